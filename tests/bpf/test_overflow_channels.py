"""Overflow channel entries go with their connection (issue 7, item 5).

A connection keeps the consumer counts of 8 channels in its own entry (channel n in slot
n mod 8); a channel whose slot another channel holds goes to the `channels` map, and the
connection lists it in its entry (conn_state.over). These tests show that such entries
leave with the connection, at every way it can end or restart, and that under churn of
more connections than the maps hold a long-lived connection's idle overflow channels are
neither lost nor pushed out by the leftovers of ended connections.
"""

import ctypes
import os

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _bpfsys, _layout
from tests.lib import amqp, packets
from tests.lib.dataplane import TC_ACT_OK, TC_ACT_SHOT, Flow
from tests.lib.tcp_harness import map_size

pytestmark = pytest.mark.bpf

LIMIT = 16
# Channels 1..12, one consumer each: 1..8 in the entry's slots (8 in slot 0), 9..12 in
# the channels map (their slots 1..4 are held by channels 1..4).
CHANNELS = range(1, 13)
OVERFLOW = [ch for ch in CHANNELS if ch > _layout.CHAN_SLOTS]
SERVER_ISN = 90000


def opened(dp, client="198.18.0.2", client_port=40000):
    flow = Flow(dp, client=client, client_port=client_port)
    assert flow.handshake() == TC_ACT_OK
    payload = b"".join(amqp.channel_open(ch) + amqp.consume(ch) for ch in CHANNELS)
    assert flow.send(payload) == TC_ACT_OK
    assert flow.channels() == {ch: 1 for ch in CHANNELS}
    return flow


def overflow_entries(dp):
    """[(conn_key bytes, channel, epoch)] of every entry in the channels map."""
    fd = dp.map_fds["channels"]
    out = []
    for raw_key in _bpfsys.map_keys(fd, ctypes.sizeof(_layout.ChanKey)):
        key = _layout.decode(_layout.ChanKey, raw_key)
        raw = _bpfsys.map_lookup(fd, raw_key, ctypes.sizeof(_layout.ChanState))
        if raw is not None:
            epoch = _layout.decode(_layout.ChanState, raw).epoch
            out.append((bytes(key.conn), key.channel, epoch))
    return out


def conn_key(flow):
    return bytes(_layout.conn_key(flow.client, flow.client_port, flow.broker, flow.dp.port))


def end_fin(flow):
    assert flow.send(flags=packets.FIN | packets.ACK) == TC_ACT_OK
    assert flow.state() is None


def end_fin_with_data(flow):
    assert flow.send(amqp.heartbeat(), flags=packets.FIN | packets.ACK | packets.PSH) == 0
    assert flow.state() is None


def end_rst(flow):
    assert flow.send(flags=packets.RST) == TC_ACT_OK
    assert flow.state() is None


def end_connection_close(flow):
    assert flow.send(amqp.connection_close()) == TC_ACT_OK
    assert flow.state().ended == _layout.ENDED_CLOSED


def end_connection_close_ok(flow):
    assert flow.send(amqp.connection_close_ok()) == TC_ACT_OK
    assert flow.state().ended == _layout.ENDED_CLOSED


def end_broker_connection_close(flow):
    """The broker closes the connection (its connection.close, on the egress program)."""
    close = amqp.method(0, amqp.CONNECTION_CLOSE, b"\x01\x40" + amqp.shortstr("x") + b"\0" * 4)
    packet = packets.tcp_packet(
        flow.broker, flow.client, flow.dp.port, flow.client_port, SERVER_ISN, close
    )
    assert flow.dp.run_egress(packet) == TC_ACT_OK
    assert flow.state().ended == _layout.ENDED_CLOSED


def end_syn_restart(flow):
    """The 4-tuple's next connection: a SYN, then its protocol header at the SYN's seq."""
    isn = flow.seq + 100000
    assert flow.send(flags=packets.SYN, seq=isn - 1) == TC_ACT_OK
    flow.seq = isn
    assert flow.send(amqp.PROTOCOL_HEADER + amqp.channel_open(1)) == TC_ACT_OK
    assert flow.state().consumers == 0


def end_reset_action(flow):
    """reset: the over-limit consume becomes a RST (the dataplane's limit is LIMIT)."""
    for ch in range(13, 13 + LIMIT - len(CHANNELS)):
        assert flow.send(amqp.channel_open(ch) + amqp.consume(ch)) == TC_ACT_OK
    assert flow.send(amqp.consume(1)) == TC_ACT_OK  # rewritten to a RST, passed
    assert flow.state().ended == _layout.ENDED_RESET


ENDS = {
    "fin": end_fin,
    "fin_with_data": end_fin_with_data,
    "rst": end_rst,
    "connection_close": end_connection_close,
    "connection_close_ok": end_connection_close_ok,
    "broker_connection_close": end_broker_connection_close,
    "syn_restart": end_syn_restart,
    "reset_action": end_reset_action,
}


@pytest.mark.parametrize("how", sorted(ENDS))
def test_an_ended_connection_leaves_no_overflow_entry(dataplanes, how):
    dp = dataplanes(limit=LIMIT, action="reset" if how == "reset_action" else "drop")
    flow = opened(dp)
    other = opened(dp, client_port=40001)
    mine = conn_key(flow)
    assert {ch for key, ch, _e in overflow_entries(dp) if key == mine} == set(OVERFLOW)
    ENDS[how](flow)
    assert [ch for key, ch, _e in overflow_entries(dp) if key == mine] == []
    # The other connection's entries are its own business: untouched.
    assert other.channels() == {ch: 1 for ch in CHANNELS}


def test_an_overflow_channel_freed_leaves_the_map(dataplanes):
    dp = dataplanes(limit=LIMIT, action="drop")
    flow = opened(dp)
    assert flow.send(amqp.cancel(9) + amqp.channel_close(10)) == TC_ACT_OK
    assert sorted(ch for _k, ch, _e in overflow_entries(dp)) == [11, 12]
    # Channel 25 takes channel 9's place in the list (25 mod 16), and goes with the
    # connection like the others.
    assert flow.send(amqp.channel_open(25) + amqp.consume(25)) == TC_ACT_OK
    assert 25 in flow.state().over and 9 not in flow.state().over
    end_fin(flow)
    assert overflow_entries(dp) == []


# -- more connections than the maps hold ---------------------------------------------------
PRESSURE = 2  # churn connections: this many times what the conns map holds
HEARTBEAT_EVERY = 1000  # churn connections between two heartbeats of the long-lived one


def churn(dp, flavour, count, on_heartbeat):
    """count connections, one segment each: the protocol header and a consumer on
    channels 1 and 9 (so one overflow entry each); "ended" ones carry FIN (over at once),
    "live" ones stay open (the conns map evicts them, no hook tells the channels map)."""
    payload = amqp.PROTOCOL_HEADER + b"".join(
        amqp.channel_open(ch) + amqp.consume(ch) for ch in (1, 9)
    )
    flags = packets.ACK | packets.PSH | (packets.FIN if flavour == "ended" else 0)
    for k in range(count):
        if k % HEARTBEAT_EVERY == 0:
            on_heartbeat()
        packet = packets.tcp_packet(
            "198.19.%d.1" % (k // 60000),
            "198.18.0.1",
            1024 + k % 60000,
            dp.port,
            5000,
            payload,
            flags,
        )
        verdict, _out = dp.run(packet)
        assert verdict == TC_ACT_OK


@pytest.mark.parametrize("flavour", ["ended", "live"])
def test_a_live_connections_overflow_channels_outlast_churn(dataplanes, flavour):
    """A long-lived connection with idle consumers on channels beyond its 8 slots sends
    only heartbeats while twice as many connections as the conns map holds come and go,
    each with a channel in the overflow map. Its cancels and closes then still free its
    consumers (it gets exactly LIMIT again), and the overflow map holds nothing of the
    ended connections."""
    dp = dataplanes(limit=LIMIT, action="drop")
    count = map_size(dp.source, "conns") * PRESSURE
    assert count > map_size(dp.source, "channels"), "the churn must be able to fill the map"
    # One CPU for the whole test: LRU maps keep per-CPU free lists.
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        flow = opened(dp)
        churn(dp, flavour, count, lambda: flow.send(amqp.heartbeat()))
        assert flow.channels() == {ch: 1 for ch in CHANNELS}
        # Its overflow channels are freed by what the client sends: a cancel, a close.
        assert flow.send(amqp.cancel(9) + amqp.channel_close(10) + amqp.cancel(11)) == 0
        assert flow.consumers() == len(CHANNELS) - 3
        # So it gets exactly LIMIT consumers again, no fewer (an honest client refused)
        # and no more.
        for i in range(3 + LIMIT - len(CHANNELS)):
            ch = 20 + i
            assert flow.send(amqp.channel_open(ch) + amqp.consume(ch)) == TC_ACT_OK, i
        assert flow.consumers() == LIMIT
        assert flow.send(amqp.consume(12)) == TC_ACT_SHOT
        if flavour == "ended":
            mine = conn_key(flow)
            leftovers = [e for e in overflow_entries(dp) if e[0] != mine]
            assert leftovers == [], "%d entries of ended connections" % len(leftovers)
    finally:
        os.sched_setaffinity(0, cpus)
