"""The limiter's program pair (clsact ingress + egress) through _deploy.apply: real tc, real
bpffs, real BCC, in a throwaway namespace (tests/root/test_apply.py's site).

Both filters are there after a deploy, under one name; a replace swaps both; absent removes
both; a missing, foreign or stale egress filter is repaired; info reports both programs.
"""

import os
import struct
import subprocess

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import (
    _bpfsys,
    _deploy,
    _layout,
    _plan,
    _tc,
)
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C

from .sites import IFACE, only, tc_filters

pytestmark = pytest.mark.bpf


def hook_filters(site, hook):
    """Our filters on one clsact hook, as iproute2 shows them."""
    return [f for f in tc_filters(site.netns, IFACE, hook) if "options" in f]


def names(site, hook):
    return [f["options"].get("bpf_name") for f in hook_filters(site, hook)]


def test_deploy_attaches_both_and_absent_removes_both(site, template):
    created = only(_deploy.apply(site.params(), template))
    assert created.action == _plan.CREATE
    (ingress,) = names(site, "ingress")
    (egress,) = names(site, "egress")
    assert ingress == egress and ingress.startswith(_plan.FILTER_PREFIX)
    (entry,) = site.info()
    assert entry["attached"] is True and entry["drift"] is None
    assert entry["program_id"] and entry["egress_program_id"]
    assert entry["egress_program_id"] != entry["program_id"]

    removed = only(_deploy.apply(site.params(state="absent")))

    assert removed.action == _plan.REMOVE
    assert hook_filters(site, "ingress") == [] and hook_filters(site, "egress") == []


def test_replace_swaps_both(site, template):
    _deploy.apply(site.params(limit=3), template)
    before = names(site, "egress")
    replaced = only(_deploy.apply(site.params(limit=5), template))
    assert replaced.action == _plan.REPLACE
    assert names(site, "egress") == names(site, "ingress") != before
    assert len(hook_filters(site, "egress")) == 1


def test_replace_keeps_the_egress_positions(site, template):
    """Both stores of the egress program's stream positions (the direct-mapped slots and the
    LRU behind them) are pins: a replaced pair finds the same maps, with what they held."""
    _deploy.apply(site.params(limit=3), template)
    key = _layout.conn_key("198.18.0.2", 40000, "198.18.0.1", site.params()["port"])
    index = struct.pack("<I", _layout.egress_slot_index(bytes(key)))
    state = _layout.EgressState(next_hdr=123456, synced=1)
    slot = bytes(_layout.EgressSlot(key=key, seen=1, state=state))
    other = bytes(_layout.conn_key("198.18.0.3", 40001, "198.18.0.1", site.params()["port"]))
    before = {}
    for name, k, value in (("egress_slots", index, slot), ("egress", other, bytes(state))):
        fd = _bpfsys.obj_get(os.path.join(site.pin, name))
        try:
            _bpfsys.map_update(fd, k, value)
            before[name] = _bpfsys.map_info(fd)["id"]
        finally:
            _bpfsys.close(fd)

    assert only(_deploy.apply(site.params(limit=5), template)).action == _plan.REPLACE

    for name, k, value in (("egress_slots", index, slot), ("egress", other, bytes(state))):
        fd = _bpfsys.obj_get(os.path.join(site.pin, name))
        try:
            assert _bpfsys.map_info(fd)["id"] == before[name]
            assert _bpfsys.map_lookup(fd, k) == value
        finally:
            _bpfsys.close(fd)


def test_a_missing_egress_filter_is_repaired(site, template):
    _deploy.apply(site.params(), template)
    with _tc.open_netns(site.netns) as tc:
        assert tc.detach(IFACE, C.EGRESS_FILTER_PREF, C.EGRESS_FILTER_HANDLE, "egress")
    (entry,) = site.info()
    assert entry["drift"] == _plan.EGRESS_GONE and entry["attached"] is False
    assert entry["egress_program_id"] is None

    repaired = only(_deploy.apply(site.params(), template))

    assert (repaired.action, repaired.reason) == (_plan.REPAIR, _plan.EGRESS_GONE)
    assert names(site, "egress") == names(site, "ingress")
    assert only(_deploy.apply(site.params(), template)).action == _plan.NONE


def test_a_foreign_egress_filter_in_our_slot_is_repaired(site, template):
    _deploy.apply(site.params(), template)
    tc_cmd = ["ip", "netns", "exec", site.netns, "tc", "filter"]
    slot = ["dev", IFACE, "egress", "pref", str(C.EGRESS_FILTER_PREF)]
    subprocess.run(tc_cmd + ["del"] + slot, check=True)
    # Another tool's classic BPF "return 0" (passes everything), IPv4 only: the kernel cannot
    # swap it in place (protocol mismatch), so the deploy deletes it first.
    subprocess.run(
        tc_cmd
        + ["add"]
        + slot
        + ["handle", hex(C.EGRESS_FILTER_HANDLE), "protocol", "ip"]
        + ["bpf", "bytecode", "1,6 0 0 0"],
        check=True,
    )
    assert names(site, "egress") == [None]
    assert site.info()[0]["drift"] == _plan.EGRESS_FOREIGN
    repaired = only(_deploy.apply(site.params(), template))
    assert (repaired.action, repaired.reason) == (_plan.REPAIR, _plan.EGRESS_FOREIGN)
    (egress,) = names(site, "egress")
    assert egress == names(site, "ingress")[0]
