# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What is deployed on a host, read back from the pins and tc: rabbit_tc_limit_info's
entries, and the input of the metrics (_metrics). No Ansible here: the boot program's
metrics mode runs it on hosts without Ansible.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

from typing import Any

from . import _constants as C
from . import _deploy, _host, _names, _overrides, _pins, _plan, _render, _tc


def describe_all(params: dict[str, Any], limiters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The info module's entries, appended to limiters as they are read: every interface
    with pins, and every interface whose filter is ours although its pins are gone."""
    pin_root = _render.check_pin_dir(params["pin_dir"])
    _host.check_bpffs()
    _pins.check_tree(pin_root)
    if params["netns"] is not None:
        ns_keys = [_names.namespace_key(params["netns"])]
    else:
        ns_keys = sorted(set(_pins.pinned_namespaces(pin_root)) | {_names.HOST_KEY})
    for ns_key in ns_keys:
        found, netns = _names.resolve_namespace(ns_key)
        if params["netns"] is not None:
            found, netns = True, params["netns"]
        ifnames = set(_pins.pinned_interfaces(pin_root, ns_key))
        if not found:
            limiters += [
                describe(None, pin_root, ns_key, i, params)
                for i in sorted(ifnames)
                if params["interfaces"] is None or i in params["interfaces"]
            ]
            continue
        with _tc.open_netns(netns) as tc:
            ifnames |= {i for i in tc.interface_names() if _plan.is_ours(_deploy.our_slot(tc, i))}
            if params["interfaces"] is not None:
                ifnames &= set(params["interfaces"])
            limiters += [describe(tc, pin_root, ns_key, i, params) for i in sorted(ifnames)]
    return limiters


def describe(
    tc: _tc.Tc | None, pin_root: str, ns_key: str, ifname: str, params: dict[str, Any]
) -> dict[str, Any]:
    seen = _deploy.observe_one(tc, pin_root, ns_key, ifname)
    tc_filter, pin = seen["filter"], seen["pin_dir"]
    ours = _plan.is_ours(tc_filter)
    drift = _plan.drift(seen)
    entry: dict[str, Any] = {
        "namespace": ns_key,
        "interface": ifname,
        "pin_dir": pin,
        "config": _plan.public_config(seen["config"]),
        "attached": ours and seen["pins"] and drift is None,
        "program_id": tc_filter["prog_id"] if ours else None,
        "egress_program_id": (seen["egress_filter"] or {}).get("prog_id")
        if _plan.is_ours(seen["egress_filter"])
        else None,
        "drift": drift,
        "warnings": _plan.shadow_warnings(ifname, seen, C.FILTER_PREF) if ours else [],
        "counters": _pins.counters(pin) if seen["pins"] else None,
        "connections": [],
        "refusals": [],
    }
    if seen["pins"]:
        log = _pins.refusals(pin)
        entry["refusals"] = log["refusals"]
        entry["counters"]["refuse_rewrites"] = log["rewrites"]
        entry["counters"]["refuse_fallbacks"] = log["fallbacks"]
    if params["connections"] and seen["pins"]:
        conns = _pins.connections(pin)
        config = seen["config"] or {}
        for conn in conns:
            conn["limit"] = (
                _overrides.effective_limit(
                    conn["client"], config.get("overrides") or [], config["limit"]
                )
                if config
                else None
            )
        entry["connections"] = [c for c in conns if c["consumers"] >= params["min_consumers"]]
        entry["connection_count"] = len(conns)
    return entry
