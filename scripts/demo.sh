#!/usr/bin/env bash
# The rabbitguard.limiter demo, from a bare Debian 12 machine, as root:
#
#   sudo scripts/demo.sh
#
#   1. scripts/setup-host.sh: packages, kernel headers, bpffs, .venv (seconds when done before)
#   2. the local lab (lab/lab.py up): three RabbitMQ hosts rabbit1..3, reachable over SSH
#   3. ansible-playbook playbooks/deploy-limiter.yml with tc_limiter_limit=DEMO_LIMIT (5)
#   4. a faulty client opens consumers without end on one connection to rabbit1 (IPv4) and
#      to rabbit2 (IPv6): each gets exactly DEMO_LIMIT, then the limiter refuses the next
#   5. ansible-playbook playbooks/limiter-status.yml: one table per host (a client holding
#      exactly DEMO_LIMIT consumers on rabbit3 shows up as a connection at the limit)
#
# The lab stays up afterwards; take it down with:  sudo /usr/bin/python3 lab/lab.py down
# Environment: DEMO_LIMIT (default 5), DEMO_ACTION (refuse, reset, drop or monitor; default refuse:
# the role's default).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIMIT="${DEMO_LIMIT:-5}"
ACTION="${DEMO_ACTION:-refuse}"
# Directories the role writes on a host: each lab host gets a private copy of them.
export RG_LAB_PRIVATE_DIRS="/etc/rabbitguard:/usr/local/lib/rabbitguard:/etc/systemd/system:/var/lib/prometheus"

step() { printf '\n\033[1m==== %s\033[0m\n' "$*"; }
die() { printf 'demo: ERROR: %s\n' "$*" >&2; exit 1; }

[[ ${EUID} -eq 0 ]] || die "run as root (sudo $0): it installs packages and creates network namespaces"
[[ ${LIMIT} =~ ^[0-9]+$ ]] || die "DEMO_LIMIT=${LIMIT}: not a number"
cd "${REPO}"
start=${SECONDS}

step "1. Set up this machine (scripts/setup-host.sh)"
bash scripts/setup-host.sh

export PATH="${REPO}/.venv/bin:${PATH}"
export ANSIBLE_CONFIG="${REPO}/ansible.cfg"
PY="${REPO}/.venv/bin/python"

step "2. The lab: three RabbitMQ hosts (lab/lab.py up)"
if ! /usr/bin/python3 lab/lab.py up; then
    die "the lab did not come up. If it runs with other settings (RG_LAB_PRIVATE_DIRS), take it
down with 'sudo /usr/bin/python3 lab/lab.py down' and run the demo again."
fi
/usr/bin/python3 lab/lab.py status

step "3. Deploy the limiter: ansible-playbook playbooks/deploy-limiter.yml -e tc_limiter_limit=${LIMIT}"
ansible-playbook playbooks/deploy-limiter.yml \
    -e "tc_limiter_limit=${LIMIT}" -e "tc_limiter_action=${ACTION}"

step "4. A faulty client opens consumers without end (limit ${LIMIT}, action ${ACTION})"
expect=(--expect "${LIMIT}")
[[ ${ACTION} == monitor ]] && expect=(--max "$((LIMIT + 3))")
"${PY}" scripts/faulty_client.py 198.18.0.11 "${expect[@]}"
"${PY}" scripts/faulty_client.py fd00:5267::12 "${expect[@]}"
if [[ ${ACTION} != monitor ]]; then
    echo "=> each client got exactly ${LIMIT} consumers: the limiter refused the next basic.consume"
fi

step "5. The fleet's state: ansible-playbook playbooks/limiter-status.yml"
# A well-behaved client holding exactly the limit on rabbit3, to show a connection at the limit.
"${PY}" scripts/faulty_client.py 198.18.0.13 --max "${LIMIT}" --hold 30 >/dev/null &
holder=$!
sleep 2
ansible-playbook playbooks/limiter-status.yml
kill "${holder}" 2>/dev/null || true
wait "${holder}" 2>/dev/null || true

step "Done in $((SECONDS - start)) s"
cat <<EOT
The lab is still up: try 'ansible rabbit -m rabbit_tc_limit_info' or
'.venv/bin/python scripts/faulty_client.py 198.18.0.12'.
Remove the limiter:   ansible-playbook playbooks/remove-limiter.yml
                      (or ad hoc: ansible rabbit -m rabbit_tc_limit -a "state=absent")
Take the lab down:    sudo /usr/bin/python3 lab/lab.py down
EOT
