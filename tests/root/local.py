# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The module run by Ansible on this machine (-c local), and the throwaway namespaces such
runs work in: made with a veth pair, and gone afterwards with no process left holding them."""

import contextlib
import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(sys.executable)
WARNING = "[WARNING]: "


def ansible(args, interpreter=None, prefix=(), env_extra=None):
    """Run rabbit_tc_limit ad hoc; returns (rc, the host's result as a dict).

    The result's ``warnings`` are the ones Ansible printed (it takes them out of the result).
    """
    env = dict(
        os.environ,
        PATH=VENV_BIN + os.pathsep + os.environ["PATH"],
        ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"),
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_STDOUT_CALLBACK="ansible.builtin.minimal",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_CALLBACK_RESULT_FORMAT="json",
    )
    env.update(env_extra or {})
    argv = list(prefix) + [
        os.path.join(VENV_BIN, "ansible"),
        "localhost",
        "-c",
        "local",
        "-m",
        "rabbitguard.limiter.rabbit_tc_limit",
        "-a",
        args,
    ]
    if interpreter:
        argv += ["-e", "ansible_python_interpreter=%s" % interpreter]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, check=False, timeout=300)
    text = proc.stdout.decode()
    start = text.find("=> {")
    assert start >= 0, text + proc.stderr.decode()
    result = json.loads(text[start + 3 : text.rfind("}") + 1])
    printed = (text + proc.stderr.decode()).splitlines()
    result.setdefault("warnings", [])
    result["warnings"] += [line[len(WARNING) :] for line in printed if line.startswith(WARNING)]
    return proc.returncode, result


def processes_in(netns):
    """[(pid, command line)] of the processes living in the named network namespace."""
    try:
        ns = os.stat("/run/netns/%s" % netns)
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat("/proc/%s/ns/net" % entry)
            if (st.st_dev, st.st_ino) != (ns.st_dev, ns.st_ino):
                continue
            with open("/proc/%s/cmdline" % entry, "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone meanwhile
        except PermissionError:
            continue  # not ours to see (PID 1 of a container): nor one we started
        found.append((int(entry), cmdline))
    return found


def make_namespace(netns, host_end):
    """A fresh namespace with loopback up and a veth pair: ``host_end`` here, eth0 there.

    Leftovers of a run killed half-way go first: a namespace still held by a process lives
    on after ``ip netns del``, and so does the veth pair in it (its host end with it).
    """
    remove_namespace(netns, host_end)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    subprocess.run(
        ["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", netns],
        check=True,
    )
    subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "up"], check=True)


def remove_namespace(netns, host_end):
    """Delete the namespace and the veth's host end; returns the processes that were still
    living in the namespace (stopped here, by PID, so that it can go)."""
    left = processes_in(netns)
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", netns], stderr=subprocess.DEVNULL, check=False)
    subprocess.run(["ip", "link", "del", host_end], stderr=subprocess.DEVNULL, check=False)
    return left
