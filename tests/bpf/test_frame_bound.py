"""Issue 8 item 1: no frame bound a client can reach. The walk takes MAX_FRAMES frames per
program and goes on in a continuation program (a tail call through the pinned walk_more
array), up to 34 programs: 34 x 256 = 8704 frames, more than the 8192 heartbeats of the
densest 64 KiB segment. Past that the walk fails open, counted in `missed`.

BPF_PROG_TEST_RUN takes at most about 3.6 KB of linear packet data (3600 bytes of payload
pass, 3700 are refused), so these tests cross one bound with the real MAX_FRAMES, and reach
the tail-call limit with a variant rendered with a small bound; every test runs on the
direct-read path and on the bpf_skb_load_bytes path that paged GRO data takes.
"""

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _render
from tests.lib import amqp
from tests.lib.dataplane import TC_ACT_OK, TC_ACT_SHOT, Dataplane, Flow

pytestmark = pytest.mark.bpf
PROGRAMS = 34  # the entry program and 33 tail calls


@pytest.fixture(params=[False, True], ids=["direct", "skb_load_bytes"])
def small_bound(request):
    dp = Dataplane(limit=1, action="drop", max_frames=8, force_skb_load_bytes=request.param)
    yield dp
    dp.close()


def opened(dp):
    flow = Flow(dp)
    assert flow.handshake() == TC_ACT_OK
    return flow


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
    assert flow.state().synced == 0
