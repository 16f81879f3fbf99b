#!/usr/bin/python3
"""Fleet runs on lab hosts: `ansible -m ping` beside a first deploy and a no-change deploy.

    sudo flock /tmp/rg-heavy.lock .venv/bin/python bench/fleet.py [--sizes 3,10] [--rounds 3]

For each lab size, one lab (lab/lab.py, prefix rgf, 198.18.220.0/24, with private copies of
the directories the role writes) is brought up, measured and taken down again. Each round:

* `ansible rabbit -m ansible.builtin.ping` (the baseline: SSH plus one module per host);
* `ansible-playbook playbooks/remove-limiter.yml` (not timed), and the controller's cached
  boot program removed, so that the next run starts from clean hosts;
* first deploy: `ansible-playbook playbooks/deploy-limiter.yml` with the defaults (rollout
  policy included); it must report changes on every host;
* no-change deploy: the same again; it must report changed=0 on every host.

Every timed command starts with no SSH connection open (its own ControlPath directory), as
an operator's run does, and uses the repository's ansible.cfg. The ratios are medians of the
rounds against the targets of issue 11 (no-change within 5x ping, first deploy within 15x).
By default only the first host of a lab runs RabbitMQ (`--brokers`): neither the role nor the
module talks to the broker, and twenty idle brokers on the two shared cores of the lab would
slow every column by the same measure without telling anything about the role.
"""

import argparse
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lab  # noqa: E402 - the repository's lab/ package

VENV_BIN = os.path.join(ROOT, ".venv", "bin")
PRIVATE_DIRS = ("/etc/rabbitguard", "/usr/local/lib/rabbitguard", "/etc/systemd/system")
TARGET_NOCHANGE = 5.0
TARGET_FIRST = 15.0
RECAP = re.compile(
    r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M
)


def lab_config():
    return lab.Config(
        prefix="rgf",
        subnet=220,
        state_dir="/run/rabbitguard-lab-rgf",
        extra_private_dirs=PRIVATE_DIRS,
    )


def run(argv, inventory, label):
    """Run an Ansible command with no SSH connection open; return (seconds, output)."""
    control_dir = tempfile.mkdtemp(prefix="rgf-cp-")
    env = dict(
        os.environ,
        PATH=VENV_BIN + os.pathsep + os.environ["PATH"],
        ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"),
        ANSIBLE_INVENTORY=inventory,
        ANSIBLE_SSH_CONTROL_PATH_DIR=control_dir,
        ANSIBLE_FORCE_COLOR="0",
    )
    try:
        start = time.monotonic()
        proc = subprocess.run(
            argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False
        )
        took = time.monotonic() - start
    finally:
        # Close the SSH master connections this run left (ControlPersist), then their sockets.
        for sock in glob.glob(os.path.join(control_dir, "*")):
            subprocess.run(
                ["ssh", "-o", "ControlPath=" + sock, "-O", "exit", "x"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        shutil.rmtree(control_dir, ignore_errors=True)
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit("%s failed (rc %d):\n%s" % (label, proc.returncode, out[-4000:]))
    return took, out


def recap(out, count, label, changed):
    rows = RECAP.findall(out)
    if len(rows) != count:
        raise SystemExit("%s: %d hosts in the recap, not %d:\n%s" % (label, len(rows), count, out))
    for host, _ok, n_changed, unreachable, failed in rows:
        if int(unreachable) or int(failed):
            raise SystemExit("%s: %s unreachable or failed:\n%s" % (label, host, out))
        if changed != (int(n_changed) > 0):
            raise SystemExit(
                "%s: %s reported changed=%s (expected %s):\n%s"
                % (label, host, n_changed, "some" if changed else "none", out)
            )


def playbook(name):
    return [os.path.join(VENV_BIN, "ansible-playbook"), os.path.join(ROOT, "playbooks", name)]


def measure(count, rounds, brokers):
    cfg = lab_config()
    lab.up(n=count, cfg=cfg, brokers=min(brokers, count))
    fd, inventory = tempfile.mkstemp(prefix="rgf-inventory-", suffix=".yml")
    samples = {"ping": [], "first": [], "nochange": []}
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(lab.render_inventory(cfg, count, min(brokers, count)))
        ping = [os.path.join(VENV_BIN, "ansible"), "rabbit", "-m", "ansible.builtin.ping"]
        pyz = os.path.join(ROOT, ".ansible", "tmp", "rabbitguard-reattach")
        for number in range(1, rounds + 1):
            took, _ = run(ping, inventory, "ping")
            samples["ping"].append(took)
            run(playbook("remove-limiter.yml"), inventory, "remove-limiter.yml")
            for path in glob.glob(pyz + "*"):
                os.unlink(path)
            took, out = run(playbook("deploy-limiter.yml"), inventory, "first deploy")
            recap(out, count, "first deploy", changed=True)
            samples["first"].append(took)
            took, out = run(playbook("deploy-limiter.yml"), inventory, "no-change deploy")
            recap(out, count, "no-change deploy", changed=False)
            samples["nochange"].append(took)
            print(
                "  %d hosts, round %d: ping %.2f s, first %.2f s, no-change %.2f s"
                % (count, number, samples["ping"][-1], samples["first"][-1], took),
                file=sys.stderr,
                flush=True,
            )
        run(playbook("remove-limiter.yml"), inventory, "remove-limiter.yml")
    finally:
        os.unlink(inventory)
        lab.down(cfg=cfg)
    return {key: statistics.median(values) for key, values in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="3,10", help="lab sizes, comma-separated (1-20)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--brokers",
        type=int,
        default=1,
        help="hosts of each lab that run RabbitMQ (default 1; the others only sshd)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if os.geteuid() != 0:
        raise SystemExit("bench/fleet.py: run as root (lab/lab.py)")
    results = {}
    for count in sizes:
        print("lab of %d hosts" % count, file=sys.stderr, flush=True)
        results[count] = measure(count, args.rounds, args.brokers)
    print(
        "Median of %d rounds; seconds of wall time, each run from no open SSH connection;"
        " default settings (forks 5, rollout policy of the playbook)\n" % args.rounds
    )
    print(
        "| hosts | `ansible -m ping` | first deploy | vs ping (target 15x) "
        "| no-change deploy | vs ping (target 5x) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for count, res in results.items():
        first = res["first"] / res["ping"]
        nochange = res["nochange"] / res["ping"]
        print(
            "| %d | %.2f | %.2f | %.1fx %s | %.2f | %.1fx %s |"
            % (
                count,
                res["ping"],
                res["first"],
                first,
                "met" if first <= TARGET_FIRST else "**not met**",
                res["nochange"],
                nochange,
                "met" if nochange <= TARGET_NOCHANGE else "**not met**",
            )
        )


if __name__ == "__main__":
    main()
