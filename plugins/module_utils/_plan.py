# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Pure planning: what is deployed on each interface, what is wanted, what to do.

No system access here, so every decision is unit-tested without root.

An observation of one interface (see _deploy.observe) is a dict:
    pins      True when all of the limiter's maps are pinned for it
    config    the deployed config read from the pinned config map (a dict), or None
    filter    the ingress filter at our pref/handle: {"name", "prog_id"}, or None
    egress_filter  the egress filter at our egress pref/handle, likewise: the pair's other
              half, deployed, replaced and removed with the ingress one under the same name
    maps_match  False when the attached program does not use the pinned maps (None: not
              known, e.g. no filter or no pins)
    continuation  the walk_more array's slot against the ingress program: "ok" (its own
              continuation), "empty", "foreign" (another compile's program), or None (not
              looked at: no filter of ours, no pins)
    egress_continuation  walk_more's egress slot against the egress program: "ok" (the
              attached egress program itself, which goes on with a long broker segment in
              itself), "empty", "foreign", or None (not looked at)
    shadows   filters at an earlier pref on the same hook, which run first
A desired state is a dict {"config": {...}, "digest": "<sha256 hex>"}, or None for absent.
The config's "overrides" (per-source limits) are not in the rendered source, so not in the
digest: when only they differ the plan is UPDATE (rewrite the pinned map, keep the program).
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

from typing import Any

FILTER_PREFIX = "rabbitguard-"
# The filter name carries this much of the source digest: a cheap state key that tc
# hands back as given (it does not decode a program's tag or id for us).
NAME_DIGEST_LEN = 16

NONE, CREATE, REPLACE, REPAIR, REMOVE = "none", "create", "replace", "repair", "remove"
# Only the per-source limits differ: the pinned overrides map is rewritten, nothing is
# compiled, the attached program stays.
UPDATE = "update"
# Why a repair is needed, as shown to the user.
FILTER_GONE = "the filter is gone but its pinned maps are there"
PINS_GONE = "the filter is there but its pinned maps are gone"
FOREIGN = "another program sits at the limiter's tc pref/handle"
CONFIG_GONE = "the pinned config does not match the attached filter"
MAPS_DIFFER = "the attached program does not use the pinned maps"
IFACE_GONE = "the interface is gone but its pinned maps are there"
EGRESS_GONE = "the egress filter (server-sent cancels) is missing"
EGRESS_FOREIGN = "another program sits at the limiter's tc egress pref/handle"
EGRESS_DIFFERS = "the egress filter is not the ingress filter's pair"
CONTINUATION_GONE = "the walk's continuation program is missing from the walk_more array"
CONTINUATION_DIFFERS = "the walk_more array holds a program that is not this pair's continuation"
EGRESS_CONTINUATION_GONE = "the egress program is missing from its walk_more slot"
EGRESS_CONTINUATION_DIFFERS = "the walk_more egress slot holds another program than the egress one"


def filter_name(digest: str) -> str:
    return FILTER_PREFIX + digest[:NAME_DIGEST_LEN]


def is_ours(tc_filter: dict[str, Any] | None) -> bool:
    return tc_filter is not None and (tc_filter.get("name") or "").startswith(FILTER_PREFIX)


def plan_interface(
    observed: dict[str, Any], desired: dict[str, Any] | None
) -> tuple[str, str | None]:
    """(action, reason) for one interface."""
    ours = is_ours(observed.get("filter"))
    foreign = observed.get("filter") is not None and not ours
    if desired is None:
        if ours or is_ours(observed.get("egress_filter")) or observed.get("pins"):
            return REMOVE, None
        return NONE, None
    if foreign:
        return REPAIR, FOREIGN
    if not ours:
        return (REPAIR, FILTER_GONE) if observed.get("pins") else (CREATE, None)
    if not observed.get("pins"):
        return REPAIR, PINS_GONE
    if observed["filter"]["name"] != filter_name(desired["digest"]):
        return REPLACE, None
    egress_problem = _egress_drift(observed)
    if egress_problem:
        return REPAIR, egress_problem
    if observed.get("maps_match") is False:
        return REPAIR, MAPS_DIFFER
    if _continuation_drift(observed):
        return REPAIR, _continuation_drift(observed)
    if (observed.get("config") or {}).get("digest") != desired["digest"]:
        return REPAIR, CONFIG_GONE
    if (observed["config"].get("overrides") or []) != (desired["config"].get("overrides") or []):
        return UPDATE, None
    return NONE, None


def _egress_drift(observed: dict[str, Any]) -> str | None:
    """What is wrong with the egress half of a pair whose ingress filter is ours."""
    egress = observed.get("egress_filter")
    if egress is None:
        return EGRESS_GONE
    if not is_ours(egress):
        return EGRESS_FOREIGN
    if egress.get("name") != observed["filter"]["name"]:
        return EGRESS_DIFFERS
    return None


def _continuation_drift(observed: dict[str, Any]) -> str | None:
    """What is wrong with the walk_more slots of a pair whose ingress filter is ours: the
    observation's "continuation" and "egress_continuation" are each "ok", "empty",
    "foreign", or None (not looked at)."""
    return {"empty": CONTINUATION_GONE, "foreign": CONTINUATION_DIFFERS}.get(
        observed.get("continuation") or ""
    ) or {"empty": EGRESS_CONTINUATION_GONE, "foreign": EGRESS_CONTINUATION_DIFFERS}.get(
        observed.get("egress_continuation") or ""
    )


def drift(observed: dict[str, Any]) -> str | None:
    """What is wrong with a deployment as found (None: filter, pins and config agree)."""
    tc_filter = observed.get("filter")
    ours = is_ours(tc_filter)
    if ours and not observed.get("pins"):
        return PINS_GONE
    if not observed.get("pins"):
        return None
    if not observed.get("exists", True):
        return IFACE_GONE
    if tc_filter is None:
        return FILTER_GONE
    if not ours:
        return FOREIGN
    config = observed.get("config")
    if config is None or tc_filter.get("name") != filter_name(config["digest"]):
        return CONFIG_GONE
    egress_problem = _egress_drift(observed)
    if egress_problem:
        return egress_problem
    if observed.get("maps_match") is False:
        return MAPS_DIFFER
    return _continuation_drift(observed)


def shadow_warnings(ifname: str, observed: dict[str, Any], our_pref: int) -> list[str]:
    """One warning per filter (pref, kind, protocol) that runs before ours on the interface's
    ingress hook (a u32 filter dumps as several entries: its hash table and its nodes)."""
    seen = []
    for f in observed.get("shadows") or ():
        key = (f["pref"], f.get("kind"), f.get("protocol") or 0)
        if key not in seen:
            seen.append(key)
    return [
        "%s: a %s filter at pref %d (protocol 0x%04x) runs before the limiter's (pref %d); "
        "if it returns a verdict, traffic bypasses the limiter"
        % (ifname, kind, pref, proto, our_pref)
        for pref, kind, proto in seen
    ]


def plan(
    observed: dict[str, dict[str, Any]], desired: dict[str, dict[str, Any]]
) -> dict[str, tuple[str, str | None]]:
    """{ifname: (action, reason)} over every interface observed or desired.

    observed: {ifname: observation}; desired: {ifname: desired state}. An interface
    observed but not desired is to be cleaned up (it was dropped from the list).
    """
    actions = {}
    for ifname in sorted(set(observed) | set(desired)):
        actions[ifname] = plan_interface(observed.get(ifname, {}), desired.get(ifname))
    return actions


def changed(actions: dict[str, tuple[str, str | None]]) -> bool:
    return any(action != NONE for action, _reason in actions.values())


def public_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a config a user sets and sees (no pin paths, no internals)."""
    if not config:
        return None
    return dict(
        (key, config[key])
        for key in ("port", "limit", "action", "frame_max", "strict", "l2", "overrides")
        if key in config
    )
