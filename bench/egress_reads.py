#!/usr/bin/python3
"""Micro-bench of payload read strategies: (A) BPF_PROG_TEST_RUN repeat loop on linear
crafted packets; (B) real egress GSO traffic from a local socket on a veth (paged)."""

import argparse
import os
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, ".collections"), os.path.join(ROOT, "bench")]
import gro  # noqa: E402
from bcc import BPF  # noqa: E402

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _bpfsys, _tc  # noqa: E402
from tests.lib import amqp, packets  # noqa: E402

PROGS = [
    "noop",
    "parse",
    "lb_map_8",
    "lb_map_16",
    "lb_map_64",
    "lb_map_128",
    "lb_map_256",
    "lb_map_1024",
    "lb_stack_8",
    "lb_stack_16",
    "lb_stack_64",
    "lb_stack_128",
    "lb_stack_256",
    "lb_regs",
    "lb_3x8",
    "lbr_stack_64",
    "pull_64",
]

ap = argparse.ArgumentParser()
ap.add_argument("--repeat", type=int, default=200000)
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--seconds", type=float, default=1.0)
ap.add_argument("--body", type=int, default=100)
ap.add_argument("--skip-a", action="store_true")
ap.add_argument("--skip-b", action="store_true")
ap.add_argument("--progs", default=",".join(PROGS))
args = ap.parse_args()
progs = args.progs.split(",")

b = BPF(src_file=os.path.join(ROOT, "bench", "egress_reads.c").encode())
fds = {p: b.load_func(p.encode(), BPF.SCHED_CLS).fd for p in progs}
try:
    if not args.skip_a:
        small = packets.tcp_packet(
            "198.18.0.1", "198.18.0.2", 5672, 40000, 1000, amqp.deliver(1, b"m" * 100)
        )
        big = packets.tcp_packet("198.18.0.1", "198.18.0.2", 5672, 40000, 1000, b"b" * 3600)
        print(
            "A: repeat loop %d, linear crafted packets, median of %d rounds, ns"
            % (args.repeat, args.rounds)
        )
        print("| prog | small delivery (%d B) | 3.6 KiB |" % len(small))
        print("|---|---:|---:|")
        res = {p: ([], []) for p in progs}
        for _r in range(args.rounds):
            for p in progs:
                for i, pkt in enumerate((small, big)):
                    res[p][i].append(_bpfsys.prog_test_run(fds[p], pkt, repeat=args.repeat)[1])
        for p in progs:
            print(
                "| %s | %d | %d |" % (p, statistics.median(res[p][0]), statistics.median(res[p][1]))
            )
    if not args.skip_b:
        with open(gro.STATS) as f:
            old_stats = f.read().strip()
        with open(gro.STATS, "w") as f:
            f.write("1")
        sink = gro.setup()
        try:
            time.sleep(0.5)
            tot = {p: [0, 0] for p in progs}
            # The parse program's counts of phase A's crafted runs, left out of B's.
            st = b[b"stats"]
            base = [sum(v) for _k, v in sorted(st.items(), key=lambda kv: kv[0].value)]
            with _tc.open_netns(None) as tc:
                tc.ensure_clsact(gro.HOST_LINK)
                for r in range(args.rounds):
                    order = progs[r % len(progs) :] + progs[: r % len(progs)]
                    for p in order:
                        tc.attach(gro.HOST_LINK, fds[p], "rgmicro", 1, 1, hook="egress")
                        before = _bpfsys.prog_info(fds[p])
                        stop, result = threading.Event(), {}
                        t = threading.Thread(target=gro.publisher, args=(stop, args.body, result))
                        t.start()
                        time.sleep(args.seconds)
                        stop.set()
                        t.join()
                        after = _bpfsys.prog_info(fds[p])
                        tc.detach(gro.HOST_LINK, 1, 1, hook="egress")
                        tot[p][0] += after["run_time_ns"] - before["run_time_ns"]
                        tot[p][1] += after["run_cnt"] - before["run_cnt"]
            vals = [
                sum(v) - b0
                for (_k, v), b0 in zip(sorted(st.items(), key=lambda kv: kv[0].value), base)
            ]
            print(
                "\nB: real egress (local socket, veth TSO on, body %d), %d rounds x %.1f s"
                % (args.body, args.rounds, args.seconds)
            )
            print(
                "parse saw: payload segments %d, with linear payload %d (%d linear payload bytes),"
                " paged %d" % tuple(vals[:4])
            )
            print("| prog | ns/pkt | runs |")
            print("|---|---:|---:|")
            for p in progs:
                ns, n = tot[p]
                print("| %s | %.1f | %d |" % (p, ns / max(n, 1), n))
        finally:
            gro.teardown(sink)
            with open(gro.STATS, "w") as f:
                f.write(old_stats)
finally:
    b.cleanup()
