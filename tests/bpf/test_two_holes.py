"""Several holes at once (a 1 MiB publisher over veth with TSO on makes them): the bytes passed
ahead of each hole are followed as two ranges, so filling the first hole delivers only the
bytes up to the second. Bytes passed ahead that held no frame header miss nothing and the
connection stays limited (issue 8: missed frames 0, the bench's 1 MiB cells); bytes passed
ahead that held one are a miss, counted when a filled hole delivers them, and the connection
goes adrift."""

import pytest

from tests.lib import amqp
from tests.lib.dataplane import TC_ACT_OK, Flow

pytestmark = pytest.mark.bpf

BODY = 5000
MSS = 1400


def causes(dp):
    return {cause: n for cause, n in dp.counters()["missed_by_cause"].items() if n}


class Stream:
    """Two publishes of BODY octets each on channel 1, sent by offset into their bytes."""

    def __init__(self, dp):
        self.flow = Flow(dp)
        assert self.flow.handshake() == TC_ACT_OK
        one = amqp.publish(1, b"\x00" * BODY)
        self.bytes = one + amqp.publish(1, b"\x00" * BODY)
        self.start = self.flow.seq
        self.cut = len(one)  # message 2's method frame starts here
        # Message 1's headers end well inside the first 1000 octets, message 2's inside the
        # first 500 of its own: the rest of each is body.
        assert self.bytes.index(b"\xce\x03", 0) < 1000
        assert self.bytes.index(b"\xce\x03", self.cut) < self.cut + 500

    def seg(self, lo, hi):
        """Octets lo..hi in segments of at most MSS (a test run takes one page at most),
        in order; the verdict of the last (every one passes in these tests)."""
        for off in range(lo, hi, MSS):
            verdict = self.flow.send(self.bytes[off : min(off + MSS, hi)], seq=self.start + off)
            if verdict != TC_ACT_OK:
                return verdict
        return verdict

    def consume_counted(self):
        """A consume after the stream: walked and counted if the connection is still
        followed."""
        assert self.flow.send(amqp.consume(1)) == TC_ACT_OK
        return self.flow.consumers() == 1


def test_filling_the_first_of_two_holes_does_not_fill_the_second(dp):
    """Segments of two publishes arrive with two holes: the first inside message 1's body,
    the second holding message 2's headers. Each segment that passed ahead lies inside a
    body. When the first hole fills, the broker's TCP delivers up to the second hole only;
    the walk's next header (message 2's method frame) is in the second hole, and is walked
    when it comes."""
    s = Stream(dp)
    cut = s.cut
    assert s.seg(0, 1000) == TC_ACT_OK  # in order: message 1's headers, walked
    assert s.seg(2000, 3000) == TC_ACT_OK  # ahead of hole 1 [1000, 2000): message 1's body
    # Ahead of hole 2 [3000, cut + 500), which holds message 2's headers: its body.
    assert s.seg(cut + 500, cut + 1500) == TC_ACT_OK
    assert dp.counters()["passed_ahead"] == 1  # beyond the position (the other is in a body)
    assert s.seg(1000, 2000) == TC_ACT_OK  # hole 1 fills; hole 2 [3000, cut + 500) is open
    assert causes(dp) == {}
    assert s.seg(3000, cut + 500) == TC_ACT_OK  # hole 2 fills: message 2's headers
    assert s.seg(cut + 1500, len(s.bytes)) == TC_ACT_OK
    assert causes(dp) == {}
    assert s.flow.state().synced == 1
    assert s.consume_counted()


@pytest.mark.parametrize("arrival", ["ascending", "descending"])
def test_three_holes_with_the_next_header_in_the_second(dp, arrival):
    """Three holes: the first and the third inside bodies, the second holding message 2's
    headers. The ranges passed ahead arrive in either order (the nearest last moves the
    others out); the holes then fill in order, and nothing is missed."""
    s = Stream(dp)
    cut = s.cut
    assert s.seg(0, 1000) == TC_ACT_OK
    ahead = [(2000, 3000), (cut + 500, cut + 1000), (cut + 2000, cut + 3000)]
    for lo, hi in ahead if arrival == "ascending" else ahead[::-1]:
        assert s.seg(lo, hi) == TC_ACT_OK
    assert s.seg(1000, 2000) == TC_ACT_OK  # hole 1 fills
    assert s.seg(3000, cut + 500) == TC_ACT_OK  # hole 2 fills: message 2's headers, walked
    assert s.seg(cut + 1000, cut + 2000) == TC_ACT_OK  # hole 3 fills: message 2's body
    assert s.seg(cut + 3000, len(s.bytes)) == TC_ACT_OK
    assert causes(dp) == {}
    assert s.flow.state().synced == 1
    assert s.consume_counted()


@pytest.mark.parametrize("holes", [2, 3])
def test_a_header_passed_ahead_of_the_last_hole_is_missed(dp, holes):
    """Message 2's frames after the first 10 octets of its method frame (the rest of it, its
    content header, its body frame's header) were passed ahead of the last of two (or three)
    holes, unwalked: the walk's position (message 2's method frame) lies in that hole.
    Filling the first hole delivers only message 1's bytes: nothing is missed yet. Filling
    the next delivers the passed frames to the broker: missed, once, and the connection is
    adrift (no longer limited)."""
    s = Stream(dp)
    cut = s.cut
    assert s.seg(0, 1000) == TC_ACT_OK
    assert s.seg(2000, 3000) == TC_ACT_OK  # message 1's body, ahead of hole 1
    if holes == 3:
        assert s.seg(3500, 4000) == TC_ACT_OK  # message 1's body, ahead of hole 2
    assert s.seg(cut + 10, cut + 1000) == TC_ACT_OK  # message 2's frames, passed ahead
    assert dp.counters()["passed_ahead"] == 1
    assert s.seg(1000, 2000) == TC_ACT_OK  # hole 1 fills
    assert causes(dp) == {}
    assert s.flow.state().synced == 1
    if holes == 3:
        # Hole 2 fills; hole 3 [4000, cut + 10) is taken as filled with it: the bytes
        # beyond it held frames, which reach the broker once it fills.
        assert s.seg(3000, 3500) == TC_ACT_OK
        assert causes(dp) == {"header_ahead_of_hole": 1}
        assert s.seg(4000, cut + 10) == TC_ACT_OK
    else:
        assert s.seg(3000, cut + 10) == TC_ACT_OK  # hole 2 fills
    missed = causes(dp)
    assert missed.pop("header_ahead_of_hole") == 1
    assert set(missed) <= {"adrift"}  # the segments that passed since: not followed
    assert s.flow.state().synced == 0
    assert s.seg(cut + 1000, len(s.bytes)) == TC_ACT_OK
    assert not s.consume_counted()
    assert causes(dp)["header_ahead_of_hole"] == 1


def test_three_holes_with_the_next_header_in_the_third(dp):
    """The documented approximation (README, Limitations): beyond the second hole, passed()
    follows one range, the holes inside it taken as filled. When the second hole fills, the
    walk is delivered beyond a third hole that still holds message 2's headers, so the
    limiter counts a header passed ahead though none was, and the connection goes adrift:
    a later consume is not counted. This test pins that cost; it fails when it changes."""
    s = Stream(dp)
    cut = s.cut
    assert s.seg(0, 1000) == TC_ACT_OK
    assert s.seg(2000, 3000) == TC_ACT_OK  # message 1's body, ahead of hole 1
    assert s.seg(3500, 4000) == TC_ACT_OK  # message 1's body, ahead of hole 2
    assert s.seg(cut + 500, cut + 1500) == TC_ACT_OK  # message 2's body, ahead of hole 3
    assert s.seg(1000, 2000) == TC_ACT_OK  # hole 1 fills
    assert causes(dp) == {}
    assert s.seg(3000, 3500) == TC_ACT_OK  # hole 2 fills: hole 3 [4000, cut + 500) is open
    missed = causes(dp)
    assert missed.pop("header_ahead_of_hole") == 1  # message 2's headers, never passed
    assert set(missed) <= {"adrift"}
    assert s.flow.state().synced == 0
    assert s.seg(4000, cut + 500) == TC_ACT_OK  # hole 3: message 2's headers, not walked
    assert s.seg(cut + 1500, len(s.bytes)) == TC_ACT_OK
    assert not s.consume_counted()
