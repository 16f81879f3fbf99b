#!/usr/bin/python3
"""Wall time and peak RSS of rabbit_tc_limit runs, side by side with the same Ansible run of
ansible.builtin.command "true" (the baseline), in one run.

    sudo .venv/bin/python bench/module.py [--rounds N]

Every step is one `ansible localhost -c local` invocation against a throwaway network
namespace (rgbench, 198.18.251.0/24), so Ansible's own start-up is in every number,
baseline included. Peak RSS is the largest process of the run (controller or module), from
getrusage(RUSAGE_CHILDREN) of a fresh helper process per step.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETNS = "rgbench"
PIN_DIR = "/sys/fs/bpf/rgbench"
VENV_BIN = os.path.join(ROOT, ".venv", "bin")

# Runs one command and prints its wall time and the peak RSS of its process tree.
_MEASURE = r"""
import json, resource, subprocess, sys, time
start = time.monotonic()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
wall = time.monotonic() - start
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": proc.returncode, "wall": wall, "rss_kib": rss,
                  "out": proc.stdout.decode()[-2000:]}))
"""


def sh(*argv):
    subprocess.run(argv, check=True)


def setup():
    teardown()
    sh("ip", "netns", "add", NETNS)
    sh("ip", "link", "add", "rgbench0", "type", "veth", "peer", "name", "eth0", "netns", NETNS)
    sh("ip", "-n", NETNS, "link", "set", "eth0", "up")
    sh("ip", "-n", NETNS, "addr", "add", "198.18.251.2/24", "dev", "eth0")


def teardown():
    subprocess.run(["ip", "netns", "del", NETNS], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "link", "del", "rgbench0"], stderr=subprocess.DEVNULL)
    shutil.rmtree(PIN_DIR, ignore_errors=True)


def ansible(module, args):
    env = dict(
        os.environ,
        PATH=VENV_BIN + os.pathsep + os.environ["PATH"],
        ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"),
    )
    argv = [
        os.path.join(VENV_BIN, "ansible"),
        "localhost",
        "-c",
        "local",
        "-o",
        "-m",
        module,
        "-a",
        args,
    ]
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE] + argv,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        check=True,
    ).stdout
    result = json.loads(out)
    if result["rc"] != 0:
        raise SystemExit("%s %s failed:\n%s" % (module, args, result["out"]))
    return result


def limiter(extra):
    return "netns=%s interfaces=eth0 pin_dir=%s %s" % (NETNS, PIN_DIR, extra)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    steps = [
        ("first apply", "rabbitguard.limiter.rabbit_tc_limit", limiter("limit=3")),
        ("no-change re-apply", "rabbitguard.limiter.rabbit_tc_limit", limiter("limit=3")),
        ("limit change", "rabbitguard.limiter.rabbit_tc_limit", limiter("limit=5")),
        (
            "absent",
            "rabbitguard.limiter.rabbit_tc_limit",
            "state=absent netns=%s interfaces=eth0 pin_dir=%s" % (NETNS, PIN_DIR),
        ),
    ]
    baseline = ("baseline: command true", "ansible.builtin.command", "true")
    samples = {name: [] for name, _m, _a in [baseline] + steps}
    setup()
    try:
        for _round in range(args.rounds):
            for name, module, module_args in [baseline] + steps:
                samples[name].append(ansible(module, module_args))
            time.sleep(0.2)
    finally:
        teardown()

    base_wall = statistics.median(s["wall"] for s in samples[baseline[0]])
    base_rss = statistics.median(s["rss_kib"] for s in samples[baseline[0]])
    print("Median of %d rounds; each row is one `ansible localhost -c local` run\n" % args.rounds)
    print("| step | wall s | vs baseline | peak RSS MiB | vs baseline |")
    print("|---|---:|---:|---:|---:|")
    for name in samples:
        wall = statistics.median(s["wall"] for s in samples[name])
        rss = statistics.median(s["rss_kib"] for s in samples[name])
        print(
            "| %s | %.2f | %.2fx | %.0f | %.2fx |"
            % (name, wall, wall / base_wall, rss / 1024.0, rss / base_rss)
        )


if __name__ == "__main__":
    main()
