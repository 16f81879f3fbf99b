"""The classifier's fallback for payload bytes outside the linear data: bpf_skb_load_bytes.

The program reads payload bytes straight from the packet's linear data when it holds them
and through bpf_skb_load_bytes when it does not (paged GRO data). BPF_PROG_TEST_RUN only
ever builds linear packets, so every other BPF test runs the direct path; here a test-only
variant, rendered with force_skb_load_bytes, takes the helper for every payload read: the
shared `dataplanes` fixture (tests/bpf/conftest.py) runs every packet and property test on
it as well. Here: the knob itself, and every variant of it through the verifier.
"""

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _bpfsys, _render
from tests.bpf.test_variants import VERIFIER_BUDGET
from tests.lib import amqp
from tests.lib.dataplane import TC_ACT_OK, TC_ACT_SHOT, Dataplane, Flow

pytestmark = pytest.mark.bpf


def render_source(force, **config):
    """The rendered C of a variant, with or without the test-only knob."""
    validated = _render.validate(
        config.pop("port", 5672),
        config.pop("limit", 3),
        config.pop("action", "drop"),
        config.pop("l2", "ethernet"),
        _render.BPFFS_ROOT + "/rg-render-only",
        config.pop("frame_max", _render.DEFAULT_FRAME_MAX),
    )
    assert not config
    if force:
        validated = dict(validated, force_skb_load_bytes=True)
    return _render.render(validated, _render.read_template())


def test_the_knob_selects_the_helper_and_production_never_does():
    production, forced = render_source(False), render_source(True)
    assert "#define FORCE_SKB_LOAD_BYTES 0\n" in production
    assert "#define FORCE_SKB_LOAD_BYTES 1\n" in forced
    assert production.replace("FORCE_SKB_LOAD_BYTES 0", "FORCE_SKB_LOAD_BYTES 1") == forced


@pytest.mark.parametrize("l2", _render.L2_KINDS)
@pytest.mark.parametrize("action", _render.ACTIONS)
@pytest.mark.parametrize("limit", [0, 65535])
def test_load_bytes_variant_passes_the_verifier(action, l2, limit):
    dp = Dataplane(limit=limit, action=action, l2=l2, force_skb_load_bytes=True)
    try:
        assert _bpfsys.prog_info(dp.function.fd)["verified_insns"] < VERIFIER_BUDGET
    finally:
        dp.close()


# The walk reads a frame's peek window (the previous frame's end octet, then 11 header
# bytes) from a read-ahead of READ_AHEAD bytes that one bpf_skb_load_bytes fills, on paged
# data (and on the helper path here). A heartbeat at offset 0, then a body frame of `size`
# bytes whose peek window (offset 7) fills the read-ahead [7, 7 + READ_AHEAD): the consume
# after the body starts at 16 + size, and its window [15 + size, 27 + size) lies inside the
# read-ahead, across its end (at every offset) or just past it.
READ_AHEAD = 256
ACROSS = range(READ_AHEAD - 22, READ_AHEAD - 5)


def body_frame(size, end=amqp.FRAME_END):
    return amqp.frame(amqp.BODY, 1, b"\xce" * size)[:-1] + bytes([end])


@pytest.mark.parametrize("size", ACROSS)
def test_a_header_across_the_read_ahead_end_is_read(dataplanes, size):
    dp = dataplanes(limit=1, action="drop")
    flow = Flow(dp)
    assert flow.handshake() == TC_ACT_OK
    segment = amqp.heartbeat() + body_frame(size) + amqp.consume(1) + amqp.heartbeat()
    assert flow.send(segment) == TC_ACT_OK
    assert flow.consumers() == 1
    assert dp.counters()["missed"] == 0
    # The position is exact after it: the next consume is the one over the limit.
    assert flow.send(amqp.heartbeat() + body_frame(size) + amqp.consume(2)) == TC_ACT_SHOT


@pytest.mark.parametrize("size", ACROSS)
def test_a_bad_end_octet_across_the_read_ahead_end_loses_sync(dataplanes, size):
    """The body's end octet is the first octet of the consume's peek window: checked there
    too, wherever the window falls, and the consume behind it is not counted."""
    dp = dataplanes(limit=1, action="drop")
    flow = Flow(dp)
    assert flow.handshake() == TC_ACT_OK
    segment = amqp.heartbeat() + body_frame(size, end=0) + amqp.consume(1) + amqp.heartbeat()
    assert flow.send(segment) == TC_ACT_OK
    assert flow.consumers() == 0
    assert flow.state().synced == 0
    assert dp.counters()["missed"] == 1
