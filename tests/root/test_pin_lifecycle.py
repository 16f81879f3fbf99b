"""Everything a deployment pins goes and comes together: the maps of the layout (conns,
channels, counters, config, refusals, overrides, egress, egress_slots) and the walk's
continuation array (walk_more), through _deploy.apply on a real kernel, in a throwaway namespace
(tests/root/test_apply.py's site).

walk_more is filled only once the new program pair is attached (the program it replaces
walks long segments on through the same pinned array until then); a replace leaves the new
continuation there, absent leaves nothing pinned, and the pins an older layout left for the
same interface go at the next deploy or removal.
"""

import os
import struct

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import (
    _bpfsys,
    _compile,
    _deploy,
    _layout,
    _names,
    _pins,
    _plan,
)
from ansible_collections.rabbitguard.limiter.plugins.module_utils._errors import LimiterError

from .sites import only

pytestmark = pytest.mark.bpf


def continuation_id(site):
    """The id of the program in the walk_more slot (a program array reads back ids)."""
    path = os.path.join(site.pin, _compile.CONTINUATION_ARRAY)
    with _bpfsys.owned_fd(_bpfsys.obj_get(path)) as fd:
        raw = _bpfsys.map_lookup(fd, struct.pack("=I", 0))
    return None if raw is None else struct.unpack("=I", raw)[0]


def test_a_deploy_pins_the_layout_and_fills_the_continuation(site, template):
    created = only(_deploy.apply(site.params(), template))
    assert created.action == _plan.CREATE

    assert sorted(os.listdir(site.pin)) == sorted(_layout.MAP_NAMES)  # no loading-* left
    more = continuation_id(site)
    (entry,) = site.info()
    assert more is not None and more not in (entry["program_id"], entry["egress_program_id"])
    assert _pins.program_uses_pins(site.pin, more)  # the continuation of this very pair


def test_a_replace_puts_its_own_continuation_in(site, template):
    only(_deploy.apply(site.params(limit=3), template))
    before = continuation_id(site)

    replaced = only(_deploy.apply(site.params(limit=5), template))

    assert replaced.action == _plan.REPLACE
    after = continuation_id(site)
    assert after not in (None, before)
    # Loaded with the new ingress program, after it: not the old pair's.
    assert after > replaced.program_id
    assert _pins.program_uses_pins(site.pin, after)
    with pytest.raises(LimiterError):
        _bpfsys.close(_bpfsys.prog_get_fd_by_id(before))  # the old one is gone


def test_absent_leaves_no_pin(site, template):
    _deploy.apply(site.params(overrides=[{"source": "198.18.0.0/15", "limit": 1}]), template)
    assert os.path.exists(os.path.join(site.pin, "overrides"))

    only(_deploy.apply(site.params(state="absent")))

    assert not os.path.exists(site.pin_root)


@pytest.mark.parametrize("then", ["redeploy", "absent"])
def test_pins_an_older_layout_left_go(site, template, then):
    only(_deploy.apply(site.params(limit=3), template))
    # What a release with layout version 3 left for this interface: its maps pinned.
    old = site.pin_older_layout(3)
    assert _names.layout_root(site.pin_root) != os.path.dirname(os.path.dirname(old))

    if then == "redeploy":
        assert only(_deploy.apply(site.params(limit=4), template)).action == _plan.REPLACE
        assert sorted(os.listdir(site.pin_root)) == ["v%d" % _layout.LAYOUT_VERSION]
    else:
        only(_deploy.apply(site.params(state="absent")))
        assert not os.path.exists(site.pin_root)
