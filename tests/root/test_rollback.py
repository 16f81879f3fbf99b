"""A run that fails half-way leaves the host as it was before it, and a walk_more slot (the
ingress walk's continuation, the egress program's own) that is empty or holds another
compile's program is drift that the next run repairs: through
_deploy.apply on a real kernel, in a throwaway namespace (tests/root/test_apply.py's site).

The failures are forced the way a host produces them: a foreign filter at the limiter's
egress pref for one protocol (the kernel refuses our all-protocols filter there, "Protocol
mismatch", after the ingress half is already attached). "As before" is what a user looks
at: `tc filter show` on both hooks of every interface, the files under the pin directory,
the program in each walk_more slot and what rabbit_tc_limit_info reports.
"""

import os
import struct
import subprocess

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import (
    _bpfsys,
    _compile,
    _deploy,
    _names,
    _plan,
)
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from ansible_collections.rabbitguard.limiter.plugins.module_utils._errors import LimiterError

from .sites import IFACE, OTHER, only, sh

pytestmark = pytest.mark.bpf


@pytest.fixture
def site(site):
    """conftest's site, with a second interface."""
    return site.add_interface(OTHER)


def slot(site, ifname, n=_compile.INGRESS_MORE_SLOT):
    """The id of the program in ifname's walk_more slot n (0: empty; None: not pinned)."""
    pin = _names.pin_dir(site.pin_root, site.ns_key, ifname)
    path = os.path.join(pin, _compile.CONTINUATION_ARRAY)
    if not os.path.exists(path):
        return None
    with _bpfsys.owned_fd(_bpfsys.obj_get(path)) as fd:
        raw = _bpfsys.map_lookup(fd, struct.pack("=I", n))
    return 0 if raw is None else struct.unpack("=I", raw)[0]


def slots(site, ifname):
    """Both walk_more slots: the ingress walk's continuation, the egress program's own."""
    return tuple(
        slot(site, ifname, n) for n in (_compile.INGRESS_MORE_SLOT, _compile.EGRESS_MORE_SLOT)
    )


def host_state(site):
    return {
        "filters": {
            (ifname, hook): site.tc(ifname, hook)
            for ifname in (IFACE, OTHER)
            for hook in ("ingress", "egress")
        },
        "pins": site.pin_files(),
        "walk_more": {ifname: slots(site, ifname) for ifname in (IFACE, OTHER)},
        "info": site.info(),
    }


def block_egress(site, ifname):
    """Another tool's IPv4-only classic BPF filter at the limiter's egress pref (another
    handle): the kernel refuses our all-protocols filter at that pref."""
    cmd = ["ip", "netns", "exec", site.netns, "tc"]
    subprocess.run(cmd + ["qdisc", "replace", "dev", ifname, "clsact"], check=True)
    subprocess.run(
        cmd
        + ["filter", "add", "dev", ifname, "egress", "pref", str(C.EGRESS_FILTER_PREF)]
        + ["handle", "0x1", "protocol", "ip", "bpf", "bytecode", "1,6 0 0 0"],
        check=True,
    )


def drop_our_egress(site, ifname):
    sh(
        *("ip", "netns", "exec", site.netns, "tc", "filter", "del", "dev", ifname, "egress"),
        *("pref", str(C.EGRESS_FILTER_PREF)),
    )


def test_a_first_deploy_whose_egress_attach_fails_leaves_nothing_running(site, template):
    block_egress(site, IFACE)
    before = host_state(site)

    with pytest.raises(LimiterError, match="egress"):
        _deploy.apply(site.params(), template)

    assert host_state(site) == before
    assert site.tc(IFACE, "ingress") == []  # the new ingress program is gone again
    assert not os.path.exists(site.pin)


def test_a_replace_whose_egress_attach_fails_puts_the_old_half_pair_back(site, template):
    _deploy.apply(site.params(limit=3), template)
    drop_our_egress(site, IFACE)
    block_egress(site, IFACE)
    before = host_state(site)
    assert before["walk_more"][IFACE][0] and before["walk_more"][IFACE][1]

    with pytest.raises(LimiterError, match="egress"):
        _deploy.apply(site.params(limit=5), template)

    assert host_state(site) == before  # old ingress program, old continuation, old config


def test_a_failure_on_the_second_interface_puts_the_first_one_back(site, template):
    # Both run the pair for limit 3; the second cannot take a new egress program.
    _deploy.apply(site.params(limit=3, interfaces=[IFACE, OTHER]), template)
    drop_our_egress(site, OTHER)
    block_egress(site, OTHER)
    before = host_state(site)
    entry = [e for e in before["info"] if e["interface"] == IFACE][0]
    assert entry["attached"] and entry["config"]["limit"] == 3
    # The egress slot holds the attached egress program (it was replaced, then put back).
    assert before["walk_more"][IFACE][1] == egress_id(site, IFACE)

    # The first interface (sorted) is replaced in full before the second one fails.
    with pytest.raises(LimiterError, match="egress"):
        _deploy.apply(site.params(limit=5, interfaces=[IFACE, OTHER]), template)

    assert host_state(site) == before  # the first pair, its walk_more slot and config too


def test_a_failure_on_the_second_interface_undoes_a_first_deploy_on_the_first(site, template):
    block_egress(site, OTHER)
    before = host_state(site)

    with pytest.raises(LimiterError, match="egress"):
        _deploy.apply(site.params(interfaces=[IFACE, OTHER]), template)

    assert host_state(site) == before
    assert site.pin_files() == []


def test_an_overrides_change_waits_for_the_builds_and_is_not_made_when_one_fails(site, template):
    rule = [{"source": "198.18.0.0/16", "limit": 7}]
    _deploy.apply(site.params(interfaces=[IFACE, OTHER]), template)
    drop_our_egress(site, OTHER)
    block_egress(site, OTHER)
    before = host_state(site)

    # IFACE needs its overrides rewritten only; OTHER's egress half must be repaired (and
    # cannot be): the build goes first, fails, and IFACE's overrides stay as they were.
    with pytest.raises(LimiterError, match="egress"):
        _deploy.apply(site.params(interfaces=[IFACE, OTHER], overrides=rule), template)

    assert host_state(site) == before


def egress_id(site, ifname):
    """The id of the program attached at the limiter's egress slot."""
    (found,) = [f for f in site.tc(ifname, "egress") if "options" in f]
    return found["options"]["prog"]["id"]


def empty_slot(site, n=_compile.INGRESS_MORE_SLOT):
    path = os.path.join(site.pin, _compile.CONTINUATION_ARRAY)
    with _bpfsys.owned_fd(_bpfsys.obj_get(path)) as fd:
        assert _bpfsys.map_delete(fd, struct.pack("=I", n))


@pytest.mark.parametrize(
    "n, drift",
    [
        (_compile.INGRESS_MORE_SLOT, _plan.CONTINUATION_GONE),
        (_compile.EGRESS_MORE_SLOT, _plan.EGRESS_CONTINUATION_GONE),
    ],
    ids=["continuation", "egress"],
)
def test_an_empty_walk_more_slot_is_drift_and_repaired(site, template, n, drift):
    """The ingress walk goes on in its continuation, the egress program with a long broker
    segment in itself, through a walk_more slot: empty, the walk stops after its frame
    budget (counted missed)."""
    _deploy.apply(site.params(), template)
    empty_slot(site, n)
    (entry,) = site.info()
    assert entry["drift"] == drift and entry["attached"] is False

    result = _deploy.apply(site.params(), template)

    assert result.changed
    assert (only(result).action, only(result).reason) == (_plan.REPAIR, drift)
    assert site.info()[0]["drift"] is None
    assert slot(site, IFACE, n)
    if n == _compile.EGRESS_MORE_SLOT:
        assert slot(site, IFACE, n) == egress_id(site, IFACE)  # the attached program itself
    assert not _deploy.apply(site.params(), template).changed


@pytest.mark.parametrize(
    "n, program, drift",
    [
        (_compile.INGRESS_MORE_SLOT, "more", _plan.CONTINUATION_DIFFERS),
        (_compile.EGRESS_MORE_SLOT, "egress", _plan.EGRESS_CONTINUATION_DIFFERS),
    ],
    ids=["continuation", "egress"],
)
def test_another_compiles_program_in_a_walk_more_slot_is_drift_and_repaired(
    site, template, n, program, drift
):
    _deploy.apply(site.params(), template)
    with _deploy._tc.open_netns(site.netns) as tc:
        source, _desired = _deploy.desire(
            tc, site.pin_root, site.ns_key, IFACE, site.params(), template
        )
    progs = _compile.compile_programs_isolated(source, site.pin)  # same source, another load
    try:
        _compile.fill_continuation(site.pin, getattr(progs, program), n)
        foreign = slot(site, IFACE, n)
    finally:
        for fd in progs:
            _bpfsys.close(fd)
    (entry,) = site.info()
    assert entry["drift"] == drift

    repaired = only(_deploy.apply(site.params(), template))

    assert (repaired.action, repaired.reason) == (_plan.REPAIR, drift)
    assert site.info()[0]["drift"] is None
    assert slot(site, IFACE, n) not in (0, foreign)
    if n == _compile.EGRESS_MORE_SLOT:
        assert slot(site, IFACE, n) == egress_id(site, IFACE)  # the attached program itself
    assert only(_deploy.apply(site.params(), template)).action == _plan.NONE


def test_a_foreign_filter_the_run_had_to_delete_is_named_when_the_run_fails(site, template):
    # Another tool's IPv4-only filter in the limiter's ingress slot: the deploy deletes it
    # (no program to swap in place), then fails at the egress half and cannot bring it back.
    block_egress(site, IFACE)
    sh(
        *("ip", "netns", "exec", site.netns, "tc", "filter", "add", "dev", IFACE, "ingress"),
        *("pref", str(C.FILTER_PREF), "handle", hex(C.FILTER_HANDLE), "protocol", "ip"),
        *("bpf", "bytecode", "1,6 0 0 0"),
    )

    with pytest.raises(LimiterError) as failed:
        _deploy.apply(site.params(), template)

    msg = str(failed.value)
    assert "NOT as before" in msg and "the bpf ingress filter that was in the limiter's slot" in msg
    # What is left is exactly what the message says: that filter is gone, nothing of ours is.
    assert site.tc(IFACE, "ingress") == []
    assert [f.get("protocol") for f in site.tc(IFACE, "egress") if "options" in f] == ["ip"]
    assert site.pin_files() == []
