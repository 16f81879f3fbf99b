#!/usr/bin/python3
"""Nanoseconds per packet on real GSO/GRO-sized traffic: the limiter, the no-op floor and the
naive first-frame limiter, side by side in one run.

    sudo .venv/bin/python bench/gro.py [--seconds S] [--body N ...] [--tso on|off]
        [--rounds R] [--no-strict] [--before TEMPLATE ...]

BPF_PROG_TEST_RUN takes at most one page of packet data, so 64 KiB segments cannot be fed
to it. Here a client in the root namespace publishes large messages (131072-byte AMQP body
frames) to a TCP sink in a throwaway namespace (rgbench-gro, 198.18.252.0/24) over a veth
pair; veth passes the sender's 64 KiB TSO segments through whole, so the classifier on the
namespace side's ingress sees GRO-sized packets. Each program is attached in turn and the
kernel's own statistics (kernel.bpf_stats_enabled: run time and run count per program) give
ns per packet; bytes per packet shows the packet sizes really seen.

With TSO on (the default) veth skips NAPI and reorders one flow's segments across CPUs, as
containers see it; with --tso off it goes through NAPI and GRO and delivers in order, like a
host NIC. The limiter runs in both modes: default and strict, which drops a segment that
arrives ahead of the stream where a frame header may start so that TCP sends it again in
order. The second table gives what that costs the publisher: its throughput and its TCP's
retransmissions (tcpi_total_retrans), per program, and the limiter's counters.

With --before TEMPLATE (repeatable) the limiter rendered from each older template (e.g.
`git show main:files/bpf/rabbit_limiter.c.j2 > /tmp/before.c.j2`) is measured beside the
current one, in default mode. With --rounds R every program runs R times, in rotating order,
and its run time and run count are summed. frames/pkt counts the AMQP frames the publisher
sent (method, content header and body frames) per program run, and ns/frame is the
run time over them: the per-frame cost of the walk on paged data. With more than one round,
a limiter's round in which it missed frames (its connection went adrift after a loss, and
segments passed unwalked) is left out of its run time, run count and frames, and counted
beside its retransmissions (one per round).
"""

import argparse
import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, ".collections")]

from bcc import BPF  # noqa: E402

from ansible_collections.rabbitguard.limiter.plugins.module_utils import (  # noqa: E402
    _bpfsys,
    _constants,
    _tc,
)
from tests.lib import amqp  # noqa: E402
from tests.lib.dataplane import Dataplane  # noqa: E402

NETNS, HOST_LINK = "rgbench-gro", "rgbgro0"
CLIENT, BROKER = "198.18.252.1", "198.18.252.2"
PREF, HANDLE = _constants.FILTER_PREF, _constants.FILTER_HANDLE
STATS = "/proc/sys/kernel/bpf_stats_enabled"

SINK = (
    r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("%s", 5672)); s.listen(8)
while True:
    c, _addr = s.accept()
    while c.recv(1 << 20):
        pass
    c.close()
"""
    % BROKER
)


def sh(*argv):
    subprocess.run(argv, check=True)


def veth_to_netns(netns, host_link, host_addr, netns_addr):
    """A new netns joined to the host by a veth pair (host_link here, eth0 there), both up."""
    sh("ip", "netns", "add", netns)
    sh("ip", "link", "add", host_link, "type", "veth", "peer", "name", "eth0", "netns", netns)
    sh("ip", "addr", "add", host_addr + "/24", "dev", host_link)
    sh("ip", "link", "set", host_link, "up")
    sh("ip", "-n", netns, "addr", "add", netns_addr + "/24", "dev", "eth0")
    sh("ip", "-n", netns, "link", "set", "eth0", "up")
    sh("ip", "-n", netns, "link", "set", "lo", "up")


def drop_veth_netns(netns, host_link):
    subprocess.run(["ip", "netns", "del", netns], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "link", "del", host_link], stderr=subprocess.DEVNULL)


def setup():
    teardown()
    veth_to_netns(NETNS, HOST_LINK, CLIENT, BROKER)
    # GRO on the namespace's end: with the sender's TSO off, veth then delivers through NAPI
    # and GRO merges the segments into packets of up to 64 KiB, as a host NIC's driver does.
    sh("ip", "netns", "exec", NETNS, "ethtool", "-K", "eth0", "gro", "on")
    return subprocess.Popen(["ip", "netns", "exec", NETNS, sys.executable, "-c", SINK])


def set_tso(ifname, on):
    """ethtool -K IFNAME tso on|off, through the SIOCETHTOOL ioctl (no ethtool binary)."""
    siocethtool, ethtool_stso = 0x8946, 0x1F
    value = ctypes.create_string_buffer(struct.pack("II", ethtool_stso, 1 if on else 0))
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(value)).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), siocethtool, ifreq)


def teardown(sink=None):
    if sink is not None:
        sink.terminate()
        sink.wait()
    drop_veth_netns(NETNS, HOST_LINK)


TCPI_TOTAL_RETRANS = 100  # offset of tcpi_total_retrans in struct tcp_info (linux/tcp.h)


def publisher(stop, body_size, result):
    """One AMQP connection publishing messages as fast as TCP takes them; result gets the
    bytes sent and the retransmissions of its TCP."""
    for _attempt in range(50):
        try:
            conn = socket.create_connection((BROKER, 5672), timeout=5)
            break
        except OSError:
            time.sleep(0.1)
    message = amqp.publish(1, b"\x00" * body_size)
    result["message_len"] = len(message)
    result["message_frames"] = count_frames(message)
    conn.sendall(amqp.PROTOCOL_HEADER + amqp.channel_open(1))
    burst = message * max(1, (4 << 20) // len(message))
    sent = 0
    try:
        while not stop.is_set():
            conn.sendall(burst)
            sent += len(burst)
    except socket.timeout:
        result["stalled"] = True  # nothing acknowledged for 5 s: shown in the table
    info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    result["bytes"] = sent
    result["retrans"] = struct.unpack_from("I", info, TCPI_TOTAL_RETRANS)[0]
    conn.close()


def count_frames(data):
    """AMQP frames in data (whole frames: type u8, channel u16, size u32, payload, end)."""
    n = pos = 0
    while pos < len(data):
        pos += 8 + struct.unpack_from(">I", data, pos + 3)[0]
        n += 1
    return n


def measure(prog_fd, seconds, body_size):
    with _tc.open_netns(NETNS) as tc:
        tc.ensure_clsact("eth0")
        tc.attach("eth0", prog_fd, "rgbench", PREF, HANDLE)
        before = _bpfsys.prog_info(prog_fd)
        stop, result = threading.Event(), {}
        thread = threading.Thread(target=publisher, args=(stop, body_size, result))
        start = time.monotonic()
        thread.start()
        time.sleep(seconds)
        stop.set()
        thread.join()
        elapsed = time.monotonic() - start
        after = _bpfsys.prog_info(prog_fd)
        tc.detach("eth0", PREF, HANDLE)
    runs = after["run_cnt"] - before["run_cnt"]
    ns = after["run_time_ns"] - before["run_time_ns"]
    mib_s = result.get("bytes", 0) / elapsed / (1 << 20)
    retrans = "stalled" if result.get("stalled") else "%d" % result.get("retrans", 0)
    frames = (
        result.get("message_frames", 0) * result.get("bytes", 0) // result.get("message_len", 1)
    )
    return ns, runs, frames, mib_s, retrans


COUNTERS = ("amqp_segments", "unparsed", "missed", "held", "resyncs", "consumes_refused")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--body", type=int, nargs="+", default=[1 << 20, 200], help="message body bytes"
    )
    parser.add_argument("--tso", choices=("on", "off"), default="on")
    parser.add_argument("--rounds", type=int, default=1, help="runs per program, rotating")
    parser.add_argument("--no-strict", action="store_true", help="leave strict mode out")
    parser.add_argument(
        "--before",
        metavar="TEMPLATE",
        action="append",
        default=[],
        help="also measure the limiter rendered from this (older) template; repeatable",
    )
    args = parser.parse_args()

    limiters = []
    try:
        for path in args.before:
            limiters.append(
                ("before (%s)" % os.path.basename(path), Dataplane(3, "drop", template_path=path))
            )
        limiters.append(("rabbitguard", Dataplane(limit=3, action="drop")))
        if not args.no_strict:
            limiters.append(("rabbitguard strict", Dataplane(3, "drop", strict=True)))
        rows = run(args, limiters)
    finally:
        for _name, dp in limiters:
            dp.close()

    print(
        "Real traffic: one connection publishing for %.0f s per program and message size;"
        " %d round(s); veth TSO %s on the sender (%s)"
        % (args.seconds, args.rounds, args.tso, "reorders" if args.tso == "on" else "in order")
    )
    print("(kernel.bpf_stats_enabled run time / run count)\n")
    print(
        "| body B | program | ns per packet | packets | vs floor | frames/pkt | ns/frame "
        "| MiB/s | retransmissions | %s |" % " | ".join(COUNTERS)
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|%s" % ("---:|" * len(COUNTERS)))
    floor = {}
    for body, name, ns, runs, frames, mib_s, retrans, counters in rows:
        per_packet = ns / max(runs, 1)
        floor.setdefault(body, per_packet)
        print(
            "| %d | %s | %.0f | %d | %.2fx | %.1f | %.1f | %.0f | %s | %s |"
            % (
                body,
                name,
                per_packet,
                runs,
                per_packet / floor[body],
                frames / max(runs, 1),
                ns / max(frames, 1),
                mib_s,
                retrans,
                " | ".join("%d" % counters[k] if counters else "-" for k in COUNTERS),
            )
        )


def run(args, limiters):
    """Each program measured on each message size, args.rounds times in rotating order:
    rows of (body, name, run time ns, runs, frames sent, MiB/s, retransmissions, counters),
    summed over the rounds (MiB/s: the mean, retransmissions: each round's, joined)."""
    with open(STATS) as f:
        stats_before = f.read().strip()
    with open(os.path.join(ROOT, "bench", "naive_limiter.c")) as f:
        base = BPF(text=f.read().encode())
    programs = [
        ("no-op (floor)", base.load_func(b"noop", BPF.SCHED_CLS).fd, None),
        ("naive limiter", base.load_func(b"naive_limiter", BPF.SCHED_CLS).fd, None),
    ] + [(name, dp.function.fd, dp) for name, dp in limiters]
    sink = None
    rows = []
    try:
        sink = setup()
        set_tso(HOST_LINK, args.tso == "on")
        with open(STATS, "w") as f:
            f.write("1")
        for body in args.body:
            sums = {name: [0, 0, 0, 0.0, [], None, 0] for name, _fd, _dp in programs}
            for r in range(args.rounds):
                order = programs[r % len(programs) :] + programs[: r % len(programs)]
                for name, fd, dp in order:
                    if dp is not None:
                        dp.reset_state()
                    ns, runs, frames, mib_s, retrans = measure(fd, args.seconds, body)
                    s = sums[name]
                    s[3] += mib_s / args.rounds
                    s[4].append(retrans)
                    if dp is not None:
                        counters = dp.counters()
                        print("    %s, body %d: %s" % (name, body, counters), file=sys.stderr)
                        s[5] = {k: counters[k] + (s[5][k] if s[5] else 0) for k in COUNTERS}
                        if counters["missed"] and args.rounds > 1:
                            # Segments passed unwalked (the connection went adrift after a
                            # loss) make a round cheaper than the walk: left out of the time.
                            s[6] += 1
                            continue
                    s[0] += ns
                    s[1] += runs
                    s[2] += frames
            for name, _fd, _dp in programs:
                ns, runs, frames, mib_s, retrans, counters, left_out = sums[name]
                retrans = "/".join(retrans) + (" (%d left out)" % left_out if left_out else "")
                rows.append((body, name, ns, runs, frames, mib_s, retrans, counters))
    finally:
        with open(STATS, "w") as f:
            f.write(stats_before)
        teardown(sink)
        base.cleanup()
    return rows


if __name__ == "__main__":
    main()
