"""Issue 8 item 3: the counters tell a harmless pass ahead of a hole (the bytes lay inside a
message body) from frames the limiter really did not see."""

import pytest

from tests.lib import amqp
from tests.lib.dataplane import TC_ACT_OK, Flow, opened

pytestmark = pytest.mark.bpf
MSS = 1400


def counts(dp):
    c = dp.counters()
    return c["passed_ahead"], c["missed"]


def causes(dp):
    """missed_by_cause without the causes that counted nothing; its sum is `missed`."""
    c = dp.counters()
    by_cause = {cause: n for cause, n in c["missed_by_cause"].items() if n}
    assert sum(by_cause.values()) == c["missed"]
    return by_cause


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
    assert causes(dp) == {"header_ahead_of_hole": 1}
    assert flow.state().synced == 0
    # From here on the connection is adrift: what it sends is not walked, and says why.
    assert flow.send(amqp.consume(1)) == TC_ACT_OK
    assert causes(dp) == {"header_ahead_of_hole": 1, "adrift": 1}


def test_a_malformed_frame_is_missed(dp):
    flow = opened(dp)
    assert flow.send(amqp.heartbeat() * 3 + b"\x09" + amqp.heartbeat()[1:]) == TC_ACT_OK
    assert counts(dp) == (0, 1)
    assert causes(dp) == {"lost_sync": 1}
    assert flow.state().synced == 0


def test_a_missing_end_octet_loses_sync_then_waits_for_a_frame(dp):
    flow = opened(dp)
    beat = amqp.heartbeat()
    assert flow.send(beat[:-1] + b"\x00" + beat * 2) == TC_ACT_OK
    assert causes(dp) == {"lost_sync": 1}
    # Lost in order: a segment that does not start on a frame waits for one that does.
    assert flow.send(b"\x00" * 40) == TC_ACT_OK
    assert causes(dp) == {"lost_sync": 1, "awaiting_resync": 1}


def test_a_connection_seen_mid_body_is_missed_as_untracked(dp):
    """No SYN seen (the limiter came up after the connection did), and the segment is not
    a frame: the one place that counts untracked_connection."""
    flow = Flow(dp, client_port=40123)
    assert flow.send(b"\x00" * 100) == TC_ACT_OK
    assert causes(dp) == {"untracked_connection": 1}
