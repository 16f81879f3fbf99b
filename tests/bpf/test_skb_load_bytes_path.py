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
from tests.lib.dataplane import Dataplane

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
