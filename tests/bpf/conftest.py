"""Compiled limiter variants, shared across the BPF tests (a compile takes about 2 s)."""

import pytest

from tests.lib.dataplane import Dataplane

_cache = {}


@pytest.fixture(scope="session")
def dataplanes():
    """get(limit=.., action=..): a loaded variant with empty maps."""

    def get(**config):
        key = tuple(sorted(config.items()))
        if key not in _cache:
            _cache[key] = Dataplane(**config)
        dp = _cache[key]
        dp.reset_state()
        return dp

    yield get
    while _cache:
        _cache.popitem()[1].close()


@pytest.fixture
def dp(dataplanes):
    """The default variant: limit 3, drop, Ethernet."""
    return dataplanes(limit=3, action="drop")
