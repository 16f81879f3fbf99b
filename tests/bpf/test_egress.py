"""The egress program: broker-to-client segments, crafted, through BPF_PROG_TEST_RUN.

Each test opens a connection on the ingress program (the client's consumes are counted
there), then feeds the broker's segments to the egress program of the same compiled
source and maps, on both payload read paths (conftest `dataplanes`).
"""

import random
import struct

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _bpfsys, _compile, _layout
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from tests.lib import amqp, packets
from tests.lib.dataplane import BROKER_V4, TC_ACT_OK, TC_ACT_SHOT, Flow

pytestmark = pytest.mark.bpf

SERVER_ISN = 5000


class Broker:
    """The broker's side of one Flow: its segments to the client, by sequence number."""

    def __init__(self, flow, isn=SERVER_ISN):
        self.flow, self.seq = flow, isn

    def packet(self, payload=b"", seq=None, flags=packets.ACK | packets.PSH):
        return packets.tcp_packet(
            self.flow.broker,
            self.flow.client,
            self.flow.dp.port,
            self.flow.client_port,
            self.seq if seq is None else seq,
            payload,
            flags,
        )

    def syn_ack(self):
        assert self.flow.dp.run_egress(self.packet(seq=self.seq - 1, flags=0x12)) == TC_ACT_OK

    def send(self, payload, seq=None, flags=packets.ACK | packets.PSH):
        """Run one segment; every egress verdict is TC_ACT_OK (fail open), checked here."""
        start = self.seq if seq is None else seq
        assert self.flow.dp.run_egress(self.packet(payload, start, flags)) == TC_ACT_OK
        self.seq = max(self.seq, start + len(payload))

    def send_cut(self, stream, cuts):
        """The stream from self.seq, cut at the given offsets into several segments."""
        start, bounds = self.seq, [0, *sorted(cuts), len(stream)]
        for a, b in zip(bounds, bounds[1:]):
            if b > a:
                self.send(stream[a:b], seq=start + a)


def opened(dp, consumers=0, channel=1, **kwargs):
    """A connection with `consumers` consumers on `channel`, the broker's SYN-ACK seen."""
    flow = Flow(dp, **kwargs)
    broker = Broker(flow)
    assert flow.send(flags=packets.SYN, seq=flow.seq - 1) == TC_ACT_OK
    broker.syn_ack()
    assert flow.send(amqp.PROTOCOL_HEADER) == TC_ACT_OK
    for _ in range(consumers):
        assert flow.send(amqp.consume(channel)) == TC_ACT_OK
    return flow, broker


def test_server_cancel_frees_the_slot(dp):
    flow, broker = opened(dp, consumers=3)
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT
    broker.send(amqp.consume_ok(1) + amqp.server_cancel(1))
    assert flow.consumers() == 2 and flow.channels() == {1: 2}
    assert flow.send(amqp.consume(1)) == TC_ACT_OK
    assert flow.consumers() == 3
    assert dp.counters()["cancels"] == 1


def test_resubscribing_after_each_server_cancel_is_never_refused(dp):
    flow, broker = opened(dp, consumers=1)
    for i in range(10):
        broker.send(amqp.deliver(1, b"m" * 50, delivery_tag=i + 1) + amqp.server_cancel(1))
        assert flow.send(amqp.consume(1)) == TC_ACT_OK, "re-subscription %d refused" % i
    assert flow.consumers() == 1


def test_a_client_at_the_limit_is_still_refused(dp):
    flow, broker = opened(dp, consumers=3)
    broker.send(amqp.consume_ok(1) * 3 + amqp.deliver(1, b"x" * 200))
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT
    assert flow.consumers() == 3


def test_cancel_inside_a_delivery_body_is_not_taken_as_one(dp):
    flow, broker = opened(dp, consumers=3)
    body = amqp.server_cancel(1) * 40
    broker.send(amqp.deliver(1, body))
    assert flow.consumers() == 3
    # The same body cut so that segments start inside it, right on a lookalike frame.
    stream = amqp.deliver(1, body)
    broker.send_cut(stream, cuts=[60, 60 + 13 * 5, 60 + 13 * 20])
    assert flow.consumers() == 3
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT


def test_body_spanning_many_segments_is_skipped_by_position(dp):
    flow, broker = opened(dp, consumers=2)
    body = amqp.server_cancel(1) * 300  # 3900 bytes of lookalike frames
    stream = amqp.deliver(1, body) + amqp.server_cancel(1)
    broker.send_cut(stream, cuts=range(1000, len(stream), 1000))
    assert flow.consumers() == 1


def test_retransmitted_cancel_decrements_once(dp):
    flow, broker = opened(dp, consumers=3)
    start = broker.seq
    segment = amqp.heartbeat() + amqp.server_cancel(1)
    broker.send(segment)
    broker.send(segment, seq=start)
    # Partly again, coalesced with a new frame.
    broker.send(segment[5:] + amqp.heartbeat(), seq=start + 5)
    assert flow.consumers() == 2 and flow.channels() == {1: 2}


def test_cancel_for_a_channel_without_consumers_never_goes_below_zero(dp):
    flow, broker = opened(dp, consumers=1, channel=1)
    broker.send(amqp.server_cancel(2) * 3)
    assert flow.consumers() == 1 and flow.channels() == {1: 1}
    broker.send(amqp.server_cancel(1) * 3)
    assert flow.consumers() == 0 and flow.channels() == {}
    for _ in range(3):
        assert flow.send(amqp.consume(1)) == TC_ACT_OK
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT


@pytest.mark.parametrize("cut", range(1, 13))
def test_cancel_cut_anywhere(dp, cut):
    flow, broker = opened(dp, consumers=3)
    stream = amqp.deliver(1, b"b" * 30) + amqp.server_cancel(1) + amqp.heartbeat()
    at = len(amqp.deliver(1, b"b" * 30))
    broker.send_cut(stream, cuts=[at + cut - 1 if cut > 1 else at - 1, at + cut])
    assert flow.consumers() == 2


def test_segments_cut_at_every_offset(dataplanes):
    dp = dataplanes(limit=100, action="drop")
    stream = (
        amqp.consume_ok(1)
        + amqp.deliver(1, amqp.server_cancel(1) * 4)
        + amqp.server_cancel(1)
        + amqp.heartbeat()
        + amqp.server_cancel(1)
    )
    for cut in range(1, len(stream)):
        flow, broker = opened(dp, consumers=5, client_port=20000 + cut)
        broker.send_cut(stream, cuts=[cut])
        assert flow.consumers() == 3, "cut at %d" % cut


def test_stashed_header_retransmitted_shorter_keeps_the_stash(dp):
    flow, broker = opened(dp, consumers=3)
    start = broker.seq
    cancel = amqp.server_cancel(1)
    broker.send(cancel[:9])
    broker.send(cancel[:4], seq=start)  # a shorter retransmission
    broker.send(cancel[9:], seq=start + 9)
    assert flow.consumers() == 2


def test_server_channel_close_frees_the_channel_once(dp):
    flow, broker = opened(dp, consumers=2, channel=1)
    assert flow.send(amqp.consume(2)) == TC_ACT_OK
    broker.send(amqp.channel_close(1))
    assert flow.channels() == {2: 1} and flow.consumers() == 1
    # The client's close-ok, and the broker's close-ok of an unrelated close, change nothing.
    assert flow.send(amqp.channel_close_ok(1)) == TC_ACT_OK
    broker.send(amqp.channel_close_ok(2))
    assert flow.channels() == {2: 1} and flow.consumers() == 1


def test_server_cancel_and_close_on_an_overflow_channel(dp):
    # Channel 9's slot (9 mod 8 = 1) is held by channel 1: its count is in the overflow map.
    flow, broker = opened(dp, consumers=1, channel=1)
    assert flow.send(amqp.consume(9)) == TC_ACT_OK
    assert flow.send(amqp.consume(9)) == TC_ACT_OK
    assert flow.channels() == {1: 1, 9: 2} and flow.consumers() == 3
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT
    broker.send(amqp.consume_ok(1) + amqp.server_cancel(9))
    assert flow.channels() == {1: 1, 9: 1} and flow.consumers() == 2
    broker.send(amqp.channel_close(9))
    assert flow.channels() == {1: 1} and flow.consumers() == 1
    # Freed for real: two more consumers fit, the third is refused.
    assert flow.send(amqp.consume(9)) == TC_ACT_OK
    assert flow.send(amqp.consume(2)) == TC_ACT_OK
    assert flow.send(amqp.consume(3)) == TC_ACT_SHOT


def test_a_total_freed_twice_reads_as_zero_and_is_set_right(dp):
    """Both directions freed the same consumer at once (the client's cancel crossing the
    broker's, on two CPUs): each applies its change as a delta, so the total can go below
    zero for a moment. The next client segment reads it as zero and writes it right."""
    flow, broker = opened(dp, consumers=1, channel=1)
    state = flow.state()
    state.consumers = 0xFFFFFFFF  # -1: what the two deltas leave
    key = _layout.conn_key(flow.client, flow.client_port, flow.broker, dp.port)
    _bpfsys.map_update(dp.map_fds["conns"], bytes(key), bytes(state))
    for expected in (1, 2, 3):
        assert flow.send(amqp.consume(2)) == TC_ACT_OK
        assert flow.consumers() == expected
    assert flow.send(amqp.consume(2)) == TC_ACT_SHOT
    assert flow.consumers() == 3


def test_cancel_ok_is_not_a_second_cancel(dp):
    flow, broker = opened(dp, consumers=2)
    assert flow.send(amqp.cancel(1)) == TC_ACT_OK
    broker.send(amqp.cancel_ok(1))
    assert flow.consumers() == 1


def test_server_connection_close_ends_the_connection(dp):
    flow, broker = opened(dp, consumers=3)
    broker.send(amqp.connection_close())
    assert flow.state().ended and flow.consumers() == 0


def test_connection_picked_up_mid_stream(dp):
    """A connection older than the egress program (no SYN-ACK seen): joined at a frame."""
    flow = Flow(dp)
    assert flow.send(amqp.PROTOCOL_HEADER) == TC_ACT_OK
    for _ in range(3):
        assert flow.send(amqp.consume(1)) == TC_ACT_OK
    broker = Broker(flow, isn=777777)
    broker.send(b"b" * 100)  # inside a body: not a frame, passes unjoined
    broker.send(amqp.heartbeat() + amqp.server_cancel(1))
    assert flow.consumers() == 2


def test_ipv6_and_untracked_connections(dp):
    flow, broker = opened(dp, consumers=1, client="fd00::2")
    broker.send(amqp.server_cancel(1))
    assert flow.consumers() == 0
    stranger = Broker(Flow(dp, client_port=41000))
    stranger.send(amqp.server_cancel(1))  # no connection tracked: nothing to free
    assert dp.counters()["cancels"] == 1


def test_egress_never_drops(dp):
    flow, broker = opened(dp, consumers=3)
    for payload in (b"\xff" * 40, amqp.server_cancel(1)[:5], b"", amqp.consume(1)):
        broker.send(payload)
    broker.send(b"", flags=packets.RST)
    broker.send(amqp.server_cancel(1), flags=packets.FIN | packets.ACK)


def test_failed_consume_counts_once_across_both_directions(dp):
    """A consume on a queue that does not exist: the broker closes the channel (404), the
    client answers close-ok. Freed once, by whichever direction comes first."""
    flow, broker = opened(dp, consumers=2, channel=1)
    assert flow.send(amqp.channel_open(2) + amqp.consume(2, queue="missing")) == TC_ACT_OK
    assert flow.consumers() == 3
    broker.send(amqp.channel_close(2))
    assert flow.consumers() == 2
    assert flow.send(amqp.channel_close_ok(2)) == TC_ACT_OK
    assert flow.consumers() == 2 and flow.channels() == {1: 2}
    assert flow.send(amqp.consume(3)) == TC_ACT_OK
    assert flow.send(amqp.consume(3)) == TC_ACT_SHOT


# -- where a connection's position is: its slot in egress_slots, or the LRU egress ---------
def position_store(dp, flow):
    """Where the connection's position is: "slot" (it owns its slot of egress_slots), "lru"
    (in egress: its slot is another's), or None."""
    key = bytes(_layout.conn_key(flow.client, flow.client_port, flow.broker, dp.port))
    if bytes(read_slot(dp, flow).key) == key:
        return "slot"
    if _bpfsys.map_lookup(dp.map_fds["egress"], key) is not None:
        return "lru"
    return None


def slot_index(dp, flow):
    key = _layout.conn_key(flow.client, flow.client_port, flow.broker, dp.port)
    return struct.pack("<I", _layout.egress_slot_index(bytes(key)))


def read_slot(dp, flow):
    raw = _bpfsys.map_lookup(dp.map_fds["egress_slots"], slot_index(dp, flow))
    return _layout.decode(_layout.EgressSlot, raw)


def colliding(dp, n):
    """n (client address, client port) pairs whose connections (to BROKER_V4:dp.port) map
    to one slot, drawn at random (seeded) from 198.18.0.0/16: a structured set (consecutive
    ports, or addresses) hardly ever collides, the hash spreads it."""
    by_slot, draw = {}, random.Random(7)
    for _i in range(400000):
        client = "198.18.%d.%d" % (draw.randrange(256), draw.randrange(2, 255))
        port = draw.randrange(1024, 65536)
        key = _layout.conn_key(client, port, BROKER_V4, dp.port)
        same = by_slot.setdefault(_layout.egress_slot_index(bytes(key)), [])
        same.append(dict(client=client, client_port=port))
        if len(same) == n:
            return same
    raise AssertionError("no %d connections share a slot" % n)


# A delivery whose body is made of lookalike cancels, cut so that its second segment starts
# right on one: walked from the wrong position (a position lost or mixed up with another
# connection's), the lookalikes free consumers that are still there.
LOOKALIKE_BODY = amqp.server_cancel(1) * 10
LOOKALIKE_STREAM = amqp.deliver(1, LOOKALIKE_BODY) + amqp.server_cancel(1)
LOOKALIKE_CUT = (
    len(amqp.deliver(1, LOOKALIKE_BODY)) - 1 - len(LOOKALIKE_BODY) + 3 * len(amqp.server_cancel(1))
)


def send_first_part(broker):
    broker.send(LOOKALIKE_STREAM[:LOOKALIKE_CUT])


def send_rest(broker):
    broker.send(LOOKALIKE_STREAM[LOOKALIKE_CUT:])


def two_in_one_slot(dp):
    """Two connections of 3 consumers whose keys map to one slot: the first holds it, the
    second is in the LRU; each broker stream is cut inside a body (send_rest goes on)."""
    first, second = colliding(dp, 2)
    a, a_broker = opened(dp, consumers=3, **first)
    b, b_broker = opened(dp, consumers=3, **second)
    assert (position_store(dp, a), position_store(dp, b)) == ("slot", "lru")
    send_first_part(a_broker)
    send_first_part(b_broker)
    return a, a_broker, b, b_broker


def test_two_connections_in_one_slot_are_both_tracked(dp):
    """The second connection's SYN-ACK finds its slot held by a live connection: it goes to
    the LRU, and the first keeps its position. A broker cancel on each frees one of each."""
    a, a_broker, b, b_broker = two_in_one_slot(dp)
    send_rest(a_broker)
    send_rest(b_broker)
    assert (a.consumers(), b.consumers()) == (2, 2)
    assert a.channels() == {1: 2} and b.channels() == {1: 2}
    assert dp.counters()["cancels"] == 2
    # Both re-subscribe, and are held at the limit again.
    for flow in (a, b):
        assert flow.send(amqp.consume(1)) == TC_ACT_OK
        assert flow.send(amqp.consume(1)) == TC_ACT_SHOT


def test_slot_of_a_connection_that_ended_unseen_is_taken_once_stale(dp):
    """A connection that vanished without a FIN or RST passing here keeps its slot only
    until it goes stale: the next connection mapping there then takes it (no slow path for
    good after churn), while one that came while it was live stays in the LRU, tracked."""
    gone_port, early_port, late_port = colliding(dp, 3)
    gone, _gone_broker = opened(dp, consumers=1, **gone_port)
    early, early_broker = opened(dp, consumers=3, **early_port)
    assert (position_store(dp, gone), position_store(dp, early)) == ("slot", "lru")
    age_slot(dp, gone)

    late, late_broker = opened(dp, consumers=3, **late_port)

    assert position_store(dp, late) == "slot" and position_store(dp, early) == "lru"
    for broker in (late_broker, early_broker):
        send_first_part(broker)
    for broker in (late_broker, early_broker):
        send_rest(broker)
    assert (late.consumers(), early.consumers()) == (2, 2)


def age_slot(dp, flow):
    """The flow's slot as if its last segment were EGRESS_STALE_JIFFIES + 2 jiffies ago."""
    slot = read_slot(dp, flow)
    slot.seen = (slot.seen - C.EGRESS_STALE_JIFFIES - 2) & 0xFFFFFFFF
    _bpfsys.map_update(dp.map_fds["egress_slots"], slot_index(dp, flow), bytes(slot))


def test_only_frames_keep_a_slot_and_a_connection_that_lost_it_keeps_its_cancels(dp):
    """Pure ACKs pass before any lookup: a publisher's broker that sends nothing else for
    the stale time lets the next connection mapping there take the slot. Its server cancel
    after that is still applied, picked up at the frame it starts with; a heartbeat, like
    any frame, would have kept the slot."""
    quiet_port, late_port, kept_port, later_port = colliding(dp, 4)
    quiet, quiet_broker = opened(dp, consumers=3, **quiet_port)
    age_slot(dp, quiet)
    quiet_broker.send(b"", flags=packets.ACK)
    late, late_broker = opened(dp, consumers=1, **late_port)
    assert position_store(dp, late) == "slot" and position_store(dp, quiet) is None
    quiet_broker.send(amqp.server_cancel(1))
    assert quiet.consumers() == 2 and quiet.channels() == {1: 2}
    assert quiet.send(amqp.consume(1)) == TC_ACT_OK

    late_broker.send(b"", flags=packets.FIN | packets.ACK)  # frees the slot
    kept, kept_broker = opened(dp, consumers=3, **kept_port)
    assert position_store(dp, kept) == "slot"
    age_slot(dp, kept)
    kept_broker.send(amqp.heartbeat())
    later, _later_broker = opened(dp, consumers=1, **later_port)
    assert (position_store(dp, kept), position_store(dp, later)) == ("slot", "lru")


def test_fin_frees_the_slot_and_rst_empties_either_store(dp):
    first, second, third = colliding(dp, 3)
    a, a_broker = opened(dp, consumers=3, **first)
    b, b_broker = opened(dp, consumers=3, **second)
    assert (position_store(dp, a), position_store(dp, b)) == ("slot", "lru")
    # The broker's FIN ends its stream: the slot is free for the next connection at once.
    a_broker.send(b"", flags=packets.FIN | packets.ACK)
    c, c_broker = opened(dp, consumers=3, **third)
    assert position_store(dp, c) == "slot"
    # A RST removes the position from the LRU; from a slot, it empties it.
    b_broker.send(b"", flags=packets.RST)
    assert position_store(dp, b) is None
    c_broker.send(b"", flags=packets.RST)
    assert position_store(dp, c) is None and bytes(read_slot(dp, c).key) == bytes(36)
    # The SYN-ACK of a reused 4-tuple whose position is in the LRU, the slot free now: it
    # moves to the slot, and the LRU entry goes.
    b2, b2_broker = opened(dp, consumers=3, **second)
    assert position_store(dp, b2) == "slot"
    key = bytes(_layout.conn_key(b2.client, b2.client_port, b2.broker, dp.port))
    assert _bpfsys.map_lookup(dp.map_fds["egress"], key) is None
    send_first_part(b2_broker)
    send_rest(b2_broker)
    assert b2.consumers() == 2


def test_a_replaced_program_pair_goes_on_from_the_positions_in_both_stores(dp):
    """A replace loads new programs on the same pins: positions in the slots and in the LRU
    carry over, so a segment that starts inside a body is skipped, never rejoined at."""
    a, a_broker, b, b_broker = two_in_one_slot(dp)
    bpf, function = _compile.compile_and_load(dp.source, dp.pin_dir)
    old = dp.function, dp.egress
    try:
        dp.function, dp.egress = function, _compile.load_egress(bpf)
        send_rest(a_broker)
        send_rest(b_broker)
        assert (a.consumers(), b.consumers()) == (2, 2)
    finally:
        # The old pair back, its continuation and egress in walk_more too: the cached
        # dataplane goes on to other tests, and a consume's tag step runs in the
        # continuation (another compile's has its own scratch, and loses the walk).
        dp.function, dp.egress = old
        _compile.fill_continuation(dp.pin_dir, _compile.load_continuation(dp.bpf).fd)
        _compile.fill_egress_slot(dp.pin_dir, dp.egress.fd)
        bpf.cleanup()
