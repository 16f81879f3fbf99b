"""The reference model on its own: the limiter's semantics, stated in Python."""

import pytest

from tests.lib import amqp
from tests.lib.model import DROP, PASS, RST, ConnectionModel, Malformed

ISN = 4294967000  # wraps around during the test


class Client:
    def __init__(self, model):
        self.model, self.seq = model, ISN
        assert self.send(amqp.PROTOCOL_HEADER) == PASS

    def send(self, data, seq=None):
        start = self.seq if seq is None else seq
        verdict = self.model.segment(start, data)
        if verdict == PASS:
            self.seq = max(self.seq, start + len(data))
        return verdict


def test_limit_and_refusal():
    client = Client(ConnectionModel(limit=2))
    assert client.send(amqp.consume(1) + amqp.consume(2)) == PASS
    assert client.send(amqp.consume(3)) == DROP
    assert client.send(amqp.consume(3)) == DROP  # retransmitted: refused again
    assert client.model.live_channels() == {1: 1, 2: 1}
    assert (client.model.counts["allowed"], client.model.counts["refused"]) == (2, 2)


def test_refused_segment_commits_nothing():
    client = Client(ConnectionModel(limit=1))
    client.send(amqp.consume(1))
    assert client.send(amqp.cancel(1) + amqp.consume(2) + amqp.consume(2)) == DROP
    assert client.model.live_channels() == {1: 1}
    assert client.model.counts["cancels"] == 0


def test_cancel_close_and_never_below_zero():
    client = Client(ConnectionModel(limit=5))
    client.send(amqp.consume(1) * 2 + amqp.consume(2) + amqp.cancel(3) + amqp.cancel(1))
    assert client.model.live_channels() == {1: 1, 2: 1}
    client.send(amqp.channel_close(2) + amqp.channel_close_ok(1))
    assert client.model.consumers == 0
    assert client.model.counts["closes"] == 2


def test_straddling_header_and_retransmission():
    client = Client(ConnectionModel(limit=5))
    consume = amqp.consume(1)
    start = client.seq
    client.send(consume[:5])
    assert client.model.consumers == 0
    client.send(consume[:9], seq=start)
    client.send(consume[9:])
    client.send(consume, seq=start)
    assert client.model.consumers == 1


def test_bodies_are_skipped():
    client = Client(ConnectionModel(limit=0))
    message = amqp.publish(1, amqp.consume_lookalike_body() * 10)
    for start in range(0, len(message), 7):
        assert client.send(message[start : start + 7]) == PASS
    assert client.model.counts["refused"] == 0


def test_monitor_and_reset():
    monitor = Client(ConnectionModel(limit=1, action="monitor"))
    assert monitor.send(amqp.consume(1) * 3) == PASS
    assert monitor.model.consumers == 3
    assert monitor.model.counts["refused"] == 2
    reset = Client(ConnectionModel(limit=1, action="reset"))
    reset.send(amqp.consume(1))
    assert reset.send(amqp.consume(1)) == RST
    assert reset.send(amqp.consume(1)) == PASS  # the host answers it, not us


def test_connection_close_ends_accounting():
    client = Client(ConnectionModel(limit=1))
    client.send(amqp.consume(1) + amqp.connection_close())
    assert client.model.closed and client.model.consumers == 0
    assert client.send(amqp.consume(1) * 4) == PASS


def test_malformed_streams_and_gaps_are_out_of_scope():
    client = Client(ConnectionModel(limit=1))
    with pytest.raises(Malformed):
        client.send(amqp.heartbeat()[:-1] + b"\x00" + amqp.heartbeat())
    with pytest.raises(ValueError):
        client.send(amqp.consume(1), seq=client.seq + 10)


def test_reset_only_exactly_at_the_next_sequence_number():
    """RFC 5961: a refused segment that starts before the broker's next expected sequence
    number (old bytes coalesced with the consume) would be an ignored RST: it is dropped."""
    client = Client(ConnectionModel(limit=1, action="reset"))
    start = client.seq
    client.send(amqp.consume(1))
    assert client.send(amqp.consume(1) + amqp.consume(2), seq=start) == DROP
    assert client.send(amqp.consume(2)) == RST


def test_frame_max_counts_the_framing_octets():
    frame_max = 4096
    payload = b"\x00\x3c\x00\x28" + b"\x00" * (frame_max - 8 - 4)
    fits = Client(ConnectionModel(limit=1, frame_max=frame_max))
    assert fits.send(amqp.frame(amqp.METHOD, 1, payload)) == PASS
    too_large = Client(ConnectionModel(limit=1, frame_max=frame_max))
    with pytest.raises(Malformed):
        too_large.send(amqp.frame(amqp.METHOD, 1, payload + b"\x00"))


@pytest.mark.parametrize(
    "bad",
    [amqp.consume(0), amqp.consume(1)[:-1] + b"\x00"],
    ids=["channel-0", "wrong-end-octet"],
)
def test_malformed_consumes_are_never_counted(bad):
    client = Client(ConnectionModel(limit=0))
    with pytest.raises(Malformed):
        client.send(bad)
    assert client.model.counts["refused"] == 0


def test_a_cancel_frees_only_a_live_tag():
    client = Client(ConnectionModel(limit=2))
    assert client.send(amqp.consume(1, tag="a") + amqp.consume(1, tag="b")) == PASS
    assert client.send(amqp.cancel(1, tag="made-up")) == PASS
    assert client.model.consumers == 2 and client.model.counts["cancels_unknown"] == 1
    assert client.send(amqp.consume(1, tag="c")) == DROP
    assert client.send(amqp.cancel(2, tag="a") + amqp.cancel(1, tag="a")) == PASS
    assert client.model.live_channels() == {1: 1}  # "a" lives on channel 1, not 2


def test_a_cut_tag_is_taken_the_honest_way():
    client = Client(ConnectionModel(limit=3))
    consume = amqp.consume(1, tag="a-long-tag")
    assert client.send(consume[:20]) == PASS and client.send(consume[20:]) == PASS
    assert client.model.untagged == 1
    cancel = amqp.cancel(1, tag="made-up")
    assert client.send(cancel[:14]) == PASS and client.send(cancel[14:]) == PASS
    assert client.model.consumers == 0 and client.model.untagged == 1


def test_tags_beyond_the_slots_are_untagged_and_the_broker_keeps_all():
    limiter, broker = ConnectionModel(limit=40), ConnectionModel(limit=40, broker=True)
    stream = b"".join(amqp.consume(1, tag="t%d" % i) for i in range(20))
    stream += b"".join(amqp.cancel(1, tag="x%d" % i) for i in range(6))
    for model in (limiter, broker):
        Client(model).send(stream)
    assert limiter.consumers == 16 and broker.consumers == 20
