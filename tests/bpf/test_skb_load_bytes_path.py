"""The classifier's fallback for payload bytes outside the linear data: bpf_skb_load_bytes.

The program reads payload bytes straight from the packet's linear data when it holds them
and through bpf_skb_load_bytes when it does not (paged GRO data). BPF_PROG_TEST_RUN only
ever builds linear packets, so every other BPF test runs the direct path; here a test-only
variant, rendered with force_skb_load_bytes, takes the helper for every payload read, and
the packet tests and the property tests run again on it.
"""

import os
import shutil
import tempfile

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import (
    _bpfsys,
    _compile,
    _layout,
    _render,
)
from tests.bpf.test_dataplane import *  # noqa: F403 (the packet tests, collected again here)
from tests.bpf.test_properties import test_classifier_agrees_with_the_model  # noqa: F401
from tests.lib.dataplane import Dataplane

pytestmark = pytest.mark.bpf


def render_source(force, **config):
    """The rendered C of a variant, with or without the test-only knob."""
    validated = _render.validate(config.pop("port", 5672), config.pop("limit", 3),
                                 config.pop("action", "drop"), config.pop("l2", "ethernet"),
                                 _render.BPFFS_ROOT + "/rg-render-only",
                                 config.pop("frame_max", _render.DEFAULT_FRAME_MAX))
    assert not config
    if force:
        validated = dict(validated, force_skb_load_bytes=True)
    return _render.render(validated, _render.read_template())


class LoadBytesDataplane(Dataplane):
    """Dataplane, with every payload read through bpf_skb_load_bytes."""

    def __init__(self, limit=3, action="drop", port=5672, l2="ethernet", frame_max=131072):
        self.pin_dir = tempfile.mkdtemp(prefix="rgtest-", dir=_render.BPFFS_ROOT)
        try:
            self.config = dict(_render.validate(port, limit, action, l2, self.pin_dir,
                                                frame_max), force_skb_load_bytes=True)
            self.source = _render.render(self.config, _render.read_template())
            self.bpf, self.function = _compile.compile_and_load(self.source, self.pin_dir)
            self.map_fds = {name: _bpfsys.obj_get(os.path.join(self.pin_dir, name))
                            for name in _layout.MAP_NAMES}
        except Exception:
            shutil.rmtree(self.pin_dir, ignore_errors=True)
            raise


_cache = {}


@pytest.fixture(scope="module")
def dataplanes():
    """As tests/bpf/conftest.py's, for the load-bytes variants."""

    def get(**config):
        key = tuple(sorted(config.items()))
        if key not in _cache:
            _cache[key] = LoadBytesDataplane(**config)
        dp = _cache[key]
        dp.reset_state()
        return dp

    yield get
    while _cache:
        _cache.popitem()[1].close()


@pytest.fixture
def dp(dataplanes):
    return dataplanes(limit=3, action="drop")


def test_the_knob_selects_the_helper_and_production_never_does():
    production, forced = render_source(False), render_source(True)
    assert "#define FORCE_SKB_LOAD_BYTES 0\n" in production
    assert "#define FORCE_SKB_LOAD_BYTES 1\n" in forced
    assert production.replace("FORCE_SKB_LOAD_BYTES 0", "FORCE_SKB_LOAD_BYTES 1") == forced


@pytest.mark.parametrize("l2", _render.L2_KINDS)
@pytest.mark.parametrize("action", _render.ACTIONS)
@pytest.mark.parametrize("limit", [0, 65535])
def test_load_bytes_variant_passes_the_verifier(action, l2, limit):
    LoadBytesDataplane(limit=limit, action=action, l2=l2).close()
