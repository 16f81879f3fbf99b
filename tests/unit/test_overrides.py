"""The overrides option: validation, normal form, trie keys, effective limits (no root)."""

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _overrides as O
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _plan
from ansible_collections.rabbitguard.limiter.plugins.module_utils._render import ConfigError


def test_normal_form_sorted_v4_before_v6_and_stripped():
    got = O.validate(
        [
            {"source": "fd00::/8", "limit": 50},
            {"source": " 10.1.0.0/16", "limit": 500},
            {"source": "10.0.0.0/8", "limit": 20},
        ]
    )
    assert got == [
        {"source": "10.0.0.0/8", "limit": 20},
        {"source": "10.1.0.0/16", "limit": 500},
        {"source": "fd00::/8", "limit": 50},
    ]
    assert O.validate(None) == [] and O.validate([]) == []


@pytest.mark.parametrize(
    "value, words",
    [
        ("10.0.0.0/8", ["overrides must be a list", "str"]),
        ({"source": "10.0.0.0/8", "limit": 1}, ["overrides must be a list", "dict"]),
        (["10.0.0.0/8"], ["overrides[0] must be a dict"]),
        ([{"source": "10.0.0.0/8"}], ["overrides[0]", "missing key limit"]),
        ([{"limit": 3}], ["overrides[0]", "missing key source"]),
        ([{"source": "10.0.0.0/8", "limit": 3, "lmit": 4}], ["overrides[0]", "unknown key lmit"]),
        ([{"source": "10.0.0.0/33", "limit": 3}], ["overrides[0]", "not a CIDR"]),
        ([{"source": "rabbit.example", "limit": 3}], ["overrides[0]", "not a CIDR"]),
        ([{"source": 10, "limit": 3}], ["overrides[0]", "source must be a CIDR"]),
        ([{"source": "10.0.0.1/8", "limit": 3}], ["host bits set", "10.0.0.0/8", "10.0.0.1/32"]),
        ([{"source": "fd00::1/64", "limit": 3}], ["host bits set", "fd00::/64", "fd00::1/128"]),
        ([{"source": "10.0.0.0/8", "limit": -1}], ["overrides[0]", "between 0 and 65535"]),
        ([{"source": "10.0.0.0/8", "limit": 65536}], ["between 0 and 65535"]),
        ([{"source": "10.0.0.0/8", "limit": "5"}], ["between 0 and 65535", "'5'"]),
        ([{"source": "10.0.0.0/8", "limit": True}], ["between 0 and 65535"]),
        (
            [{"source": "10.0.0.0/8", "limit": 1}, {"source": "::ffff:10.0.0.0/104", "limit": 2}],
            ["overrides[1]", "same as overrides[0]"],
        ),
    ],
)
def test_bad_entries_name_the_option_on_one_line(value, words):
    with pytest.raises(ConfigError) as e:
        O.validate(value)
    message = str(e.value)
    assert message.startswith("overrides") and "\n" not in message
    for word in words:
        assert word in message


def test_too_many_entries():
    many = [{"source": "10.%d.%d.0/24" % (i // 256, i % 256), "limit": 1} for i in range(1025)]
    with pytest.raises(ConfigError, match="at most %d" % C.MAX_OVERRIDES):
        O.validate(many)
    assert len(O.validate(many[: C.MAX_OVERRIDES])) == C.MAX_OVERRIDES


def test_trie_keys_are_the_conn_key_form_and_read_back():
    import ipaddress

    p, a = O.key_of(ipaddress.ip_network("198.18.0.0/15"))
    assert p == 96 + 15 and a == b"\x00" * 10 + b"\xff\xff" + bytes([198, 18, 0, 0])
    assert O.text_of(p, a) == "198.18.0.0/15"
    p, a = O.key_of(ipaddress.ip_network("fd00:1::/32"))
    assert p == 32 and O.text_of(p, a) == "fd00:1::/32"
    # an IPv6 prefix shorter than the v4-mapped block stays IPv6
    p, a = O.key_of(ipaddress.ip_network("::/0"))
    assert O.text_of(p, a) == "::/0"


def test_longest_prefix_wins_and_families_stay_apart():
    ov = O.validate(
        [
            {"source": "198.18.0.0/15", "limit": 7},
            {"source": "198.18.0.0/24", "limit": 2},
            {"source": "198.18.0.9/32", "limit": 0},
            {"source": "fd00::/8", "limit": 40},
        ]
    )
    assert O.effective_limit("198.18.0.9", ov, 10) == 0
    assert O.effective_limit("198.18.0.10", ov, 10) == 2
    assert O.effective_limit("198.19.1.1", ov, 10) == 7
    assert O.effective_limit("203.0.113.1", ov, 10) == 10
    assert O.effective_limit("fd00::5", ov, 10) == 40
    assert O.effective_limit("fe80::5", ov, 10) == 10


def _observed(overrides):
    return {
        "exists": True,
        "pins": True,
        "config": {"digest": "ab" * 32, "overrides": overrides},
        "filter": {"name": _plan.filter_name("ab" * 32), "prog_id": 7},
        "egress_filter": {"name": _plan.filter_name("ab" * 32), "prog_id": 8},
    }


def test_only_overrides_differ_plans_an_update_not_a_build():
    want = {"config": {"overrides": [{"source": "10.0.0.0/8", "limit": 3}]}, "digest": "ab" * 32}
    assert _plan.plan_interface(_observed([]), want) == (_plan.UPDATE, None)
    assert _plan.plan_interface(_observed(want["config"]["overrides"]), want) == (_plan.NONE, None)
    # a source change is a build, whatever the overrides: the build writes them too
    other = dict(want, digest="cd" * 32)
    assert _plan.plan_interface(_observed([]), other) == (_plan.REPLACE, None)
    assert _plan.public_config({"limit": 3, "overrides": [], "digest": "x"}) == {
        "limit": 3,
        "overrides": [],
    }
