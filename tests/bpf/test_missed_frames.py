"""Issue 8 item 3: the counters tell a harmless pass ahead of a hole (the bytes lay inside a
message body) from frames the limiter really did not see."""

import pytest

from tests.lib import amqp
from tests.lib.dataplane import TC_ACT_OK, Flow

pytestmark = pytest.mark.bpf
MSS = 1400


def opened(dp):
    flow = Flow(dp)
    assert flow.handshake() == TC_ACT_OK
    return flow


def counts(dp):
    c = dp.counters()
    return c["passed_ahead"], c["missed"]


def test_a_segment_ahead_of_a_hole_inside_a_body_misses_nothing(dp):
    """Reordering inside a 1 MiB body (veth with TSO on does it): the later segment passes
    first, the hole fills, and the walk's next header lies beyond both."""
    flow = opened(dp)
    message = amqp.publish(1, b"\x00" * 60000)
    start = flow.seq
    assert flow.send(message[2000:4000], seq=start + 2000) == TC_ACT_OK  # ahead of a hole
    assert counts(dp) == (1, 0)
    assert flow.send(message[:2000], seq=start) == TC_ACT_OK  # the hole fills
    for off in range(4000, len(message), MSS):
        assert flow.send(message[off : off + MSS], seq=start + off) == TC_ACT_OK
    assert flow.state().synced == 1
    assert counts(dp) == (1, 0)
    assert flow.send(amqp.consume(1)) == TC_ACT_OK
    assert flow.consumers() == 1


def test_a_frame_header_in_bytes_passed_ahead_is_missed(dp):
    """The bytes passed ahead of the hole held a cancel the walk never saw: missed, once,
    and the connection is no longer followed."""
    flow = opened(dp)
    assert flow.send(amqp.consume(1)) == TC_ACT_OK
    hole = flow.seq
    gap = amqp.heartbeat()
    assert flow.send(amqp.cancel(1), seq=hole + len(gap)) == TC_ACT_OK
    assert counts(dp) == (1, 0)
    assert flow.send(gap, seq=hole) == TC_ACT_OK
    assert counts(dp) == (1, 1)
    assert flow.state().synced == 0


def test_a_malformed_frame_is_missed(dp):
    flow = opened(dp)
    assert flow.send(amqp.heartbeat() * 3 + b"\x09" + amqp.heartbeat()[1:]) == TC_ACT_OK
    assert counts(dp) == (0, 1)
    assert flow.state().synced == 0
