#!/usr/bin/env bash
# Prepare this Debian 12 machine to develop and test rabbitguard.limiter, from scratch.
#
# Run as root; safe to run again (a second run only checks, and takes seconds):
#   1. Debian packages: BCC, pyroute2, iproute2, RabbitMQ, OpenSSH, venv, ... Services that
#      apt installs are not left running: tests and the lab start their own brokers and
#      sshds inside network namespaces.
#   2. Kernel headers for BCC at /lib/modules/$(uname -r)/build (with a loud fallback to the
#      distro's headers when the running kernel has no headers package).
#   3. bpffs mounted at /sys/fs/bpf.
#   4. .venv in the repository (Debian's python3 with --system-site-packages, so it sees BCC
#      and pyroute2), with requirements-dev.txt installed.
#   5. collections/ansible_collections/rabbitguard/limiter -> the repository (committed; checked
#      here), so Ansible and the tests find the collection by its name; and .collections, the
#      old name of that directory, as a link to it (extensions/molecule and bench/ still use it).
#   6. One venv per ansible-core release of the CI matrix (tests/controller/ansible-core-versions.txt),
#      .venv-ansible-<major.minor>, with ansible-core from PyPI and nothing else (no system site
#      packages): a bare controller, for the bare-controller tests and ansible-test sanity.
#
# Needs no network but the Debian and PyPI package registries.
# Environment: SETUP_HOST_FORCE_APT=1 runs apt-get even when every package is installed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
REQUIREMENTS="$REPO/requirements-dev.txt"
SYSTEM_PYTHON=/usr/bin/python3
SYSTEM_SITE=/usr/lib/python3/dist-packages

log() { printf '[setup-host] %s\n' "$*"; }
warn() { printf '[setup-host] WARNING: %s\n' "$*" >&2; }
die() { printf '[setup-host] ERROR: %s\n' "$*" >&2; exit 1; }

[[ ${EUID} -eq 0 ]] || die "run as root (sudo $0): it installs packages and mounts bpffs"
if ! command -v dpkg >/dev/null || ! command -v apt-get >/dev/null; then
    die "this script supports Debian (12, bookworm) only: apt-get/dpkg not found"
fi
if [[ -r /etc/os-release ]]; then
    # shellcheck disable=SC1091
    . /etc/os-release
    if [[ "${ID:-}" != debian || "${VERSION_ID:-}" != 12 ]]; then
        warn "tested on Debian 12 only; this is ${PRETTY_NAME:-unknown}: carrying on"
    fi
fi

ARCH="$(dpkg --print-architecture)"
KREL="$(uname -r)"
export DEBIAN_FRONTEND=noninteractive

# --------------------------------------------------------------------------------------------
# 1. Debian packages
# --------------------------------------------------------------------------------------------
APT_PACKAGES=(
    python3-bpfcc bpfcc-tools          # BCC: compiles and loads the tc classifier
    python3-pyroute2                   # netlink: clsact qdisc + cls_bpf filter (0.7.2)
    python3-jinja2                     # renders the C template on managed hosts
    python3-venv python3-pip           # the .venv below
    python3-pika                       # AMQP client for the system python (demo client)
    iproute2 bridge-utils kmod procps  # ip/tc/ip netns, bridges, modprobe, ps
    iputils-ping                       # lab reachability checks
    ethtool                            # bench/broker.py: GRO and TSO on its veth pair
    rabbitmq-server                    # the broker under test (started per network namespace)
    openssh-server openssh-client      # the lab's test hosts are real SSH hosts for Ansible
    shellcheck                         # lint for scripts/ and .ci/run
    nodejs npm                         # Node amqplib, a client library the tests drive
    ca-certificates git
)
# Packages whose services apt would start; stopped and disabled if this run installs them.
SERVICE_PACKAGES=(rabbitmq-server openssh-server erlang-base)

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

APT_UPDATED=0
apt_update_once() {
    if [[ ${APT_UPDATED} -eq 0 ]]; then
        log "apt-get update"
        apt-get update -q
        APT_UPDATED=1
    fi
}

# While apt installs packages, a policy-rc.d that answers 101 keeps invoke-rc.d and
# deb-systemd-invoke from starting their services. An existing policy-rc.d is left alone.
POLICY_RC_D=/usr/sbin/policy-rc.d
POLICY_RC_D_OURS=0
block_service_starts() {
    if [[ -e ${POLICY_RC_D} ]]; then
        log "keeping the existing ${POLICY_RC_D}"
        return
    fi
    printf '#!/bin/sh\n# Written by rabbitguard scripts/setup-host.sh while apt runs; removed after.\nexit 101\n' \
        >"${POLICY_RC_D}"
    chmod 0755 "${POLICY_RC_D}"
    POLICY_RC_D_OURS=1
}
unblock_service_starts() {
    if [[ ${POLICY_RC_D_OURS} -eq 1 ]]; then
        rm -f "${POLICY_RC_D}"
        POLICY_RC_D_OURS=0
    fi
}
trap unblock_service_starts EXIT

# PIDs of epmd processes in our own network namespace (tests run theirs in other namespaces).
epmd_pids_here() {
    local pid own_ns
    own_ns="$(readlink /proc/self/ns/net)"
    for pid in $(pgrep -x epmd || true); do
        if [[ "$(readlink "/proc/${pid}/ns/net" 2>/dev/null || true)" == "${own_ns}" ]]; then
            printf '%s\n' "${pid}"
        fi
    done
}

systemd_running() { [[ -d /run/systemd/system ]]; }

# Stop and disable the services of packages this run installed.
quiesce_new_services() {
    local pkg unit
    local -a units=()
    for pkg in "$@"; do
        case "${pkg}" in
            rabbitmq-server) units+=(rabbitmq-server.service) ;;
            openssh-server) units+=(ssh.service ssh.socket) ;;
            erlang-base) units+=(epmd.socket epmd.service) ;;
        esac
    done
    [[ ${#units[@]} -gt 0 ]] || return 0
    if systemd_running; then
        for unit in "${units[@]}"; do
            if systemctl list-unit-files "${unit}" >/dev/null 2>&1; then
                log "systemctl stop + disable ${unit} (installed by this run; tests start their own)"
                systemctl stop "${unit}" || true
                systemctl disable "${unit}" >/dev/null 2>&1 || true
            fi
        done
    else
        for pkg in "$@"; do
            case "${pkg}" in
                rabbitmq-server) unit=rabbitmq-server ;;
                openssh-server) unit=ssh ;;
                *) continue ;;
            esac
            if [[ -x /etc/init.d/${unit} ]] && service "${unit}" status >/dev/null 2>&1; then
                log "service ${unit} stop (installed by this run; tests start their own)"
                service "${unit}" stop || true
            fi
        done
    fi
}

install_packages() {
    local pkg
    local -a missing=() new_services=() epmd_before=() epmd_after=()
    for pkg in "${APT_PACKAGES[@]}"; do
        is_installed "${pkg}" && continue
        # NodeSource's nodejs ships npm itself and conflicts with Debian's npm package.
        if [[ ${pkg} == npm ]] && command -v npm >/dev/null 2>&1; then
            continue
        fi
        missing+=("${pkg}")
    done
    if [[ ${#missing[@]} -eq 0 && "${SETUP_HOST_FORCE_APT:-0}" != 1 ]]; then
        log "Debian packages: all ${#APT_PACKAGES[@]} installed"
        return
    fi
    for pkg in "${SERVICE_PACKAGES[@]}"; do
        is_installed "${pkg}" || new_services+=("${pkg}")
    done
    mapfile -t epmd_before < <(epmd_pids_here)

    # Only what is missing: packages already here are not upgraded behind the user's back.
    [[ ${#missing[@]} -gt 0 ]] || missing=("${APT_PACKAGES[@]}")
    apt_update_once
    log "apt-get install ${missing[*]}"
    block_service_starts
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    unblock_service_starts

    # Services of packages new to this machine: stopped, disabled.
    local -a installed_now=()
    for pkg in "${new_services[@]}"; do
        is_installed "${pkg}" && installed_now+=("${pkg}")
    done
    quiesce_new_services "${installed_now[@]}"
    # An epmd that appeared in our namespace during the install was started by it: end it by
    # its PID (never by name: tests run other epmds in their own namespaces).
    mapfile -t epmd_after < <(epmd_pids_here)
    for pid in "${epmd_after[@]}"; do
        if [[ " ${epmd_before[*]} " != *" ${pid} "* ]]; then
            log "stopping epmd (pid ${pid}) left by the package install"
            kill "${pid}" 2>/dev/null || true
        fi
    done
}

# --------------------------------------------------------------------------------------------
# 2. Kernel headers for BCC
# --------------------------------------------------------------------------------------------
newest_headers_dir() {
    # Newest /usr/src/linux-headers-<version>-<arch>, by version order.
    find /usr/src -maxdepth 1 -type d -name "linux-headers-*-${ARCH}" -printf '%f\n' 2>/dev/null \
        | sort -V | tail -n 1
}

setup_kernel_headers() {
    local moddir="/lib/modules/${KREL}" build hdr common
    build="${moddir}/build"

    # Headers made for this very kernel (package or real tree): nothing to do.
    if [[ -d ${build}/include && ! -L ${build} ]] \
        || [[ -L ${build} && -d ${build}/include && "$(readlink -f "${build}")" == *"${KREL}"* ]]; then
        log "kernel headers: ${build} matches the running kernel ${KREL}"
        return
    fi

    # Our fallback link from an earlier run: keep it if it still points at the newest tree.
    hdr="$(newest_headers_dir)"
    if [[ -z ${hdr} || ! -L ${build} || ! -d ${build}/include ]]; then
        apt_update_once
        if apt-cache show "linux-headers-${KREL}" >/dev/null 2>&1; then
            log "apt-get install linux-headers-${KREL}"
            apt-get install -y -q --no-install-recommends "linux-headers-${KREL}"
            if [[ -d ${build}/include ]]; then
                log "kernel headers: ${build} from linux-headers-${KREL}"
                return
            fi
            warn "linux-headers-${KREL} did not provide ${build}; falling back to the distro headers"
        fi
        log "apt-get install linux-headers-${ARCH} (no headers package for kernel ${KREL})"
        apt-get install -y -q --no-install-recommends "linux-headers-${ARCH}"
        hdr="$(newest_headers_dir)"
    fi
    [[ -n ${hdr} ]] || die "no /usr/src/linux-headers-*-${ARCH} after installing linux-headers-${ARCH}"
    common="/usr/src/${hdr%-"${ARCH}"}-common"
    [[ -d ${common} ]] || die "${common} is missing (it comes with /usr/src/${hdr})"

    if [[ -e ${build} && ! -L ${build} ]]; then
        die "${build} exists and is not a symlink; not replacing it"
    fi
    mkdir -p "${moddir}"
    [[ "$(readlink "${build}" 2>/dev/null || true)" == "/usr/src/${hdr}" ]] \
        || ln -sfn "/usr/src/${hdr}" "${build}"
    if [[ ! -e ${moddir}/source || -L ${moddir}/source ]]; then
        [[ "$(readlink "${moddir}/source" 2>/dev/null || true)" == "${common}" ]] \
            || ln -sfn "${common}" "${moddir}/source"
    fi
    warn "************************************************************************************"
    warn "KERNEL HEADERS FALLBACK IN USE: the running kernel ${KREL} has no headers package,"
    warn "so ${build} -> /usr/src/${hdr} and ${moddir}/source -> ${common}"
    warn "(Debian's linux-headers-${ARCH}). This is safe for rabbitguard's tc classifier: it"
    warn "uses only UAPI types (uapi/linux/*.h: the stable kernel ABI) and BPF helpers, and no"
    warn "kernel-internal struct layouts. It is NOT safe for kprobes or kernel modules."
    warn "************************************************************************************"
}

# --------------------------------------------------------------------------------------------
# 3. bpffs
# --------------------------------------------------------------------------------------------
setup_bpffs() {
    if findmnt -rn -t bpf /sys/fs/bpf >/dev/null 2>&1; then
        log "bpffs: mounted at /sys/fs/bpf"
        return
    fi
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf
    log "bpffs: mounted at /sys/fs/bpf"
}

# --------------------------------------------------------------------------------------------
# 4. .venv with the development requirements
# --------------------------------------------------------------------------------------------
venv_is_usable() {
    [[ -x ${VENV}/bin/python && -f ${VENV}/pyvenv.cfg ]] || return 1
    grep -qx 'include-system-site-packages = true' "${VENV}/pyvenv.cfg" || return 1
    grep -qx 'home = /usr/bin' "${VENV}/pyvenv.cfg" || return 1
    "${VENV}/bin/python" -c 'import sys; sys.exit(0)' 2>/dev/null
}

setup_venv() {
    if ! venv_is_usable; then
        if [[ -e ${VENV} ]]; then
            log "recreating ${VENV}: it was not made by ${SYSTEM_PYTHON} --system-site-packages"
            rm -rf "${VENV}"
        fi
        log "${SYSTEM_PYTHON} -m venv --system-site-packages ${VENV}"
        "${SYSTEM_PYTHON}" -m venv --system-site-packages "${VENV}"
    fi

    # Skip pip when this exact requirements file is already installed in this exact venv.
    local stamp="${VENV}/.rabbitguard-requirements.sha256" want
    want="$(cat "${REQUIREMENTS}" "${VENV}/pyvenv.cfg" | sha256sum | cut -d' ' -f1)"
    if [[ -f ${stamp} && "$(cat "${stamp}")" == "${want}" ]]; then
        log "venv: ${VENV} has requirements-dev.txt installed"
    else
        log "venv: pip install -r requirements-dev.txt"
        # Never pip-install pyroute2 or bcc: both come from Debian (see requirements-dev.txt).
        if grep -Eiq '^[[:space:]]*(bcc|pyroute2)([^a-z0-9_.-]|$)' "${REQUIREMENTS}"; then
            die "requirements-dev.txt names bcc or pyroute2; both must come from Debian"
        fi
        local pip_log="${VENV}/pip-install.log"
        if ! "${VENV}/bin/python" -m pip install --require-virtualenv -r "${REQUIREMENTS}" \
            >"${pip_log}" 2>&1; then
            tail -n 40 "${pip_log}" >&2
            die "pip install -r requirements-dev.txt failed; full log: ${pip_log}"
        fi
        printf '%s\n' "${want}" >"${stamp}"
    fi

    # BCC and pyroute2 must be Debian's (a pip-installed one in the venv would shadow them).
    "${VENV}/bin/python" - "${SYSTEM_SITE}" <<'PY'
import sys

system_site = sys.argv[1]
for name in ("bcc", "pyroute2"):
    try:
        mod = __import__(name)
    except Exception as exc:  # report any import failure with its cause
        sys.exit("[setup-host] ERROR: .venv cannot import %s: %s" % (name, exc))
    if not mod.__file__.startswith(system_site + "/"):
        sys.exit("[setup-host] ERROR: .venv imports %s from %s, not Debian's %s: "
                 "pip uninstall it from .venv" % (name, mod.__file__, system_site))
PY
    log "venv: $("${VENV}/bin/python" -c 'import sys, importlib.metadata as m; print("python %d.%d.%d" % sys.version_info[:3], *("| %s %s" % (d, m.version(d)) for d in ("ansible-core", "bcc", "pyroute2")))') (bcc, pyroute2 from Debian)"
}

# ansible-test sanity/units bootstrap pip in their own venvs with a script they download, which
# fails offline: a cached stand-in that uses ensurepip does the same job.
setup_ansible_test_pip_bootstrap() {
    local pyreq pip_version cache
    pyreq="$(find "${VENV}"/lib/python3*/site-packages/ansible_test/_internal -name python_requirements.py 2>/dev/null | head -n 1)"
    [[ -n ${pyreq} ]] || return 0
    pip_version="$(sed -n "s/^[[:space:]]*pip='\([0-9.]*\)',\$/\1/p" "${pyreq}" | head -n 1)"
    [[ -n ${pip_version} ]] || return 0
    cache="${HOME:-/root}/.ansible/test/cache/get_pip_${pip_version//./_}.py"
    if [[ ! -f ${cache} ]]; then
        mkdir -p "$(dirname "${cache}")"
        printf '# Offline stand-in for get-pip %s (rabbitguard scripts/setup-host.sh).\nimport ensurepip\nensurepip.bootstrap(upgrade=True)\n' \
            "${pip_version}" >"${cache}"
        log "ansible-test: offline pip bootstrap stand-in at ${cache}"
    fi
}

# --------------------------------------------------------------------------------------------
# 5. The collection under its name
# --------------------------------------------------------------------------------------------
setup_collection_link() {
    local parent="${REPO}/collections/ansible_collections/rabbitguard"
    # Committed to git; made again only if a checkout lost it. Relative, so the link survives
    # moving the clone.
    if [[ ! -L ${parent}/limiter ]]; then
        mkdir -p "${parent}"
        ln -sfn ../../.. "${parent}/limiter"
    fi
    [[ -f ${parent}/limiter/galaxy.yml ]] || die "${parent}/limiter does not lead to the repository"
    log "collection: ${parent}/limiter -> ${REPO}"
    # The old, untracked name of the same directory: a link, so both lead to the working tree.
    local legacy="${REPO}/.collections"
    if [[ -d ${legacy} && ! -L ${legacy} ]]; then
        # The symlink tree that earlier versions of this script made: nothing else lives there.
        rm -rf "${legacy}"
    fi
    [[ "$(readlink "${legacy}" 2>/dev/null || true)" == collections ]] || ln -sfn collections "${legacy}"
}

# --------------------------------------------------------------------------------------------
# 6. Bare-controller venvs: ansible-core and nothing else, one per release of the CI matrix
# --------------------------------------------------------------------------------------------
ANSIBLE_MATRIX="${REPO}/tests/controller/ansible-core-versions.txt"

setup_matrix_venvs() {
    local version venv stamp
    while read -r version; do
        [[ -n ${version} && ${version} != \#* ]] || continue
        venv="${REPO}/.venv-ansible-${version%.*}"
        stamp="${venv}/.rabbitguard-ansible-core"
        if [[ -x ${venv}/bin/ansible && -f ${stamp} && "$(cat "${stamp}")" == "${version}" ]] \
            && grep -qx 'include-system-site-packages = false' "${venv}/pyvenv.cfg"; then
            log "bare venv: ${venv} has ansible-core ${version}"
        else
            install_bare_venv "${venv}" "${version}"
        fi
        # ansible-test of this release bootstraps pip in its own venvs too.
        VENV="${venv}" setup_ansible_test_pip_bootstrap
    done <"${ANSIBLE_MATRIX}"
}

install_bare_venv() { # install_bare_venv DIR VERSION
    local venv=$1 version=$2
    rm -rf "${venv}"
    log "bare venv: ${SYSTEM_PYTHON} -m venv ${venv}; pip install ansible-core==${version}"
    "${SYSTEM_PYTHON}" -m venv "${venv}"
    if ! "${venv}/bin/python" -m pip install --require-virtualenv -q "ansible-core==${version}" \
        >"${venv}/pip-install.log" 2>&1; then
        tail -n 40 "${venv}/pip-install.log" >&2
        die "pip install ansible-core==${version} into ${venv} failed"
    fi
    printf '%s\n' "${version}" >"${venv}/.rabbitguard-ansible-core"
}

# Node client libraries for the integration tests (tests/node/package.json: amqplib), from
# the npm registry into tests/node/node_modules; skipped when already there.
setup_node_clients() {
    local dir="${REPO}/tests/node"
    if [[ -f "${dir}/node_modules/amqplib/package.json" ]]; then
        log "node: amqplib $(node -p "require('${dir}/node_modules/amqplib/package.json').version")"
        return
    fi
    log "node: npm install (tests/node)"
    (cd "${dir}" && npm install --no-audit --no-fund --loglevel=error) \
        || die "npm install in tests/node failed"
}

install_packages
setup_kernel_headers
setup_bpffs
setup_venv
setup_ansible_test_pip_bootstrap
setup_collection_link
setup_matrix_venvs
setup_node_clients
log "done: activate with 'source .venv/bin/activate', or run scripts/run-tests.sh"
