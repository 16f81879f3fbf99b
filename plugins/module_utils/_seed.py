# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Counts seeded from the broker: the consumers connections already hold at attach time.

On the day the limiter is deployed a faulty client may already hold thousands of consumers;
without seeding its connection would start at zero and get ``limit`` more. At attach (and at
the boot re-attach) the broker is asked (``rabbitmqctl list_connections`` and
``list_channels``, inside the namespace when one is given) and its counts are written into
the pinned conns map (a channel in its connection's slot, channel n in slot n mod
CHAN_SLOTS, as the classifier keeps it; one whose slot another holds in the channels map,
flagged CONN_OVERFLOW), flagged CONN_SEEDED: the classifier joins such a
connection's stream at its first well-formed frame and keeps the seeded counts.

No rabbitmqctl, or a broker that does not answer: a warning naming the cause, counting
starts at zero. Entries the data plane already has (a replace keeps its pins) are kept:
they are exact, the broker's answer is a moment old.

rabbitmqctl is an Erlang node of its own: where no epmd runs (a namespace without a broker,
a host whose broker is down) RabbitMQ's CLI starts an ``epmd -daemon``, which would outlive
the run (and hold a deleted namespace, with its interfaces). ERL_FLAGS (CLI_ERL_FLAGS) keeps
it from doing so: the CLI node does not listen, so it needs no epmd of its own, and asks the
broker's epmd where the broker is; where there is none, the broker did not answer.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from typing import Any, Callable

from . import _bpfsys, _layout
from ._errors import LimiterError
from ._render import ConfigError

# The conn_state flags the classifier's template defines as CONN_SEEDED and CONN_OVERFLOW.
CONN_SEEDED = 0x40
CONN_OVERFLOW = 0x10
# name@host, as rabbitmqctl -n takes it (no spaces, exactly one @, both parts non-empty).
_NODE_RE = re.compile(r"^[A-Za-z0-9_.\-]+@[A-Za-z0-9_.\-]+$")
RABBITMQCTL_TIMEOUT = 30
CONNECTION_COLUMNS = ("pid", "peer_host", "peer_port", "host", "port")
CHANNEL_COLUMNS = ("connection", "number", "consumer_count")
# Erlang flags for rabbitmqctl's VM and for the `erl` it runs to start epmd when it finds
# none (both read ERL_FLAGS): start no epmd; do not listen for other nodes (then the CLI node
# registers with no epmd, and reaches the broker through the broker's own).
CLI_ERL_FLAGS = "-start_epmd false -dist_listen false"
# The first line of rabbitmqctl's error: "Error: unable to perform an operation on node
# 'rabbit@vm'. Please see diagnostics information and suggestions below."
_FAILED_NODE_RE = re.compile(r"unable to perform an operation on node '([^']+)'")


class SeedError(LimiterError):
    """The broker could not be asked; the caller turns this into a warning."""


class NoAnswer(SeedError):
    """rabbitmqctl ran, and no broker answered it."""


def validate_node(node: str | None) -> str | None:
    """broker_node as given, or a ConfigError naming the option."""
    if node is None or node == "":
        return None
    if not isinstance(node, str) or not _NODE_RE.match(node):
        raise ConfigError(
            "broker_node must be a RabbitMQ node name like rabbit@hostname, got %r" % (node,)
        )
    return node


def rabbitmqctl_argv(node: str | None, netns: str | None, args: list[str]) -> list[str]:
    """The command line: rabbitmqctl (JSON, quiet), inside the namespace when one is given.

    ``ip netns exec`` is fine here (it remounts /sys, which only the BPF loader minds).
    """
    argv = ["rabbitmqctl", "-q", "--formatter", "json"]
    if node:
        argv += ["-n", node]
    argv += args
    if netns:
        if "/" in netns:
            argv = ["nsenter", "--net=%s" % netns, "--"] + argv
        else:
            argv = ["ip", "netns", "exec", netns] + argv
    return argv


def _address(value: Any) -> str:
    """An address as rabbitmqctl's JSON gives it: text, or the Erlang tuple as a list (4
    octets, or 8 16-bit words); v4-mapped IPv6 as IPv4, as conn_key stores it."""
    if isinstance(value, list):
        if len(value) == 4:
            value = ".".join(str(int(part)) for part in value)
        elif len(value) == 8:
            value = ":".join("%x" % int(part) for part in value)
        else:
            raise ValueError("%r is not an address" % (value,))
    addr = ipaddress.ip_address(str(value))
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def parse(connections_json: str, channels_json: str) -> list[dict[str, Any]]:
    """The broker's consumers per connection and channel, from rabbitmqctl's JSON.

    Returns [{client, client_port, broker, broker_port, channels: {number: consumers}}],
    connections without consumers left out. Raises SeedError on output it cannot read.
    """
    try:
        conns = json.loads(connections_json or "[]")
        chans = json.loads(channels_json or "[]")
        by_pid: dict[str, dict[str, Any]] = {}
        for conn in conns:
            by_pid[conn["pid"]] = {
                "client": _address(conn["peer_host"]),
                "client_port": int(conn["peer_port"]),
                "broker": _address(conn["host"]),
                "broker_port": int(conn["port"]),
                "channels": {},
            }
        for chan in chans:
            conn = by_pid.get(chan["connection"])
            count = int(chan["consumer_count"])
            if conn is not None and count > 0:
                conn["channels"][int(chan["number"])] = count
    except (ValueError, KeyError, TypeError) as exc:
        raise SeedError("rabbitmqctl's output could not be read: %s" % exc) from exc
    return [c for c in by_pid.values() if c["channels"]]


Runner = Callable[[list[str]], str]


def cli_failure(output: str) -> str:
    """rabbitmqctl's error output on one line: the node it tried and what its diagnostics
    found there ("rabbit@vm: unable to connect to epmd (port 4369) on vm: ..."), else its
    first line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines:
        return "no output"
    node = _FAILED_NODE_RE.search(lines[0])
    if node and "DIAGNOSTICS" in lines:
        found = []
        for line in lines[lines.index("DIAGNOSTICS") + 1 :]:
            if line.startswith("Current node details"):
                break
            if line.startswith("* ") and not line.startswith("* suggestion"):
                found.append(line[2:])
        if found:
            return "%s: %s" % (node.group(1), "; ".join(found))
    return lines[0]


def _descendants(pid: int) -> list[int]:
    """The processes under ``pid``, from /proc (su, the Erlang VM and its helpers: each of
    them in a session of its own, out of reach of a signal to ours)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                stat = handle.read()
        except OSError:
            continue  # gone meanwhile
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(proc: subprocess.Popen[str]) -> None:
    """Kill a rabbitmqctl that did not answer, and everything it started."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):  # gone meanwhile
            os.kill(pid, signal.SIGKILL)
    proc.communicate()


def _run(argv: list[str]) -> str:
    for tool in dict.fromkeys((argv[0], "rabbitmqctl")):  # ip/nsenter enter the netns first
        if shutil.which(tool) is None:
            raise SeedError("%s is not installed on this host" % tool)
    erl_flags = (os.environ.get("ERL_FLAGS", "") + " " + CLI_ERL_FLAGS).strip()
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, LC_ALL="C.UTF-8", ERL_FLAGS=erl_flags),
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=RABBITMQCTL_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            _stop(proc)
            who = "rabbitmqctl"
            if "-n" in argv:  # the node it asked (rabbitmqctl_argv's only -n)
                who += " -n " + argv[argv.index("-n") + 1]
            raise NoAnswer("%s did not answer in %d s" % (who, exc.timeout)) from exc
    if proc.returncode != 0:
        raise NoAnswer(
            "%s (rabbitmqctl exit %d)" % (cli_failure(stderr or stdout), proc.returncode)
        )
    return stdout


def read_broker(node: str | None, netns: str | None, run: Runner = _run) -> list[dict[str, Any]]:
    """Ask the broker (see parse); raises SeedError when it cannot."""
    try:
        conns = run(rabbitmqctl_argv(node, netns, ["list_connections", *CONNECTION_COLUMNS]))
        chans = run(rabbitmqctl_argv(node, netns, ["list_channels", *CHANNEL_COLUMNS]))
    except NoAnswer as exc:
        where = "in namespace %s" % netns if netns else "on this host"
        # from None: the message carries the CLI's answer, and the traceback adds nothing
        raise SeedError("no broker answered %s: %s" % (where, exc)) from None
    return parse(conns, chans)


def conn_value(
    consumers: int, epoch: int, channels: dict[int, int] | None = None
) -> tuple[bytes, dict[int, int]]:
    """A seeded conns entry: channel n in slot n mod CHAN_SLOTS (lowest channel first, as
    clients open them); returns it and the channels that did not fit (for the channels
    map, the entry then flagged CONN_OVERFLOW)."""
    state = _layout.ConnState()
    state.epoch, state.consumers, state.flags = epoch, consumers, CONN_SEEDED
    overflow: dict[int, int] = {}
    for channel, count in sorted((channels or {}).items()):
        if not count:
            continue
        slot = state.chans[channel & (_layout.CHAN_SLOTS - 1)]
        if slot.consumers:
            overflow[channel] = count
            # Listed, so that the classifier deletes it with the connection (where its
            # place in the list is free; else unlisted, as the classifier does).
            place = channel & (_layout.OVER_SLOTS - 1)
            if not state.over[place]:
                state.over[place] = channel
            continue
        slot.channel, slot.consumers = channel, count
    if overflow:
        state.flags |= CONN_OVERFLOW
    return bytes(state), overflow


def write(pin: str, entries: list[dict[str, Any]], port: int, epoch: int | None = None) -> int:
    """Write the broker's counts for connections to ``port`` into the pinned maps, keeping
    the entries the data plane has. Returns how many connections were seeded."""
    base = time.monotonic_ns() if epoch is None else epoch
    seeded = 0
    conns_fd = _bpfsys.obj_get(os.path.join(pin, "conns"))
    try:
        chans_fd = _bpfsys.obj_get(os.path.join(pin, "channels"))
        try:
            for n, entry in enumerate(entries):
                if entry["broker_port"] != port:
                    continue
                key = _layout.conn_key(entry["client"], entry["client_port"], entry["broker"], port)
                if _bpfsys.map_lookup(conns_fd, bytes(key), ctypes.sizeof(_layout.ConnState)):
                    continue  # the data plane knows it already, exactly
                conn_epoch = base + n  # distinct from any the data plane gives
                total = sum(entry["channels"].values())
                value, overflow = conn_value(total, conn_epoch, entry["channels"])
                for channel, consumers in overflow.items():
                    ckey = _layout.ChanKey(conn=key, channel=channel)
                    cvalue = _layout.ChanState(epoch=conn_epoch, consumers=consumers)
                    _bpfsys.map_update(chans_fd, bytes(ckey), bytes(cvalue))
                _bpfsys.map_update(conns_fd, bytes(key), value, _bpfsys.BPF_NOEXIST)
                seeded += 1
        finally:
            _bpfsys.close(chans_fd)
    finally:
        _bpfsys.close(conns_fd)
    return seeded


def seed(
    pins: list[str], port: int, node: str | None, netns: str | None, run: Runner = _run
) -> tuple[int, list[str]]:
    """Seed every pin directory from one answer of the broker.

    Returns (connections seeded, warnings): a broker that cannot be asked is a warning.
    """
    if not pins:
        return 0, []
    try:
        entries = read_broker(node, netns, run)
    except SeedError as exc:
        return 0, ["consumer counts not seeded from the broker, counting starts at zero: %s" % exc]
    seeded = 0
    for pin in pins:
        seeded += write(pin, entries, port)
    return seeded, []


def interface_addresses(tc: Any, ifname: str) -> set[str]:
    """The addresses of one interface (the broker addresses its clients reach through it)."""
    out = set()
    for msg in tc.ipr.get_addr(index=tc.interface_index(ifname)):
        addr = msg.get_attr("IFA_ADDRESS")
        if addr:
            out.add(_address(addr.split("%")[0]))
    return out


class Seeder:
    """Seeds each interface a run (re)builds, between loading and attaching its program
    (_deploy.deploy's ``prime``): the broker is asked once per run, at the first build.

    Before the program is live, so that the data plane cannot pick a connection up from
    zero first (its heartbeats would); a replace keeps the entries the data plane has.
    Never fails the run: ``warnings`` says what went wrong.
    """

    def __init__(self, tc: Any, params: dict[str, Any], run: Runner = _run) -> None:
        self.tc, self.params, self.run = tc, params, run
        self.enabled = bool(params.get("seed_from_broker", True))
        self.entries: list[dict[str, Any]] | None = None
        self.warnings: list[str] = []
        self.seeded = 0

    def __call__(self, ifname: str, pin: str) -> None:
        if not self.enabled:
            return
        if self.entries is None:
            try:
                self.entries = read_broker(
                    self.params.get("broker_node"), self.params.get("netns"), self.run
                )
            except SeedError as exc:
                self.enabled = False
                self.warnings.append(
                    "consumer counts not seeded from the broker, counting starts at zero: %s" % exc
                )
                return
        try:
            addresses = interface_addresses(self.tc, ifname)
            mine = [e for e in self.entries if e["broker"] in addresses]
            self.seeded += write(pin, mine, self.params["port"])
        except LimiterError as exc:
            self.warnings.append(
                "consumer counts not seeded on %s, counting starts at zero: %s" % (ifname, exc)
            )
