"""Per-source limits in the classifier: the pinned overrides LPM trie, written by the same
userspace code the modules use (_overrides.sync), read at each basic.consume."""

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _overrides
from tests.lib import amqp
from tests.lib.dataplane import TC_ACT_OK, TC_ACT_SHOT, Flow

pytestmark = pytest.mark.bpf

OVERRIDES = _overrides.validate(
    [
        {"source": "198.18.7.0/24", "limit": 5},
        {"source": "198.18.7.9/32", "limit": 1},
        {"source": "198.18.8.0/24", "limit": 0},
        {"source": "fd00:7::/64", "limit": 6},
    ]
)


@pytest.fixture
def odp(dataplanes):
    """Default limit 3, with OVERRIDES in the pinned trie; emptied afterwards."""
    dp = dataplanes(limit=3, action="drop")
    assert _overrides.sync(dp.pin_dir, OVERRIDES) is True
    yield dp
    _overrides.sync(dp.pin_dir, [])


def allowed(dp, client, port, tries=8):
    """How many consumes in a row the connection from client gets before a refusal."""
    flow = Flow(dp, client=client, client_port=port)
    assert flow.handshake() == TC_ACT_OK
    for n in range(tries):
        if flow.send(amqp.consume(1)) == TC_ACT_SHOT:
            return n
    return tries


@pytest.mark.parametrize(
    "client, expected",
    [
        ("198.18.7.20", 5),  # the /24
        ("198.18.7.9", 1),  # the /32 inside it: longest prefix wins
        ("198.18.8.1", 0),  # an override of 0 refuses every consume
        ("198.18.9.1", 3),  # no override: the compiled default
        ("fd00:7::42", 6),  # IPv6
        ("fd00:8::42", 3),
    ],
)
def test_each_source_gets_its_limit(odp, client, expected):
    assert allowed(odp, client, 41000) == expected


def test_the_map_reads_back_in_normal_form_and_sync_is_exact(odp):
    assert _overrides.read(odp.pin_dir) == OVERRIDES
    assert _overrides.sync(odp.pin_dir, OVERRIDES) is False
    fewer = [e for e in OVERRIDES if e["source"] != "198.18.7.9/32"]
    assert _overrides.sync(odp.pin_dir, fewer) is True
    assert _overrides.read(odp.pin_dir) == fewer
    assert allowed(odp, "198.18.7.9", 41001) == 5


def test_a_change_applies_at_the_next_consume_of_a_live_connection(odp):
    flow = Flow(odp, client="198.18.9.1", client_port=41002)
    assert flow.handshake() == TC_ACT_OK
    for _i in range(3):
        assert flow.send(amqp.consume(1)) == TC_ACT_OK
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT
    _overrides.sync(odp.pin_dir, OVERRIDES + [{"source": "198.18.9.0/24", "limit": 4}])
    assert flow.send(amqp.consume(1)) == TC_ACT_OK  # the same connection, the retransmission
    assert flow.consumers() == 4
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT
