"""Compiled limiter variants, shared across the BPF tests (a compile takes about 2 s)."""

import pytest

from tests.lib.dataplane import Dataplane

# Each loaded variant holds some 40 fds (maps, programs, pins): the cache keeps the most
# recently used few, so that the session (which goes on to tests that use select(), limited to
# fds below 1024) never holds hundreds of them.
CACHED_VARIANTS = 6
_cache = {}


# Payload bytes are read straight from the packet's linear data when it holds them, and
# through bpf_skb_load_bytes when it does not (paged GRO data). BPF_PROG_TEST_RUN only builds
# linear packets, so every test that uses a dataplane runs twice: once as deployed, once on
# a test-only variant that takes the helper for every payload read.
READ_PATHS = {"direct": False, "skb_load_bytes": True}


@pytest.fixture(scope="session", params=sorted(READ_PATHS))
def dataplanes(request):
    """get(limit=.., action=..): a loaded variant with empty maps."""

    def get(**config):
        config["force_skb_load_bytes"] = READ_PATHS[request.param]
        key = tuple(sorted(config.items()))
        dp = _cache.pop(key, None)
        if dp is None:
            dp = Dataplane(**config)
        _cache[key] = dp  # the most recently used goes last
        while len(_cache) > CACHED_VARIANTS:
            _cache.pop(next(iter(_cache))).close()
        dp.reset_state()
        return dp

    yield get
    while _cache:
        _cache.popitem()[1].close()


@pytest.fixture
def dp(dataplanes):
    """The default variant: limit 3, drop, Ethernet."""
    return dataplanes(limit=3, action="drop")
