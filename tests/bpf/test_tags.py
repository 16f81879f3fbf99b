"""Cancels free a slot only for a consumer the limiter knows is live (issue 7, "no faulty
client let through"): the consumer tags of each connection, crafted streams through
BPF_PROG_TEST_RUN on both payload read paths (conftest `dataplanes`).

RabbitMQ answers the cancel of a tag it does not know with cancel-ok and changes nothing;
a limiter that freed a slot at every cancel let a faulty client that sends consume(T1),
cancel("x"), consume(T2), cancel("x"), ... have consumers without end.
"""

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _compile
from tests.bpf.test_egress import opened
from tests.bpf.test_seed_pickup import seed
from tests.lib import amqp
from tests.lib.dataplane import TC_ACT_OK, TC_ACT_SHOT, Flow

pytestmark = pytest.mark.bpf


def consumes(flow, tags, channel=1):
    for tag in tags:
        assert flow.send(amqp.consume(channel, tag=tag)) == TC_ACT_OK, tag


def test_cancels_of_made_up_tags_free_nothing(dp):
    flow, _ = opened(dp)
    consumes(flow, ["T1", "T2", "T3"])
    for i in range(5):
        assert flow.send(amqp.cancel(1, tag="nonsense-%d" % i)) == TC_ACT_OK
        assert flow.consumers() == 3
        assert flow.send(amqp.consume(1, tag="T%d" % (4 + i))) == TC_ACT_SHOT
    assert dp.counters()["cancels_unknown"] >= 1


def test_made_up_cancels_and_consumes_in_one_segment_are_refused(dp):
    flow, _ = opened(dp)
    consumes(flow, ["T1", "T2"])
    segment = b"".join(
        amqp.consume(1, tag="T%d" % i) + amqp.cancel(1, tag="bogus") for i in range(3, 8)
    )
    # T3 fits (2 + 1); the bogus cancel frees nothing, so T4 is over the limit.
    assert flow.send(segment) == TC_ACT_SHOT
    assert flow.consumers() == 2


def test_an_honest_cancel_then_consume_in_one_segment_is_allowed(dp):
    flow, _ = opened(dp)
    consumes(flow, ["T1", "T2", "T3"])
    assert flow.send(amqp.cancel(1, tag="T2") + amqp.consume(1, tag="T4")) == TC_ACT_OK
    assert flow.consumers() == 3 and flow.channels() == {1: 3}
    # Many pipelined in one segment, on several channels, always at the limit.
    segment = b"".join(
        amqp.cancel(1, tag=t) + amqp.consume(2, tag="U%s" % t) for t in ("T1", "T3", "T4")
    )
    assert flow.send(segment) == TC_ACT_OK
    assert flow.consumers() == 3 and flow.channels() == {2: 3}
    assert flow.send(amqp.consume(1, tag="T9")) == TC_ACT_SHOT


def test_more_events_in_a_segment_than_one_tag_step_takes(dataplanes):
    dp = dataplanes(limit=40, action="drop")
    flow, _ = opened(dp)
    tags = ["T%d" % i for i in range(20)]  # more than TAG_EVENTS, and than TAG_SLOTS
    assert flow.send(b"".join(amqp.consume(1, tag=t) for t in tags)) == TC_ACT_OK
    assert flow.send(b"".join(amqp.cancel(1, tag=t) for t in tags)) == TC_ACT_OK
    assert flow.consumers() == 0
    assert flow.send(b"".join(amqp.cancel(1, tag=t) for t in tags)) == TC_ACT_OK
    assert dp.counters()["cancels_unknown"] == 0  # channel 1 holds none: nothing to free


def test_crossed_client_and_broker_cancels_free_one(dp):
    flow, broker = opened(dp)
    consumes(flow, ["T1", "T2"])
    broker.send(amqp.consume_ok(1, tag="T1") + amqp.consume_ok(1, tag="T2"))
    assert flow.send(amqp.cancel(1, tag="T1")) == TC_ACT_OK
    broker.send(amqp.server_cancel(1, tag="T1"))
    assert flow.consumers() == 1 and flow.channels() == {1: 1}
    consumes(flow, ["T3", "T4"])
    assert flow.send(amqp.consume(1, tag="T5")) == TC_ACT_SHOT


def test_broker_cancel_first_then_the_clients_frees_one(dp):
    flow, broker = opened(dp)
    consumes(flow, ["T1", "T2"])
    broker.send(amqp.consume_ok(1, tag="T1") + amqp.server_cancel(1, tag="T1"))
    assert flow.send(amqp.cancel(1, tag="T1")) == TC_ACT_OK
    assert flow.consumers() == 1
    assert dp.counters()["cancels_unknown"] == 1


def test_pipelined_consume_and_cancel_then_the_late_consume_ok(dp):
    flow, broker = opened(dp)
    assert flow.send(amqp.consume(1, tag="T") + amqp.cancel(1, tag="T")) == TC_ACT_OK
    assert flow.consumers() == 0
    broker.send(amqp.consume_ok(1, tag="T") + amqp.cancel_ok(1, tag="T"))
    assert flow.consumers() == 0
    assert not any(flow.state().tags), "the late consume-ok recorded the cancelled tag"
    consumes(flow, ["A", "B", "C"])
    assert flow.consumers() == 3
    assert flow.send(amqp.consume(1, tag="D")) == TC_ACT_SHOT


def test_late_consume_ok_is_not_taken_for_a_server_generated_tag(dp):
    flow, broker = opened(dp)
    # An anonymous consume awaits its consume-ok while T is consumed and cancelled.
    segment = amqp.consume(1, tag="") + amqp.consume(1, tag="T") + amqp.cancel(1, tag="T")
    assert flow.send(segment) == TC_ACT_OK
    assert flow.consumers() == 1
    broker.send(amqp.consume_ok(1, tag="amq.ctag-S1") + amqp.consume_ok(1, tag="T"))
    assert flow.send(amqp.cancel(1, tag="amq.ctag-S1")) == TC_ACT_OK
    assert flow.consumers() == 0


def test_server_generated_tag_is_recorded_from_the_consume_ok(dp):
    flow, broker = opened(dp)
    consumes(flow, ["", "", ""])
    assert flow.state().anon == 3
    # A guessed tag before any consume-ok frees nothing.
    assert flow.send(amqp.cancel(1, tag="amq.ctag-guess")) == TC_ACT_OK
    assert flow.consumers() == 3
    broker.send(b"".join(amqp.consume_ok(1, tag="amq.ctag-%d" % i) for i in range(3)))
    assert flow.state().anon == 0
    assert flow.send(amqp.cancel(1, tag="amq.ctag-1")) == TC_ACT_OK
    assert flow.consumers() == 2
    assert flow.send(amqp.cancel(1, tag="amq.ctag-1")) == TC_ACT_OK
    assert flow.consumers() == 2
    assert flow.send(amqp.consume(1, tag="")) == TC_ACT_OK
    assert flow.send(amqp.consume(1, tag="")) == TC_ACT_SHOT


def test_no_wait_consume_tag_is_live_at_once(dp):
    flow, _ = opened(dp)
    consumes(flow, ["T1", "T2", "T3"])
    assert flow.send(amqp.cancel(1, tag="T2")) == TC_ACT_OK
    assert flow.send(amqp.consume(1, tag="N", no_wait=True)) == TC_ACT_OK
    assert flow.send(amqp.cancel(1, tag="N")) == TC_ACT_OK
    assert flow.consumers() == 2


def test_channel_close_forgets_the_channels_tags(dp):
    flow, _ = opened(dp)
    consumes(flow, ["T1", "T2"], channel=1)
    assert flow.send(amqp.channel_close(1)) == TC_ACT_OK
    assert flow.consumers() == 0
    consumes(flow, ["X1", "X2", "X3"], channel=1)
    # T1 was live on the channel before its close, not now.
    assert flow.send(amqp.cancel(1, tag="T1")) == TC_ACT_OK
    assert flow.consumers() == 3
    assert flow.send(amqp.consume(1, tag="X4")) == TC_ACT_SHOT


def test_cancel_then_close_then_consume_in_one_segment(dp):
    flow, _ = opened(dp)
    consumes(flow, ["T1"], channel=1)
    consumes(flow, ["T2", "T3"], channel=2)
    segment = (
        amqp.cancel(1, tag="T1")
        + amqp.channel_close_ok(1)
        + amqp.channel_open(1)
        + amqp.consume(1, tag="T4")
    )
    assert flow.send(segment) == TC_ACT_OK
    assert flow.consumers() == 3 and flow.channels() == {1: 1, 2: 2}


def test_seeded_connection_frees_at_most_its_seeded_count(dataplanes):
    dp = dataplanes(limit=5, action="drop")
    seed(dp, 40600, {1: 3})
    flow = Flow(dp, client_port=40600, isn=4242)
    assert flow.send(amqp.heartbeat()) == TC_ACT_OK
    assert flow.state().untagged == 3
    consumes(flow, ["N1", "N2"])
    for i in range(6):
        assert flow.send(amqp.cancel(1, tag="seeded-or-not-%d" % i)) == TC_ACT_OK
    # The three seeded consumers' tags are unknown: three cancels freed, no more.
    assert flow.consumers() == 2
    assert dp.counters()["cancels_unknown"] == 3
    consumes(flow, ["N3", "N4", "N5"])
    assert flow.send(amqp.consume(1, tag="N6")) == TC_ACT_SHOT


def test_more_live_tags_than_slots_fall_back_for_the_excess(dataplanes):
    dp = dataplanes(limit=30, action="drop")
    flow, _ = opened(dp)
    consumes(flow, ["T%d" % i for i in range(20)])
    state = flow.state()
    assert state.untagged == 20 - len(state.tags)
    # Made-up tags free only the untagged ones (the documented fallback) ...
    for i in range(6):
        assert flow.send(amqp.cancel(1, tag="x%d" % i)) == TC_ACT_OK
    assert flow.consumers() == 16
    # ... and every recorded one still frees its own slot.
    for i in range(16):
        assert flow.send(amqp.cancel(1, tag="T%d" % i)) == TC_ACT_OK
    assert flow.consumers() == 0


@pytest.mark.parametrize("cut", [3, 8])
def test_cancel_whose_tag_is_cut_by_the_segment_end_frees(dp, cut):
    flow, _ = opened(dp)
    consumes(flow, ["a-long-consumer-tag-1", "T2", "T3"])
    cancel = amqp.cancel(1, tag="a-long-consumer-tag-1")
    at = 12 + cut  # header (7), class/method (4), length octet (1), then the tag
    assert flow.send(cancel[:at]) == TC_ACT_OK
    assert flow.send(cancel[at:]) == TC_ACT_OK
    assert flow.consumers() == 2
    assert dp.counters()["tags_unreadable"] == 1
    assert flow.send(amqp.consume(1, tag="T4")) == TC_ACT_OK


def test_a_cut_made_up_cancel_lets_one_consumer_more_through_not_more(dp):
    """The fallback's cost (README): a made-up cancel whose tag is cut frees a slot the
    broker keeps; the broker then holds limit + 1 consumers at most, however the client
    frees slots honestly afterwards (tcp_harness bar (b), from its smallest failing stream)."""
    flow, _ = opened(dp)
    consumes(flow, ["T1", "T2"])
    consumes(flow, ["T3"], channel=2)
    cancel = amqp.cancel(1, tag="made-up")
    assert flow.send(cancel[:12]) == TC_ACT_OK  # up to its tag's length octet
    assert flow.send(cancel[12:]) == TC_ACT_OK
    assert flow.consumers() == 2 and dp.counters()["tags_unreadable"] == 1
    consumes(flow, ["T4"])  # the broker: 4 live
    assert flow.send(amqp.consume(1, tag="T5")) == TC_ACT_SHOT
    assert flow.send(amqp.channel_close(2)) == TC_ACT_OK  # the broker: 3 live
    consumes(flow, ["T6"], channel=3)  # the broker: 4 live again, one over: allowed
    assert flow.send(amqp.consume(3, tag="T7")) == TC_ACT_SHOT
    assert flow.consumers() == 3


def test_consume_whose_tag_is_cut_counts_untagged(dp):
    flow, _ = opened(dp)
    consume = amqp.consume(1, tag="a-long-consumer-tag")
    assert flow.send(consume[:20]) == TC_ACT_OK
    assert flow.send(consume[20:]) == TC_ACT_OK
    assert flow.consumers() == 1 and flow.state().untagged == 1
    # Its tag is unknown: a cancel of any tag frees it (honest side), once.
    assert flow.send(amqp.cancel(1, tag="a-long-consumer-tag")) == TC_ACT_OK
    assert flow.consumers() == 0


def test_refused_segment_commits_no_tag(dp):
    flow, _ = opened(dp)
    consumes(flow, ["T1", "T2"])
    segment = amqp.cancel(1, tag="T1") + b"".join(amqp.consume(1, tag=t) for t in "ABC")
    assert flow.send(segment) == TC_ACT_SHOT  # C is the fourth once T1 is freed
    assert flow.consumers() == 2
    # Nothing of it stayed: T1 is live, A and B are not.
    assert flow.send(amqp.cancel(1, tag="A")) == TC_ACT_OK
    assert flow.consumers() == 2
    assert flow.send(amqp.cancel(1, tag="T1")) == TC_ACT_OK
    assert flow.consumers() == 1


def test_the_tag_key_is_random_and_kept_across_a_replace(dataplanes):
    dp = dataplanes(limit=3, action="drop")
    key = dp.bpf[b"tag_key"][0]
    other = dataplanes(limit=4, action="drop").bpf[b"tag_key"][0]
    assert (key.k0, key.k1) != (0, 0) and (key.k0, key.k1) != (other.k0, other.k1)
    # A replace compiles again against the same pins: the key stays, so that the tags the
    # old program recorded are found by the new one.
    bpf, _function = _compile.compile_and_load(dp.source, dp.pin_dir, fill=False)
    try:
        again = bpf[b"tag_key"][0]
        assert (again.k0, again.k1) == (key.k0, key.k1)
    finally:
        bpf.cleanup()


@pytest.mark.parametrize("made_up", [False, True], ids=["honest", "made-up"])
def test_forty_cancel_then_consume_pairs_in_one_segment_never_lose_the_walk(dp, made_up):
    """More pairs than the tag step's budget (two programs a pair: the stop before the
    consume, the tag step) in one segment: where the budget runs out the rest is taken by
    main's rule (a cancel frees, counted in cancels_blind), never left unwalked. The
    consume over the limit at the end is refused either way, and no frame is missed."""
    flow, _ = opened(dp)
    consumes(flow, ["T0", "T1", "T2"])
    before = dp.counters()
    pairs = b"".join(
        amqp.cancel(1, tag="x" if made_up else "T%d" % i) + amqp.consume(1, tag="T%d" % (i + 3))
        for i in range(40)
    )
    # Made-up cancels free nothing: the first consume after one is over the limit.
    assert flow.send(pairs + amqp.consume(1, tag="over")) == TC_ACT_SHOT
    assert flow.consumers() == 3 and flow.channels() == {1: 3}
    after = dp.counters()
    assert after["missed"] == before["missed"]
    assert after["consumes_refused"] == before["consumes_refused"] + 1
    if made_up:
        return
    # Without the consume over the limit, the honest pairs pass, at the limit throughout;
    # the budget ran out on the way (a blind rest), and nothing was missed.
    assert flow.send(pairs) == TC_ACT_OK
    assert flow.consumers() == 3 and flow.channels() == {1: 3}
    after = dp.counters()
    assert after["missed"] == before["missed"]
    assert after["cancels_blind"] > before["cancels_blind"]
    assert after["consumes_allowed"] == before["consumes_allowed"] + 40
    assert flow.send(amqp.consume(1, tag="over")) == TC_ACT_SHOT
    # The connection's consumers are untagged now (main's rule): a cancel frees one.
    assert flow.send(amqp.cancel(1, tag="T42") + amqp.consume(1, tag="T43")) == TC_ACT_OK
    assert flow.consumers() == 3
