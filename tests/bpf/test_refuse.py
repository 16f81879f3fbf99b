"""The refuse action, packet by packet: the over-limit basic.consume reaches the broker with
its queue name rewritten in place (the broker answers 404 NOT_FOUND on that channel alone),
the TCP checksum stays right, a retransmission is rewritten the same way, other frames pass
untouched; where no rewrite is possible the segment is dropped (counted); every refusal is
logged in the pinned ring that rabbit_tc_limit_info reads."""

import ctypes
import struct

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _bpfsys, _layout, _pins
from tests.lib import amqp, packets
from tests.lib.dataplane import TC_ACT_OK, TC_ACT_SHOT, Flow

pytestmark = pytest.mark.bpf

REFUSED = b"amq.rabbitguard.consumer-limit-refused"


def refused_name(length):
    if length < 4:
        return b"\x00" * length
    return (REFUSED + b"-" * 255)[:length]


def consume(channel, queue=b"q", tag=b""):
    """basic.consume with a queue name given as bytes."""
    args = struct.pack(">H", 0) + bytes([len(queue)]) + queue + bytes([len(tag)]) + tag
    return amqp.method(channel, amqp.BASIC_CONSUME, args + b"\x00" + struct.pack(">I", 0))


@pytest.fixture
def rdp(dataplanes):
    dp = dataplanes(limit=3, action="refuse")
    size = ctypes.sizeof(_layout.RefusalLog)
    _bpfsys.map_update(dp.map_fds["refusals"], b"\x00" * 4, b"\x00" * size)
    return dp


def opened(dp, **kwargs):
    flow = Flow(dp, **kwargs)
    assert flow.handshake() == TC_ACT_OK
    return flow


def payload_of(packet):
    """The TCP payload of an Ethernet + IPv4 packet."""
    ihl = (packet[14] & 0x0F) * 4
    total = struct.unpack("!H", packet[16:18])[0]
    tcp = 14 + ihl
    doff = (packet[tcp + 12] >> 4) * 4
    return packet[tcp + doff : 14 + total]


def test_fourth_consume_in_one_segment_is_rewritten_and_the_others_pass(rdp):
    flow = opened(rdp)
    queue = b"orders.incoming"
    frames = [consume(1, queue), consume(1, queue), consume(2, queue), consume(2, queue)]
    segment = b"".join(frames)
    assert flow.send(segment) == TC_ACT_OK
    out = payload_of(flow.last_out)
    expected = b"".join(frames[:3]) + consume(2, refused_name(len(queue)))
    assert out == expected
    assert refused_name(len(queue)) == b"amq.rabbitguard"
    assert packets.tcp_checksum_ok(flow.last_out)
    # The refused consume is not counted; the three before it are.
    assert flow.consumers() == 3
    assert flow.channels() == {1: 2, 2: 1}
    log = _pins.refusals(rdp.pin_dir)
    assert log["rewrites"] == 1 and log["fallbacks"] == 0
    (entry,) = log["refusals"]
    assert entry["client"] == flow.client and entry["client_port"] == flow.client_port
    assert (entry["channel"], entry["consumers"], entry["action"]) == (2, 3, "refuse")
    assert rdp.counters()["consumes_refused"] == 1


def test_a_retransmission_is_rewritten_the_same_way(rdp):
    flow = opened(rdp)
    for _ in range(3):
        assert flow.send(consume(1, b"work")) == TC_ACT_OK
    start = flow.seq
    segment = amqp.heartbeat() + consume(2, b"work") + amqp.heartbeat()
    assert flow.send(segment) == TC_ACT_OK
    first = flow.last_out
    # The same bytes again, and again coalesced with the next command.
    assert flow.send(segment, seq=start) == TC_ACT_OK
    assert flow.last_out == first
    more = segment + amqp.heartbeat()
    assert flow.send(more, seq=start) == TC_ACT_OK
    assert payload_of(flow.last_out) == amqp.heartbeat() + consume(2, b"amq.") + (
        amqp.heartbeat() * 2
    )
    assert packets.tcp_checksum_ok(flow.last_out)
    # A partial retransmission that starts inside the name.
    name_at = len(amqp.heartbeat()) + 14
    assert flow.send(segment[name_at + 2 :], seq=start + name_at + 2) == TC_ACT_OK
    assert payload_of(flow.last_out)[:2] == b"q."
    assert packets.tcp_checksum_ok(flow.last_out)
    assert flow.consumers() == 3
    assert _pins.refusals(rdp.pin_dir)["rewrites"] == 1  # logged once


def test_a_name_cut_by_the_segment_end_is_rewritten_in_both_segments(rdp):
    flow = opened(rdp)
    for _ in range(3):
        flow.send(consume(1, b"q"))
    queue = b"a-long-queue-name-for-the-cut"
    frame = consume(5, queue)
    cut = 14 + 10  # header, ids, reserved, length octet and 10 octets of the name
    assert flow.send(frame[:cut]) == TC_ACT_OK
    first = payload_of(flow.last_out)
    assert packets.tcp_checksum_ok(flow.last_out)
    assert flow.send(frame[cut:]) == TC_ACT_OK
    assert packets.tcp_checksum_ok(flow.last_out)
    assert first + payload_of(flow.last_out) == consume(5, refused_name(len(queue)))


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 38, 39, 255])
def test_names_of_every_length_keep_the_frame_length(rdp, length):
    flow = opened(rdp)
    for _ in range(3):
        flow.send(consume(1, b"q"))
    queue = bytes(range(0x41, 0x41 + 26)) * 10
    queue = queue[:length]
    assert flow.send(consume(3, queue, b"tag")) == TC_ACT_OK
    assert payload_of(flow.last_out) == consume(3, refused_name(length), b"tag")
    assert packets.tcp_checksum_ok(flow.last_out)


def test_an_empty_queue_name_falls_back_to_a_drop(rdp):
    """An empty name means the channel's last declared queue: no rewrite can refuse it."""
    flow = opened(rdp)
    for _ in range(3):
        flow.send(consume(1, b"q"))
    start = flow.seq
    assert flow.send(consume(1, b"")) == TC_ACT_SHOT
    assert flow.send(consume(1, b""), seq=start) == TC_ACT_SHOT
    log = _pins.refusals(rdp.pin_dir)
    assert log["fallbacks"] == 1 and log["rewrites"] == 0
    assert [e["action"] for e in log["refusals"]] == ["drop"]
    assert flow.consumers() == 3


def test_two_refusals_on_two_channels_in_one_segment_fall_back_to_a_drop(rdp):
    flow = opened(rdp)
    for _ in range(3):
        flow.send(consume(1, b"q"))
    assert flow.send(consume(2, b"q1") + consume(3, b"q2")) == TC_ACT_SHOT
    # On one channel, one rewrite is enough: the broker ignores the channel after the 404.
    assert flow.send(consume(2, b"q1") + consume(2, b"q2")) == TC_ACT_OK
    assert payload_of(flow.last_out) == consume(2, b"\x00\x00") + consume(2, b"q2")
    assert flow.consumers() == 3


def test_close_ok_frees_the_refused_channel(rdp):
    flow = opened(rdp)
    flow.send(consume(1, b"q") + consume(1, b"q") + consume(2, b"q"))
    assert flow.send(consume(2, b"q")) == TC_ACT_OK  # refused in place
    assert flow.channels() == {1: 2, 2: 1}
    assert flow.send(amqp.channel_close_ok(2)) == TC_ACT_OK
    assert flow.channels() == {1: 2}
    assert flow.send(amqp.channel_open(2) + consume(2, b"q")) == TC_ACT_OK
    assert payload_of(flow.last_out) == amqp.channel_open(2) + consume(2, b"q")
    assert flow.consumers() == 3


def test_the_log_keeps_the_last_64_newest_first(rdp):
    flows = []
    for port in range(41000, 41070):
        flow = opened(rdp, client_port=port)
        flow.send(consume(1, b"q") * 3)
        assert flow.send(consume(7, b"queue")) == TC_ACT_OK
        flows.append(flow)
    log = _pins.refusals(rdp.pin_dir)
    assert log["logged"] == 70 and log["rewrites"] == 70
    assert [e["client_port"] for e in log["refusals"]] == list(range(41069, 41005, -1))
    assert all(e["channel"] == 7 and e["consumers"] == 3 for e in log["refusals"])
    times = [e["time"] for e in log["refusals"]]
    assert times == sorted(times, reverse=True)


@pytest.mark.parametrize("action", ["drop", "reset", "monitor"])
def test_other_actions_log_their_refusals(dataplanes, action):
    dp = dataplanes(limit=1, action=action)
    size = ctypes.sizeof(_layout.RefusalLog)
    _bpfsys.map_update(dp.map_fds["refusals"], b"\x00" * 4, b"\x00" * size)
    flow = opened(dp)
    flow.send(consume(1, b"q"))
    start = flow.seq
    flow.send(consume(4, b"q"))
    if action == "drop":
        flow.send(consume(4, b"q"), seq=start)  # a retransmission is not logged again
    log = _pins.refusals(dp.pin_dir)
    assert [(e["action"], e["channel"], e["consumers"]) for e in log["refusals"]] == [
        (action, 4, 1)
    ]
    assert log["rewrites"] == 0
