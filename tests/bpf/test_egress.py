"""The egress program: broker-to-client segments, crafted, through BPF_PROG_TEST_RUN.

Each test opens a connection on the ingress program (the client's consumes are counted
there), then feeds the broker's segments to the egress program of the same compiled
source and maps, on both payload read paths (conftest `dataplanes`).
"""

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _bpfsys, _layout
from tests.lib import amqp, packets
from tests.lib.dataplane import TC_ACT_OK, TC_ACT_SHOT, Flow

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
