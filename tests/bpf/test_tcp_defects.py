"""The TCP and AMQP defects of issue 7, item 1, one named test each, packet by packet.

Each test failed on the classifier before its fix: what a real client's TCP (or a faulty
or hostile one) sends, against what the broker's TCP and AMQP would accept. The limit is
reached first where a consume let through would show.
"""

import ctypes
import struct

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import (
    _bpfsys,
    _layout,
)
from tests.lib import amqp, packets
from tests.lib.dataplane import TC_ACT_OK, TC_ACT_SHOT, Flow

pytestmark = pytest.mark.bpf


def opened(dp, **kwargs):
    flow = Flow(dp, **kwargs)
    assert flow.handshake() == TC_ACT_OK
    return flow


def stray(flow, flags, offset, payload=b""):
    """A segment at flow.seq + offset that leaves the flow's own sequence alone."""
    seq = (flow.seq + offset) & 0xFFFFFFFF
    return flow.dp.run(flow.packet(payload, seq=seq, flags=flags))[0]


def at_the_limit(dp, limit=3, **kwargs):
    flow = opened(dp, **kwargs)
    for _i in range(limit):
        assert flow.send(amqp.consume(1)) == TC_ACT_OK
    return flow


# -- faulty clients let through ------------------------------------------------------------


def test_refused_consume_retransmitted_after_a_later_segment_is_refused_again(dp):
    """drop: the client's TCP sends its next segment (a heartbeat) while the refused one
    waits for retransmission; the broker queues it behind the hole. The retransmission of
    the consume must be refused again, not skipped as already seen."""
    flow = at_the_limit(dp)
    hole = flow.seq
    consume = amqp.consume(1)
    assert flow.send(consume) == TC_ACT_SHOT
    assert flow.send(amqp.heartbeat(), seq=hole + len(consume)) == TC_ACT_OK
    assert flow.send(amqp.heartbeat() + amqp.consume(2), seq=hole + len(consume) + 8) == 0
    for _i in range(3):
        assert flow.send(consume, seq=hole) == TC_ACT_SHOT
    assert flow.consumers() == 3
    assert flow.channels() == {1: 3}


@pytest.mark.parametrize(
    "isn, first",
    [
        pytest.param(0, amqp.PROTOCOL_HEADER + amqp.consume(1) * 4, id="new-connection-isn-0"),
        pytest.param(0x90000000, amqp.consume(1) * 4, id="older-connection-high-isn"),
    ],
)
def test_refusal_in_the_first_segment_seen_sets_the_stream_position(dp, isn, first):
    """The first segment seen of a connection (a new one, one that predates the limiter or
    was evicted) is refused: later segments must still be walked from its position."""
    flow = Flow(dp, isn=isn)
    assert flow.send(first) == TC_ACT_SHOT
    assert flow.send(first) == TC_ACT_SHOT  # the retransmission
    state = flow.state()
    assert state is not None and state.next_hdr == (isn + (8 if isn == 0 else 0)) & 0xFFFFFFFF
    # Cut so that the three allowed consumes pass and the fourth comes alone.
    assert flow.send(first[: -len(amqp.consume(1))]) == TC_ACT_OK
    assert flow.consumers() == 3
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT


def test_partial_retransmission_inside_a_stashed_header_keeps_the_stash(dp):
    """A retransmission that ends inside the header being assembled, shorter than what was
    stashed, must not shrink the stash: the next segment completes the header."""
    flow = at_the_limit(dp)
    start = flow.seq
    consume = amqp.consume(4)
    assert flow.send(consume[:6]) == TC_ACT_OK
    assert flow.send(consume[:4], seq=start) == TC_ACT_OK
    assert flow.state().stash_len == 6
    assert flow.send(consume[6:], seq=start + 6) == TC_ACT_SHOT
    assert flow.consumers() == 3


@pytest.mark.parametrize(
    "offset",
    [
        pytest.param(1, id="in-window-not-exact"),
        pytest.param(5000, id="ahead"),
        pytest.param(-5000, id="behind"),
        pytest.param(1 << 31, id="half-the-sequence-space"),
    ],
)
@pytest.mark.parametrize("flags", [packets.RST, packets.RST | packets.ACK], ids=["rst", "rst-ack"])
def test_rst_not_at_the_next_sequence_number_is_ignored(dp, flags, offset):
    """RFC 5961: the broker's TCP resets only on a RST exactly at the next sequence number
    it expects; it ignores any other (a challenge ACK at most). So must the limiter."""
    flow = at_the_limit(dp)
    assert stray(flow, flags, offset) == TC_ACT_OK
    assert flow.consumers() == 3
    assert flow.send(amqp.consume(2)) == TC_ACT_SHOT
    assert dp.counters()["conns_forgotten"] == 0


def test_rst_at_the_next_sequence_number_after_reordering_forgets(dp):
    """The next sequence number the broker expects is past segments that arrived out of
    order once the hole before them is filled."""
    flow = at_the_limit(dp)
    hole = flow.seq
    first, second = amqp.heartbeat(), amqp.heartbeat() * 2
    assert flow.send(second, seq=hole + len(first)) == TC_ACT_OK  # ahead of a hole
    assert flow.send(first, seq=hole) == TC_ACT_OK  # fills it
    assert flow.send(flags=packets.RST, seq=hole + len(first) + len(second)) == TC_ACT_OK
    assert flow.state() is None


@pytest.mark.parametrize("offset", [0, 1, 5000, -5000])
def test_syn_on_a_live_connection_is_ignored(dp, offset):
    """RFC 5961: a SYN on an established connection never resets it."""
    flow = at_the_limit(dp)
    assert stray(flow, packets.SYN, offset) == TC_ACT_OK
    assert flow.consumers() == 3
    assert flow.send(amqp.consume(2)) == TC_ACT_SHOT


@pytest.mark.parametrize("offset", [5000, -5000, 1 << 31])
def test_fin_out_of_order_does_not_forget_the_connection(dp, offset):
    """A FIN the broker's TCP would not take now (beyond a hole, or outside the window)."""
    flow = at_the_limit(dp)
    fin = packets.FIN | packets.ACK
    assert stray(flow, fin, offset) == TC_ACT_OK
    assert flow.consumers() == 3
    assert flow.send(amqp.consume(2)) == TC_ACT_SHOT


def test_reset_refusal_ahead_of_a_gap_does_not_end_the_connection(dataplanes):
    """reset: a RST ahead of a hole is ignored by the broker's TCP (RFC 5961), so the
    segment is dropped instead, and the connection stays tracked: its retransmission, in
    order, is then turned into the RST that ends it. (The hole is inside a message body,
    so where the segment's frames start is known.)"""
    dp = dataplanes(limit=1, action="reset")
    flow = opened(dp)
    assert flow.send(amqp.consume(1)) == TC_ACT_OK
    message = amqp.publish(1, b"x" * 200)
    assert flow.send(message[:100]) == TC_ACT_OK
    hole = flow.seq
    ahead = flow.packet(message[150:] + amqp.consume(2), seq=hole + 50)
    verdict, out = dp.run(ahead)
    assert verdict == TC_ACT_SHOT
    assert flow.state().ended == _layout.ENDED_NO
    # Everything after it is still limited, and the hole filled, the retransmission resets.
    assert flow.send(message[100:150], seq=hole) == TC_ACT_OK
    verdict, out = dp.run(ahead)
    assert verdict == TC_ACT_OK and packets.tcp_flags(out) & packets.RST
    assert flow.state().ended == _layout.ENDED_RESET


def test_reset_refusal_of_a_retransmission_overlapping_passed_bytes_drops(dataplanes):
    """reset: a segment that starts before the next sequence number (old bytes coalesced
    with the refused consume) would be a RST the broker ignores: drop it instead."""
    dp = dataplanes(limit=1, action="reset")
    flow = opened(dp)
    start = flow.seq
    assert flow.send(amqp.consume(1)) == TC_ACT_OK
    assert flow.send(amqp.consume(1) + amqp.consume(2), seq=start) == TC_ACT_SHOT
    assert flow.state().ended == _layout.ENDED_NO
    verdict, out = dp.run(flow.packet(amqp.consume(2)))
    assert verdict == TC_ACT_OK and packets.tcp_flags(out) & packets.RST


# -- segments out of order: never a count raised, nothing skipped ----------------------------


@pytest.mark.parametrize("cut", [1, 3, 7])
def test_protocol_header_cut_across_segments_is_followed(dataplanes, cut):
    """A client's TCP may cut the 8-octet protocol header (harness seed 143003700500006:
    segments [0,7) and [7,357)): the connection is followed from its SYN, and the third
    consume at limit 2 is refused."""
    dp = dataplanes(limit=2, action="drop")
    flow = Flow(dp)
    assert flow.send(flags=packets.SYN, seq=flow.seq - 1) == TC_ACT_OK
    stream = amqp.PROTOCOL_HEADER + amqp.consume(1) + amqp.consume(2)
    assert flow.send(stream[:cut]) == TC_ACT_OK
    assert flow.send(stream[cut:]) == TC_ACT_OK
    assert flow.channels() == {1: 1, 2: 1}
    assert flow.send(amqp.consume(3)) == TC_ACT_SHOT


def test_protocol_header_cut_without_a_syn_seen_is_followed(dp):
    """The first bytes of the protocol header, alone, start the connection (no SYN seen:
    the limiter attached during the handshake)."""
    flow = Flow(dp, isn=4242)
    assert flow.send(amqp.PROTOCOL_HEADER[:5]) == TC_ACT_OK
    assert flow.send(amqp.PROTOCOL_HEADER[5:] + amqp.consume(1) * 3) == TC_ACT_OK
    assert flow.consumers() == 3
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT


def test_first_segment_seen_out_of_order_after_the_syn_is_not_taken_as_frames(dp):
    """Harness seed 304685592200040: after the SYN, a body segment that looks like frames
    arrives before the protocol header. It must not start the connection there."""
    flow = Flow(dp)
    assert flow.send(flags=packets.SYN, seq=flow.seq - 1) == TC_ACT_OK
    start = flow.seq
    lookalikes = amqp.consume(2) * 5
    message = amqp.publish(1, lookalikes)
    stream = amqp.PROTOCOL_HEADER + message + amqp.consume(1)
    cut = len(amqp.PROTOCOL_HEADER) + len(message) - len(lookalikes) - 1
    assert flow.send(stream[cut:], seq=start + cut) == TC_ACT_OK  # looks like 5 consumes
    assert flow.send(stream[:cut], seq=start) == TC_ACT_OK
    assert flow.consumers() == 0  # the consume of the stream passed unwalked: adrift
    assert flow.send(amqp.consume(1)) == TC_ACT_OK


def test_body_segment_after_a_gap_is_never_taken_as_frames(dp):
    """Issue 7: after a gap (reordering, loss before us), a body segment that looks like
    frames was taken as them, refusing an honest client (harness seed 304685592200000)."""
    flow = opened(dp)
    assert flow.send(amqp.consume(1)) == TC_ACT_OK
    lookalikes = amqp.consume(3) * 6
    message = amqp.publish(1, lookalikes)
    hole = flow.seq
    cut = len(message) - len(lookalikes) - 1
    # The segment from the first look-alike on arrives first, beyond a hole.
    assert flow.send(message[cut:], seq=hole + cut) == TC_ACT_OK
    assert flow.consumers() == 1
    assert flow.send(message[:cut], seq=hole) == TC_ACT_OK  # fills the hole
    assert flow.send(amqp.consume(2) + amqp.consume(2)) == TC_ACT_OK  # 3 live, honest
    assert flow.channels() == {1: 1, 2: 2}


def test_cancel_out_of_order_never_leaves_the_count_too_high(dataplanes):
    """Issue 7: a basic.cancel in a segment that arrived ahead of a hole (harness seed
    39236485900012) was skipped, the count stayed one too high and the client's next
    consume was refused. Such a stream is no longer limited (fail open), unless strict."""
    dp = dataplanes(limit=2, action="drop")
    flow = opened(dp)
    assert flow.send(amqp.consume(1) + amqp.consume(2)) == TC_ACT_OK
    hole = flow.seq
    first, second = amqp.heartbeat(), amqp.cancel(2)
    assert flow.send(second, seq=hole + len(first)) == TC_ACT_OK  # ahead of the hole
    assert flow.send(first, seq=hole) == TC_ACT_OK  # the hole filled: the cancel is past
    assert flow.send(amqp.consume(2)) == TC_ACT_OK  # two live consumers: honest
    assert flow.state().synced == 0


def test_segment_far_ahead_does_not_move_the_position(dp):
    """Deliberate reordering: a segment far ahead that starts on a frame used to move the
    position, so the consumes in the bytes before it passed unwalked."""
    flow = at_the_limit(dp)
    assert stray(flow, packets.ACK | packets.PSH, 5000, amqp.heartbeat()) == TC_ACT_OK
    assert flow.send(amqp.consume(2)) == TC_ACT_SHOT
    assert flow.consumers() == 3


def test_protocol_header_ahead_without_a_syn_does_not_start_from_zero(dp):
    """A new protocol header beyond the stream, without a SYN, used to start the 4-tuple's
    count from zero."""
    flow = at_the_limit(dp)
    assert stray(flow, packets.ACK | packets.PSH, 5000, amqp.PROTOCOL_HEADER) == TC_ACT_OK
    assert flow.consumers() == 3
    assert flow.send(amqp.consume(2)) == TC_ACT_SHOT


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_syn_after_connection_close_does_not_start_a_connection_elsewhere(dataplanes, strict):
    """Harness seed 376269102501382 (control, strict, RG_TCP_SEED=7): after the client's
    connection.close, a SYN out of the window started a new connection at its sequence
    number, and strict then held the client's last bytes (its TCP still open) for ever."""
    dp = dataplanes(limit=2, action="reset", strict=strict)
    flow = opened(dp)
    close = amqp.connection_close()
    assert flow.send(close[:12]) == TC_ACT_OK
    assert stray(flow, packets.SYN, -(1 << 30)) == TC_ACT_OK
    assert flow.send(close[12:]) == TC_ACT_OK
    assert flow.send(amqp.connection_close_ok()) == TC_ACT_OK


# -- strict mode ------------------------------------------------------------------------------


def test_strict_holds_a_segment_ahead_of_the_stream(dataplanes):
    """strict: a segment ahead of a hole that may hold a frame header is dropped, to come
    again in order; the cancel in it then counts, and the limit holds exactly."""
    dp = dataplanes(limit=2, action="drop", strict=True)
    flow = opened(dp)
    assert flow.send(amqp.consume(1) + amqp.consume(2)) == TC_ACT_OK
    hole = flow.seq
    first, second = amqp.heartbeat(), amqp.cancel(2) + amqp.consume(3)
    assert flow.send(second, seq=hole + len(first)) == TC_ACT_SHOT
    assert dp.counters()["held"] == 1
    assert flow.send(first, seq=hole) == TC_ACT_OK
    assert flow.send(second) == TC_ACT_OK  # in order now: cancel, then consume
    assert flow.channels() == {1: 1, 3: 1}
    assert flow.send(amqp.consume(3)) == TC_ACT_SHOT


def test_strict_walks_a_segment_ahead_inside_a_body(dataplanes):
    """strict: a hole inside a message body holds no frame header: the segment after it
    is walked where it is, not dropped."""
    dp = dataplanes(limit=1, action="drop", strict=True)
    flow = opened(dp)
    message = amqp.publish(1, b"x" * 200)
    assert flow.send(message[:100]) == TC_ACT_OK
    hole = flow.seq
    assert flow.send(message[150:] + amqp.consume(1), seq=hole + 50) == TC_ACT_OK
    assert flow.send(amqp.consume(2)) == TC_ACT_SHOT  # at the position: over the limit
    assert flow.send(message[100:150], seq=hole) == TC_ACT_OK
    assert flow.consumers() == 1
    assert dp.counters()["held"] == 0


def test_strict_holds_segments_beyond_a_refused_consume(dataplanes):
    """strict: a hostile client that resends the refused segment's bytes changed cannot
    get the segments it sent after it delivered unwalked."""
    dp = dataplanes(limit=1, action="drop", strict=True)
    flow = opened(dp)
    assert flow.send(amqp.consume(1)) == TC_ACT_OK
    hole = flow.seq
    refused = amqp.consume(2)
    assert flow.send(refused) == TC_ACT_SHOT
    assert stray(flow, packets.ACK | packets.PSH, len(refused), amqp.consume(3)) == TC_ACT_SHOT
    changed = b"\x08" + refused[1:]  # the same bytes but the frame type: a heartbeat
    assert flow.send(changed, seq=hole) == TC_ACT_OK
    assert flow.consumers() == 1


def test_strict_reset_never_sends_a_rst_beyond_a_second_hole(dataplanes):
    """strict, reset (harness seed 88194292300051): one range of out-of-order bytes is
    followed, so a segment that would open a second hole is held; otherwise the holes
    merge, the limiter takes a later segment for the one the broker expects next, and its
    RST (ignored by the broker's TCP) ends the limiting."""
    dp = dataplanes(limit=1, action="reset", strict=True)
    flow = Flow(dp)
    assert flow.send(flags=packets.SYN, seq=flow.seq - 1) == TC_ACT_OK
    start = flow.seq
    stream = amqp.PROTOCOL_HEADER + amqp.publish(1, b"x" * 300) + amqp.consume(1)
    stream += amqp.consume(2)
    # The protocol header is lost; the first 100 octets of the message arrive.
    assert flow.send(stream[8:108], seq=start + 8) == TC_ACT_OK
    # Octets 108..118 are lost too; 118..128, inside the body, would open a second hole.
    assert flow.send(stream[118:128], seq=start + 118) == TC_ACT_SHOT
    assert dp.counters()["held"] == 1
    assert flow.send(stream[:8], seq=start) == TC_ACT_OK
    # The rest, from 128 on: the broker still waits for 108, so no RST, a drop.
    verdict, out = dp.run(flow.packet(stream[128:], seq=start + 128))
    assert verdict == TC_ACT_SHOT
    assert flow.state().ended == _layout.ENDED_NO
    assert flow.send(stream[108:], seq=start + 108) == TC_ACT_OK
    assert packets.tcp_flags(flow.last_out) & packets.RST


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_partial_retransmission_after_a_lost_sync_leaves_no_position_behind(dataplanes, strict):
    """Found by bench/gro.py (strict, 200-byte publishes stalled): a segment of more frames
    than the walk takes loses sync; a partial retransmission of it resumed the walk and left
    the connection synced at a position behind what the broker has, so every later segment
    was ahead of it: held for ever by strict, passed unwalked without it."""
    # 8 frames per program: the walk's bound (34 programs) within a test packet's reach.
    dp = dataplanes(limit=1, action="drop", strict=strict, max_frames=8)
    flow = opened(dp)
    start = flow.seq
    many = amqp.heartbeat() * (34 * 8 + 20)
    assert flow.send(many) == TC_ACT_OK
    assert flow.state().synced == 0
    assert flow.send(many[: len(many) - 40], seq=start) == TC_ACT_OK  # resumes, stops short
    assert flow.state().synced == 0
    assert flow.send(amqp.consume(1)) == TC_ACT_OK  # in order, on a frame: rejoins
    assert flow.state().synced == 1
    assert flow.send(amqp.consume(2)) == TC_ACT_SHOT


# -- state that cannot leak ---------------------------------------------------------------


def channel_entries(dp):
    fd = dp.map_fds["channels"]
    return list(_bpfsys.map_keys(fd, ctypes.sizeof(_layout.ChanKey)))


@pytest.mark.parametrize(
    "end",
    [
        pytest.param(lambda flow: flow.send(flags=packets.FIN | packets.ACK), id="fin"),
        pytest.param(lambda flow: flow.send(flags=packets.RST), id="rst"),
        pytest.param(lambda flow: flow.send(amqp.connection_close()), id="connection-close"),
    ],
)
def test_channel_entries_go_with_their_connection(dp, end):
    """Issue 7 item 5: channel entries of ended connections were never deleted, so under
    churn the channels LRU evicted the entries of live, idle consumers. A connection's
    channels are now kept in its own entry and end with it."""
    flow = opened(dp)
    assert flow.send(amqp.consume(1) + amqp.consume(2) + amqp.consume(2)) == TC_ACT_OK
    assert flow.channels() == {1: 1, 2: 2}
    assert channel_entries(dp) == []
    end(flow)
    assert flow.state() is None or flow.state().ended
    assert channel_entries(dp) == []
    assert flow.channels() == {}


def test_channels_beyond_the_slots_overflow_to_the_map_and_leave_it(dataplanes):
    """Channel n lives in slot n % 8 of its connection; a channel whose slot is taken goes
    to the channels map, and leaves it when its last consumer goes."""
    dp = dataplanes(limit=4, action="drop")
    flow = opened(dp)
    assert flow.send(amqp.consume(1) + amqp.consume(9) + amqp.consume(17)) == TC_ACT_OK
    assert flow.channels() == {1: 1, 9: 1, 17: 1}
    assert len(channel_entries(dp)) == 2
    assert flow.send(amqp.cancel(9) + amqp.channel_close(17)) == TC_ACT_OK
    assert flow.channels() == {1: 1}
    assert channel_entries(dp) == []
    # A refused segment undoes what it did in both places.
    assert flow.send(amqp.consume(9) + amqp.consume(2) + amqp.consume(3) + amqp.consume(4)) == 2
    assert flow.channels() == {1: 1}
    assert channel_entries(dp) == []
    assert flow.send(amqp.consume(9) + amqp.consume(2) + amqp.consume(3)) == TC_ACT_OK
    assert flow.channels() == {1: 1, 9: 1, 2: 1, 3: 1}


def test_an_adrift_connection_keeps_no_channels(dataplanes):
    """A connection that goes adrift (bytes it sent reached the broker unwalked) is no
    longer limited; its channels go at once."""
    dp = dataplanes(limit=2, action="drop")
    flow = opened(dp)
    assert flow.send(amqp.consume(1) + amqp.consume(9)) == TC_ACT_OK
    hole = flow.seq
    assert flow.send(amqp.cancel(1), seq=hole + 8) == TC_ACT_OK
    assert flow.send(amqp.heartbeat(), seq=hole) == TC_ACT_OK
    assert flow.state().synced == 0
    assert flow.channels() == {}


# -- malformed consumes pass uncounted ------------------------------------------------------


def malformed_consume_passes_uncounted(dp, segment):
    flow = opened(dp)
    assert flow.send(segment) == TC_ACT_OK
    assert flow.consumers() == 0
    counters = dp.counters()
    assert (counters["consumes_allowed"], counters["consumes_refused"]) == (0, 0)
    assert counters["unparsed"] == 1


def test_consume_with_a_wrong_end_octet_passes_uncounted(dataplanes):
    """The broker closes the connection on a frame without its end octet (501 FRAME_ERROR):
    that consume never makes a consumer."""
    bad = amqp.consume(1)[:-1] + b"\x00"
    malformed_consume_passes_uncounted(dataplanes(limit=0, action="drop"), bad + amqp.heartbeat())


def test_consume_on_channel_0_passes_uncounted(dataplanes):
    """basic.consume on channel 0 is a connection error (504 CHANNEL_ERROR) at the broker."""
    malformed_consume_passes_uncounted(dataplanes(limit=0, action="drop"), amqp.consume(0))


def test_frame_larger_than_frame_max_passes_uncounted(dataplanes):
    """AMQP's frame_max counts the 8 framing octets: a frame of frame_max - 7 payload
    octets is one octet too large, and the broker closes the connection on it."""
    frame_max = 4096
    dp = dataplanes(limit=0, action="drop", frame_max=frame_max)
    consume = amqp.consume(1)
    args = consume[11:-1]
    padded = args + b"\x00" * (frame_max - 7 - 4 - len(args))
    payload = struct.pack(">HH", *amqp.BASIC_CONSUME) + padded
    assert len(payload) == frame_max - 7
    # The segment with its header is judged (a test packet holds at most a page).
    malformed_consume_passes_uncounted(dp, amqp.frame(amqp.METHOD, 1, payload)[:100])
    # One octet less is a frame of exactly frame_max octets: counted (and refused).
    flow = opened(dp, client_port=40001)
    ok = amqp.frame(amqp.METHOD, 1, payload[:-1])
    assert len(ok) == frame_max
    assert flow.send(ok[:100]) == TC_ACT_SHOT
