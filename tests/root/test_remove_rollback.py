"""A removal that fails half-way leaves the host as it was before the run, as a deploy does
(tests/root/test_rollback.py): through _deploy.apply on a real kernel, in throwaway
namespaces (tests/root/sites.py).

The failure is forced the way a host produces it: a directory someone made inside an
interface's pin directory. bpffs holds only pinned objects and directories, and the module
unpins what it finds there, so unpinning fails on it ("Is a directory") after that
interface's filters were detached, its clsact qdisc dropped and, in a run over several
interfaces, after the interfaces before it were removed in full.

"As before" is what a user looks at: `tc filter show` on both hooks (the same program ids),
`tc qdisc show`, the files and directories under the pin directory, the programs in the
walk_more slots, the kernel ids of the pinned maps, and what rabbit_tc_limit_info reports
(the config and the counters: the maps pinned again are the very maps that were there).
"""

import contextlib
import ctypes
import os
import subprocess
import time

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import (
    _bpfsys,
    _deploy,
    _layout,
    _names,
    _pins,
)
from ansible_collections.rabbitguard.limiter.plugins.module_utils._errors import LimiterError

from .sites import IFACE, OTHER, module_params, sh

pytestmark = pytest.mark.bpf

# rgap-x0 sorts before rgap-y0: OTHER is removed second.
BOTH = [IFACE, OTHER]


@pytest.fixture
def site(site):
    """conftest's site, with a second interface."""
    return site.add_interface(OTHER)


def pin_of(site, ifname, ns_key=None):
    return _names.pin_dir(site.pin_root, ns_key or site.ns_key, ifname)


def qdiscs(netns, ifname):
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "tc", "qdisc", "show", "dev", ifname, "ingress"],
        check=True,
        stdout=subprocess.PIPE,
    ).stdout
    return out.decode().split()


def pin_tree(site):
    """Every directory under the pin root with its mode, and every pinned object."""
    dirs = []
    for top, names, _files in os.walk(site.pin_root):
        dirs += [
            (
                os.path.relpath(os.path.join(top, d), site.pin_root),
                os.stat(os.path.join(top, d)).st_mode,
            )
            for d in names
        ]
    return sorted(dirs), site.pin_files()


def count(site, ifname, n):
    """Count n segments on CPU 0 in ifname's pinned counters, as the program would."""
    size = (ctypes.sizeof(_layout.Counters) + 7) & ~7
    value = _layout.Counters(segments=n)
    raw = bytes(value) + b"\0" * (size - ctypes.sizeof(value))
    raw += b"\0" * size * (_bpfsys.possible_cpus() - 1)
    with _bpfsys.owned_fd(_bpfsys.obj_get(os.path.join(pin_of(site, ifname), "counters"))) as fd:
        _bpfsys.map_update(fd, b"\0" * 4, raw)


def pins_state(site, ns_key, ifnames=BOTH):
    """What the pins of these interfaces hold: map ids (the same maps, so the same
    counters), and the programs in both walk_more slots."""
    return {
        ifname: (
            _pins.map_ids(pin_of(site, ifname, ns_key)),
            _pins.continuation_id(pin_of(site, ifname, ns_key)),
            _pins.egress_slot_id(pin_of(site, ifname, ns_key)),
        )
        for ifname in ifnames
    }


def host_state(site, ifnames=BOTH):
    return {
        "filters": {
            (ifname, hook): site.tc(ifname, hook)
            for ifname in ifnames
            for hook in ("ingress", "egress")
        },
        "qdiscs": {ifname: qdiscs(site.netns, ifname) for ifname in ifnames},
        "pins": pins_state(site, site.ns_key, ifnames),
        "info": site.info(),
    }


def assert_gone(map_ids, wait=5.0):
    """None of these maps is left in the kernel (freed after an RCU grace period, once the
    last program using them is)."""
    deadline = time.monotonic() + wait
    while True:
        left = [map_id for map_id in map_ids if _bpfsys.map_exists(map_id)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert left == []


def block_unpin(pin):
    """A directory someone made in the pin directory: unpinning fails on it."""
    os.mkdir(os.path.join(pin, "kept-by-hand"), 0o700)


def test_absent_that_fails_on_the_second_interface_puts_both_back(site, template):
    _deploy.apply(site.params(interfaces=BOTH), template)
    count(site, IFACE, 41)
    count(site, OTHER, 43)
    block_unpin(pin_of(site, OTHER))
    before, tree = host_state(site), pin_tree(site)
    assert all(e["attached"] for e in before["info"])
    assert [e["counters"]["segments"] for e in before["info"]] == [41, 43]

    with pytest.raises(LimiterError, match="kept-by-hand: Is a directory") as failed:
        _deploy.apply(site.params(state="absent", interfaces=BOTH))

    assert "NOT as before" not in str(failed.value)
    assert host_state(site) == before  # same programs, qdisc, walk_more, maps, counters
    assert pin_tree(site) == tree

    # With the directory gone, the same removal leaves nothing: no pin, and the maps go
    # (nothing holds them any longer).
    os.rmdir(os.path.join(pin_of(site, OTHER), "kept-by-hand"))
    _deploy.apply(site.params(state="absent", interfaces=BOTH))
    assert not os.path.exists(site.pin_root)
    assert_gone([i for maps, _more, _egress in before["pins"].values() for i in maps.values()])
    for ifname in BOTH:
        assert site.tc(ifname, "ingress") == [] and site.tc(ifname, "egress") == []
        assert "clsact" not in qdiscs(site.netns, ifname)


@pytest.mark.parametrize("blocked", ["its pins", "an older layout's pins"])
def test_absent_that_fails_half_way_through_one_removal_puts_it_back(site, template, blocked):
    # The interface's filters are detached and its clsact qdisc dropped before unpinning
    # fails; with an older layout's pins blocked, its own pins and directories (up to the
    # layout's) are gone too by then.
    _deploy.apply(site.params(limit=4), template)
    count(site, IFACE, 7)
    old = site.pin_older_layout(3)  # a removal unpins it after the interface's own
    block_unpin(site.pin if blocked == "its pins" else old)
    before, tree = host_state(site, [IFACE]), pin_tree(site)
    assert "clsact" in before["qdiscs"][IFACE] and all(before["pins"][IFACE][1:])

    with pytest.raises(LimiterError, match="kept-by-hand: Is a directory"):
        _deploy.apply(site.params(state="absent"))

    assert host_state(site, [IFACE]) == before
    assert pin_tree(site) == tree
    (entry,) = site.info()
    assert entry["attached"] and entry["config"]["limit"] == 4
    assert entry["counters"]["segments"] == 7


def test_an_interface_dropped_from_the_list_whose_removal_fails_puts_the_run_back(site, template):
    # IFACE is replaced (limit 3 -> 5), then OTHER, dropped from the list, cannot be removed.
    _deploy.apply(site.params(interfaces=BOTH), template)
    block_unpin(pin_of(site, OTHER))
    before, tree = host_state(site), pin_tree(site)

    with pytest.raises(LimiterError, match="kept-by-hand: Is a directory"):
        _deploy.apply(site.params(limit=5, interfaces=[IFACE]), template)

    assert host_state(site) == before
    assert pin_tree(site) == tree


@contextlib.contextmanager
def second_namespace(site):
    netns = site.netns + "b"
    try:
        sh("ip", "netns", "add", netns)
        for ifname, peer in ((IFACE, "rgap-x1"), (OTHER, "rgap-y1")):
            sh("ip", "-n", netns, "link", "add", ifname, "type", "veth", "peer", "name", peer)
        yield netns
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False, stderr=subprocess.DEVNULL)


def test_absent_over_namespaces_that_fails_in_a_gone_one_puts_every_namespace_back(site, template):
    """state=absent with neither netns nor interfaces: the site's namespace is removed in
    full, then the pins of a namespace that is gone (only pins are left of it) fail half-way:
    the first namespace's pair and the gone one's first pins come back."""
    _deploy.apply(site.params(interfaces=BOTH), template)
    with second_namespace(site) as netns:
        _deploy.apply(module_params(netns, site.pin_root, IFACE, interfaces=BOTH), template)
    gone = _names.namespace_key(netns)
    assert _pins.pinned_namespaces(site.pin_root) == [site.ns_key, gone]  # removed second
    pinned_gone = pins_state(site, gone)
    block_unpin(pin_of(site, OTHER, gone))
    before, tree = host_state(site), pin_tree(site)

    absent = module_params(None, site.pin_root, IFACE, state="absent", interfaces=None)
    with pytest.raises(LimiterError, match="kept-by-hand: Is a directory"):
        _deploy.apply(absent)

    assert host_state(site) == before
    assert pin_tree(site) == tree
    assert pins_state(site, gone) == pinned_gone

    os.rmdir(os.path.join(pin_of(site, OTHER, gone), "kept-by-hand"))
    done = _deploy.apply(absent)
    assert sorted((o.namespace, o.interface) for o in done.outcomes) == sorted(
        (ns, i) for ns in (site.ns_key, gone) for i in BOTH
    )
    assert not os.path.exists(site.pin_root)
