"""Every frame of a real 64 KiB GRO packet is walked (issue 8, item 1): real kernel, real tc,
real veth NAPI + GRO, the limiter deployed through _deploy.apply as the module does.

BPF_PROG_TEST_RUN only builds linear skbs of about a page, so tests/bpf cannot show the paged
path. Here a client namespace and a server namespace (198.18.250.0/24) share a veth pair;
client TSO off and GRO on the server's end (DESIGN.md: veth then goes through NAPI and GRO and
merges the client's MSS segments into packets of up to 64 KiB whose payload sits in page
fragments). The limiter (limit 2, action refuse) runs on the server's veth; a plain socket
there reads and keeps what arrives. The client sends, in ONE write, about 67 KB of small
frames (basic.ack and heartbeats, about 6200 in all) with a basic.consume after 2200 frames,
another after 4600 and an over-limit one after about 5900.

What the user gets: both consumes deep inside the packet are counted (the info module shows 2
consumers on channel 1), the third is refused (the server receives its queue name rewritten
to amq.rabbitguard...; every other byte arrives as sent) and `missed` stays 0. A recorder
program on the same hook, before ours, logs each packet's sequence number, skb->len and
skb->data_len, so the test itself proves that a counted consume sat behind 2000+ frames in
one paged GRO packet (and fails, after a few tries, if GRO did not merge).
"""

import socket
import struct
import threading
import time

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _deploy, _render
from tests.lib import amqp

from .sites import (
    PORT,
    SERVER,
    SERVER_IF,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    TCP_SYN,
    Recorder,
    entered,
    made_pair,
    packet_at,
)

pytestmark = pytest.mark.bpf

LIMIT = 2
ATTEMPTS = 5
DEEP = 2000  # frames ahead of a counted consume in its own packet: 8 tail calls at least


class Sink:
    """A plain TCP server in the server namespace: keeps every byte of each connection."""

    def __init__(self, netns):
        with entered(netns):
            self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        self.listener.bind((SERVER, PORT))
        self.listener.listen(8)
        self.streams = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _addr = self.listener.accept()
            except OSError:
                return
            stream = bytearray()
            self.streams.append(stream)
            with conn:
                while True:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        break
                    stream += chunk

    def wait_for(self, index, size, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.streams) > index and len(self.streams[index]) >= size:
                return bytes(self.streams[index])
            time.sleep(0.01)
        got = len(self.streams[index]) if len(self.streams) > index else None
        raise AssertionError("the server got %r of %d bytes in %d s" % (got, size, timeout))

    def close(self):
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def recorder():
    with Recorder("ingress") as r:  # compiled first: a BCC failure leaves nothing behind
        yield r


@pytest.fixture
def pair():
    with made_pair(limit=LIMIT) as p:
        yield p


def ack(tag):
    return amqp.method(1, amqp.BASIC_ACK, struct.pack(">QB", tag, 0))


FIRST_QUEUE = "first-queue-behind-2200-small-frames"
SECOND_QUEUE = "second-queue-behind-4600-small-frames"
OVER_QUEUE = "third-queue-over-the-limit-of-two"


def burst():
    """About 67 KB of small frames in one write, three consumes deep inside. Returns the bytes,
    the offset of every frame start, and the offset of each consume by queue name."""
    parts = (
        [ack(i + 1) for i in range(1000)]
        + [amqp.heartbeat()] * 1200
        + [amqp.consume(1, FIRST_QUEUE)]
        + [amqp.heartbeat()] * 2400
        + [amqp.consume(1, SECOND_QUEUE)]
        + [amqp.heartbeat()] * 1300
        + [amqp.consume(1, OVER_QUEUE)]
        + [ack(1001 + i) for i in range(300)]
    )
    starts, offset = [], 0
    for part in parts:
        starts.append(offset)
        offset += len(part)
    data = b"".join(parts)
    consumes = {q: data.index(amqp.consume(1, q)) for q in (FIRST_QUEUE, SECOND_QUEUE, OVER_QUEUE)}
    return data, starts, consumes


def run_once(pair, sink, recorder, index):
    """One connection: handshake, warm-up (cwnd and window grow), the burst. Returns what the
    test asserts on."""
    recorder.clear()
    with entered(pair.client_ns):
        client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
    client.settimeout(10)
    with client:
        client.connect((SERVER, PORT))
        head = amqp.PROTOCOL_HEADER + amqp.channel_open(1)
        client.sendall(head)
        sent = len(head)
        warm = amqp.heartbeat() * 8192  # 64 KiB of heartbeats: the limiter walks them too
        for _ in range(8):
            client.sendall(warm)
            sent += len(warm)
            sink.wait_for(index, sent)
        data, starts, consumes = burst()
        base = sent
        client.sendall(data)  # ONE write
        sent += len(data)
        received = sink.wait_for(index, sent)
        time.sleep(0.05)
        entry, conn = pair.connection(client)
    return dict(
        entry=entry,
        conn=conn,
        received=received[base:],
        data=data,
        starts=starts,
        consumes=consumes,
        base=base,
        records=recorder.records(),
    )


def test_consumes_behind_thousands_of_frames_in_one_gro_packet_count_and_the_excess_is_refused(
    recorder, pair
):
    created = _deploy.apply(pair.params(), _render.read_template())
    assert [o.action for o in created.outcomes] == ["create"]
    recorder.attach(pair.server_ns, SERVER_IF)
    sink = Sink(pair.server_ns)
    tries = []
    try:
        for index in range(ATTEMPTS):
            before = pair.info()["counters"]
            got = run_once(pair, sink, recorder, index)
            counters = got["entry"]["counters"]

            # What the user gets, whatever GRO did: two consumes counted, the third refused.
            assert got["conn"]["consumers"] == LIMIT and got["conn"]["channels"] == {"1": LIMIT}
            assert got["conn"]["refused"] == 1
            assert counters["consumes_allowed"] - before["consumes_allowed"] == LIMIT
            assert counters["consumes_refused"] - before["consumes_refused"] == 1
            assert counters["missed"] == 0 and counters["unparsed"] == 0, counters
            received, data = got["received"], got["data"]
            name_at = got["consumes"][OVER_QUEUE] + 7 + 4 + 2 + 1  # header, ids, reserved, len
            rewritten = received[name_at : name_at + len(OVER_QUEUE)]
            assert rewritten.startswith(b"amq.rabbitguard"), rewritten
            assert received[:name_at] == data[:name_at]  # the counted consumes untouched
            assert received[name_at + len(OVER_QUEUE) :] == data[name_at + len(OVER_QUEUE) :]

            # ...and the proof that it went through the paged path, deep inside one packet.
            records = got["records"]
            (isn,) = {r.seq for r in records if r.flags & TCP_SYN}  # this connection's SYN
            seen = []
            for queue in (FIRST_QUEUE, SECOND_QUEUE):
                offset = got["base"] + got["consumes"][queue]
                start, payload, data_len = packet_at(records, isn, offset) or (offset, 0, 0)
                ahead = sum(1 for s in got["starts"] if start <= got["base"] + s < offset)
                seen.append((queue, start, payload, data_len, ahead))
            tries.append(seen)
            if any(data_len > 0 and ahead >= DEEP for _q, _s, _p, data_len, ahead in seen):
                break
        else:
            pytest.fail(
                "GRO never put a consume behind %d frames of one paged packet in %d tries "
                "(per try: queue, packet offset, payload bytes, data_len, frames ahead): %r"
                % (DEEP, ATTEMPTS, tries)
            )
        largest = max(r.len for r in got["records"])
        assert largest > 60000, "no 64 KiB GRO packet (largest %d bytes)" % largest
    finally:
        sink.close()
    print("\nGRO packets holding the consumes, per try:", tries, "largest", largest)
    print("counters:", pair.info()["counters"])
