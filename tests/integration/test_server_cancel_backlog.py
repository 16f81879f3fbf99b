# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A basic.cancel the real broker sends behind a backlog of deliveries frees the slot, on
rabbit1 at limit 1 (action refuse): the real-RabbitMQ version of
tests/root/test_gso_egress.py, where a plain socket server plays the broker.

A consumer with a large prefetch subscribes to a queue holding 2000 small messages and then
does not read its socket for a while, so that the broker's deliveries queue up in the
broker's TCP send queue behind the client's closed window. The queue is deleted: the broker
sends basic.cancel behind those deliveries (the client does not answer it). Then the client
reads everything, and the broker's TCP sends the backlog in GSO packets of up to 64 KiB
(the lab host's veth keeps TSO/GSO on, its default), the cancel in the last of them. The
client subscribes again, to the next queue, which becomes the next round's consumer: ten
rounds at limit 1, so one cancel the egress program missed is a refused re-subscription.

What the user gets: every re-subscription is taken (consume-ok, never the 404 of a refused
consume), the limiter and the broker agree on one consumer at the end, and ``missed`` does
not move. The client is a raw-socket AMQP client, so that the test knows the offset of every
frame of the broker's stream; a recorder program on the lab host's egress hook, before ours,
logs each of the broker's packets (sequence number, skb->len, skb->data_len), and the test
requires that in at least one round the cancel sat in a paged packet behind more than 256
frames (the egress program's walk per run: beyond it, only its tail calls see the cancel).
How deep the cancel lands is up to the broker's and the client's TCP (window updates, cwnd),
not the test: the rounds print what they saw, and the test fails, naming them, if no round
went past 256 frames.
"""

import contextlib
import socket
import struct
import time

import pytest

from tests.integration.common import (
    HOST,
    IFACE,
    broker_connections,
    connection_of,
    delete_queue,
    deleted_after,
    info,
    limited_host,
    limiter_entry,
)
from tests.lib import amqp, clients
from tests.root.sites import TCP_SYN, Recorder, packet_at

pytestmark = pytest.mark.integration

LIMIT = 1
limited = limited_host(LIMIT, "refuse")
ROUNDS = 10
MESSAGES = 2000
BODY = b"m" * 32
PREFETCH = 5000
STALL = 1.0  # seconds the client does not read, before and after the queue is deleted
RCVBUF = 32 << 10  # the client's receive buffer: a window the backlog does not fit in
WALK = 256  # frames the egress program walks per run (MAX_FRAMES)

BASIC_QOS_OK = (60, 11)
CONNECTION_START, CONNECTION_TUNE, CONNECTION_OPEN_OK = (10, 10), (10, 30), (10, 41)
CHANNEL_OPEN_OK = (20, 11)


def _table(raw):
    """A field table's (or a long string's) bytes: their length, then them."""
    return struct.pack(">I", len(raw)) + raw


class RawConsumer:
    """A minimal AMQP 0-9-1 client on a raw socket (no heartbeats) that keeps every byte the
    broker sends, so that the test knows where each frame of the broker's stream starts."""

    def __init__(self, addr):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.sock.settimeout(10)
        self.sock.connect((addr, clients.AMQP_PORT))
        self.local_port = self.sock.getsockname()[1]
        self.stream = bytearray()  # everything received, from the broker's first byte
        self.frames = []  # (offset, type, channel, payload) of each complete frame
        self._parsed = 0
        self.sock.sendall(amqp.PROTOCOL_HEADER)
        self.expect(CONNECTION_START)
        user, password = clients.AMQP_USER.encode(), clients.AMQP_PASSWORD.encode()
        auth = b"\0" + user + b"\0" + password
        # The broker sends basic.cancel only to clients that say they take it.
        capabilities = amqp.shortstr("consumer_cancel_notify") + b"t\x01"
        properties = amqp.shortstr("capabilities") + b"F" + _table(capabilities)
        properties += amqp.shortstr("connection_name") + b"S" + _table(b"rgi-backlog")
        start_ok = (
            _table(properties)
            + amqp.shortstr("PLAIN")
            + struct.pack(">I", len(auth))
            + auth
            + amqp.shortstr("en_US")
        )
        self.sock.sendall(amqp.method(0, (10, 11), start_ok))
        tune = self.expect(CONNECTION_TUNE)
        channel_max = struct.unpack(">H", tune[:2])[0]
        tune_ok = struct.pack(">HIH", channel_max, 131072, 0)  # no heartbeats
        self.sock.sendall(amqp.method(0, (10, 31), tune_ok))
        vhost = amqp.shortstr(clients.AMQP_VHOST) + amqp.shortstr("") + b"\0"
        self.sock.sendall(amqp.method(0, (10, 40), vhost))
        self.expect(CONNECTION_OPEN_OK)
        self.sock.sendall(amqp.channel_open(1))
        self.expect(CHANNEL_OPEN_OK)
        self.sock.sendall(amqp.method(1, amqp.BASIC_QOS, struct.pack(">IHB", 0, PREFETCH, 0)))
        self.expect(BASIC_QOS_OK)

    def _read(self):
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("the broker closed the connection")
        self.stream += data
        while len(self.stream) - self._parsed >= 8:
            ftype, channel, size = struct.unpack_from(">BHI", self.stream, self._parsed)
            end = self._parsed + 7 + size
            if len(self.stream) <= end:
                break
            assert self.stream[end] == amqp.FRAME_END, "lost the broker's frames"
            self.frames.append(
                (self._parsed, ftype, channel, bytes(self.stream[self._parsed + 7 : end]))
            )
            self._parsed = end + 1

    def wait(self, predicate, timeout=10):
        """Read until predicate(frame) holds for a frame not looked at yet; that frame."""
        deadline = time.monotonic() + timeout
        looked = getattr(self, "_looked", 0)
        while True:
            while looked < len(self.frames):
                frame = self.frames[looked]
                looked += 1
                if predicate(frame):
                    self._looked = looked
                    return frame
            if time.monotonic() >= deadline:
                raise AssertionError("nothing awaited came in %d s" % timeout)
            self._read()

    def expect(self, class_method):
        def wanted(frame):
            _offset, ftype, _channel, payload = frame
            if ftype != amqp.METHOD:
                return False
            got = struct.unpack(">HH", payload[:4])
            if got in (amqp.CONNECTION_CLOSE, amqp.CHANNEL_CLOSE):
                return True
            return got == class_method

        _offset, _ftype, _channel, payload = self.wait(wanted)
        got = struct.unpack(">HH", payload[:4])
        if got != class_method:
            raise ConnectionError("%r instead of %r: %r" % (got, class_method, payload[4:80]))
        return payload[4:]

    def consume(self, queue, tag):
        """basic.consume; True on consume-ok, False when the broker closes the channel."""
        self.sock.sendall(amqp.consume(1, queue, tag=tag))
        try:
            self.expect(amqp.BASIC_CONSUME_OK)
        except ConnectionError:
            return False
        return True

    def drain_to_cancel(self, tag):
        """Read until the broker's basic.cancel of tag; its offset in the stream."""

        def cancel(frame):
            _offset, ftype, channel, payload = frame
            return (
                ftype == amqp.METHOD
                and channel == 1
                and payload[:4] == struct.pack(">HH", *amqp.BASIC_CANCEL)
                and payload[4 : 5 + len(tag)] == amqp.shortstr(tag)
            )

        offset, _t, _c, _p = self.wait(cancel)
        return offset

    def close(self):
        self.sock.close()


def fill(addr, queue, count):
    """Declare queue and publish count small messages to it, confirmed (pika)."""
    import pika

    params = pika.ConnectionParameters(
        host=addr,
        credentials=pika.PlainCredentials(clients.AMQP_USER, clients.AMQP_PASSWORD),
        client_properties={"connection_name": "rgi-backlog-filler"},
    )
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        ch.queue_declare(queue, durable=False, auto_delete=False)
        ch.confirm_delivery()
        for _ in range(count):
            ch.basic_publish("", queue, BODY)
    finally:
        conn.close()


@pytest.fixture
def recorder(limited):
    with Recorder("egress", records=65536) as r:
        r.attach(limited["netns"], IFACE)
        yield r


def test_cancels_behind_a_backlog_of_deliveries_free_the_slot(ansible, limited, recorder):
    names = ["rgi-backlog-%d" % i for i in range(ROUNDS + 1)]
    before = limiter_entry(info(ansible, HOST, connections=False))["counters"]
    client = RawConsumer(limited["ipv4"])
    rounds = []
    with deleted_after(HOST, names), contextlib.closing(client):
        (isn,) = {
            r.seq
            for r in recorder.records()
            if r.flags & TCP_SYN and r.peer_port == client.local_port
        }
        fill(limited["ipv4"], names[0], MESSAGES)
        assert client.consume(names[0], "c0"), "the first consume was refused"
        for i in range(ROUNDS):
            recorder.clear()
            time.sleep(STALL)  # not reading: the deliveries queue up at the broker
            delete_queue(HOST, names[i])
            time.sleep(STALL)  # the cancel is behind them
            fill(limited["ipv4"], names[i + 1], MESSAGES)
            cancel_at = client.drain_to_cancel("c%d" % i)
            records = [r for r in recorder.records() if r.peer_port == client.local_port]
            start, payload, data_len = packet_at(records, isn, cancel_at) or (cancel_at, 0, 0)
            ahead = sum(1 for f in client.frames if start <= f[0] < cancel_at)
            taken = client.consume(names[i + 1], "c%d" % (i + 1))
            rounds.append(
                dict(round=i, packet=payload, paged=data_len, frames_ahead=ahead, taken=taken)
            )
            assert taken, "re-subscription %d refused: %r" % (i + 1, rounds)

        # One consumer, as the broker says, and nothing missed.
        entry = limiter_entry(info(ansible, HOST, connections=True))
        conn = connection_of(entry, client)
        assert conn is not None and conn["consumers"] == 1, conn
        broker = broker_connections(HOST)[client.local_port]
        assert sum(broker["channels"].values()) == 1, broker
        counters = entry["counters"]
        assert counters["missed"] == before["missed"], counters
        assert counters["cancels"] - before["cancels"] >= ROUNDS, counters
    print("\nper round, the cancel's packet:", rounds)
    deep = [r for r in rounds if r["paged"] > 0 and r["frames_ahead"] > WALK]
    assert deep, "no round put the cancel behind more than %d frames of one paged packet: %r" % (
        WALK,
        rounds,
    )
