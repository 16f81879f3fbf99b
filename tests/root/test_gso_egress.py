"""A server cancel behind thousands of broker frames in one real 64 KiB GSO segment frees the
slot: real kernel, real TCP, real tc, a veth whose server end keeps TSO/GSO on (the default),
the limiter deployed through _deploy.apply as the module does.

The broker's side of a consumer with a large prefetch is what the egress program sees most:
many small deliveries (basic.deliver, content header, body: three frames each) that the
server's TCP hands to tc egress as one GSO skb of up to 64 KiB, its payload in page
fragments. Before the egress walk went on in tail calls it stopped at 256 frames, the stream
was lost (`missed`) and a basic.cancel in the unwalked rest stayed counted: the client that
re-subscribed was refused at limit 1, with no consumer left.

Here a plain server socket (the broker's part) sends, in ONE write, 2000 small deliveries and
then basic.cancel (the queue was deleted); the client, limit 1, refuse, re-subscribes. What
the user gets: the re-subscription is not refused (its queue name reaches the server as sent),
the info module shows one consumer, `missed` stays 0. A recorder program on the server's
egress hook, before ours, logs each packet's skb->len and data_len, so the test proves the
cancel sat behind 2000+ frames in one paged GSO packet (and fails, after a few tries, if none
was that large).
"""

import socket
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

ATTEMPTS = 5
DELIVERIES = 2000
DEEP = 2000  # frames ahead of the cancel in its own packet: 8 tail calls at least
QUEUE = "queue-the-broker-deleted"
AGAIN = "queue-subscribed-again-after-the-cancel"


@pytest.fixture
def recorder():
    with Recorder("egress") as r:  # the broker's packets (source port)
        yield r


@pytest.fixture
def pair():
    # The server sends the burst: GSO packets of up to 64 KiB, a first flight of 64 KiB and
    # more.
    with made_pair(limit=1, server_gso=True) as p:
        yield p


class Reader:
    """Reads and keeps everything a socket receives, in a thread."""

    def __init__(self, sock):
        self.sock, self.data = sock, bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            self.data += chunk

    def wait_for(self, size, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.data) >= size:
                return bytes(self.data)
            time.sleep(0.01)
        raise AssertionError("got %d of %d bytes in %d s" % (len(self.data), size, timeout))


def deliveries():
    """DELIVERIES small deliveries of three frames, then the broker's basic.cancel; and the
    offset of every frame start."""
    data = b"".join(amqp.deliver(1, b"m", delivery_tag=i + 1) for i in range(DELIVERIES))
    data += amqp.server_cancel(1)
    starts, offset = [], 0
    while offset < len(data):
        starts.append(offset)
        offset += 8 + int.from_bytes(data[offset + 3 : offset + 7], "big")
    return data, starts


def run_once(pair, listener, recorder):
    """One connection: a consumer (limit 1), a warm-up from the broker (cwnd grows), the
    burst with the cancel last, the re-subscription. Returns what the test asserts on."""
    recorder.clear()
    with entered(pair.client_ns):
        client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    client.settimeout(10)
    with client:
        client.connect((SERVER, PORT))
        server, _addr = listener.accept()
        with server:
            server.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
            at_server, at_client = Reader(server), Reader(client)
            head = amqp.PROTOCOL_HEADER + amqp.channel_open(1) + amqp.consume(1, QUEUE)
            client.sendall(head)
            at_server.wait_for(len(head))
            sent = 0
            warm = amqp.deliver(1, b"w" * 60000)  # bodies: skipped by position
            for _ in range(8):
                server.sendall(warm)
                sent += len(warm)
                at_client.wait_for(sent)
            data, starts = deliveries()
            base = sent
            server.sendall(data)  # ONE write
            sent += len(data)
            at_client.wait_for(sent)
            time.sleep(0.05)
            again = amqp.consume(1, AGAIN)
            client.sendall(again)
            received = at_server.wait_for(len(head) + len(again))
            time.sleep(0.05)
            entry, conn = pair.connection(client)
    return dict(
        entry=entry,
        conn=conn,
        again=received[len(head) :],
        sent=again,
        cancel_at=base + len(data) - len(amqp.server_cancel(1)),
        frames_before=lambda start: sum(1 for s in starts[:-1] if start <= base + s),
        records=recorder.records(),
    )


def test_a_cancel_behind_thousands_of_deliveries_in_one_gso_packet_frees_the_slot(recorder, pair):
    created = _deploy.apply(pair.params(limit=1, action="refuse"), _render.read_template())
    assert [o.action for o in created.outcomes] == ["create"]
    recorder.attach(pair.server_ns, SERVER_IF)
    with entered(pair.server_ns):
        listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((SERVER, PORT))
    listener.listen(8)
    listener.settimeout(10)
    tries = []
    try:
        for _attempt in range(ATTEMPTS):
            got = run_once(pair, listener, recorder)
            counters = got["entry"]["counters"]

            # What the user gets: the re-subscription passes as sent, one consumer counted.
            assert got["again"] == got["sent"], got["again"][:64]
            assert got["conn"]["consumers"] == 1 and got["conn"]["refused"] == 0, got["conn"]
            assert counters["cancels"] >= 1
            assert counters["missed"] == 0 and counters["unparsed"] == 0, counters

            # ...and the proof that the cancel sat deep inside one paged GSO packet.
            records = got["records"]
            (isn,) = {r.seq for r in records if r.flags & TCP_SYN}  # the server's SYN-ACK
            start, payload, data_len = packet_at(records, isn, got["cancel_at"]) or (0, 0, 0)
            ahead = got["frames_before"](start)
            tries.append((start, payload, data_len, ahead))
            if data_len > 0 and ahead >= DEEP:
                print(
                    "the cancel's packet: %d payload octets (%d paged), %d frames ahead"
                    % (payload, data_len, ahead)
                )
                return
    finally:
        listener.close()
    pytest.fail(
        "no try put the cancel behind %d frames of one paged GSO packet "
        "(start, payload, data_len, frames ahead): %r" % (DEEP, tries)
    )
