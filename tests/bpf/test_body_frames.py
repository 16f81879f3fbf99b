"""A large message's segments: each holds one body frame header at most, amid its body (the
one-body-frame path of the classifier). Its body is made of lookalike consumes, so that a
position moved wrongly shows as counted consumes; a consume after the message is counted,
and one over the limit refused."""

import pytest

from tests.lib import amqp
from tests.lib.dataplane import TC_ACT_OK, TC_ACT_SHOT, opened

pytestmark = pytest.mark.bpf
FRAME_MAX = 4096
MSS = 3000  # BPF_PROG_TEST_RUN takes a packet of one page
LOOKALIKES = amqp.consume_lookalike_body() * 400  # about 30 KiB of complete-looking consumes


def send_range(flow, message, start, a, b):
    """message[a:b] in segments of MSS octets at most, in order."""
    for x in range(a, b, MSS):
        assert flow.send(message[x : min(x + MSS, b)], seq=start + x) == TC_ACT_OK


def body_header_offsets(message):
    """Where the message's body frame headers start."""
    offsets, at = [], 0
    while at < len(message):
        size = int.from_bytes(message[at + 3 : at + 7], "big")
        if message[at] == 3:
            offsets.append(at)
        at += 7 + size + 1
    return offsets


def segments_around(message, offsets, before, after):
    """(start, end) of segments that put each body header `before` octets after a segment's
    start (with the end octet before it in the segment) and that segment's end `after`
    octets past it; the bytes between go in segments of MSS octets at most."""
    bounds = [0]
    for at in offsets[1:]:  # the first is in the segment of the method and content header
        bounds += [at - before, at + after]
    bounds.append(len(message))
    out = []
    for a, b in zip(bounds, bounds[1:]):
        out += [(x, min(x + MSS, b)) for x in range(a, b, MSS)]
    return out


@pytest.mark.parametrize("before,after", [(1, 7), (100, 2800), (2000, 8)])
def test_a_large_message_cut_one_body_header_a_segment_is_walked_exactly(dp, before, after):
    flow = opened(dp)
    message = amqp.publish(1, LOOKALIKES, frame_max=FRAME_MAX)
    offsets = body_header_offsets(message)
    assert len(offsets) == -(-len(LOOKALIKES) // (FRAME_MAX - 8))
    start = flow.seq
    for a, b in segments_around(message, offsets, before, after):
        assert flow.send(message[a:b], seq=start + a) == TC_ACT_OK
    assert flow.state().synced == 1
    assert flow.state().next_hdr == (start + len(message)) & 0xFFFFFFFF
    assert flow.consumers() == 0
    for _ in range(3):
        assert flow.send(amqp.consume(1)) == TC_ACT_OK
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT
    assert dp.counters()["missed"] == 0


def no_end_octet_before(message, at):
    message[at - 1] = 0x00


def size_over_frame_max(message, at):
    message[at + 3 : at + 7] = (1 << 20).to_bytes(4, "big")


@pytest.mark.parametrize("corrupt", [no_end_octet_before, size_over_frame_max])
def test_a_malformed_body_header_loses_sync(dp, corrupt):
    """A body frame header the broker would take as a connection error (no frame end before
    it, a size over frame_max): the stream is lost there (counted), not walked on as if it
    were a body frame."""
    flow = opened(dp)
    message = bytearray(amqp.publish(1, LOOKALIKES, frame_max=FRAME_MAX))
    second = body_header_offsets(bytes(message))[1]
    corrupt(message, second)
    start = flow.seq
    send_range(flow, bytes(message), start, 0, second - 100)
    segment = bytes(message[second - 100 : second + 500])
    assert flow.send(segment, seq=start + second - 100) == TC_ACT_OK
    assert flow.state().synced == 0
    assert dp.counters()["missed_by_cause"]["lost_sync"] == 1


def test_a_consume_after_the_last_body_frame_in_the_same_segment_is_counted(dp):
    """The segment that holds the last body header also holds what follows the body: the
    full walk takes it, and counts the consume."""
    flow = opened(dp)
    message = amqp.publish(1, LOOKALIKES, frame_max=FRAME_MAX)
    last = body_header_offsets(message)[-1]
    start = flow.seq
    send_range(flow, message, start, 0, last - 50)
    stream = message[last - 50 :] + amqp.consume(1)
    assert flow.send(stream, seq=start + last - 50) == TC_ACT_OK
    assert flow.consumers() == 1
