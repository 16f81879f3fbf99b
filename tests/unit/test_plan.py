"""Planning: what is deployed vs what is wanted -> what to do (no root, no kernel)."""

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _plan

DIGEST = "ab" * 32
OTHER = "cd" * 32
WANT = {
    "config": {
        "port": 5672,
        "limit": 3,
        "action": "drop",
        "frame_max": C.DEFAULT_FRAME_MAX,
        "l2": "ethernet",
        "pin_dir": "/sys/fs/bpf/x",
    },
    "digest": DIGEST,
}


_PAIR = object()


def seen(filter_name=None, pins=True, digest=DIGEST, prog_id=7, egress=_PAIR):
    """egress: the egress filter's name (default: the ingress filter's, a whole pair)."""
    egress = filter_name if egress is _PAIR else egress
    return {
        "exists": True,
        "pins": pins,
        "config": {"digest": digest} if pins and digest else None,
        "filter": {"name": filter_name, "prog_id": prog_id} if filter_name else None,
        "egress_filter": {"name": egress, "prog_id": prog_id + 1} if egress else None,
    }


OURS = _plan.filter_name(DIGEST)


@pytest.mark.parametrize(
    "observed, desired, expected",
    [
        pytest.param({}, WANT, (_plan.CREATE, None), id="nothing-there"),
        pytest.param(seen(OURS), WANT, (_plan.NONE, None), id="unchanged"),
        pytest.param(
            seen(_plan.filter_name(OTHER), digest=OTHER),
            WANT,
            (_plan.REPLACE, None),
            id="config-changed",
        ),
        pytest.param(seen(None), WANT, (_plan.REPAIR, _plan.FILTER_GONE), id="filter-gone"),
        pytest.param(seen(OURS, pins=False), WANT, (_plan.REPAIR, _plan.PINS_GONE), id="pins-gone"),
        pytest.param(seen("cilium-policy"), WANT, (_plan.REPAIR, _plan.FOREIGN), id="foreign"),
        pytest.param(
            seen(OURS, digest=OTHER),
            WANT,
            (_plan.REPAIR, _plan.CONFIG_GONE),
            id="config-map-disagrees",
        ),
        pytest.param(seen(OURS), None, (_plan.REMOVE, None), id="absent"),
        pytest.param(seen(None), None, (_plan.REMOVE, None), id="absent-pins-only"),
        pytest.param(seen(OURS, pins=False), None, (_plan.REMOVE, None), id="absent-filter-only"),
        pytest.param({}, None, (_plan.NONE, None), id="absent-nothing-there"),
        pytest.param(
            seen(OURS, egress=None), WANT, (_plan.REPAIR, _plan.EGRESS_GONE), id="egress-gone"
        ),
        pytest.param(
            seen(OURS, egress="cilium-egress"),
            WANT,
            (_plan.REPAIR, _plan.EGRESS_FOREIGN),
            id="egress-foreign",
        ),
        pytest.param(
            seen(OURS, egress=_plan.filter_name(OTHER)),
            WANT,
            (_plan.REPAIR, _plan.EGRESS_DIFFERS),
            id="egress-of-another-pair",
        ),
        pytest.param(
            seen(None, pins=False, egress=OURS), None, (_plan.REMOVE, None), id="absent-egress-only"
        ),
        pytest.param(
            seen("cilium-policy", pins=False),
            None,
            (_plan.NONE, None),
            id="absent-leaves-foreign-filters-alone",
        ),
    ],
)
def test_plan_interface(observed, desired, expected):
    assert _plan.plan_interface(observed, desired) == expected


def test_interfaces_dropped_from_the_list_are_removed():
    actions = _plan.plan({"eth0": seen(OURS), "eth1": seen(OURS)}, {"eth0": WANT})
    assert actions == {"eth0": (_plan.NONE, None), "eth1": (_plan.REMOVE, None)}
    assert _plan.changed(actions)


def test_nothing_to_do_is_not_a_change():
    assert not _plan.changed(_plan.plan({"eth0": seen(OURS)}, {"eth0": WANT}))


def test_filter_name_carries_the_digest():
    name = _plan.filter_name(DIGEST)
    assert name.startswith(_plan.FILTER_PREFIX) and DIGEST[:16] in name
    assert _plan.is_ours({"name": name}) and not _plan.is_ours({"name": "other"})
    assert not _plan.is_ours(None)


def test_public_config_hides_internals():
    assert _plan.public_config(WANT["config"]) == {
        "port": 5672,
        "limit": 3,
        "action": "drop",
        "frame_max": C.DEFAULT_FRAME_MAX,
        "l2": "ethernet",
    }
    assert _plan.public_config(None) is None


@pytest.mark.parametrize(
    "name", ["eth0", "eth0.100", "br-lan", "wg_0", "vlan@x", "ens1f0np0", "naïve"]
)
def test_interface_names_become_bpffs_safe_and_come_back(name):
    from ansible_collections.rabbitguard.limiter.plugins.module_utils import _names, _render

    component = _names.path_component(name)
    assert "." not in component and "/" not in component
    assert _names.from_path_component(component) == name
    # ...and the pin path passes the renderer's validation.
    _render.validate(5672, 1, "drop", "ethernet", _names.pin_dir(C.DEFAULT_PIN_ROOT, "host", name))


def test_maps_not_used_by_the_attached_program_are_a_repair():
    found = dict(seen(_plan.filter_name(DIGEST)), maps_match=False)
    assert _plan.plan_interface(found, WANT) == (_plan.REPAIR, _plan.MAPS_DIFFER)
    assert _plan.drift(found) == _plan.MAPS_DIFFER


@pytest.mark.parametrize(
    "found, reason",
    [
        (seen(_plan.filter_name(DIGEST)), None),
        (seen(_plan.filter_name(DIGEST), pins=False), _plan.PINS_GONE),
        (seen(None), _plan.FILTER_GONE),
        (dict(seen(None), exists=False), _plan.IFACE_GONE),
        (seen("someone-else"), _plan.FOREIGN),
        (seen(_plan.filter_name(OTHER)), _plan.CONFIG_GONE),
        (seen(None, pins=False), None),
    ],
)
def test_drift_names_what_disagrees(found, reason):
    assert _plan.drift(found) == reason


def test_every_filter_before_ours_is_a_warning():
    u32 = {"pref": 1, "kind": "u32", "protocol": 3}  # dumped as its hash table and its node
    found = {"shadows": [{"pref": 1, "kind": "bpf", "protocol": 3}, u32, dict(u32)]}
    warning, other = _plan.shadow_warnings("eth0", found, C.FILTER_PREF)
    assert "eth0: a u32 filter at pref 1" in other
    assert "eth0: a bpf filter at pref 1 (protocol 0x0003)" in warning
    assert _plan.shadow_warnings("eth0", {"shadows": []}, C.FILTER_PREF) == []


@pytest.mark.parametrize(
    "state, reason",
    [
        ("ok", None),
        (None, None),
        ("empty", _plan.CONTINUATION_GONE),
        ("foreign", _plan.CONTINUATION_DIFFERS),
    ],
)
def test_the_walk_more_slot_is_drift_and_a_repair(state, reason):
    found = dict(seen(_plan.filter_name(DIGEST)), continuation=state)
    assert _plan.drift(found) == reason
    assert _plan.plan_interface(found, WANT) == (
        (_plan.REPAIR, reason) if reason else (_plan.NONE, None)
    )


@pytest.mark.parametrize(
    "state, reason",
    [
        ("ok", None),
        (None, None),
        ("empty", _plan.EGRESS_CONTINUATION_GONE),
        ("foreign", _plan.EGRESS_CONTINUATION_DIFFERS),
    ],
)
def test_the_walk_more_egress_slot_is_drift_and_a_repair(state, reason):
    found = dict(seen(_plan.filter_name(DIGEST)), continuation="ok", egress_continuation=state)
    assert _plan.drift(found) == reason
    assert _plan.plan_interface(found, WANT) == (
        (_plan.REPAIR, reason) if reason else (_plan.NONE, None)
    )


def test_maps_that_differ_come_before_the_walk_more_slot():
    found = dict(seen(_plan.filter_name(DIGEST)), continuation="empty", maps_match=False)
    assert _plan.drift(found) == _plan.MAPS_DIFFER
