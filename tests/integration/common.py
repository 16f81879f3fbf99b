# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the integration tests share: the lab's settings, looking at a host (tc, pins, the
broker's own view), and running the modules through Ansible (tests.lib.ansible_run)."""

import contextlib
import json
import os
import time

import pytest

import lab
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from tests.lib.ansible_run import INFO, LIMIT, REPO_ROOT

# The module's host lock directory (_constants.LOCK_DIR) is per host, as on real hosts,
# instead of one lock shared by every lab host and every lab on this machine.
CFG = lab.Config(
    prefix="rgi",
    subnet=240,
    state_dir="/run/rabbitguard-lab-rgi",
    extra_private_dirs=(C.LOCK_DIR,),
)
N_HOSTS = 2
QUEUE = "rgi-q"
PIN_ROOT = C.DEFAULT_PIN_ROOT
IFACE = "eth0"
PREF, HANDLE = C.FILTER_PREF, C.FILTER_HANDLE
HOST = "rabbit1"  # the host of the tests that need only one


# ---------------------------------------------------------------------------------------------
# Looking at a host
# ---------------------------------------------------------------------------------------------
def run(host, argv, check=True):
    """argv inside the lab host (its netns and its mount namespace, so its own bpffs)."""
    return lab.run(host, argv, cfg=CFG, check=check, timeout=60)


def tc_filters(host, dev=IFACE, hook="ingress"):
    return run(host, ["tc", "filter", "show", "dev", dev, hook]).stdout


def tc_qdiscs(host, dev=IFACE):
    return run(host, ["tc", "qdisc", "show", "dev", dev]).stdout


def delete_our_filter(host):
    """The limiter's ingress filter deleted by hand (tc filter del at its pref and handle)."""
    argv = ["tc", "filter", "del", "dev", IFACE, "ingress", "pref", str(PREF)]
    run(host, argv + ["handle", hex(HANDLE), "bpf"])


def add_foreign_filter(host, pref, handle, protocol="all"):
    """Another tool's classifier on IFACE's ingress: classic BPF "return 0" (passes
    everything)."""
    argv = ["tc", "filter", "add", "dev", IFACE, "ingress", "protocol", protocol]
    run(host, argv + ["pref", str(pref), "handle", str(handle), "bpf", "bytecode", "1,6 0 0 0"])


def pins(host):
    """Every path under the pin root (empty when there is none)."""
    proc = run(host, ["find", PIN_ROOT], check=False)
    return sorted(proc.stdout.split())


def snapshot(host):
    """What the limiter leaves on a host: filters (with program ids), qdiscs, pins."""
    return {"filters": tc_filters(host), "qdiscs": tc_qdiscs(host), "pins": pins(host)}


def broker_connections(host):
    """{client port: {"name": connection_name, "channels": {n: consumers}}} as the broker
    lists them (rabbitmqctl on the host)."""
    out = run(
        host,
        [
            "sh",
            "-c",
            "rabbitmqctl -q --formatter json list_connections name peer_port "
            "client_properties && echo @@ && rabbitmqctl -q --formatter json "
            "list_channels name consumer_count",
        ],
    ).stdout
    conns_text, chans_text = out.split("@@")
    by_name = {}
    for conn in json.loads(conns_text):
        props = dict((p[0], p[2]) for p in conn["client_properties"])
        by_name[conn["name"]] = {
            "port": conn["peer_port"],
            "channels": {},
            "name": props.get("connection_name"),
        }
    for chan in json.loads(chans_text):
        conn_name, _sp, number = chan["name"].rpartition(" (")
        if conn_name in by_name:
            by_name[conn_name]["channels"][int(number.rstrip(")"))] = chan["consumer_count"]
    return dict((c["port"], c) for c in by_name.values())


def broker_consumers(host, client):
    """How many consumers the broker holds for this client's connection (None: no such
    connection)."""
    conn = broker_connections(host).get(client.local_port)
    return None if conn is None else sum(conn["channels"].values())


def delete_queue(host, name, check=True):
    """Delete a queue on the host's broker (the broker cancels its consumers: basic.cancel
    to clients that take it)."""
    run(host, ["rabbitmqctl", "-q", "delete_queue", name], check=check)


@contextlib.contextmanager
def deleted_after(host, names):
    """Every queue of names deleted at the end (those that are still there)."""
    try:
        yield names
    finally:
        for name in names:
            delete_queue(host, name, check=False)


def wait_for(predicate, timeout, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Running the modules
# ---------------------------------------------------------------------------------------------
def eth0(result, ns="host"):
    """The per-interface entry of a rabbit_tc_limit result."""
    return result["interfaces"][ns][IFACE]


# What the last successful run of rabbit_tc_limit (not in check mode) deployed, per host.
_deployed = {}


def deploy(ansible, host, diff=False, **args):
    """rabbit_tc_limit state=present with args; asserts it did not fail."""
    result = ansible.run(host, LIMIT, diff=diff, **args)
    assert not result.get("failed"), result
    _deployed[host] = args
    return result


def ensure(ansible, host, **args):
    """deploy() unless this session's last deploy on host had these very args."""
    if _deployed.get(host) != args:
        deploy(ansible, host, **args)


def forget(*hosts):
    """The host was changed behind deploy()'s back (by hand, by a group run)."""
    for host in hosts:
        _deployed.pop(host, None)


def limited_host(limit, action, host=HOST):
    """A test module's ``limited`` fixture: host limited to limit consumers with action
    (deployed once while the session's last deploy there had other options: ensure);
    the fixture's value is the lab's host dict.

    ``limited = limited_host(3, "reset")`` at a test module's top level."""

    @pytest.fixture
    def limited(ansible, lab_hosts, queues):
        ensure(ansible, host, limit=limit, action=action)
        return lab_hosts[host]

    return limited


def remove(ansible, host):
    result = ansible.run(host, LIMIT, state="absent")
    assert not result.get("failed"), result
    forget(host)
    return result


def info(ansible, host, **args):
    result = ansible.run(host, INFO, **args)
    assert not result.get("failed"), result
    assert result["changed"] is False
    return result


def limiter_entry(info_result, iface=IFACE):
    (entry,) = [e for e in info_result["limiters"] if e["interface"] == iface]
    return entry


def connection_of(entry, client):
    """The info module's entry for this client's connection, or None."""
    found = [c for c in entry["connections"] if c["client_port"] == client.local_port]
    assert len(found) <= 1, found
    return found[0] if found else None


def status_table(ansible, host):
    """The table playbooks/limiter-status.yml prints for host (its debug task's msg)."""
    proc, records = ansible.playbook(
        os.path.join(REPO_ROOT, "playbooks", "limiter-status.yml"), "-l", host
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    (text,) = [
        r["result"]["msg"]
        for r in records
        if r["host"] == host and "rabbitguard limiter on" in str(r["result"].get("msg", ""))
    ]
    return text
