# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A bigger lab for real (root): five hosts, RabbitMQ on the first two only (prefix ``rgs``,
subnet 249), as bench/fleet.py uses it. The tests run in file order on one lab."""

import os
import socket
import subprocess
import sys

import pytest
import yaml

import lab

pytestmark = pytest.mark.integration

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = lab.Config(prefix="rgs", subnet=249, state_dir="/run/rabbitguard-lab-rgs")
N = 5
BROKERS = 2


class Log(list):
    def __call__(self, msg):
        self.append(msg)


@pytest.fixture(scope="module")
def hosts():
    lab.down(cfg=CFG, log=Log())  # leftovers of an interrupted run
    try:
        yield lab.up(n=N, cfg=CFG, log=Log(), brokers=BROKERS)
    finally:
        lab.down(cfg=CFG, log=Log())


def lab_env():
    return dict(
        os.environ,
        RG_LAB_PREFIX=CFG.prefix,
        RG_LAB_SUBNET=str(CFG.subnet),
        RG_LAB_STATE_DIR=CFG.state_dir,
    )


def ssh(host, command, addr):
    argv = [
        "ssh",
        "-i",
        host["ssh_key"],
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "LogLevel=ERROR",
        f"root@{addr}",
        command,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


def amqp_answers(addr):
    """Does something accept AMQP there (the broker answers the protocol header)?"""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect((addr, lab.AMQP_PORT))
        except ConnectionRefusedError:
            return False
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        return sock.recv(7)[:1] == b"\x01"  # a method frame: connection.start


def netns_commands(netns):
    pids = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=True
    ).stdout.split()
    names = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8") as handle:
                names.add(handle.read().strip())
        except FileNotFoundError:
            pass
    return names


def test_every_host_is_up_and_only_the_first_ones_run_rabbitmq(hosts):
    assert [h["name"] for h in hosts] == [f"rabbit{i}" for i in range(1, N + 1)]
    assert [h["rabbitmq"] for h in hosts] == [True, True, False, False, False]
    entries = lab.status(CFG)
    assert [(e["state"], e["missing"]) for e in entries] == [("up", [])] * N
    assert [sorted(e["pids"]) for e in entries] == [["epmd", "rabbitmq", "sshd"]] * 2 + [
        ["sshd"]
    ] * 3


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_every_host_is_a_host_of_its_own_over_ssh(hosts, family):
    for host in hosts:
        out = ssh(
            host, "hostname; findmnt -n -o FSTYPE /sys/fs/bpf; stat -c %a /sys/fs/bpf", host[family]
        )
        name, fstype, mode = out.split()
        assert (name, fstype) == (host["name"], "bpf")
        # Mounted mode=700, as systemd mounts it (bpffs adds the sticky bit): root's alone.
        assert int(mode, 8) & 0o777 == 0o700


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_brokers_answer_where_they_run_and_nowhere_else(hosts, family):
    assert [amqp_answers(h[family]) for h in hosts] == [True, True, False, False, False]
    for host in hosts[BROKERS:]:
        assert not netns_commands(host["netns"]) & {"epmd", "beam.smp"}


def test_up_again_changes_nothing_and_refuses_other_brokers(hosts):
    log = Log()
    lab.up(cfg=CFG, log=log)
    assert log == [f"lab is already up: {N} hosts ({BROKERS} with RabbitMQ), nothing changed"]
    with pytest.raises(lab.LabError, match=f"RabbitMQ on {BROKERS} of its hosts, not {N}"):
        lab.up(cfg=CFG, log=Log(), brokers=N)
    with pytest.raises(lab.LabError, match="lab brokers 6: use 0-5"):
        lab.up(cfg=CFG, log=Log(), brokers=6)


def test_status_command_shows_hosts_without_a_broker(hosts):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "lab", "lab.py"), "status"],
        env=lab_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(out) == N
    assert all(" up " in line for line in out)
    assert all("epmd=none rabbitmq=none" in line for line in out[BROKERS:])
    assert all("epmd=none" not in line for line in out[:BROKERS])


def test_ansible_reaches_every_host_of_the_printed_inventory(hosts, tmp_path):
    inventory = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "lab", "lab.py"), "inventory"],
        env=lab_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    group = yaml.safe_load(inventory)["all"]["children"]["rabbit"]["hosts"]
    assert {name: spec.get("rabbitguard_lab_rabbitmq", True) for name, spec in group.items()} == {
        f"rabbit{i}": i <= BROKERS for i in range(1, N + 1)
    }
    path = tmp_path / "inventory.yml"
    path.write_text(inventory, encoding="utf-8")
    venv_bin = os.path.dirname(sys.executable)
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO_ROOT, "ansible.cfg"))
    out = subprocess.run(
        [
            os.path.join(venv_bin, "ansible"),
            "rabbit",
            "-i",
            str(path),
            "-m",
            "ansible.builtin.ping",
        ],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(
        line.split()[0] for line in out.stdout.splitlines() if "SUCCESS" in line
    ) == sorted(group)


def test_down_leaves_nothing_behind(hosts):
    lab.down(cfg=CFG, log=Log())
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True)
    assert "rgs-" not in netns.stdout + links.stdout
    assert not os.path.exists(CFG.state_dir)
    assert {e["state"] for e in lab.status(CFG)} == {"down"}
