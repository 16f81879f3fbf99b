# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The local test lab for real (root): two hosts of a separate lab (prefix ``rgt``, subnet
250), so that a developer's default lab keeps running. The tests run in file order on one
lab: up, use it as Ansible and clients would, break it, complete it, take it down."""

import json
import os
import signal
import subprocess
import time
import uuid

import pytest

import lab
from tests.lab.common import Log, ssh

pika = pytest.importorskip("pika")

pytestmark = pytest.mark.integration

CFG = lab.Config(prefix="rgt", subnet=250, state_dir="/run/rabbitguard-lab-rgt")
N = 2


@pytest.fixture(scope="module")
def hosts():
    lab.down(cfg=CFG, log=Log())  # leftovers of an interrupted run
    try:
        yield lab.up(n=N, cfg=CFG, log=Log())
    finally:
        lab.down(cfg=CFG, log=Log())


def command(*argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


def amqp_connection(addr):
    params = pika.ConnectionParameters(
        host=addr,
        port=lab.AMQP_PORT,
        virtual_host=lab.AMQP_VHOST,
        credentials=pika.PlainCredentials(lab.AMQP_USER, lab.AMQP_PASSWORD),
        heartbeat=5,
        socket_timeout=5,
        blocked_connection_timeout=5,
        connection_attempts=1,
    )
    return pika.BlockingConnection(params)


def running(pid):
    """Is pid a live process (not gone, not a zombie waiting for its parent)?"""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def recorded_pids():
    with open(os.path.join(CFG.state_dir, "state.json"), encoding="utf-8") as handle:
        state = json.load(handle)
    pids = {"keeper": state["keeper"]["pid"]}
    for name, recs in state["hosts"].items():
        pids.update({f"{name} {comp}": rec["pid"] for comp, rec in recs.items()})
    return pids


def test_every_host_is_up(hosts):
    assert [h["name"] for h in hosts] == ["rabbit1", "rabbit2"]
    assert [e["state"] for e in lab.status(CFG)] == ["up", "up"]


def test_up_again_changes_nothing(hosts):
    before = recorded_pids()
    log = Log()
    lab.up(cfg=CFG, log=log)
    assert log == ["lab is already up: 2 hosts, nothing changed"]
    assert recorded_pids() == before


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_root_logs_in_over_ssh_on_a_host_of_its_own(hosts, family):
    for host in hosts:
        out = ssh(
            host,
            "hostname; id -u; findmnt -n -o FSTYPE /sys/fs/bpf; "
            "ip -j -4 route show default; ip -j -6 route show default",
            addr=host[family],
        ).splitlines()
        assert out[:3] == [host["name"], "0", "bpf"]
        # "The interfaces of the default routes" are eth0, via the bridge's addresses.
        (route4,), (route6,) = json.loads(out[3]), json.loads(out[4])
        assert (route4["dev"], route4["gateway"]) == ("eth0", host["gateway4"])
        assert (route6["dev"], route6["gateway"]) == ("eth0", host["gateway6"])


def test_bpffs_is_private_to_each_host(hosts):
    marker = f"rgt-{uuid.uuid4().hex[:8]}"
    ssh(hosts[0], f"mkdir /sys/fs/bpf/{marker}")
    assert marker in ssh(hosts[0], "ls /sys/fs/bpf").split()
    assert marker not in ssh(hosts[1], "ls /sys/fs/bpf").split()
    assert marker not in os.listdir("/sys/fs/bpf")


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_each_broker_takes_consumers_from_the_root_namespace(hosts, family):
    for host in hosts:
        conn = amqp_connection(host[family])
        try:
            channel = conn.channel()
            queue = channel.queue_declare(queue="", exclusive=True).method.queue
            tag = channel.basic_consume(queue, lambda *args: None, auto_ack=True)
            # The broker itself, asked inside the host as on any Debian host, sees it.
            listed = lab.run(host["name"], ["rabbitmqctl", "-q", "list_consumers"], cfg=CFG)
            assert tag in listed.stdout
            (peer,) = lab.run(
                host["name"], ["ss", "-Htn", "state", "established", "( sport = :5672 )"], cfg=CFG
            ).stdout.splitlines()
            assert host[family] in peer
        finally:
            conn.close()


def test_a_half_up_lab_is_completed(hosts):
    broker = recorded_pids()["rabbit2 rabbitmq"]
    os.kill(broker, signal.SIGKILL)
    # The kernel may close the dead broker's listening socket a moment after the process.
    deadline = time.monotonic() + 10
    while lab.status(CFG)[1]["missing"] != ["rabbitmq", "amqp"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(e["state"], e["missing"]) for e in lab.status(CFG)] == [
        ("up", []),
        ("partial", ["rabbitmq", "amqp"]),
    ]
    log = Log()
    lab.up(cfg=CFG, log=log)
    changed = [m for m in log if m.startswith(("rabbit", "started", "created"))]
    assert changed[0] == f"rabbit2: started rabbitmq (pid {recorded_pids()['rabbit2 rabbitmq']})"
    assert changed[1:] == [m for m in changed if m.startswith("rabbit2: RabbitMQ ready")]
    assert len(changed) == 2
    assert [e["state"] for e in lab.status(CFG)] == ["up", "up"]
    amqp_connection(hosts[1]["ipv6"]).close()


def test_down_leaves_nothing_behind(hosts):
    pids = recorded_pids()
    lab.down(cfg=CFG, log=Log())
    assert {label: pid for label, pid in pids.items() if running(pid)} == {}
    assert "rgt-" not in command("ip", "netns", "list")
    assert "rgt-" not in command("ip", "-br", "link")
    assert not os.path.exists(CFG.state_dir)
    assert {e["state"] for e in lab.status(CFG)} == {"down"}
