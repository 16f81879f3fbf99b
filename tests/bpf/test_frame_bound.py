"""Issue 8 item 1: no frame bound a client can reach. The walk takes MAX_FRAMES frames per
program and goes on in a continuation program (a tail call through the pinned walk_more
array), up to 34 programs: 34 x 256 = 8704 frames, more than the 8192 heartbeats of the
densest 64 KiB segment. Past that the walk fails open, counted in `missed`.

BPF_PROG_TEST_RUN takes at most about 3.6 KB of linear packet data (3600 bytes of payload
pass, 3700 are refused), so these tests cross one bound with the real MAX_FRAMES, and reach
the tail-call limit with a variant rendered with a small bound; every test runs on the
direct-read path and on the bpf_skb_load_bytes path that paged GRO data takes.
"""

import struct

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _render
from tests.lib import amqp, packets
from tests.lib.dataplane import TC_ACT_OK, TC_ACT_SHOT, Dataplane, opened

pytestmark = pytest.mark.bpf
PROGRAMS = 34  # the entry program and 33 tail calls


@pytest.fixture(params=[False, True], ids=["direct", "skb_load_bytes"])
def small_bound(request):
    dp = Dataplane(limit=1, action="drop", max_frames=8, force_skb_load_bytes=request.param)
    yield dp
    dp.close()


def test_frames_beyond_the_first_bound_are_walked(dataplanes):
    """400 frames in one segment (over 256), then consumes: counted, and the one over the
    limit refused."""
    dp = dataplanes(limit=1, action="drop")
    flow = opened(dp)
    burst = amqp.heartbeat() * 400
    assert _render.MAX_FRAMES < 400
    assert flow.send(burst + amqp.consume(1)) == TC_ACT_OK
    assert flow.consumers() == 1
    assert flow.state().synced == 1
    assert dp.counters()["missed"] == 0
    assert flow.send(burst + amqp.consume(2)) == TC_ACT_SHOT


def test_a_consume_in_the_last_program_is_counted(small_bound):
    """With a bound of 8 frames per program, frame 34 x 8 - 1 is the last one walked."""
    flow = opened(small_bound)
    frames = PROGRAMS * 8
    assert flow.send(amqp.heartbeat() * (frames - 1) + amqp.consume(1)) == TC_ACT_OK
    assert flow.consumers() == 1
    assert small_bound.counters()["missed"] == 0
    assert flow.send(amqp.heartbeat() * (frames - 1) + amqp.consume(2)) == TC_ACT_SHOT


def test_past_the_tail_call_limit_the_walk_fails_open_and_says_so(small_bound):
    flow = opened(small_bound)
    frames = PROGRAMS * 8
    assert flow.send(amqp.heartbeat() * frames + amqp.consume(1)) == TC_ACT_OK
    assert flow.consumers() == 0
    assert small_bound.counters()["missed"] == 1
    assert small_bound.counters()["missed_by_cause"]["frame_bound"] == 1
    assert flow.state().synced == 0


def test_refuse_rewrites_a_consume_the_continuation_walks(dataplanes):
    """With refuse, an over-limit consume past the first MAX_FRAMES frames is refused by the
    continuation program: its queue name is rewritten (checksum kept right), the segment
    passes, and its retransmission is rewritten the same way."""
    dp = dataplanes(limit=1, action="refuse")
    flow = opened(dp)
    burst = amqp.heartbeat() * 300
    assert _render.MAX_FRAMES < 300
    segment = burst + amqp.consume(1, queue="orders") + amqp.consume(1, queue="orders")
    refused = burst + amqp.consume(1, queue="orders") + amqp.consume(1, queue="amq.ra")
    seq = flow.seq
    for _ in range(2):  # the segment, then its retransmission
        assert flow.send(segment, seq=seq) == TC_ACT_OK
        assert tcp_payload(flow.last_out) == refused
        assert packets.tcp_checksum_ok(flow.last_out)
        assert flow.consumers() == 1
    assert dp.counters()["missed"] == 0


def tcp_payload(packet):
    """The TCP payload of an Ethernet + IPv4 packet."""
    ihl = (packet[14] & 0x0F) * 4
    total = struct.unpack("!H", packet[16:18])[0]
    doff = (packet[14 + ihl + 12] >> 4) * 4
    return packet[14 + ihl + doff : 14 + total]
