# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The local test lab (lab/lab.py) without root: names, addresses, rendered files."""

import os
import subprocess
import sys

import pytest
import yaml

import lab
from lab import lab as labmod

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INVENTORY = os.path.join(REPO_ROOT, "inventory", "hosts.yml")
LAB_PY = os.path.join(REPO_ROOT, "lab", "lab.py")


def test_default_lab_names_and_addresses():
    cfg = lab.Config()
    hosts = [h.__dict__ for h in cfg.hosts(3)]
    assert [(h["name"], h["netns"], h["veth"], h["ipv4"], h["ipv6"]) for h in hosts] == [
        ("rabbit1", "rg-rabbit1", "rg-veth1", "198.18.0.11", "fd00:5267::11"),
        ("rabbit2", "rg-rabbit2", "rg-veth2", "198.18.0.12", "fd00:5267::12"),
        ("rabbit3", "rg-rabbit3", "rg-veth3", "198.18.0.13", "fd00:5267::13"),
    ]
    assert (cfg.bridge, cfg.gateway4, cfg.gateway6) == ("rg-br0", "198.18.0.1", "fd00:5267::1")
    assert cfg.ssh_key == "/run/rabbitguard-lab/id_ed25519"


def test_environment_selects_a_separate_lab():
    cfg = lab.Config.from_env({"RG_LAB_PREFIX": "mol1", "RG_LAB_SUBNET": "7"})
    host = cfg.host(2)
    assert (host.netns, host.veth, cfg.bridge) == ("mol1-rabbit2", "mol1-veth2", "mol1-br0")
    assert (host.ipv4, host.ipv6) == ("198.18.7.12", "fd00:5267:0:7::12")
    assert cfg.state_dir == "/run/rabbitguard-lab-mol1"
    assert lab.Config.from_env({"RG_LAB_STATE_DIR": "/tmp/x"}).state_dir == "/tmp/x"
    assert lab.Config.from_env({}) == lab.Config()


@pytest.mark.parametrize(
    "env",
    [
        {"RG_LAB_PREFIX": "RG"},
        {"RG_LAB_PREFIX": "toolong7"},
        {"RG_LAB_PREFIX": "1rg"},
        {"RG_LAB_SUBNET": "256"},
        {"RG_LAB_SUBNET": "x"},
        {"RG_LAB_STATE_DIR": "relative/dir"},
    ],
)
def test_bad_configuration_is_refused_with_the_reason(env):
    with pytest.raises(lab.LabError, match="RG_LAB|prefix|subnet|state dir"):
        lab.Config.from_env(env)


def test_every_address_stays_in_the_lab_ranges_and_names_fit_the_kernel_limit():
    import ipaddress

    v4 = ipaddress.ip_network("198.18.0.0/15")
    v6 = ipaddress.ip_network("fd00::/8")
    for subnet in (0, 255):
        cfg = lab.Config(prefix="abcdef", subnet=subnet)
        assert ipaddress.ip_address(cfg.gateway4) in v4
        assert ipaddress.ip_address(cfg.gateway6) in v6
        for host in cfg.hosts(labmod.MAX_COUNT):
            assert ipaddress.ip_address(host.ipv4) in v4
            assert ipaddress.ip_address(host.ipv6) in v6
            assert len(host.veth) <= 15 and len(cfg.bridge) <= 15
    with pytest.raises(lab.LabError):
        lab.Config().hosts(labmod.MAX_COUNT + 1)


def test_builtin_inventory_is_the_rendered_default_lab():
    with open(INVENTORY, encoding="utf-8") as handle:
        assert handle.read() == lab.render_inventory(lab.Config(), 3), (
            "inventory/hosts.yml is out of date: /usr/bin/python3 lab/lab.py inventory "
            "> inventory/hosts.yml"
        )


def test_inventory_gives_ansible_what_it_needs_to_reach_each_host():
    with open(INVENTORY, encoding="utf-8") as handle:
        inv = yaml.safe_load(handle)
    group = inv["all"]["children"]["rabbit"]
    assert list(group["hosts"]) == ["rabbit1", "rabbit2", "rabbit3"]
    for spec, host in zip(group["hosts"].values(), lab.hosts(n=3, cfg=lab.Config())):
        assert spec["ansible_host"] == host["ipv4"]
        assert spec["rabbitguard_lab_ipv6"] == host["ipv6"]
        assert spec["rabbitguard_lab_netns"] == host["netns"]
    common = group["vars"]
    assert common["ansible_user"] == "root"
    assert common["ansible_ssh_private_key_file"] == lab.Config().ssh_key
    assert common["ansible_python_interpreter"] == "/usr/bin/python3"
    assert "StrictHostKeyChecking=no" in common["ansible_ssh_common_args"]
    assert "UserKnownHostsFile=/dev/null" in common["ansible_ssh_common_args"]
    assert (common["rabbitguard_lab_amqp_user"], common["rabbitguard_lab_amqp_password"]) == (
        lab.AMQP_USER,
        lab.AMQP_PASSWORD,
    )
    assert common["rabbitguard_lab_amqp_port"] == lab.AMQP_PORT


def test_inventory_command_prints_the_inventory_of_the_configured_lab(tmp_path):
    env = dict(os.environ, RG_LAB_PREFIX="mol2", RG_LAB_SUBNET="9", RG_LAB_STATE_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, LAB_PY, "inventory", "-n", "2"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    inv = yaml.safe_load(out)
    hosts = inv["all"]["children"]["rabbit"]["hosts"]
    assert {name: h["ansible_host"] for name, h in hosts.items()} == {
        "rabbit1": "198.18.9.11",
        "rabbit2": "198.18.9.12",
    }
    assert hosts["rabbit2"]["rabbitguard_lab_netns"] == "mol2-rabbit2"
    key = inv["all"]["children"]["rabbit"]["vars"]["ansible_ssh_private_key_file"]
    assert key == str(tmp_path / "id_ed25519")


def test_sshd_allows_only_the_lab_key_for_root_on_both_addresses():
    cfg = lab.Config()
    text = labmod.render_sshd_config(cfg, cfg.host(1))
    lines = set(text.splitlines())
    assert {"ListenAddress 198.18.0.11", "ListenAddress fd00:5267::11"} <= lines
    assert "PermitRootLogin prohibit-password" in lines
    assert "PasswordAuthentication no" in lines
    assert f"AuthorizedKeysFile {cfg.state_dir}/authorized_keys" in lines
    assert f"HostKey {cfg.state_dir}/ssh_host_ed25519_key" in lines


def test_broker_config_creates_the_documented_user_and_listens_on_both_families():
    cfg = lab.Config()
    conf = dict(
        line.split(" = ", 1)
        for line in labmod.render_rabbitmq_conf(cfg.host(1)).splitlines()
        if " = " in line and not line.startswith("#")
    )
    assert conf["listeners.tcp.default"] == str(lab.AMQP_PORT)
    assert (conf["default_user"], conf["default_pass"]) == (lab.AMQP_USER, lab.AMQP_PASSWORD)
    assert conf["default_vhost"] == lab.AMQP_VHOST
    assert all(conf[f"default_permissions.{p}"] == ".*" for p in ("configure", "read", "write"))
    env = labmod.render_rabbitmq_env(cfg.host(1))
    assert f"NODENAME={lab.RABBITMQ_NODE}" in env.splitlines()


def test_host_file_names_every_lab_host_on_both_families():
    cfg = lab.Config()
    text = labmod.render_hosts_file(cfg, cfg.host(2), 3, "127.0.0.1 localhost\n")
    lines = text.splitlines()
    assert lines[0] == "127.0.0.1 localhost"
    assert "127.0.1.1 rabbit2" in lines
    assert "198.18.0.13 rabbit3" in lines and "fd00:5267::13 rabbit3" in lines


def test_a_recorded_process_is_alive_only_with_its_start_time():
    state, _ppid, start = labmod._proc_stat(os.getpid())
    assert state in "RS"
    assert labmod._alive({"pid": os.getpid(), "start": start})
    assert not labmod._alive({"pid": os.getpid(), "start": start + 1})  # a reused PID
    assert not labmod._alive(None)


def test_hosts_lists_what_a_test_needs_without_root(tmp_path):
    cfg = lab.Config(state_dir=str(tmp_path))
    hosts = lab.hosts(cfg=cfg)
    assert [h["name"] for h in hosts] == ["rabbit1", "rabbit2", "rabbit3"]
    first = hosts[0]
    assert first["ssh_key"] == str(tmp_path / "id_ed25519")
    assert (first["interface"], first["amqp_port"], first["rabbitmq_node"]) == (
        "eth0",
        5672,
        "rabbit@localhost",
    )


def test_private_dirs_are_bind_mounted_in_every_host_from_its_own_copy():
    cfg = lab.Config.from_env({"RG_LAB_PRIVATE_DIRS": "/etc/rabbitguard:/usr/local/lib/rg/:"})
    assert cfg.extra_private_dirs == ("/etc/rabbitguard", "/usr/local/lib/rg")
    host = cfg.host(3)
    script = labmod._host_init_argv(cfg, host)[-1]
    for path in (
        "/etc/rabbitmq",
        "/var/lib/rabbitmq",
        "/var/log/rabbitmq",
        "/etc/rabbitguard",
        "/usr/local/lib/rg",
    ):
        assert f"mount --bind {host.private_dir(path)} {path};" in script
    assert host.private_dir("/etc/rabbitguard") == f"{cfg.state_dir}/rabbit3/etc-rabbitguard"
    # mode 700, as systemd mounts it
    assert "mount -t bpf -o mode=700 bpf /sys/fs/bpf;" in script
    assert script.endswith(f"exec /usr/sbin/sshd -D -e -f {host.dir}/sshd_config")


@pytest.mark.parametrize("dirs", ["relative/dir", "/", "/proc", "/etc/a b", "/etc/$(x)"])
def test_unsafe_private_dirs_are_refused(dirs):
    with pytest.raises(lab.LabError, match="private dir"):
        lab.Config.from_env({"RG_LAB_PRIVATE_DIRS": dirs})


def test_hosts_past_the_brokers_run_only_sshd():
    assert labmod.components(1, 2) == ("sshd", "epmd", "rabbitmq")
    assert labmod.components(2, 2) == ("sshd", "epmd", "rabbitmq")
    assert labmod.components(3, 2) == ("sshd",)
    assert labmod.components(1, 0) == ("sshd",)


def test_twenty_hosts_get_distinct_names_and_addresses_in_the_lab_ranges():
    import ipaddress

    hosts = lab.Config().hosts(20)
    for attr in ("name", "netns", "veth", "ipv4", "ipv6", "dir"):
        assert len({getattr(h, attr) for h in hosts}) == 20, attr
    assert hosts[-1].ipv4 == "198.18.0.30" and hosts[-1].name == "rabbit20"
    assert all(ipaddress.ip_address(h.ipv4) in ipaddress.ip_network("198.18.0.0/24") for h in hosts)
    assert all(
        ipaddress.ip_address(h.ipv6) in ipaddress.ip_network("fd00:5267::/64") for h in hosts
    )


def test_inventory_marks_the_hosts_without_a_broker():
    inv = yaml.safe_load(lab.render_inventory(lab.Config(), 20, 1))
    hosts = inv["all"]["children"]["rabbit"]["hosts"]
    assert len(hosts) == 20
    assert "rabbitguard_lab_rabbitmq" not in hosts["rabbit1"]
    assert all(hosts[f"rabbit{i}"]["rabbitguard_lab_rabbitmq"] is False for i in range(2, 21))
    # All hosts with a broker (the default): the inventory is the one without the option.
    assert lab.render_inventory(lab.Config(), 3, 3) == lab.render_inventory(lab.Config(), 3)


def test_host_dicts_say_which_hosts_run_rabbitmq(tmp_path):
    cfg = lab.Config(state_dir=str(tmp_path))
    assert [h["rabbitmq"] for h in lab.hosts(n=4, cfg=cfg)] == [True] * 4
    (tmp_path / "state.json").write_text('{"count": 4, "brokers": 1}', encoding="utf-8")
    assert [h["rabbitmq"] for h in lab.hosts(cfg=cfg)] == [True, False, False, False]
    # A lab made before brokers were counted runs RabbitMQ on every host.
    (tmp_path / "state.json").write_text('{"count": 2}', encoding="utf-8")
    assert [h["rabbitmq"] for h in lab.hosts(cfg=cfg)] == [True, True]


def test_up_command_takes_the_number_of_brokers():
    out = subprocess.run(
        [sys.executable, LAB_PY, "up", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--brokers K" in out and "--hosts" in out
