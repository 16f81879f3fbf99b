#!/usr/bin/python3
# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Local test lab for rabbitguard.limiter: RabbitMQ hosts in network namespaces.

Each lab host ``rabbitN`` is a small, real, SSH-reachable Linux host on this machine:

* a network namespace ``<prefix>-rabbitN`` whose ``eth0`` is one end of a veth pair; the other
  end (``<prefix>-vethN``) sits on the bridge ``<prefix>-br0`` in the root namespace, which holds
  the gateway addresses (198.18.S.1/24, fd00:5267:0:S::1/64, S = subnet index, 0 by default);
  the host has 198.18.S.(10+N)/24 and fd00:5267:0:S::(10+N)/64 and default routes via the bridge;
* its own mount namespace (from ``ip netns exec``, which also mounts a sysfs of that network
  namespace) holding a private bpffs at /sys/fs/bpf and private bind mounts over
  /etc/rabbitmq, /var/lib/rabbitmq and /var/log/rabbitmq, plus its own UTS namespace
  (hostname ``rabbitN``) and /etc/hosts;
* its own sshd (root login with the lab key only) on port 22 of both addresses;
* its own epmd and RabbitMQ node ``rabbit@localhost`` (the Debian package, run as the
  ``rabbitmq`` user) in those namespaces, listening on 0.0.0.0:5672 and [::]:5672, with the
  AMQP user from ``AMQP_USER``/``AMQP_PASSWORD`` created at first boot (``default_user``).

Every process of the lab is started by a small keeper process (``_keeper``) that is a child
subreaper: it reaps every daemon and every orphan of a daemon, because PID 1 on the machines we
test on does not reap adopted orphans. Processes are stopped by their recorded PID and start
time (state.json in the state dir), never by name.

Use it as a command (root)::

    /usr/bin/python3 lab/lab.py up [-n 3]     # idempotent: completes a half-up lab
    /usr/bin/python3 lab/lab.py up -n 20 --brokers 1   # RabbitMQ on rabbit1 only
    /usr/bin/python3 lab/lab.py status        # one line per host; exit 0 when all are up
    /usr/bin/python3 lab/lab.py down          # stops everything, removes every trace
    /usr/bin/python3 lab/lab.py inventory     # Ansible inventory for this lab (YAML)
    /usr/bin/python3 lab/lab.py ssh rabbit1 [command...]

or as a library (pytest fixtures, Molecule create/destroy)::

    import lab            # the lab/ package from the repository root
    hosts = lab.up(n=3)   # list of dicts: name, netns, ipv4, ipv6, ssh_key, amqp_user, ...
    lab.up(n=20, brokers=1)   # twenty hosts, RabbitMQ on the first only
    lab.down()
    with lab.running(n=3) as hosts:   # up, and down afterwards unless it was up before
        ...

Environment (so that several labs can run side by side, e.g. a Molecule scenario next to the
default lab): ``RG_LAB_PREFIX`` (default ``rg``: 1-6 lowercase letters and digits),
``RG_LAB_SUBNET`` (0-255, default 0), ``RG_LAB_STATE_DIR`` (default /run/rabbitguard-lab, or
/run/rabbitguard-lab-<prefix> for another prefix), ``RG_LAB_PRIVATE_DIRS`` (colon-separated
absolute directories that each host gets a private copy of, e.g. where a role writes files
that must not land on this machine or be shared between hosts). Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import ipaddress
import json
import os
import pwd
import re
import resource
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time

__all__ = [
    "AMQP_PASSWORD",
    "AMQP_PORT",
    "AMQP_USER",
    "AMQP_VHOST",
    "Config",
    "LabError",
    "RABBITMQ_NODE",
    "down",
    "hosts",
    "render_inventory",
    "run",
    "running",
    "status",
    "up",
]

DEFAULT_PREFIX = "rg"
DEFAULT_STATE_DIR = "/run/rabbitguard-lab"
DEFAULT_COUNT = 3
MAX_COUNT = 50
HOST_NAME = "rabbit{}"
IFACE = "eth0"

AMQP_PORT = 5672
AMQP_USER = "rguser"
AMQP_PASSWORD = "rgpass"
AMQP_VHOST = "/"
RABBITMQ_NODE = "rabbit@localhost"

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
EPMD = "/usr/bin/epmd"
SSHD = "/usr/sbin/sshd"
# Host directories replaced by a private per-host directory inside each lab host (the broker's;
# rabbitmq-server's package makes them on this machine).
PRIVATE_DIRS = ("/etc/rabbitmq", "/var/lib/rabbitmq", "/var/log/rabbitmq")
# Private in every lab host too, made as a mountpoint here when missing (like the extra dirs):
# the limiter's runtime directory, which holds its host lock. Each lab host keeps its own, as
# real hosts do, so that runs on different lab hosts never queue behind one another's lock.
RUNTIME_DIRS = ("/run/rabbitguard",)


def _dir_mode(path: str) -> int:
    """The mode a directory made here gets: the limiter's runtime directory is root's alone
    (0700, as the module makes it: a lab that made it 0755 first would leave this machine's
    lock directory unlike a real host's), other mountpoints 0755."""
    return 0o700 if path in RUNTIME_DIRS else 0o755


SSHD_TIMEOUT = 10.0
EPMD_TIMEOUT = 10.0
BROKER_TIMEOUT = 120.0
# Brokers starting at once: each takes about 5 s of CPU to boot, so twenty at once on two cores
# would all crawl and time out together; a sliding window of this many keeps every core busy
# and each start short (the next one starts as soon as one is ready).
BROKER_PARALLEL = max(2, 2 * (os.cpu_count() or 1))
STOP_TIMEOUT = 30.0
KEEPER_SOCKET = "keeper.sock"
NOFILE = 65536
PR_SET_CHILD_SUBREAPER = 36

# Busy-waiting schedulers would burn CPU on idle nodes (three on two cores slow every test).
# RabbitMQ 3.10 already defaults to none; kept explicit, as other versions differ.
ERL_ADDITIONAL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none"


class LabError(Exception):
    """Something the lab could not do; the message says what and to what."""


def _log(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


class _Changes(list):
    """What up() changed, each logged as it happens; empty means "nothing to do"."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def add(self, what: str) -> None:
        self.log(what)
        self.append(what)


# --------------------------------------------------------------------------------------------
# Configuration and names
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Names and addresses of one lab. ``Config.from_env()`` reads ``RG_LAB_*``."""

    prefix: str = DEFAULT_PREFIX
    subnet: int = 0
    state_dir: str = DEFAULT_STATE_DIR
    # More directories of this machine that each host sees as a private copy (bind mounts).
    extra_private_dirs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", self.prefix):
            raise LabError(
                f"lab prefix {self.prefix!r}: use 1-6 lowercase letters or digits, letter first"
            )
        if not 0 <= self.subnet <= 255:
            raise LabError(f"lab subnet index {self.subnet}: use 0-255")
        if not os.path.isabs(self.state_dir):
            raise LabError(f"lab state dir {self.state_dir!r}: must be an absolute path")
        for path in self.extra_private_dirs:
            if (
                not os.path.isabs(path)
                or os.path.normpath(path) in ("/", "/proc", "/sys", "/dev")
                or not re.fullmatch(r"[A-Za-z0-9_./+-]+", path)
            ):
                raise LabError(
                    f"lab private dir {path!r}: use an absolute path (not /, /proc, "
                    "/sys, /dev) of letters, digits and _./+-"
                )

    @classmethod
    def from_env(cls, environ: dict | None = None) -> Config:
        env = os.environ if environ is None else environ
        prefix = env.get("RG_LAB_PREFIX") or DEFAULT_PREFIX
        subnet_text = env.get("RG_LAB_SUBNET") or "0"
        try:
            subnet = int(subnet_text)
        except ValueError:
            raise LabError(f"RG_LAB_SUBNET={subnet_text!r}: not an integer") from None
        default_dir = DEFAULT_STATE_DIR
        if prefix != DEFAULT_PREFIX:
            default_dir = f"{DEFAULT_STATE_DIR}-{prefix}"
        state_dir = env.get("RG_LAB_STATE_DIR") or default_dir
        extra = tuple(
            os.path.normpath(p) for p in (env.get("RG_LAB_PRIVATE_DIRS") or "").split(":") if p
        )
        return cls(prefix=prefix, subnet=subnet, state_dir=state_dir, extra_private_dirs=extra)

    @property
    def local_private_dirs(self) -> tuple[str, ...]:
        """The private dirs beyond the broker's: mountpoints made here when missing."""
        extra = tuple(p for p in self.extra_private_dirs if p not in PRIVATE_DIRS + RUNTIME_DIRS)
        return RUNTIME_DIRS + extra

    @property
    def private_dirs(self) -> tuple[str, ...]:
        return PRIVATE_DIRS + self.local_private_dirs

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br0"

    @property
    def gateway4(self) -> str:
        return f"198.18.{self.subnet}.1"

    @property
    def gateway6(self) -> str:
        return str(ipaddress.IPv6Address(f"fd00:5267:0:{self.subnet:x}::1"))

    @property
    def ssh_key(self) -> str:
        return os.path.join(self.state_dir, "id_ed25519")

    @property
    def lock_file(self) -> str:
        return self.state_dir.rstrip("/") + ".lock"

    @property
    def state_file(self) -> str:
        return os.path.join(self.state_dir, "state.json")

    def host(self, index: int) -> Host:
        if not 1 <= index <= MAX_COUNT:
            raise LabError(f"lab host index {index}: use 1-{MAX_COUNT}")
        name = HOST_NAME.format(index)
        return Host(
            index=index,
            name=name,
            netns=f"{self.prefix}-{name}",
            veth=f"{self.prefix}-veth{index}",
            ipv4=f"198.18.{self.subnet}.{10 + index}",
            ipv6=str(ipaddress.IPv6Address(f"fd00:5267:0:{self.subnet:x}::{10 + index}")),
            dir=os.path.join(self.state_dir, name),
        )

    def hosts(self, count: int) -> list[Host]:
        if not 1 <= count <= MAX_COUNT:
            raise LabError(f"lab host count {count}: use 1-{MAX_COUNT}")
        return [self.host(i) for i in range(1, count + 1)]


@dataclasses.dataclass(frozen=True)
class Host:
    index: int
    name: str
    netns: str
    veth: str
    ipv4: str
    ipv6: str
    dir: str

    def private_dir(self, path: str) -> str:
        """Per-host source directory bind-mounted over ``path`` inside the host."""
        return os.path.join(self.dir, path.strip("/").replace("/", "-"))


def components(index: int, brokers: int) -> tuple[str, ...]:
    """The daemons of lab host ``index`` when the first ``brokers`` hosts run RabbitMQ."""
    return COMPONENTS if index <= brokers else COMPONENTS[:1]


def _host_dict(cfg: Config, host: Host, brokers: int = MAX_COUNT) -> dict:
    return {
        "name": host.name,
        "netns": host.netns,
        "interface": IFACE,
        "ipv4": host.ipv4,
        "ipv6": host.ipv6,
        "ipv4_prefixlen": 24,
        "ipv6_prefixlen": 64,
        "gateway4": cfg.gateway4,
        "gateway6": cfg.gateway6,
        "bridge": cfg.bridge,
        "ssh_user": "root",
        "ssh_port": 22,
        "ssh_key": cfg.ssh_key,
        "amqp_port": AMQP_PORT,
        "amqp_user": AMQP_USER,
        "amqp_password": AMQP_PASSWORD,
        "amqp_vhost": AMQP_VHOST,
        "rabbitmq_node": RABBITMQ_NODE,
        "rabbitmq": host.index <= brokers,
    }


# --------------------------------------------------------------------------------------------
# Rendered files
# --------------------------------------------------------------------------------------------


def render_sshd_config(cfg: Config, host: Host) -> str:
    return f"""\
# rabbitguard lab host {host.name} (generated by lab/lab.py)
Port 22
ListenAddress {host.ipv4}
ListenAddress {host.ipv6}
HostKey {cfg.state_dir}/ssh_host_ed25519_key
PidFile none
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile {cfg.state_dir}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
X11Forwarding no
PrintMotd no
PrintLastLog no
AcceptEnv LANG LC_*
MaxStartups 100:30:200
MaxSessions 100
Subsystem sftp internal-sftp
"""


def render_rabbitmq_conf(host: Host) -> str:
    return f"""\
# rabbitguard lab host {host.name} (generated by lab/lab.py)
listeners.tcp.default = {AMQP_PORT}
# Created at first boot with full permissions on the default vhost; guest is not created.
default_vhost = {AMQP_VHOST}
default_user = {AMQP_USER}
default_pass = {AMQP_PASSWORD}
default_user_tags.administrator = true
default_permissions.configure = .*
default_permissions.read = .*
default_permissions.write = .*
log.console = false
log.file.level = info
"""


def render_rabbitmq_env(host: Host) -> str:
    return f"""\
# rabbitguard lab host {host.name} (generated by lab/lab.py); read by rabbitmq-server and the CLI
NODENAME={RABBITMQ_NODE}
MNESIA_BASE=/var/lib/rabbitmq/mnesia
LOG_BASE=/var/log/rabbitmq
CONFIG_FILE=/etc/rabbitmq/rabbitmq.conf
ENABLED_PLUGINS_FILE=/etc/rabbitmq/enabled_plugins
SERVER_ADDITIONAL_ERL_ARGS="{ERL_ADDITIONAL_ARGS}"
"""


def render_hosts_file(cfg: Config, host: Host, count: int, base: str) -> str:
    lines = [base.rstrip("\n"), f"# rabbitguard lab host {host.name} (generated by lab/lab.py)"]
    lines.append(f"127.0.1.1 {host.name}")
    for other in cfg.hosts(count):
        lines.append(f"{other.ipv4} {other.name}")
        lines.append(f"{other.ipv6} {other.name}")
    return "\n".join(lines) + "\n"


def render_ssh_config(cfg: Config, count: int) -> str:
    out = ["# rabbitguard lab (generated by lab/lab.py): ssh -F THIS_FILE rabbit1"]
    for host in cfg.hosts(count):
        out += [
            f"Host {host.name}",
            f"    HostName {host.ipv4}",
            "    User root",
            f"    IdentityFile {cfg.ssh_key}",
            "    IdentitiesOnly yes",
            "    UserKnownHostsFile /dev/null",
            "    StrictHostKeyChecking no",
            "    LogLevel ERROR",
        ]
    return "\n".join(out) + "\n"


def render_inventory(
    cfg: Config | None = None, count: int = DEFAULT_COUNT, brokers: int | None = None
) -> str:
    """Ansible YAML inventory for the lab: group ``rabbit`` with rabbit1..N.

    Hosts past the first ``brokers`` (default: all) run no RabbitMQ and say so with
    ``rabbitguard_lab_rabbitmq: false``."""
    cfg = cfg or Config.from_env()
    brokers = count if brokers is None else brokers
    out = [
        "---",
        "# Local test lab of rabbitguard.limiter: `/usr/bin/python3 lab/lab.py up` (as root)",
        "# brings these hosts up (network namespaces on this machine), `... down` removes them.",
        "# Generated by `lab/lab.py inventory`; tests/lab checks that it stays in sync.",
        f"# RabbitMQ on every host: node {RABBITMQ_NODE}, AMQP on port {AMQP_PORT} (IPv4, IPv6);",
        "# the AMQP user below is the broker's default_user (full permissions on vhost /;",
        "# no guest user). Inside a host `rabbitmqctl <command>` works as on any Debian host.",
        "all:",
        "  children:",
        "    rabbit:",
        "      hosts:",
    ]
    for host in cfg.hosts(count):
        out += [
            f"        {host.name}:",
            f"          ansible_host: {host.ipv4}",
            f"          rabbitguard_lab_ipv4: {host.ipv4}",
            f'          rabbitguard_lab_ipv6: "{host.ipv6}"',
            f"          rabbitguard_lab_netns: {host.netns}",
        ]
        if host.index > brokers:
            out.append("          rabbitguard_lab_rabbitmq: false")
    out += [
        "      vars:",
        "        ansible_user: root",
        f"        ansible_ssh_private_key_file: {cfg.ssh_key}",
        "        ansible_python_interpreter: /usr/bin/python3",
        "        ansible_ssh_common_args: >-",
        "          -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no -o LogLevel=ERROR",
        f"        rabbitguard_lab_interface: {IFACE}",
        f"        rabbitguard_lab_bridge: {cfg.bridge}",
        f"        rabbitguard_lab_gateway4: {cfg.gateway4}",
        f'        rabbitguard_lab_gateway6: "{cfg.gateway6}"',
        f"        rabbitguard_lab_amqp_port: {AMQP_PORT}",
        f"        rabbitguard_lab_amqp_user: {AMQP_USER}",
        f"        rabbitguard_lab_amqp_password: {AMQP_PASSWORD}",
        f'        rabbitguard_lab_amqp_vhost: "{AMQP_VHOST}"',
        f'        rabbitguard_lab_rabbitmq_node: "{RABBITMQ_NODE}"',
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Small system helpers
# --------------------------------------------------------------------------------------------


def _cmd(
    argv: list[str],
    check: bool = True,
    timeout: float = 60.0,
    env: dict | None = None,
    what: str | None = None,
) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except FileNotFoundError:
        raise LabError(f"{what or 'running ' + argv[0]}: {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{what or ' '.join(argv)}: no answer in {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"{what or ' '.join(argv)}: exit {proc.returncode}: {detail}")
    return proc


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _cmd(["ip", *args], check=check)


def _ip_json(*args: str) -> list:
    proc = _ip("-j", *args, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    return json.loads(proc.stdout)


def _netns_list() -> list[str]:
    return [entry["name"] for entry in _ip_json("netns", "list")]


def _link_exists(name: str, netns: str | None = None) -> bool:
    args = (["-n", netns] if netns else []) + ["link", "show", "dev", name]
    return _ip(*args, check=False).returncode == 0


def _write_if_changed(path: str, text: str, mode: int = 0o644) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text:
                return False
    except FileNotFoundError:
        pass
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def _set_sysctl(path: str, value: str) -> None:
    """Write a /proc/sys file of the root namespace if its value differs."""
    with open(path, "r+", encoding="ascii") as handle:
        if handle.read().strip() != value:
            handle.seek(0)
            handle.write(value + "\n")


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time in clock ticks) of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            data = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[19])


def _alive(rec: dict | None) -> bool:
    """Is the recorded process (pid + start time) still running (not a zombie)?"""
    if not rec:
        return False
    stat = _proc_stat(rec["pid"])
    if stat is None or stat[2] != rec["start"]:
        return False
    if stat[0] not in ("Z", "X"):
        return True
    # A zombie thread-group leader whose other threads are still exiting still holds its files
    # (a broker's listening socket): it is gone only when no other thread is left.
    try:
        return os.listdir(f"/proc/{rec['pid']}/task") != [str(rec["pid"])]
    except FileNotFoundError:
        return False


def _netns_inode(netns: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{netns}").st_ino
    except FileNotFoundError:
        return None


def _proc_netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat and stat[1] == pid:
                kids.append(int(entry))
    return kids


def _tcp_open(addr: str, port: int, timeout: float = 0.5) -> bool:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((addr, port))
        except OSError:
            return False
    return True


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:]).rstrip()
    except FileNotFoundError:
        return "(no log)"


@contextlib.contextmanager
def _locked(cfg: Config):
    os.makedirs(os.path.dirname(cfg.lock_file), exist_ok=True)
    with open(cfg.lock_file, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another lab command holding {cfg.lock_file}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, mounts, sshd)")


def _check_prerequisites() -> None:
    missing = []
    for tool, package in (
        ("ip", "iproute2"),
        ("ssh-keygen", "openssh-client"),
        ("nsenter", "util-linux"),
        ("setpriv", "util-linux"),
        ("unshare", "util-linux"),
        ("mount", "mount"),
        ("sysctl", "procps"),
    ):
        if shutil.which(tool) is None:
            missing.append(f"{tool} ({package})")
    for path, package in (
        (SSHD, "openssh-server"),
        (RABBITMQ_SERVER, "rabbitmq-server"),
        (RABBITMQCTL, "rabbitmq-server"),
        (EPMD, "erlang-base"),
    ):
        if not os.access(path, os.X_OK):
            missing.append(f"{path} ({package})")
    for path in PRIVATE_DIRS:
        if not os.path.isdir(path):
            missing.append(f"{path} (rabbitmq-server)")
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        missing.append("user rabbitmq (rabbitmq-server)")
    try:
        pwd.getpwnam("sshd")
    except KeyError:
        missing.append("user sshd (openssh-server)")
    if missing:
        raise LabError(
            "missing prerequisites: " + ", ".join(missing) + "; install them with "
            "apt-get install iproute2 openssh-server rabbitmq-server util-linux procps"
        )


# --------------------------------------------------------------------------------------------
# State (recorded PIDs)
# --------------------------------------------------------------------------------------------

COMPONENTS = ("sshd", "epmd", "rabbitmq")


def _load_state(cfg: Config) -> dict:
    try:
        with open(cfg.state_file, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {}
    except PermissionError:
        raise LabError(f"reading {cfg.state_file}: permission denied (run as root)") from None
    except json.JSONDecodeError as exc:
        raise LabError(f"reading {cfg.state_file}: {exc}; run `lab.py down` to clean up") from None


def _save_state(cfg: Config, state: dict) -> None:
    _write_if_changed(cfg.state_file, json.dumps(state, indent=2, sort_keys=True) + "\n", 0o600)


# --------------------------------------------------------------------------------------------
# Keeper: parent and child subreaper of every lab process
# --------------------------------------------------------------------------------------------


def _keeper_main(state_dir: str) -> int:
    """Spawn lab daemons on request and reap them (and their orphans) until SIGTERM."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"keeper: prctl(PR_SET_CHILD_SUBREAPER): errno {ctypes.get_errno()}", file=sys.stderr)
        return 1
    # Daemons inherit this: brokers and sshd sessions should not run out of descriptors at the
    # caller's (often 1024) soft limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    path = os.path.join(state_dir, KEEPER_SOCKET)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)
    server.listen(16)
    server.settimeout(0.5)
    spawned: dict[int, subprocess.Popen] = {}

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            popen = spawned.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            if popen is not None:
                popen.returncode = code
            how = f"signal {-code}" if code < 0 else f"exit {code}"
            print(
                f"keeper: reaped {pid} ({'lab daemon' if popen else 'orphan'}): {how}",
                file=sys.stderr,
                flush=True,
            )

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            request = json.loads(stream.readline())
            reply: dict
            if request.get("op") == "spawn":
                with open(request["log"], "ab") as logf:
                    try:
                        popen = subprocess.Popen(  # noqa: S603 - argv comes from lab.py itself
                            request["argv"],
                            env=request["env"],
                            stdin=subprocess.DEVNULL,
                            stdout=logf,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                            close_fds=True,
                        )
                    except OSError as exc:
                        reply = {"error": f"{request['argv'][0]}: {exc}"}
                    else:
                        spawned[popen.pid] = popen
                        stat = _proc_stat(popen.pid)
                        reply = {"pid": popen.pid, "start": stat[2] if stat else 0}
                        print(
                            f"keeper: spawned {popen.pid}: {' '.join(request['argv'])}",
                            file=sys.stderr,
                            flush=True,
                        )
            else:
                reply = {"pid": os.getpid()}
            stream.write(json.dumps(reply).encode() + b"\n")
            stream.flush()

    while not stopping.is_set():
        reap()
        try:
            conn, _ = server.accept()
        except (TimeoutError, socket.timeout):
            if not os.path.exists(path):
                # The state dir is gone (removed without down()): nobody can reach us any more.
                print("keeper: socket removed, stopping", file=sys.stderr, flush=True)
                stopping.set()
            continue
        except InterruptedError:
            continue
        try:
            handle(conn)
        except (OSError, ValueError, KeyError) as exc:
            print(f"keeper: bad request: {exc}", file=sys.stderr, flush=True)
    server.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    # Whatever is left (ssh sessions, orphans of daemons) is ours: end it and reap it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reap()
        kids = _children(os.getpid())
        if not kids:
            break
        for kid in kids:
            print(f"keeper: killing leftover child {kid}", file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)
        time.sleep(0.1)
    reap()
    return 0


class _Keeper:
    def __init__(self, cfg: Config, rec: dict):
        self.cfg = cfg
        self.rec = rec

    def _call(self, request: dict) -> dict:
        path = os.path.join(self.cfg.state_dir, KEEPER_SOCKET)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            with sock.makefile("rwb") as stream:
                stream.write(json.dumps(request).encode() + b"\n")
                stream.flush()
                reply = json.loads(stream.readline())
        if "error" in reply:
            raise LabError(f"keeper could not start {reply['error']}")
        return reply

    def ping(self) -> bool:
        try:
            return self._call({"op": "ping"}).get("pid") == self.rec["pid"]
        except (OSError, ValueError, LabError):
            return False

    def spawn(self, argv: list[str], env: dict, log: str) -> dict:
        reply = self._call({"op": "spawn", "argv": argv, "env": env, "log": log})
        return {"pid": reply["pid"], "start": reply["start"]}


def _start_keeper(cfg: Config) -> _Keeper:
    log = open(os.path.join(cfg.state_dir, "keeper.log"), "ab")  # noqa: SIM115 - handed to child
    with log:
        popen = subprocess.Popen(  # noqa: S603
            [sys.executable, os.path.abspath(__file__), "_keeper", cfg.state_dir],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + 10
    stat = None
    while time.monotonic() < deadline:
        stat = _proc_stat(popen.pid)
        keeper = _Keeper(cfg, {"pid": popen.pid, "start": stat[2] if stat else 0})
        if keeper.ping():
            return keeper
        if popen.poll() is not None:
            break
        time.sleep(0.05)
    log_path = os.path.join(cfg.state_dir, "keeper.log")
    raise LabError(f"lab keeper did not start; log {log_path}:\n{_tail(log_path)}")


# --------------------------------------------------------------------------------------------
# Building a lab
# --------------------------------------------------------------------------------------------


def _ensure_mountpoints(cfg: Config, state: dict, changes: _Changes) -> None:
    """Extra private dirs need a mountpoint on this machine; down() removes the ones made here."""
    made = state.setdefault("made_dirs", [])
    for path in cfg.local_private_dirs:
        if not os.path.isdir(path):
            missing = path
            while not os.path.isdir(os.path.dirname(missing)):
                missing = os.path.dirname(missing)
            os.makedirs(path, mode=_dir_mode(path))
            os.chmod(path, _dir_mode(path))  # makedirs' mode goes through the umask
            made.append(missing)
            changes.add(f"created {path} (mountpoint of the hosts' private copies)")


def _ensure_files(cfg: Config, hosts_: list[Host], count: int, changes: _Changes) -> set[str]:
    """State dir, keys, per-host config; returns the names of hosts whose config changed."""
    if not os.path.isdir(cfg.state_dir):
        os.makedirs(cfg.state_dir, mode=0o700)
        changes.add(f"created {cfg.state_dir}")
    os.chmod(cfg.state_dir, 0o700)
    host_key = os.path.join(cfg.state_dir, "ssh_host_ed25519_key")
    for key, comment in ((cfg.ssh_key, "rabbitguard-lab"), (host_key, "rabbitguard-lab-host")):
        if not os.path.exists(key):
            _cmd(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", key],
                what=f"generating {key}",
            )
            changes.add(f"generated {key}")
    with open(cfg.ssh_key + ".pub", encoding="utf-8") as handle:
        if _write_if_changed(os.path.join(cfg.state_dir, "authorized_keys"), handle.read(), 0o600):
            changes.add("wrote authorized_keys")
    _write_if_changed(os.path.join(cfg.state_dir, "ssh_config"), render_ssh_config(cfg, count))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir

    rabbit = pwd.getpwnam("rabbitmq")
    with open("/etc/hosts", encoding="utf-8") as handle:
        base_hosts = handle.read()
    dirty = set()
    for host in hosts_:
        os.makedirs(host.dir, mode=0o755, exist_ok=True)
        for path in cfg.local_private_dirs:
            copy = host.private_dir(path)
            if not os.path.isdir(copy):
                # The host starts from what this machine has there; then it is the host's own.
                if os.path.isdir(path):
                    shutil.copytree(path, copy, symlinks=True)
                else:
                    os.makedirs(copy, mode=_dir_mode(path))
                changes.add(f"{host.name}: private copy of {path}")
        etc, lib, logdir = (host.private_dir(p) for p in PRIVATE_DIRS)
        for path in (etc, lib, os.path.join(lib, "mnesia"), logdir):
            os.makedirs(path, mode=0o755, exist_ok=True)
        for path in (lib, os.path.join(lib, "mnesia"), logdir):
            os.chown(path, rabbit.pw_uid, rabbit.pw_gid)
        cookie = os.path.join(lib, ".erlang.cookie")
        if not os.path.exists(cookie):
            with open(cookie, "w", encoding="ascii") as handle:
                handle.write("".join(secrets.choice(string.ascii_uppercase) for _ in range(20)))
            os.chmod(cookie, 0o400)
            os.chown(cookie, rabbit.pw_uid, rabbit.pw_gid)
        files = {
            os.path.join(host.dir, "sshd_config"): render_sshd_config(cfg, host),
            os.path.join(host.dir, "hosts"): render_hosts_file(cfg, host, count, base_hosts),
            os.path.join(etc, "rabbitmq.conf"): render_rabbitmq_conf(host),
            os.path.join(etc, "rabbitmq-env.conf"): render_rabbitmq_env(host),
            os.path.join(etc, "enabled_plugins"): "[].\n",
        }
        wrote = [_write_if_changed(path, text) for path, text in files.items()]
        if any(wrote):
            dirty.add(host.name)
            changes.add(f"{host.name}: wrote configuration")
    return dirty


def _ensure_network(cfg: Config, hosts_: list[Host], changes: _Changes) -> None:
    br = cfg.bridge
    if not _link_exists(br):
        _ip("link", "add", br, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        changes.add(f"created bridge {br}")
    _set_sysctl(f"/proc/sys/net/ipv6/conf/{br}/accept_dad", "0")
    addrs = {
        (a["local"], a["prefixlen"])
        for link in _ip_json("addr", "show", "dev", br)
        for a in link.get("addr_info", [])
    }
    for addr, plen, extra in ((cfg.gateway4, 24, ()), (cfg.gateway6, 64, ("nodad",))):
        if (addr, plen) not in addrs:
            _ip("addr", "replace", f"{addr}/{plen}", "dev", br, *extra)
            changes.add(f"{br}: added {addr}/{plen}")
    if "UP" not in (_ip_json("link", "show", "dev", br) or [{}])[0].get("flags", []):
        _ip("link", "set", br, "up")
        changes.add(f"{br}: up")

    existing = set(_netns_list())
    for host in hosts_:
        ns = host.netns
        if ns not in existing:
            _ip("netns", "add", ns)
            changes.add(f"created netns {ns}")
        # Before eth0 exists, so that it inherits "no DAD": addresses usable at once.
        _cmd(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
            what=f"{ns}: disabling IPv6 DAD",
        )
        veth_here, eth_there = _link_exists(host.veth), _link_exists(IFACE, ns)
        if not (veth_here and eth_there):
            # Half a pair (e.g. the netns was deleted and recreated): start over with a new pair.
            if veth_here:
                _ip("link", "del", host.veth)
            if eth_there:
                _ip("-n", ns, "link", "del", IFACE)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", IFACE, "netns", ns)
            changes.add(f"created veth {host.veth} <-> {ns}:{IFACE}")
        _set_sysctl(f"/proc/sys/net/ipv6/conf/{host.veth}/accept_dad", "0")
        link = (_ip_json("link", "show", "dev", host.veth) or [{}])[0]
        if link.get("master") != br or "UP" not in link.get("flags", []):
            _ip("link", "set", host.veth, "master", br, "up")
            changes.add(f"{host.veth}: on {br}, up")
        inner = {entry["ifname"]: entry for entry in _ip_json("-n", ns, "addr", "show")}
        if "UP" not in inner.get("lo", {}).get("flags", []):
            _ip("-n", ns, "link", "set", "lo", "up")
            changes.add(f"{ns}: lo up")
        eth = inner.get(IFACE, {})
        have = {(a["local"], a["prefixlen"]) for a in eth.get("addr_info", [])}
        for addr, plen, extra in ((host.ipv4, 24, ()), (host.ipv6, 64, ("nodad",))):
            if (addr, plen) not in have:
                _ip("-n", ns, "addr", "replace", f"{addr}/{plen}", "dev", IFACE, *extra)
                changes.add(f"{ns}: added {addr}/{plen}")
        if "UP" not in eth.get("flags", []):
            _ip("-n", ns, "link", "set", IFACE, "up")
            changes.add(f"{ns}: {IFACE} up")
        for family, gateway in (("-4", cfg.gateway4), ("-6", cfg.gateway6)):
            routes = _ip_json("-n", ns, family, "route", "show", "default")
            if not any(r.get("gateway") == gateway and r.get("dev") == IFACE for r in routes):
                _ip("-n", ns, family, "route", "replace", "default", "via", gateway, "dev", IFACE)
                changes.add(f"{ns}: default route {family} via {gateway}")


def _component_ok(rec: dict | None, netns: str) -> bool:
    return _alive(rec) and _proc_netns_inode(rec["pid"]) == _netns_inode(netns)


def _signal_group(rec: dict, sig: int) -> None:
    """Signal a recorded process and its process group (it leads one: start_new_session)."""
    if not _alive(rec):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(rec["pid"], sig)
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec["pid"], sig)


def _stop_records(recs: list[tuple[str, dict]], timeout: float, log) -> None:
    """SIGTERM each recorded process group, wait, then SIGKILL what is left."""
    live = [(label, rec) for label, rec in recs if _alive(rec)]
    for _, rec in live:
        _signal_group(rec, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(rec) for _, rec in live):
        time.sleep(0.1)
    for label, rec in live:
        if _alive(rec):
            log(f"{label} (pid {rec['pid']}) ignored SIGTERM for {timeout:.0f} s: SIGKILL")
            _signal_group(rec, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(rec) for _, rec in live):
        time.sleep(0.05)
    for label, rec in live:
        if _alive(rec):
            raise LabError(f"could not stop {label} (pid {rec['pid']})")


def _in_host(sshd_pid: int, user: str | None, argv: list[str]) -> list[str]:
    """argv run in a host's network, mount and UTS namespaces (those of its sshd)."""
    prefix = ["nsenter", "-t", str(sshd_pid), "-n", "-m", "-u", "--"]
    if user:
        prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]
    return prefix + argv


def _rabbit_env() -> dict:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/var/lib/rabbitmq",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "RABBITMQ_NODENAME": RABBITMQ_NODE,
        "RABBITMQ_MNESIA_BASE": "/var/lib/rabbitmq/mnesia",
        "RABBITMQ_LOG_BASE": "/var/log/rabbitmq",
        "RABBITMQ_CONFIG_FILE": "/etc/rabbitmq/rabbitmq.conf",
        "RABBITMQ_ENABLED_PLUGINS_FILE": "/etc/rabbitmq/enabled_plugins",
        "RABBITMQ_CONF_ENV_FILE": "/etc/rabbitmq/rabbitmq-env.conf",
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_ADDITIONAL_ARGS,
        # Makes the start script exec erl: the recorded PID is the VM's, SIGTERM stops it cleanly.
        "RUNNING_UNDER_SYSTEMD": "1",
    }


def _host_init_argv(cfg: Config, host: Host) -> list[str]:
    """sshd of a host in its netns, in a new mount + UTS namespace set up as that host."""
    binds = "; ".join(f"mount --bind {host.private_dir(p)} {p}" for p in cfg.private_dirs)
    script = (
        "set -e; "
        f"hostname {host.name}; "
        # ip netns exec has made / a recursive slave and mounted a fresh sysfs: mounts made
        # here stay in this namespace (and its sshd sessions); a bpffs mount is a new instance,
        # mode 700 as systemd mounts it.
        "mount -t bpf -o mode=700 bpf /sys/fs/bpf; "
        f"{binds}; "
        f"mount --bind {host.dir}/hosts /etc/hosts; "
        f"exec {SSHD} -D -e -f {host.dir}/sshd_config"
    )
    return ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--", "/bin/sh", "-c", script]


def _wait(predicate, timeout: float, what: str, log_path: str, rec: dict) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if not _alive(rec):
            raise LabError(
                f"{what}: process {rec['pid']} exited; log {log_path}:\n{_tail(log_path)}"
            )
        time.sleep(0.05)
    raise LabError(f"{what}: not ready after {timeout:.0f} s; log {log_path}:\n{_tail(log_path)}")


def _await_broker(host: Host, rec: dict, sshd_pid: int) -> float:
    began = time.monotonic()
    log_path = os.path.join(host.dir, "rabbitmq.out")
    _wait(
        lambda: _tcp_open(host.ipv4, AMQP_PORT),
        BROKER_TIMEOUT,
        f"{host.name}: RabbitMQ on {host.ipv4}:{AMQP_PORT}",
        log_path,
        rec,
    )
    _cmd(
        _in_host(
            sshd_pid,
            "rabbitmq",
            [
                RABBITMQCTL,
                "-n",
                RABBITMQ_NODE,
                "await_startup",
                "--timeout",
                str(int(BROKER_TIMEOUT)),
            ],
        ),
        env=_rabbit_env(),
        timeout=BROKER_TIMEOUT + 10,
        what=f"{host.name}: rabbitmqctl await_startup",
    )
    return time.monotonic() - began


def _ensure_processes(
    cfg: Config,
    hosts_: list[Host],
    state: dict,
    keeper: _Keeper,
    dirty: set[str],
    changes: _Changes,
    log,
    brokers: int = MAX_COUNT,
) -> None:
    procs = state.setdefault("hosts", {})
    restart: dict[str, set[str]] = {}
    for host in hosts_:
        recs = procs.setdefault(host.name, {})
        need: set[str] = set()
        for comp in components(host.index, brokers):
            # A component (re)starts when it is not running in this host's netns, when the
            # host's configuration changed, or when one it runs inside of/depends on restarts.
            if need or host.name in dirty or not _component_ok(recs.get(comp), host.netns):
                need.add(comp)
        restart[host.name] = need
        stale = [
            (f"{host.name} {c}", recs[c]) for c in reversed(COMPONENTS) if c in need and recs.get(c)
        ]
        if stale:
            _stop_records(stale, STOP_TIMEOUT, log)
        for comp in need:
            recs.pop(comp, None)
    _save_state(cfg, state)

    by_name = {h.name: h for h in hosts_}
    path_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    def start(comp: str, argv_for, env: dict, log_name: str) -> list[tuple[Host, dict, str]]:
        """Start one component on every host that needs it; wait for them all afterwards."""
        started = []
        for name, need in restart.items():
            if comp in need:
                host = by_name[name]
                log_path = os.path.join(host.dir, log_name)
                procs[name][comp] = rec = keeper.spawn(argv_for(host), env, log_path)
                started.append((host, rec, log_path))
                changes.add(f"{name}: started {comp} (pid {rec['pid']})")
        _save_state(cfg, state)
        return started

    def sshd_pid(host: Host) -> int:
        return procs[host.name]["sshd"]["pid"]

    # sshd first: it is the anchor of the host's mount and UTS namespaces.
    for host, rec, log_path in start(
        "sshd", lambda h: _host_init_argv(cfg, h), path_env, "sshd.log"
    ):
        _wait(
            lambda h=host: _tcp_open(h.ipv4, 22),
            SSHD_TIMEOUT,
            f"{host.name}: sshd on {host.ipv4}:22",
            log_path,
            rec,
        )
    # Our own epmd, so that its PID is known (the one erl would start daemonizes itself).
    for host, rec, log_path in start(
        "epmd", lambda h: _in_host(sshd_pid(h), "rabbitmq", [EPMD]), _rabbit_env(), "epmd.log"
    ):
        _wait(
            lambda h=host: _tcp_open(h.ipv4, 4369),
            EPMD_TIMEOUT,
            f"{host.name}: epmd on {host.ipv4}:4369",
            log_path,
            rec,
        )
    wanted = [by_name[name] for name, need in restart.items() if "rabbitmq" in need]
    if not wanted:
        return
    log(f"starting {len(wanted)} RabbitMQ node(s), at most {BROKER_PARALLEL} at a time")
    errors: list[str] = []
    guard = threading.Lock()  # the keeper's socket, state.json and the change log
    window = threading.Semaphore(BROKER_PARALLEL)

    def start_one(host: Host) -> None:
        with window:
            log_path = os.path.join(host.dir, "rabbitmq.out")
            argv = _in_host(sshd_pid(host), "rabbitmq", [RABBITMQ_SERVER])
            with guard:
                procs[host.name]["rabbitmq"] = rec = keeper.spawn(argv, _rabbit_env(), log_path)
                changes.add(f"{host.name}: started rabbitmq (pid {rec['pid']})")
                _save_state(cfg, state)
            try:
                took = _await_broker(host, rec, sshd_pid(host))
            except LabError as exc:
                with guard:
                    errors.append(str(exc))
            else:
                log(f"{host.name}: RabbitMQ ready ({took:.1f} s)")

    threads = [threading.Thread(target=start_one, args=(host,)) for host in wanted]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise LabError("\n".join(errors))


def _brokers_of(state: dict, count: int) -> int:
    """How many hosts run RabbitMQ in a lab of ``count`` hosts (labs made before: all)."""
    return state.get("brokers", count) if state.get("count") else count


def up(
    n: int | None = None, cfg: Config | None = None, log=_log, brokers: int | None = None
) -> list[dict]:
    """Bring the lab up (idempotent; completes a half-up lab). Returns ``hosts()``.

    ``brokers``: how many hosts (the first ones) run RabbitMQ; default all (or as running).
    The others have sshd and everything else of a host, but no epmd and no broker: enough
    for a fleet run that does not talk to the broker, at a fraction of the memory and CPU."""
    cfg = cfg or Config.from_env()
    _require_root()
    _check_prerequisites()
    began = time.monotonic()
    with _locked(cfg):
        state = _load_state(cfg)
        count = n or state.get("count") or DEFAULT_COUNT
        if state.get("count") and state["count"] != count:
            raise LabError(
                f"the lab has {state['count']} hosts, not {count}: run `lab.py down` first"
            )
        running_brokers = _brokers_of(state, count)
        if brokers is None:
            brokers = running_brokers
        if not 0 <= brokers <= count:
            raise LabError(f"lab brokers {brokers}: use 0-{count} (the number of hosts)")
        if state.get("count") and brokers != running_brokers:
            raise LabError(
                f"the lab has RabbitMQ on {running_brokers} of its hosts, not {brokers}: "
                "run `lab.py down` first"
            )
        hosts_ = cfg.hosts(count)
        changes = _Changes(log)
        record = json.loads(json.dumps(dataclasses.asdict(cfg)))
        if state.get("config") and state["config"] != record:
            raise LabError(
                f"the lab in {cfg.state_dir} was made with other settings "
                f"({state['config']}): run `lab.py down` first"
            )
        dirty = _ensure_files(cfg, hosts_, count, changes)
        state.update({"count": count, "brokers": brokers, "config": record})
        _ensure_mountpoints(cfg, state, changes)
        _save_state(cfg, state)
        _ensure_network(cfg, hosts_, changes)
        keeper = _Keeper(cfg, state.get("keeper") or {"pid": 0, "start": 0})
        if not (_alive(keeper.rec) and keeper.ping()):
            keeper = _start_keeper(cfg)
            state["keeper"] = keeper.rec
            changes.add(f"started keeper (pid {keeper.rec['pid']})")
        _save_state(cfg, state)
        _ensure_processes(cfg, hosts_, state, keeper, dirty, changes, log, brokers)
        _save_state(cfg, state)
    what = f"{count} hosts" + ("" if brokers == count else f" ({brokers} with RabbitMQ)")
    if changes:
        took = time.monotonic() - began
        log(f"lab is up: {what}, {len(changes)} changes in {took:.1f} s")
    else:
        log(f"lab is already up: {what}, nothing changed")
    return hosts(cfg=cfg)


def _netns_pids(netns: str) -> list[int]:
    proc = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def down(cfg: Config | None = None, log=_log) -> None:
    """Stop every lab process by recorded PID, remove namespaces, links, bridge and state dir."""
    cfg = cfg or Config.from_env()
    _require_root()
    with _locked(cfg):
        state = _load_state(cfg)
        procs = state.get("hosts", {})
        pattern = re.compile(rf"{re.escape(cfg.prefix)}-{HOST_NAME.format('')}\d+")
        netnses = sorted(n for n in _netns_list() if pattern.fullmatch(n))
        for comp, timeout in (("rabbitmq", STOP_TIMEOUT), ("epmd", 5.0), ("sshd", 5.0)):
            recs = [
                (f"{name} {comp}", host_recs[comp])
                for name, host_recs in procs.items()
                if host_recs.get(comp)
            ]
            _stop_records(recs, timeout, log)
            for label, rec in recs:
                log(f"stopped {label} (pid {rec['pid']})")
        keeper = state.get("keeper")
        if keeper and _alive(keeper):
            _stop_records([("keeper", keeper)], 15.0, log)
            log(f"stopped keeper (pid {keeper['pid']})")
        if keeper:
            with contextlib.suppress(ChildProcessError):  # our own child when up() ran in-process
                os.waitpid(keeper["pid"], os.WNOHANG)
        for netns in netnses:
            left = _netns_pids(netns)
            if left:
                log(
                    f"{netns}: processes still inside (not stopped by recorded PID): "
                    f"{left}: SIGKILL"
                )
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and _netns_pids(netns):
                    time.sleep(0.05)
            _ip("netns", "del", netns)
            log(f"deleted netns {netns}")
        for link in _ip_json("link", "show"):
            name = link.get("ifname", "")
            if re.fullmatch(rf"{re.escape(cfg.prefix)}-veth\d+", name) or name == cfg.bridge:
                _ip("link", "del", name, check=False)
                log(f"deleted link {name}")
        for path in state.get("made_dirs", []):
            # Only mountpoints made by up(), and only while empty: never anyone's files.
            for root, _dirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(root)
            if not os.path.exists(path):
                log(f"removed {path}")
        if os.path.isdir(cfg.state_dir):
            shutil.rmtree(cfg.state_dir)
            log(f"removed {cfg.state_dir}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cfg.lock_file)
    left = [n for n in _netns_list() if pattern.fullmatch(n)]
    if left or _link_exists(cfg.bridge):
        raise LabError(f"lab not fully removed: netns {left}, bridge {cfg.bridge}")
    log("lab is down")


def hosts(n: int | None = None, cfg: Config | None = None) -> list[dict]:
    """The lab's hosts as dicts (name, netns, ipv4, ipv6, ssh_key, amqp_*...). No root needed."""
    cfg = cfg or Config.from_env()
    try:
        state = _load_state(cfg)
    except (PermissionError, LabError):
        state = {}
    count = n or state.get("count") or DEFAULT_COUNT
    brokers = _brokers_of(state, count) if state.get("count") == count else count
    return [_host_dict(cfg, h, brokers) for h in cfg.hosts(count)]


def status(cfg: Config | None = None) -> list[dict]:
    """Per host: its dict plus ``state`` (up/partial/down), ``pids`` and ``missing``."""
    cfg = cfg or Config.from_env()
    state = _load_state(cfg)
    count = state.get("count") or DEFAULT_COUNT
    brokers = _brokers_of(state, count)
    netnses = set(_netns_list())
    result = []
    for host in cfg.hosts(count):
        recs = state.get("hosts", {}).get(host.name, {})
        entry = _host_dict(cfg, host, brokers)
        comps = components(host.index, brokers)
        missing = []
        if host.netns not in netnses:
            missing.append("netns")
        pids = {}
        for comp in comps:
            if _component_ok(recs.get(comp), host.netns):
                pids[comp] = recs[comp]["pid"]
            else:
                missing.append(comp)
        if "rabbitmq" in comps and not (
            host.netns in netnses and _tcp_open(host.ipv4, AMQP_PORT, 0.3)
        ):
            missing.append("amqp")
        if len(missing) == 1 + len(comps) + ("rabbitmq" in comps):
            entry["state"] = "down"
        else:
            entry["state"] = "partial" if missing else "up"
        entry.update({"pids": pids, "missing": missing})
        result.append(entry)
    return result


def run(
    host: str,
    argv: list[str],
    user: str | None = None,
    cfg: Config | None = None,
    check: bool = True,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess:
    """Run argv inside a lab host (its netns, mount and UTS namespaces), from the root namespace.

    ``run("rabbit1", ["rabbitmqctl", "list_consumers"])`` works like on a Debian host.
    """
    cfg = cfg or Config.from_env()
    recs = _load_state(cfg).get("hosts", {}).get(host, {})
    if not _alive(recs.get("sshd")):
        raise LabError(f"lab host {host} is not up")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    return _cmd(
        _in_host(recs["sshd"]["pid"], user, argv),
        check=check,
        timeout=timeout,
        env=env,
        what=f"{host}: {' '.join(argv)}",
    )


@contextlib.contextmanager
def running(n: int | None = None, cfg: Config | None = None, log=_log):
    """``with running() as hosts:`` brings the lab up and takes it down afterwards, unless it
    was already fully up before (a developer's lab is left as it was)."""
    cfg = cfg or Config.from_env()
    was_up = os.path.exists(cfg.state_file) and all(entry["state"] == "up" for entry in status(cfg))
    try:
        yield up(n=n, cfg=cfg, log=log)
    finally:
        if not was_up:
            down(cfg=cfg, log=log)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _format_status(entry: dict) -> str:
    pids = " ".join(
        f"{c}={entry['pids'].get(c, '-')}" if entry["rabbitmq"] or c == "sshd" else f"{c}=none"
        for c in COMPONENTS
    )
    missing = f"  missing: {','.join(entry['missing'])}" if entry["state"] == "partial" else ""
    return (
        f"{entry['name']:<8} {entry['state']:<7} {entry['netns']:<12} {entry['ipv4']:<13} "
        f"{entry['ipv6']:<18} {pids}{missing}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="bring the lab up (idempotent)")
    p_up.add_argument(
        "-n",
        "--hosts",
        type=int,
        default=None,
        help=f"number of hosts (default: as running, else {DEFAULT_COUNT})",
    )
    p_up.add_argument(
        "--brokers",
        type=int,
        default=None,
        metavar="K",
        help="run RabbitMQ on the first K hosts only (default: all, or as running)",
    )
    p_up.add_argument("--json", action="store_true", help="print the hosts as JSON on stdout")
    sub.add_parser("down", help="stop and remove everything")
    p_status = sub.add_parser("status", help="one line per host; exit 0 when all are up")
    p_status.add_argument("--json", action="store_true", help="print JSON instead")
    p_inv = sub.add_parser("inventory", help="print the Ansible inventory of this lab")
    p_inv.add_argument("-n", "--hosts", type=int, default=None)
    p_ssh = sub.add_parser("ssh", help="ssh into a lab host")
    p_ssh.add_argument("host")
    p_ssh.add_argument("remote", nargs=argparse.REMAINDER)
    p_keeper = sub.add_parser("_keeper", help=argparse.SUPPRESS)
    p_keeper.add_argument("state_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "_keeper":
            return _keeper_main(args.state_dir)
        cfg = Config.from_env()
        if args.command == "up":
            result = up(n=args.hosts, cfg=cfg, brokers=args.brokers)
            if args.json:
                print(json.dumps(result, indent=2))
            return 0
        if args.command == "down":
            down(cfg=cfg)
            return 0
        if args.command == "status":
            entries = status(cfg=cfg)
            if args.json:
                print(json.dumps(entries, indent=2))
            for entry in [] if args.json else entries:
                print(_format_status(entry))
            return 0 if all(e["state"] == "up" for e in entries) else 1
        if args.command == "inventory":
            lab_hosts = hosts(n=args.hosts, cfg=cfg)
            brokers = sum(1 for h in lab_hosts if h["rabbitmq"])
            print(render_inventory(cfg, len(lab_hosts), brokers), end="")
            return 0
        if args.command == "ssh":
            ssh_config = os.path.join(cfg.state_dir, "ssh_config")
            os.execvp("ssh", ["ssh", "-F", ssh_config, args.host, *args.remote])
    except LabError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
