"""The classifier against the reference model on random AMQP streams.

Random frame sequences (consume, cancel, channel open/close, publishes whose bodies hold
consume look-alikes, heartbeats) are cut into random segments, with random
retransmissions that may overlap old bytes and carry new ones, at random initial sequence
numbers (wrap-around included). Both the BPF program and the model see every segment;
verdicts, per-channel counts and counters must agree after each one.
"""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _layout
from tests.lib import amqp, packets
from tests.lib.dataplane import TC_ACT_OK, TC_ACT_SHOT, Flow
from tests.lib.model import DROP, PASS, RST, ConnectionModel

pytestmark = pytest.mark.bpf

FRAME_MAX = 4096
EXAMPLES = int(os.environ.get("RG_PROPERTY_EXAMPLES", "400"))
VARIANTS = [
    pytest.param(dict(limit=3, action="drop"), id="drop-3"),
    pytest.param(dict(limit=2, action="reset"), id="reset-2"),
    pytest.param(dict(limit=1, action="monitor"), id="monitor-1"),
    pytest.param(dict(limit=2, action="refuse"), id="refuse-2"),
]

channels = st.integers(min_value=1, max_value=4)
# Consumer tags: a few, so that cancels meet live tags, made-up ones, and tags of other
# channels; "" asks the broker for one (its consume-ok never comes here).
tags = st.sampled_from(["ctag", "t1", "t2", "a-consumer-tag-of-some-length", ""])
bodies = st.one_of(
    st.binary(max_size=600),
    st.integers(min_value=1, max_value=12).map(lambda n: amqp.consume_lookalike_body() * n),
    st.integers(min_value=FRAME_MAX - 100, max_value=2 * FRAME_MAX + 50).map(
        lambda n: (amqp.consume(1) * (n // 21 + 1))[:n]
    ),
)
frames = st.one_of(
    channels.map(amqp.consume),
    st.builds(lambda ch, tag: amqp.consume(ch, tag=tag), channels, tags),
    channels.map(amqp.cancel),
    st.builds(lambda ch, tag: amqp.cancel(ch, tag=tag), channels, tags),
    channels.map(amqp.channel_open),
    channels.map(amqp.channel_close),
    channels.map(amqp.channel_close_ok),
    st.builds(lambda ch, body: amqp.publish(ch, body, frame_max=FRAME_MAX), channels, bodies),
    st.just(amqp.heartbeat()),
)
# (bytes resent from before the current position, new bytes): a segment of the stream.
cuts = st.tuples(
    st.one_of(st.just(0), st.just(0), st.integers(min_value=1, max_value=80)),
    st.one_of(st.integers(min_value=0, max_value=40), st.integers(min_value=1, max_value=3000)),
)


@pytest.mark.parametrize("variant", VARIANTS)
def test_classifier_agrees_with_the_model(dataplanes, variant):
    dp = dataplanes(frame_max=FRAME_MAX, **variant)

    @settings(max_examples=EXAMPLES)
    @given(
        stream_frames=st.lists(frames, max_size=40),
        plan=st.lists(cuts, max_size=60),
        isn=st.integers(min_value=0, max_value=2**32 - 1),
        close_at_end=st.booleans(),
    )
    def check(stream_frames, plan, isn, close_at_end):
        dp.reset_state()
        stream = amqp.PROTOCOL_HEADER + b"".join(stream_frames)
        if close_at_end:
            stream += amqp.connection_close()
        model = ConnectionModel(variant["limit"], variant["action"], frame_max=FRAME_MAX)
        flow = Flow(dp, isn=isn)
        assert flow.send(flags=packets.SYN, seq=isn - 1) == TC_ACT_OK

        # The protocol header always arrives whole, as every client library sends it.
        plan = [(0, max(8, plan[0][1] if plan else 8))] + plan[1:]
        pos = 0
        while pos < len(stream):
            back, ahead = plan.pop(0) if plan else (0, 1448)
            start, end = max(0, pos - back), min(len(stream), pos + ahead)
            if start >= end:
                continue
            verdict = exchange(dp, flow, model, isn + start, stream[start:end])
            if verdict == PASS:
                pos = max(pos, end)
                continue
            # Refused: the client retransmits the same bytes, which are refused again (drop)
            # or pass untouched to a host that no longer knows the connection (reset).
            again = exchange(dp, flow, model, isn + start, stream[start:end])
            assert again == (DROP if verdict == DROP else PASS)
            break

        counters = dp.counters()
        assert counters["consumes_allowed"] == model.counts["allowed"]
        assert counters["consumes_refused"] == model.counts["refused"]
        assert counters["cancels"] == model.counts["cancels"]
        assert counters["channel_closes"] == model.counts["closes"]
        assert counters["cancels_unknown"] == model.counts["cancels_unknown"]
        assert counters["unparsed"] == 0
        assert counters["resyncs"] == 0

    check()


def exchange(dp, flow, model, seq, payload):
    """One segment through both; their verdicts and states must match. Returns the verdict."""
    packet = flow.packet(payload, seq=seq)
    verdict, out = dp.run(packet)
    expected = model.segment(seq, payload)
    if expected == DROP:
        assert verdict == TC_ACT_SHOT
    elif expected == RST:
        assert verdict == TC_ACT_OK
        assert packets.tcp_flags(out) & packets.RST
    else:
        assert verdict == TC_ACT_OK
        # As sent, or (refuse) with a queue name rewritten, checksum included.
        assert out == flow.packet(model.output, seq=seq)
    state = flow.state()
    if model.closed:
        assert state.ended == _layout.ENDED_CLOSED
    elif model.reset_sent:
        assert state.ended == _layout.ENDED_RESET
    else:
        assert state is not None
        assert state.consumers == model.consumers
        assert flow.channels() == model.live_channels()
    return expected
