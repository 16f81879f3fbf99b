"""No frame bound on the broker's side either: the egress program walks EGRESS_MAX_FRAMES
frames of a broker segment, then goes on in itself, tail-called through the walk_more array's
egress slot, up to 34 runs: 34 x 256 = 8704 frames. A 64 KiB GSO segment of small
deliveries holds over a thousand frames; before, the walk stopped at 256, the stream was
lost (`missed`) and a server cancel after them stayed counted, so the client that
re-subscribed was refused.

BPF_PROG_TEST_RUN takes at most about 3.6 KB of linear packet data, so one test crosses the
real bound (deliveries and heartbeats, as a broker sends them), and the others reach the
tail-call limit with a variant rendered with a bound of 8 frames; every test runs on the
direct-read path and on the bpf_skb_load_bytes path that paged GSO data takes.
tests/root/test_gso_egress.py does it on real 64 KiB GSO segments of a real broker.
"""

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import (
    _bpfsys,
    _compile,
    _constants,
)
from tests.bpf.test_egress import opened
from tests.lib import amqp
from tests.lib.dataplane import TC_ACT_OK, TC_ACT_SHOT, Dataplane

pytestmark = pytest.mark.bpf
PROGRAMS = 34  # the first run and 33 tail calls
BOUND = 8


@pytest.fixture(params=[False, True], ids=["direct", "skb_load_bytes"])
def small_bound(request):
    dp = Dataplane(
        limit=3, action="drop", egress_max_frames=BOUND, force_skb_load_bytes=request.param
    )
    yield dp
    dp.close()


def deliveries(n):
    """n small deliveries, 3 frames each, as a consumer with prefetch gets them."""
    return b"".join(amqp.deliver(1, b"m", delivery_tag=i + 1) for i in range(n))


def test_a_cancel_after_more_than_256_broker_frames_frees_the_slot(dataplanes):
    dp = dataplanes(limit=3, action="drop")
    flow, broker = opened(dp, consumers=3)
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT
    # 105 frames of deliveries and 170 heartbeats: 275 frames, then the cancel.
    frames = deliveries(35) + amqp.heartbeat() * 170
    assert _constants.EGRESS_MAX_FRAMES < 35 * 3 + 170
    broker.send(frames + amqp.server_cancel(1))
    assert flow.consumers() == 2 and flow.channels() == {1: 2}
    assert dp.counters()["missed"] == 0
    # The client re-subscribes: not refused.
    assert flow.send(amqp.consume(1)) == TC_ACT_OK
    # The stream is followed after it: the next segment's cancel counts too.
    broker.send(amqp.deliver(1, b"x" * 100) + amqp.server_cancel(1))
    assert flow.consumers() == 2
    assert dp.counters()["missed"] == 0


def test_deliveries_over_many_runs_then_a_cancel(small_bound):
    """40 deliveries (120 frames) walked 8 at a time: 15 tail calls."""
    flow, broker = opened(small_bound, consumers=3)
    broker.send(deliveries(40) + amqp.server_cancel(1) + amqp.heartbeat())
    assert flow.consumers() == 2
    assert small_bound.counters()["missed"] == 0
    broker.send(amqp.server_cancel(1))
    assert flow.consumers() == 1


def test_a_cancel_in_the_last_run_frees_the_slot(small_bound):
    flow, broker = opened(small_bound, consumers=3)
    broker.send(amqp.heartbeat() * (PROGRAMS * BOUND - 1) + amqp.server_cancel(1))
    assert flow.consumers() == 2
    assert small_bound.counters()["missed"] == 0


def test_past_the_tail_call_limit_the_walk_fails_open_and_says_so(small_bound):
    flow, broker = opened(small_bound, consumers=3)
    broker.send(amqp.heartbeat() * (PROGRAMS * BOUND) + amqp.server_cancel(1))
    assert flow.consumers() == 3  # not seen: the count stays (fail open)
    assert small_bound.counters()["missed"] == 1
    # Rejoined at the next segment that starts on a frame.
    broker.send(amqp.server_cancel(1))
    assert flow.consumers() == 2


def test_a_retransmitted_long_segment_frees_once(small_bound):
    flow, broker = opened(small_bound, consumers=3)
    start = broker.seq
    segment = amqp.heartbeat() * 30 + amqp.server_cancel(1) + amqp.heartbeat() * 30
    broker.send(segment)
    broker.send(segment, seq=start)
    assert flow.consumers() == 2
    assert small_bound.counters()["missed"] == 0


def test_an_empty_egress_slot_fails_open(small_bound):
    """The egress slot emptied (drift: rabbit_tc_limit repairs it): the walk stops after its
    first run, counted in missed, and rejoins later; nothing is dropped."""
    fd = small_bound.map_fds[_compile.CONTINUATION_ARRAY]
    _bpfsys.map_delete(fd, _compile.EGRESS_MORE_SLOT.to_bytes(4, "little"))
    flow, broker = opened(small_bound, consumers=3)
    broker.send(amqp.heartbeat() * 20 + amqp.server_cancel(1))
    assert flow.consumers() == 3
    assert small_bound.counters()["missed"] == 1
