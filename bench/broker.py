#!/usr/bin/python3
"""Real RabbitMQ, real publishers, real GRO: what the limiter costs a broker, side by side.

    flock /tmp/rg-heavy.lock /usr/bin/python3 bench/broker.py [--quick] [--seconds S] [--rounds R]
        [--strict] [--before TEMPLATE] [--select CELLS]

A lab host (lab/lab.py, prefix rgp, subnet 210: RabbitMQ in its own namespace) gets a
second veth pair straight to a client namespace (rgp-pub, 198.18.210.252/30): the broker's
end has GRO on, so the kernel hands the classifier GRO packets (payload in page fragments)
as a NIC would; the client's end is benched with TSO off (NAPI and GRO on veth deliver a
flow in order like a real NIC) and on (64 KiB TSO segments passed whole, reordered across
CPUs: what containers see).

Workloads: publishers with publisher confirms (a raw-socket AMQP client, one process per
connection, a bounded window of unconfirmed messages, each into a queue of its own that holds
at most 10000 messages or 64 MiB, dropping its oldest) of 64 B, 4 KiB and 1 MiB messages on 1
and 8 connections, and a consume/cancel storm (64 consumers in flight on one connection, each
cancelled as soon as its consume-ok comes, and replaced as soon as its cancel-ok comes).
Each cell runs a few seconds with, in rotating order each round: no program, a no-op program,
the naive first-frame limiter (bench/naive_limiter.c) and ours, then no program again (the
control: its spread against the first is the noise of this machine).

Ours is deployed through the module's own apply path (_deploy.apply, netns + interface) once;
the cells then swap programs in our tc slot by fd (tc replace), so no cell pays a compile.
Printed per cell: messages/s ratio to no program (median of rounds), ns per packet from the
kernel's per-program statistics (kernel.bpf_stats_enabled: run_time_ns / run_cnt), bytes per
program run (GRO size), the program's time as a share of the CPU time the broker and the
client processes used, and ours' missed frames (its counters).

--strict adds ours in strict mode, and --before ours rendered from another template, each in
cells of its own in the same rotation, printed on a line below each row beside ours: what
strict costs (segments held, the clients' retransmissions) on the same path, and whether it
misses nothing where the default mode fails open.

Everything it creates (lab, namespace, pins, the bpf_stats setting) is taken down at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "collections")]

from tests.lib import amqp  # noqa: E402

PREFIX, SUBNET = "rgp", "210"
CLIENT_NS = "rgp-pub"
BROKER_LINK, CLIENT_LINK = "rgpb1", "eth0"
BROKER_ADDR, CLIENT_ADDR = "198.18.210.253", "198.18.210.254"
PIN_ROOT = "/sys/fs/bpf/rgp-bench"
STATS = "/proc/sys/kernel/bpf_stats_enabled"
LIMIT = 1000  # ours: far above what the storm ever holds (STORM_PIPELINE)
# The naive limiter never hears of a cancel, so the storm reaches any limit it has: it gets
# one that no run reaches (with 1000, every storm cell of it stalled on its drop within a
# second).
NAIVE_LIMIT = 1 << 30
STORM_PIPELINE = 64
QUEUE_MAX_MESSAGES = 10000  # each publisher's queue, at most (drop-head)
VARIANTS = ("none", "noop", "naive", "ours", "control")

# -- the client (runs in the client namespace, one process per connection) -----------------

CONFIRM_SELECT, CONFIRM_SELECT_OK = (85, 10), (85, 11)
QUEUE_DECLARE, QUEUE_DECLARE_OK = (50, 10), (50, 11)
BASIC_ACK, BASIC_NACK = (60, 80), (60, 120)
CONSUME_OK, CANCEL_OK = (60, 21), (60, 31)


def _longstr(raw):
    return struct.pack(">I", len(raw)) + raw


class Client:
    """A minimal AMQP 0-9-1 client on a raw socket: enough to publish with confirms."""

    def __init__(self, host, user, password):
        self.sock = socket.create_connection((host, 5672), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.sock.sendall(amqp.PROTOCOL_HEADER)
        self.expect((10, 10))
        auth = b"\x00" + user.encode() + b"\x00" + password.encode()
        args = _longstr(b"") + amqp.shortstr("PLAIN") + _longstr(auth) + amqp.shortstr("en_US")
        self.sock.sendall(amqp.method(0, (10, 11), args))
        tune = self.expect((10, 30))
        channel_max = struct.unpack(">H", tune[:2])[0]
        self.sock.sendall(amqp.method(0, (10, 31), struct.pack(">HIH", channel_max, 131072, 0)))
        self.sock.sendall(amqp.method(0, (10, 40), amqp.shortstr("/") + amqp.shortstr("") + b"\0"))
        self.expect((10, 41))
        self.sock.sendall(amqp.channel_open(1))
        self.expect((20, 11))

    def methods(self, block=True):
        """Method frames received: (class, method) and arguments, as they come."""
        while True:
            while len(self.buf) >= 7:
                ftype, _channel, size = struct.unpack_from(">BHI", self.buf)
                if len(self.buf) < 8 + size:
                    break
                payload = bytes(self.buf[7 : 7 + size])
                del self.buf[: 8 + size]
                if ftype == amqp.METHOD:
                    yield struct.unpack(">HH", payload[:4]), payload[4:]
            if not block and not select.select([self.sock], [], [], 0)[0]:
                return
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the broker closed the connection")
            self.buf += data
            block = False

    def expect(self, wanted):
        for got, args in self.methods():
            if got == wanted:
                return args
            if got in ((10, 50), (20, 40)):
                raise ConnectionError("closed by the broker: %r" % args[:80])

    def declare(self, queue):
        # Bounded by bytes and by count (drop-head), so that every cell meets a queue in the
        # same steady state: at 64 MiB alone a 64 B publisher's queue grew to a million
        # messages over a run, and the broker's work per message with it.
        table = (
            amqp.shortstr("x-max-length-bytes") + b"l" + struct.pack(">q", 64 << 20)
            + amqp.shortstr("x-max-length") + b"l" + struct.pack(">q", QUEUE_MAX_MESSAGES)
        )  # fmt: skip
        args = struct.pack(">H", 0) + amqp.shortstr(queue) + b"\x00" + _longstr(table)
        self.sock.sendall(amqp.method(1, QUEUE_DECLARE, args))
        self.expect(QUEUE_DECLARE_OK)

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.sendall(amqp.connection_close())
        self.sock.close()


def cpu_seconds():
    t = os.times()
    return t.user + t.system


def storm(client, queue, args):
    """The consume/cancel storm on one connection: STORM_PIPELINE consumers in flight, each
    cancelled as soon as its consume-ok comes, a new one sent for each cancel-ok. What
    completes is a pair (a consume and its cancel, both answered); the frames the broker's
    answers make ready are answered together, so segments carry several frames each.

    A cancel never goes before its own consume-ok: RabbitMQ 3.10 handles a classic queue's
    consume-ok asynchronously, and a basic.cancel pipelined behind its basic.consume is done
    first, so that the consume-ok then finds no such consumer and the channel crashes
    (541 INTERNAL_ERROR; in the broker's log, a badkey for the tag in
    rabbit_channel:consumer_monitor/2). Returns (done, cpu) at start and at stop."""
    serial = 0

    def consume():
        nonlocal serial
        serial += 1
        return amqp.consume(1, queue, tag="c%d" % serial)

    out = b"".join(consume() for _ in range(STORM_PIPELINE))
    done = 0
    at_start = None
    while True:
        now = time.time()
        if at_start is None and now >= args.start:
            at_start = (done, cpu_seconds())
        if now >= args.stop:
            return at_start, (done, cpu_seconds())
        if out:
            client.sock.sendall(out)
            out = b""
        for got, margs in client.methods(block=True):
            if got == CONSUME_OK:
                tag = margs[1 : 1 + margs[0]].decode()
                out += amqp.cancel(1, tag=tag)
            elif got == CANCEL_OK:
                done += 1
                out += consume()
            elif got in ((10, 50), (20, 40)):
                raise ConnectionError("closed by the broker: %r" % margs[:80])


def worker(args):
    """One connection: warm up until args.start, count what completes until args.stop."""
    client = Client(args.host, args.user, args.password)
    # The storm consumes from a queue nothing is published to (no deliveries in its way).
    queue = ("rgp-storm%d" if args.mode == "storm" else "rgp-q%d") % args.index
    client.declare(queue)
    if args.mode == "storm":
        at_start, at_stop = storm(client, queue, args)
        client.close()
        at_start = at_start or at_stop
        print(json.dumps({"done": at_stop[0] - at_start[0], "cpu": at_stop[1] - at_start[1]}))
        return
    client.sock.sendall(amqp.method(1, CONFIRM_SELECT, b"\x00"))
    client.expect(CONFIRM_SELECT_OK)
    message = amqp.publish(1, b"\x00" * args.size, routing_key=queue)
    unit = max(1, min(256, (256 << 10) // len(message)))  # messages per send
    window = max(2 * unit, (4 << 20) // len(message))
    burst = message * unit
    sent = done = 0
    at_start = at_stop = None
    while True:
        now = time.time()
        if at_start is None and now >= args.start:
            at_start = (done, cpu_seconds())
        if now >= args.stop:
            at_stop = (done, cpu_seconds())
            break
        while sent - done <= window - unit:
            client.sock.sendall(burst)
            sent += unit
        for got, margs in client.methods(block=True):
            if got == BASIC_ACK:
                tag, bits = struct.unpack(">QB", margs[:9])
                done = max(done, tag) if bits & 1 else done + 1
            elif got == BASIC_NACK:
                raise RuntimeError("the broker refused (nack) a message")
            elif got in ((10, 50), (20, 40)):
                raise ConnectionError("closed by the broker: %r" % margs[:80])
    client.close()
    if at_start is None:
        at_start = at_stop
    print(json.dumps({"done": at_stop[0] - at_start[0], "cpu": at_stop[1] - at_start[1]}))


# -- the harness (root namespace) -----------------------------------------------------------


def sh(*argv, check=True):
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError("%s: %s" % (" ".join(argv), proc.stderr.strip()))
    return proc


def setup_client_link(broker_ns):
    teardown_client_link()
    sh("ip", "netns", "add", CLIENT_NS)
    sh("ip", "link", "add", BROKER_LINK, "netns", broker_ns, "type", "veth",
       "peer", "name", CLIENT_LINK, "netns", CLIENT_NS)  # fmt: skip
    sh("ip", "-n", broker_ns, "addr", "add", BROKER_ADDR + "/30", "dev", BROKER_LINK)
    sh("ip", "-n", CLIENT_NS, "addr", "add", CLIENT_ADDR + "/30", "dev", CLIENT_LINK)
    sh("ip", "-n", broker_ns, "link", "set", BROKER_LINK, "up")
    sh("ip", "-n", CLIENT_NS, "link", "set", CLIENT_LINK, "up")
    sh("ip", "-n", CLIENT_NS, "link", "set", "lo", "up")
    sh("ip", "netns", "exec", broker_ns, "ethtool", "-K", BROKER_LINK, "gro", "on")
    sh("ip", "netns", "exec", CLIENT_NS, "ethtool", "-K", CLIENT_LINK, "gro", "off")


def teardown_client_link():
    sh("ip", "netns", "del", CLIENT_NS, check=False)


def set_client_tso(on):
    state = "on" if on else "off"
    sh("ip", "netns", "exec", CLIENT_NS, "ethtool", "-K", CLIENT_LINK, "tso", state, "gso", "on")


def proc_cpu(pids):
    """CPU seconds (user + system) used so far by these processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def tcp_stats(netns):
    """The namespace's TCP counters (/proc/net/snmp and netstat), by name."""
    out = {}
    text = sh("ip", "netns", "exec", netns, "cat", "/proc/net/snmp", "/proc/net/netstat").stdout
    lines = text.splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        kind = names.split(":")[0]
        for name, value in zip(names.split()[1:], values.split()[1:]):
            with contextlib.suppress(ValueError):
                out[kind + "." + name] = int(value)
    return out


def rx_bytes(netns):
    out = sh("ip", "-n", netns, "-s", "-j", "link", "show", BROKER_LINK).stdout
    return json.loads(out)[0]["stats64"]["rx"]["bytes"]


class Bench:
    def __init__(self, args, host):
        from bcc import BPF

        from ansible_collections.rabbitguard.limiter.plugins.module_utils import (
            _bpfsys,
            _constants,
            _deploy,
            _names,
            _pins,
            _render,
            _tc,
        )

        self.args, self.host = args, host
        self.ns = host["netns"]
        self.bpfsys, self.tc_mod, self.pins, self.C = _bpfsys, _tc, _pins, _constants
        self.deploy = _deploy
        with open(os.path.join(ROOT, "bench", "naive_limiter.c")) as f:
            self.base = BPF(text=f.read().encode(), cflags=["-DCONSUMER_LIMIT=%d" % NAIVE_LIMIT])
        self.params = dict(
            state="present",
            interfaces=[BROKER_LINK],
            port=5672,
            limit=LIMIT,
            action="drop",
            frame_max=_constants.DEFAULT_FRAME_MAX,
            netns=self.ns,
            pin_dir=PIN_ROOT,
            kernel_headers=None,
            lock_timeout=120,
            strict=False,
        )
        result = _deploy.apply(self.params, _render.read_template())
        (outcome,) = [o for o in result.outcomes if o.program_id]
        self.ours_fd = _bpfsys.prog_get_fd_by_id(outcome.program_id)
        # The pair's egress half (server-sent cancels) runs in "ours" cells only.
        with _tc.open_netns(self.ns) as tc:
            egress = tc.find_filter(
                BROKER_LINK,
                _constants.EGRESS_FILTER_PREF,
                _constants.EGRESS_FILTER_HANDLE,
                "egress",
            )
        self.egress_fd = _bpfsys.prog_get_fd_by_id(egress["prog_id"])
        self.egress_name = egress["name"]
        self.pin = _names.pin_dir(PIN_ROOT, _names.namespace_key(self.ns), BROKER_LINK)
        self.fds = {
            "noop": self.base.load_func(b"noop", BPF.SCHED_CLS).fd,
            "naive": self.base.load_func(b"naive_limiter", BPF.SCHED_CLS).fd,
            "ours": self.ours_fd,
        }
        # --before (ours rendered from an older template) and --strict (ours in strict
        # mode): each with its own maps and its own egress program (if it has one), in
        # cells of its own.
        self.extra = {}
        if args.before or args.strict:
            from tests.lib.dataplane import Dataplane

            if args.before:
                self.extra["before"] = Dataplane(
                    limit=LIMIT, action="drop", template_path=args.before
                )
            if args.strict:
                self.extra["strict"] = Dataplane(limit=LIMIT, action="drop", strict=True)
            for name, dataplane in self.extra.items():
                self.fds[name] = dataplane.function.fd

    def close(self):
        try:
            self.deploy.apply(dict(self.params, state="absent"))
        finally:
            self.bpfsys.close(self.ours_fd)
            self.bpfsys.close(self.egress_fd)
            self.base.cleanup()
            for dataplane in self.extra.values():
                dataplane.close()

    def attach(self, variant):
        egress_slot = (self.C.EGRESS_FILTER_PREF, self.C.EGRESS_FILTER_HANDLE, "egress")
        with self.tc_mod.open_netns(self.ns) as tc:
            if variant in ("none", "control"):
                tc.detach(BROKER_LINK, self.C.FILTER_PREF, self.C.FILTER_HANDLE)
            else:
                tc.ensure_clsact(BROKER_LINK)
                tc.attach(BROKER_LINK, self.fds[variant], "rgbench-" + variant,
                          self.C.FILTER_PREF, self.C.FILTER_HANDLE)  # fmt: skip
            if variant == "ours":
                tc.attach(BROKER_LINK, self.egress_fd, self.egress_name, *egress_slot)
            elif variant in self.extra and self.extra[variant].egress is not None:
                egress = self.extra[variant].egress
                tc.attach(BROKER_LINK, egress.fd, "rgbench-" + variant, *egress_slot)
            else:
                tc.detach(BROKER_LINK, *egress_slot)

    def cell(self, variant, mode, size, conns):
        self.attach(variant)
        fd = self.fds.get(variant)
        attached = self.pins.counters(self.pin)
        tcp_before = tcp_stats(self.ns), tcp_stats(CLIENT_NS)
        warm = 0.8 if mode == "storm" else 0.6
        start = time.time() + warm + 0.15 * conns
        stop = start + self.args.seconds
        procs = [
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    CLIENT_NS,
                    sys.executable,
                    os.path.abspath(__file__),
                    "worker",
                    "--host",
                    BROKER_ADDR,
                    "--user",
                    self.host["amqp_user"],
                    "--password",
                    self.host["amqp_password"],
                    "--mode",
                    mode,
                    "--size",
                    str(size),
                    "--index",
                    str(i),
                    "--start",
                    repr(start),
                    "--stop",
                    repr(stop),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for i in range(conns)
        ]
        broker_pids = [int(p) for p in sh("ip", "netns", "pids", self.ns).stdout.split()]
        time.sleep(max(0.0, start - time.time()))
        egress_fd = self.egress_fd_of(variant)
        before = self.snapshot(fd, egress_fd, broker_pids)
        extra = self.extra.get(variant)
        if extra is not None:
            counters_before = extra.counters()
        time.sleep(max(0.0, stop - time.time()))
        after = self.snapshot(fd, egress_fd, broker_pids)
        if extra is not None:
            row_counters = counter_delta(counters_before, extra.counters())
        tcp_after = tcp_stats(self.ns), tcp_stats(CLIENT_NS)
        done = cpu = 0.0
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise RuntimeError("a %s worker failed (%s)" % (mode, variant))
            got = json.loads(out.strip().splitlines()[-1])
            done += got["done"]
            cpu += got["cpu"]
        row = {
            "rate": done / (after["t"] - before["t"]),
            "done": done,
            "cpu": after["cpu"] - before["cpu"] + cpu,
            # From attach (connections opened, warm-up) to stop: the broker's TCP queued
            # segments out of order, the clients' TCP retransmitted.
            "ofo": tcp_after[0]["TcpExt.TCPOFOQueue"] - tcp_before[0]["TcpExt.TCPOFOQueue"],
            "retrans": tcp_after[1]["Tcp.RetransSegs"] - tcp_before[1]["Tcp.RetransSegs"],
        }
        if fd is not None:
            runs = after["run_cnt"] - before["run_cnt"]
            row["runs"] = runs
            row["prog_ns"] = after["run_time_ns"] - before["run_time_ns"]
            row["bytes"] = after["rx"] - before["rx"]
        if extra is not None:
            row["counters"] = row_counters
        if variant == "ours":
            row["counters"] = counter_delta(before["counters"], after["counters"])
            # Misses before the window (connection start, warm-up) leave connections
            # adrift in it: what counted them shows only from the attach on.
            row["since_attach"] = counter_delta(attached, after["counters"])
        if egress_fd is not None:
            row["egress_runs"] = after["egress_cnt"] - before["egress_cnt"]
            row["egress_ns"] = after["egress_ns"] - before["egress_ns"]
        return row

    def egress_fd_of(self, variant):
        """The egress program attached in this variant's cells (ours, or an extra's own),
        or None where none is."""
        if variant == "ours":
            return self.egress_fd
        extra = self.extra.get(variant)
        if extra is not None and extra.egress is not None:
            return extra.egress.fd
        return None

    def snapshot(self, fd, egress_fd, broker_pids):
        snap = {"t": time.time(), "cpu": proc_cpu(broker_pids), "rx": rx_bytes(self.ns)}
        if fd is not None:
            info = self.bpfsys.prog_info(fd)
            snap["run_cnt"], snap["run_time_ns"] = info["run_cnt"], info["run_time_ns"]
        if egress_fd is not None:
            info = self.bpfsys.prog_info(egress_fd)
            snap["egress_cnt"], snap["egress_ns"] = info["run_cnt"], info["run_time_ns"]
        snap["counters"] = self.pins.counters(self.pin)
        return snap


def counter_delta(before, after):
    """after - before, field by field (missed_by_cause: cause by cause)."""
    out = {}
    for k, v in after.items():
        if isinstance(v, dict):
            out[k] = {c: n - before[k][c] for c, n in v.items()}
        else:
            out[k] = v - before[k]
    return out


def counter_sum(rows):
    """The counters of several cells added up; causes that counted nothing left out."""
    total = {"missed_by_cause": {}}
    for row in rows:
        for k, v in row.items():
            if isinstance(v, dict):
                for c, n in v.items():
                    if n:
                        total[k][c] = total[k].get(c, 0) + n
            else:
                total[k] = total.get(k, 0) + v
    return total


WORKLOADS = [
    ("64 B", "publish", 64, 1),
    ("64 B", "publish", 64, 8),
    ("4 KiB", "publish", 4096, 1),
    ("4 KiB", "publish", 4096, 8),
    ("1 MiB", "publish", 1 << 20, 1),
    ("1 MiB", "publish", 1 << 20, 8),
    ("consume/cancel", "storm", 0, 1),
]


def median(values):
    return statistics.median(values) if values else float("nan")


def frames_per_message(mode, size):
    """Client frames per message: method, content header, body frames of at most frame_max
    (131072 less 8 framing octets); the storm's unit is a consume and a cancel."""
    if mode == "storm":
        return 2
    return 2 + max(1, -(-size // (131072 - 8)))


def totals(cells, fpm):
    """One program's cells (one per round) summed: ns per packet and its share of the
    broker's and clients' CPU (ingress; egress when it had an egress program), bytes and
    client frames per program run, its counters and the clients' retransmissions."""
    runs = max(sum(c["runs"] for c in cells), 1)
    cpu = max(sum(c["cpu"] for c in cells), 1e-9)
    ns = sum(c["prog_ns"] for c in cells)
    out = {
        "ns_per_pkt": ns / runs,
        "share": ns / 1e9 / cpu,
        "bytes_per_pkt": sum(c["bytes"] for c in cells) / runs,
        "frames": fpm * sum(c["done"] for c in cells),
        "counters": counter_sum(c.get("counters", {}) for c in cells),  # none: no-op, naive
        "retrans": sum(c["retrans"] for c in cells),
        "egress": None,
    }
    out["frames_per_pkt"] = out["frames"] / runs
    out["ns_per_frame"] = ns / max(out["frames"], 1)
    if all("egress_ns" in c for c in cells):
        egress_ns = sum(c["egress_ns"] for c in cells)
        egress_runs = max(sum(c["egress_runs"] for c in cells), 1)
        out["egress"] = {"ns_per_pkt": egress_ns / egress_runs, "share": egress_ns / 1e9 / cpu}
    return out


def summarize(tso, name, conns, rounds, fpm):
    """One table row from the rounds of one workload."""
    base = [r["none"]["rate"] for r in rounds]
    # A round whose no-program cell completed nothing (the machine stalled) says nothing.
    rounds = [r for r in rounds if r["none"]["rate"] > 0] or rounds[:0]
    if not rounds:
        return "| %s | %s | %d | no round completed |" % (tso, name, conns), {}
    ratio = {v: median([r[v]["rate"] / r["none"]["rate"] for r in rounds]) for v in VARIANTS}
    spread = [r["control"]["rate"] / r["none"]["rate"] for r in rounds]
    ns = {v: totals([r[v] for r in rounds], fpm)["ns_per_pkt"] for v in ("noop", "naive")}
    ours = totals([r["ours"] for r in rounds], fpm)
    counters = ours["counters"]
    missed = "%d (%d)" % (counters.get("missed", -1), counters.get("passed_ahead", -1))
    causes = counters["missed_by_cause"]
    if causes:
        missed += " " + ", ".join("%s %d" % (c, n) for c, n in sorted(causes.items()))
    egress = ours["egress"] or {"ns_per_pkt": float("nan"), "share": float("nan")}
    return (
        "| %s | %s | %d | %.0f | %.3f (%.3f-%.3f) | %.3f | %.3f | %.3f | %.0f | %.0f | %.0f "
        "| %.2fx | %.3f%% | %.0f | %.3f%% | %.0f | %.1f | %s |"
        % (tso, name, conns, median(base), ratio["control"], min(spread), max(spread),
           ratio["noop"], ratio["naive"], ratio["ours"], ns["noop"], ns["naive"],
           ours["ns_per_pkt"], ours["ns_per_pkt"] / max(ns["naive"], 1e-9),
           100 * ours["share"], egress["ns_per_pkt"], 100 * egress["share"],
           ours["bytes_per_pkt"], ours["frames_per_pkt"], missed)
    ), counters  # fmt: skip


def summarize_extra(tso, name, conns, rounds, fpm, extras):
    """--before, --strict: those cells' rows beside ours, in the same rounds: messages/s
    ratio, ns per packet and per frame, CPU share, frames per packet, missed frames, and
    (strict) segments held, with the clients' retransmissions in the cells."""
    rounds = [r for r in rounds if r["none"]["rate"] > 0 and all(v in r for v in extras)]
    if not rounds:
        return "| %s | %s | %d | %s: no round completed |" % (tso, name, conns, "/".join(extras))
    out = []
    for v in list(extras) + ["ours"]:
        ratio = median([r[v]["rate"] / r["none"]["rate"] for r in rounds])
        got = totals([r[v] for r in rounds], fpm)
        counters = got["counters"]
        missed = "%d" % counters.get("missed", 0)
        causes = counters["missed_by_cause"]
        if causes:  # by cause, as in the table (the trace of a miss starts there)
            missed += " (%s)" % ", ".join("%s %d" % kv for kv in sorted(causes.items()))
        egress = "no egress program"
        if got["egress"] is not None:
            e = got["egress"]
            egress = "egress %.0f ns/pkt, + %.3f%% CPU" % (e["ns_per_pkt"], 100 * e["share"])
        out.append("%s %.3f, %.0f ns/pkt, %.1f ns/frame, %.3f%% CPU, %s, %.1f frames/pkt, "
                   "missed %s, held %d, retransmitted %d"
                   % (v, ratio, got["ns_per_pkt"], got["ns_per_frame"], 100 * got["share"],
                      egress, got["frames_per_pkt"], missed,
                      counters.get("held", 0), got["retrans"]))  # fmt: skip
    return "| %s | %s | %d | %s |" % (tso, name, conns, " · ".join(out))


def run(args):
    # SIGTERM (a timeout) takes everything down too, as an exception through the finally.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit("bench/broker.py: terminated"))
    os.environ.update(RG_LAB_PREFIX=PREFIX, RG_LAB_SUBNET=SUBNET)
    sys.path.insert(0, ROOT)
    import lab

    with open(STATS) as f:
        stats_before = f.read().strip()
    bench = None
    lines = []
    try:
        (host,) = lab.up(n=1)
        setup_client_link(host["netns"])
        with open(STATS, "w") as f:
            f.write("1")
        bench = Bench(args, host)
        for tso in (False, True):
            set_client_tso(tso)
            tso_name = "on" if tso else "off"
            for name, mode, size, conns in WORKLOADS:
                if args.only and args.only not in name:
                    continue
                if args.select and "%s:%s:%d" % (tso_name, name, conns) not in args.select:
                    continue
                rounds = []
                for r in range(args.rounds):
                    order = list(VARIANTS[:4]) + list(bench.extra)
                    order = order[r % len(order) :] + order[: r % len(order)]
                    cells = {}
                    try:
                        for variant in order + ["control"]:
                            cells[variant] = bench.cell(variant, mode, size, conns)
                    except RuntimeError as exc:
                        # A publisher stalled past its socket timeout (loss on the veth,
                        # backed-off retransmissions; it happens with any program and with
                        # none): the round says nothing, the others still do.
                        print("    round %d left out: %s" % (r, exc), file=sys.stderr, flush=True)
                        continue
                    rounds.append(cells)
                line, counters = summarize(
                    tso_name, name, conns, rounds, frames_per_message(mode, size)
                )
                print(line, flush=True)
                if bench.extra:
                    extra_line = summarize_extra(tso_name, name, conns, rounds,
                                                 frames_per_message(mode, size),
                                                 list(bench.extra))  # fmt: skip
                    print(extra_line, flush=True)
                    lines.append(extra_line)
                print("    ours' counters: %s" % counters, file=sys.stderr, flush=True)
                for i, cells in enumerate(rounds):
                    since = counter_sum([cells["ours"]["since_attach"]])
                    print(
                        "    round %d: out-of-order queued by the broker's TCP / client "
                        "retransmissions from attach to stop: %s; ours from attach: missed %d, "
                        "passed ahead %d, %s"
                        % (i, ", ".join("%s %d/%d" % (v, c["ofo"], c["retrans"])
                                        for v, c in cells.items()),
                           since["missed"], since["passed_ahead"], since["missed_by_cause"]),
                        file=sys.stderr, flush=True,
                    )  # fmt: skip
                lines.append(line)
    finally:
        with open(STATS, "w") as f:
            f.write(stats_before)
        if bench is not None:
            bench.close()
        teardown_client_link()
        lab.down()
    return lines


HEADER = (
    "| client TSO | messages | conns | no program msg/s | control (spread) | no-op | naive "
    "| ours | ns/pkt no-op | ns/pkt naive | ns/pkt ours | ours/naive | ours' CPU share "
    "| ns/pkt egress | egress CPU share | bytes/pkt | frames/pkt | missed (passed ahead) |\n"
    "|---|---" + "|---:" * 16 + "|"
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--host")
    w.add_argument("--user")
    w.add_argument("--password")
    w.add_argument("--mode", choices=("publish", "storm"))
    w.add_argument("--size", type=int)
    w.add_argument("--index", type=int)
    w.add_argument("--start", type=float)
    w.add_argument("--stop", type=float)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 s cells")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per cell")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="workloads whose name contains this (e.g. '64 B')")
    parser.add_argument(
        "--select",
        type=lambda text: text.split(","),
        help="only these cells, as TSO:MESSAGES:CONNS,... (e.g. 'off:64 B:1,on:1 MiB:8')",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="also measure ours in strict mode (segments ahead of a hole held, not passed), "
        "in cells of its own",
    )
    parser.add_argument(
        "--before",
        metavar="TEMPLATE",
        help="also measure ours rendered from this (older) template, in cells of its own",
    )
    args = parser.parse_args()
    if args.cmd == "worker":
        worker(args)
        return
    if args.quick:
        args.seconds, args.rounds = 1.0, 2
    print(
        "RabbitMQ (lab host, own namespace) <- veth (broker GRO on) <- raw-socket publishers "
        "with confirms; %d rounds of %.1f s per cell, variants in rotating order.\n"
        "Ratios: messages/s (consume+cancel pairs/s for the storm) against no program, median "
        "of rounds; control = no program again (its min-max across rounds is the noise).\n"
        "ns/pkt: kernel.bpf_stats_enabled run_time_ns / run_cnt (ours: the ingress program, its "
        "continuation included); CPU share: that run time / CPU time of the broker's and the "
        "client's processes; egress: the pair's egress program on the broker's packets, alike; "
        "bytes/pkt: per ingress run; frames/pkt: client frames per ingress run (messages x "
        "frames per message / runs, pure ACKs included); missed: by cause after the counts.\n"
        % (args.rounds, args.seconds)
    )
    print(HEADER, flush=True)
    run(args)


if __name__ == "__main__":
    main()
