#!/usr/bin/python3
"""ns per packet of the egress program on real broker-side traffic: a server socket in the
root namespace sends realistic deliveries (ctag of 31 chars, routing key, content-type and
delivery-mode properties) to a reader in a namespace over a veth (TSO on: GSO skbs whole,
payload in page frags). Programs rotate per round; kernel bpf_stats give run time/count."""

import argparse
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, ".collections"), os.path.join(ROOT, "bench")]
import dataplane as dpb  # noqa: E402
import gro  # noqa: E402

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _bpfsys, _tc  # noqa: E402
from tests.lib import amqp  # noqa: E402
from tests.lib.dataplane import Dataplane  # noqa: E402

NS, LINK, SRV, CLI = "rgbench-egr", "rgbegr0", "198.18.247.1", "198.18.247.2"
STATS = "/proc/sys/kernel/bpf_stats_enabled"
READER = (
    r"""
import socket, sys, time
for i in range(100):
    try:
        c = socket.create_connection(("%s", 5672), timeout=30); break
    except OSError: time.sleep(0.05)
c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
while c.recv(1 << 20): pass
"""
    % SRV
)


def teardown():
    gro.drop_veth_netns(NS, LINK)


def setup():
    teardown()
    gro.veth_to_netns(NS, LINK, SRV, CLI)


def delivery(body, tag_no):
    args = (
        amqp.shortstr("amq.ctag-Hd2kL9xQp0aZ7mNcVb3RtA")
        + struct.pack(">Q", tag_no)
        + b"\x00"
        + amqp.shortstr("")
        + amqp.shortstr("orders.incoming")
    )
    out = amqp.method(1, amqp.BASIC_DELIVER, args)
    props = amqp.shortstr("application/json") + b"\x02"
    out += amqp.frame(2, 1, struct.pack(">HHQH", 60, 0, len(body), 0x9000) + props)
    out += amqp.frame(3, 1, body)
    return out


def run_cell(listener, fd, pattern, seconds):
    with _tc.open_netns(None) as tc:
        tc.ensure_clsact(LINK)
        tc.attach(LINK, fd, "rgegr", 1, 1, hook="egress")
        reader = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", READER])
        try:
            conn, _a = listener.accept()
            before = _bpfsys.prog_info(fd)
            body = {"4k-burst": 4096, "100-burst": 100, "100-single": 100, "1k-single": 1024}[
                pattern
            ]
            one = delivery(b"x" * body, 1)
            end = time.monotonic() + seconds
            sent = 0
            if pattern.endswith("burst"):
                burst = one * max(1, (1 << 20) // len(one))
                while time.monotonic() < end:
                    conn.sendall(burst)
                    sent += len(burst)
            else:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while time.monotonic() < end:
                    conn.sendall(one)
                    sent += len(one)
                    t = time.perf_counter() + 0.00005
                    while time.perf_counter() < t:
                        pass
            after = _bpfsys.prog_info(fd)
            conn.close()
        finally:
            reader.wait(timeout=30)
            tc.detach(LINK, 1, 1, hook="egress")
    return after["run_time_ns"] - before["run_time_ns"], after["run_cnt"] - before["run_cnt"], sent


ap = argparse.ArgumentParser()
ap.add_argument("templates", nargs="*", help="label=path")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--seconds", type=float, default=1.0)
ap.add_argument("--patterns", default="100-single,1k-single,4k-burst,100-burst")
args = ap.parse_args()
old = Path(STATS).read_text().strip()
Path(STATS).write_text("1")
base = dpb.Baseline()
dps, progs = [], [("no-op", base.fds["noop"])]
setup()
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
listener.bind((SRV, 5672))
listener.listen(4)
try:
    for spec in args.templates:
        label, path = spec.split("=", 1)
        dp = Dataplane(limit=3, action="drop", template_path=path)
        dps.append(dp)
        progs.append((label, dp.egress.fd))
    pats = args.patterns.split(",")
    tot = {(p, lab): [0, 0, 0] for p in pats for lab, _f in progs}
    for r in range(args.rounds):
        for p in pats:
            order = progs[r % len(progs) :] + progs[: r % len(progs)]
            for lab, fd in order:
                ns, n, sent = run_cell(listener, fd, p, args.seconds)
                t = tot[(p, lab)]
                t[0] += ns
                t[1] += n
                t[2] += sent
    print("| pattern | " + " | ".join(lab for lab, _f in progs) + " | bytes/pkt |")
    print("|---|" + "---:|" * (len(progs) + 1))
    for p in pats:
        cells = ["%.0f" % (tot[(p, lab)][0] / max(tot[(p, lab)][1], 1)) for lab, _f in progs]
        bpp = tot[(p, progs[0][0])][2] / max(tot[(p, progs[0][0])][1], 1)
        print("| %s | %s | %.0f |" % (p, " | ".join(cells), bpp))
    for dp, (lab, _f) in zip(dps, progs[1:]):
        print(
            lab,
            "counters:",
            {k: v for k, v in dp.counters().items() if v} if hasattr(dp, "counters") else "",
        )
finally:
    listener.close()
    for dp in dps:
        dp.close()
    base.close()
    teardown()
    Path(STATS).write_text(old)
