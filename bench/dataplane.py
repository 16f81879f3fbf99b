#!/usr/bin/python3
"""Nanoseconds per packet of the limiter, side by side with a no-op tc program (the floor)
and the naive first-frame limiter (bench/naive_limiter.c), in one run; then the egress
program (the broker's segments to its consumers) against the same floor.

    sudo .venv/bin/python bench/dataplane.py [--samples N] [--before TEMPLATE]

Every program runs on the same crafted packets through BPF_PROG_TEST_RUN. The limiter
keeps state per connection, so a packet run twice is a retransmission the second time;
to measure the first-time path, each sample restores the connection's state from
userspace and runs the packet once (repeat=1). Every program is measured the same way
(median of N single runs; the kernel's clock read around one run is included for all
three), and a second table gives the classic repeat-loop mean for the stateless cases.
The programs take turns sample by sample, in a rotating order, so that whatever else
the machine does weighs on all of them alike. With --before, the limiter rendered from
another template (an older revision: `git show REV:files/bpf/rabbit_limiter.c.j2 > F`)
is measured in the same run, in a column of its own.
"""

import argparse
import ctypes
import os
import statistics
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = os.path.join(ROOT, ".collections", "ansible_collections", "rabbitguard", "limiter")
if not os.path.islink(LINK):
    os.makedirs(os.path.dirname(LINK), exist_ok=True)
    os.symlink(os.path.join("..", "..", ".."), LINK)
sys.path[:0] = [ROOT, os.path.join(ROOT, ".collections")]

from bcc import BPF  # noqa: E402

from ansible_collections.rabbitguard.limiter.plugins.module_utils import (  # noqa: E402
    _bpfsys,
    _layout,
)
from tests.lib import amqp, packets  # noqa: E402
from tests.lib.dataplane import Dataplane  # noqa: E402

CLIENT, BROKER, SPORT, SEQ = "198.18.0.2", "198.18.0.1", 40000, 1000000
LIMIT = 3


def amqp_packet(payload, port=5672):
    return packets.tcp_packet(CLIENT, BROKER, SPORT, port, SEQ, payload)


def cases():
    small_publish = amqp.publish(1, b"m" * 100)
    sixteen = (amqp.publish(1, b"m" * 40) * 5) + amqp.heartbeat()  # 5 x 3 frames + 1
    # BPF_PROG_TEST_RUN takes at most one page of linear data (3712 bytes here), so the
    # largest segments are measured on real traffic by bench/gro.py.
    big_body = amqp.publish(1, b"b" * 3500)
    return [
        # name, packet, where the limiter's next frame header is (relative to SEQ), consumers
        (
            "non-AMQP TCP (port 443, 1448 B)",
            packets.tcp_packet(CLIENT, BROKER, SPORT, 443, SEQ, b"x" * 1448),
            0,
            0,
        ),
        ("heartbeat", amqp_packet(amqp.heartbeat()), 0, 0),
        ("publish, small (3 frames)", amqp_packet(small_publish), 0, 0),
        ("publish, 3.5 KiB (3 frames)", amqp_packet(big_body), 0, 0),
        ("3.5 KiB inside a body", amqp_packet(b"b" * 3600), 70000, 0),
        ("16 pipelined frames", amqp_packet(sixteen), 0, 0),
        ("consume over the limit (refused)", amqp_packet(amqp.consume(1)), 0, LIMIT),
    ]


def broker_packet(payload):
    return packets.tcp_packet(BROKER, CLIENT, 5672, SPORT, SEQ, payload)


def egress_cases():
    """The broker's segments: what every consumer's deliveries cost on the egress hook."""
    small = amqp.deliver(1, b"m" * 100)
    sixteen = amqp.deliver(1, b"m" * 40) * 16  # 16 deliveries of 3 frames
    big = amqp.deliver(1, b"b" * 3500)
    # A 64 KiB GRO/GSO segment of bodies is a few header reads through bpf_skb_load_bytes,
    # whatever its length: its bytes are skipped by position. BPF_PROG_TEST_RUN builds one
    # page at most, so the stand-in is a 3.5 KiB segment with the same reads (the end of one
    # delivery's body, the next delivery's three headers, the start of its body), run on
    # the helper-only variant.
    tail_and_next = b"t" * 1000 + amqp.deliver(1, b"n" * 5000)[:2600]
    return [
        # name, packet, next frame header (relative to SEQ), helper-only variant
        ("delivery, small (3 frames)", broker_packet(small), 0, False),
        ("delivery, 3.5 KiB (3 frames)", broker_packet(big), 0, False),
        ("3.5 KiB inside a body", broker_packet(b"b" * 3600), 70000, False),
        # Most of what a broker sends a publisher: passed before the position lookup.
        ("pure ACK", broker_packet(b""), 0, False),
        ("16 pipelined deliveries (48 frames)", broker_packet(sixteen), 0, False),
        ("64 KiB GRO stand-in (3 headers, helper reads)", broker_packet(tail_and_next), 1000, True),
        ("delivery, small, helper reads", broker_packet(small), 0, True),
    ]


class EgressLimiter:
    """Our egress program: restores the connection's egress position before every sample."""

    def __init__(self, dp):
        self.dp = dp
        self.key = bytes(_layout.conn_key(CLIENT, SPORT, BROKER, 5672))

    def prepare(self, header_at):
        state = _layout.EgressState(next_hdr=SEQ + header_at, synced=1)
        slots = self.dp.map_fds.get("egress_slots")
        if slots is None:  # a template before layout 6: the LRU alone
            _bpfsys.map_update(self.dp.map_fds["egress"], self.key, bytes(state))
            return
        # The connection owns its slot, as one whose SYN-ACK found it free.
        slot = _layout.EgressSlot(
            key=_layout.ConnKey.from_buffer_copy(self.key), seen=1, state=state
        )
        index = struct.pack("<I", _layout.egress_slot_index(self.key))
        _bpfsys.map_update(slots, index, bytes(slot))

    def fd(self):
        return self.dp.egress.fd


class Limiter:
    """Ours: restores the connection's state before every sample."""

    name = "rabbitguard"

    def __init__(self, template=None):
        self.dp = Dataplane(limit=LIMIT, action="drop", template_path=template)
        self.key = bytes(_layout.conn_key(CLIENT, SPORT, BROKER, 5672))

    def prepare(self, header_at, consumers):
        fd = self.dp.map_fds["conns"]
        size = _bpfsys.map_info(fd)["value_size"]
        if size == 40:  # layout 1 (before rcv_nxt), for --before
            raw = struct.pack("<QIIIBBBB11s5x", 1, SEQ + header_at, consumers, 0, 1, 0, 1, 0, b"")
        else:
            # Layouts 2 and 3 share their first 56 octets (3 adds the channel slots).
            raw = bytes(
                _layout.ConnState(
                    epoch=1,
                    next_hdr=SEQ + header_at,
                    consumers=consumers,
                    rcv_nxt=SEQ,
                    synced=1,
                    after_frame=1,
                )
            )[:size]
        _bpfsys.map_update(fd, self.key, raw)

    def fd(self):
        return self.dp.function.fd

    def close(self):
        self.dp.close()


class Baseline:
    """The no-op program and the naive limiter, compiled together."""

    def __init__(self):
        with open(os.path.join(ROOT, "bench", "naive_limiter.c")) as f:
            self.bpf = BPF(text=f.read().encode())
        self.fds = {
            name: self.bpf.load_func(name.encode(), BPF.SCHED_CLS).fd
            for name in ("noop", "naive_limiter")
        }
        table = self.bpf[b"naive_consumers"]
        import socket

        key = table.Key(
            struct.unpack("I", socket.inet_aton(CLIENT))[0],
            struct.unpack("I", socket.inet_aton(BROKER))[0],
            socket.htons(SPORT),
            socket.htons(5672),
        )
        table[key] = ctypes.c_uint32(LIMIT)  # the naive limiter sits at its limit too

    def close(self):
        self.bpf.cleanup()


def single_runs(fds, packet, samples, before):
    """Median ns of one run of each program, taking turns in a rotating order."""
    times = [[] for _fd in fds]
    order = list(range(len(fds)))
    for _i in range(samples):
        order.append(order.pop(0))
        for k in order:
            before()
            times[k].append(_bpfsys.prog_test_run(fds[k], packet, repeat=1)[1])
    return [statistics.median(t) for t in times]


def print_table(rows, columns, vs, before=False):
    """Print one side-by-side Markdown table. columns: the titles of the programs measured,
    ours last; vs: the names of the others in the ratio columns; a row is [case, ns of each
    column, and with `before` the ns of ours built from the older template]."""
    titles = columns[:-1] + (["before"] if before else []) + columns[-1:]
    ratios = ["vs " + name for name in vs] + (["vs before"] if before else [])
    print("| " + " | ".join(["case"] + titles + ratios) + " |")
    print("|---|" + "---:|" * (len(titles) + len(ratios)))
    ours = len(columns) - 1
    for name, *ns in rows:
        mine, others = ns[ours], ns[:ours] + ns[ours + 1 :]
        print(
            "| %s | %s | %s |"
            % (
                name,
                " | ".join("%d" % v for v in others + [mine]),
                " | ".join("%.2fx" % (mine / v) for v in others),
            )
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=200000)
    parser.add_argument(
        "--before", metavar="TEMPLATE", help="also measure the limiter rendered from this template"
    )
    args = parser.parse_args()

    ours, base = Limiter(), Baseline()
    older = Limiter(args.before) if args.before else None
    limiters = [ours] + ([older] if older else [])
    try:
        rows = []
        for name, packet, header_at, consumers in cases():

            def restore(header_at=header_at, consumers=consumers):
                for limiter in limiters:
                    limiter.prepare(header_at, consumers)

            # The same userspace step before every program's sample keeps caches comparable.
            fds = [base.fds["noop"], base.fds["naive_limiter"]] + [x.fd() for x in limiters]
            rows.append([name] + single_runs(fds, packet, args.samples, restore))

        print(
            "Median ns per packet, one run per sample after restoring state "
            "(%d samples each)\n" % args.samples
        )
        print_table(
            rows,
            ["no-op (floor)", "naive limiter", "rabbitguard"],
            ["floor", "naive"],
            before=bool(older),
        )

        helper_dps = [Dataplane(limit=LIMIT, action="drop", force_skb_load_bytes=True)]
        # With --before, the older template's egress program too, when it has one.
        old_egress = older is not None and older.dp.egress is not None
        if old_egress:
            helper_dps.append(
                Dataplane(
                    limit=LIMIT, action="drop", force_skb_load_bytes=True, template_path=args.before
                )
            )
        try:
            egress = {
                False: [EgressLimiter(ours.dp)] + ([EgressLimiter(older.dp)] if old_egress else []),
                True: [EgressLimiter(dp) for dp in helper_dps],
            }
            egress_rows = []
            for name, packet, header_at, helper in egress_cases():
                runs = egress[helper]

                def restore(h=header_at, runs=runs):
                    for x in runs:
                        x.prepare(h)

                fds = [base.fds["noop"]] + [x.fd() for x in runs]
                egress_rows.append([name] + single_runs(fds, packet, args.samples, restore))
        finally:
            for dp in helper_dps:
                dp.close()
        print("\nEgress program (broker to client), median ns per packet, same method\n")
        print_table(
            egress_rows, ["no-op (floor)", "rabbitguard egress"], ["floor"], before=old_egress
        )

        print("\nMean ns per packet, repeat loop of %d (stateless paths only)\n" % args.repeat)
        print("| case | no-op (floor) | naive limiter | rabbitguard | vs floor |")
        print("|---|---:|---:|---:|---:|")
        name, packet, _at, _n = cases()[0]
        loop = {
            label: _bpfsys.prog_test_run(fd, packet, repeat=args.repeat)[1]
            for label, fd in (
                ("noop", base.fds["noop"]),
                ("naive", base.fds["naive_limiter"]),
                ("ours", ours.fd()),
            )
        }
        print(
            "| %s | %d | %d | %d | %.2fx |"
            % (name, loop["noop"], loop["naive"], loop["ours"], loop["ours"] / max(loop["noop"], 1))
        )
    finally:
        for limiter in limiters:
            limiter.close()
        base.close()


if __name__ == "__main__":
    main()
