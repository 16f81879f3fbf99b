# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one apply path of the module and the boot program: pick the interfaces, desire,
observe, plan, check what acting needs, act, and report what happened.

    result = apply(params, template, check_mode=module.check_mode)
    result.changed, result.interfaces(), result.diff()

Everything that touches the system goes through _tc (netlink), _pins (the pinned maps),
_host (bpffs, headers, the lock) and _compile (BCC); the decisions are _plan's.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, cast

from . import (
    _bpfsys,
    _compile,
    _constants,
    _host,
    _layout,
    _names,
    _overrides,
    _pins,
    _plan,
    _render,
    _seed,
    _tc,
)
from ._errors import LimiterError

# typing.Dict: these aliases are evaluated at import, on managed hosts' Python 3.8 too.
Params = Dict[str, Any]
Observation = Dict[str, Any]
Desired = Dict[str, Any]

# The actions that compile and attach a program.
BUILDS = (_plan.CREATE, _plan.REPLACE, _plan.REPAIR)


# -- the result ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What was found and done on one interface."""

    namespace: str
    interface: str
    action: str
    reason: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    program_id: int | None = None
    compiled: bool = False
    pin_dir: str | None = None

    @property
    def label(self) -> str:
        return "%s/%s" % (self.namespace, self.interface)

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "config": self.after,
            "program_id": self.program_id,
            "compiled": self.compiled,
            "pin_dir": self.pin_dir,
        }


@dataclass
class ApplyResult:
    """Every interface's outcome; `changed` and the diff are computed here only."""

    outcomes: list[Outcome] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(o.action != _plan.NONE for o in self.outcomes)

    def interfaces(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for o in self.outcomes:
            out.setdefault(o.namespace, {})[o.interface] = o.as_dict()
        return out

    def diff(self) -> dict[str, dict[str, Any]]:
        return {
            "before": {o.label: o.before for o in self.outcomes},
            "after": {o.label: o.after for o in self.outcomes},
        }

    def as_module_result(self) -> dict[str, Any]:
        return {"changed": self.changed, "interfaces": self.interfaces()}


# -- options ---------------------------------------------------------------------------------


def validate_options(params: Params) -> None:
    """Option errors first: they name the option and nothing has been touched."""
    _render.validate(
        params["port"],
        params["limit"],
        params["action"],
        "ethernet",
        _constants.BPFFS_ROOT + "/check",
        params["frame_max"],
        params["strict"],
    )
    _seed.validate_node(params.get("broker_node"))
    _overrides.validate(params.get("overrides"))


# -- observing -------------------------------------------------------------------------------


def our_slot(tc: _tc.Tc, ifname: str) -> dict[str, Any] | None:
    """The filter at our pref/handle on ifname's ingress, or None."""
    return tc.find_filter(ifname, _constants.FILTER_PREF, _constants.FILTER_HANDLE)


def l2_kind(tc: _tc.Tc, ifname: str) -> str:
    """'ethernet' when tc sees an Ethernet header on ifname (loopback too), else 'none'."""
    return "ethernet" if tc.has_ethernet_header(ifname) else "none"


def observe(tc: _tc.Tc, pin_root: str, ns_key: str, ifnames: list[str]) -> dict[str, Observation]:
    """{ifname: observation} for the named interfaces and every interface with pins."""
    wanted = set(ifnames) | set(_pins.pinned_interfaces(pin_root, ns_key))
    return {ifname: observe_one(tc, pin_root, ns_key, ifname) for ifname in sorted(wanted)}


def observe_one(tc: _tc.Tc | None, pin_root: str, ns_key: str, ifname: str) -> Observation:
    """One interface as found (tc None: its namespace is gone). See _plan for the fields."""
    pin = _names.pin_dir(pin_root, ns_key, ifname)
    exists = tc is not None and tc.interface_exists(ifname)
    filters = tc.list_filters(ifname) if tc is not None and exists else []
    slot = (_constants.FILTER_PREF, _constants.FILTER_HANDLE)
    found = [f for f in filters if (f["pref"], f["handle"]) == slot]
    egress = (
        tc.find_filter(
            ifname, _constants.EGRESS_FILTER_PREF, _constants.EGRESS_FILTER_HANDLE, "egress"
        )
        if tc is not None and exists
        else None
    )
    pins = _pins.pins_present(pin)
    observation = {
        "exists": exists,
        "pins": pins,
        "pin_dir": pin,
        "config": _pins.read_config(pin),
        "filter": found[0] if found else None,
        "egress_filter": egress,
        "shadows": [f for f in filters if f["pref"] < _constants.FILTER_PREF],
        "maps_match": None,
    }
    prog_id = found[0].get("prog_id") if found and _plan.is_ours(found[0]) else None
    if pins and prog_id:
        observation["maps_match"] = _pins.program_uses_pins(pin, prog_id)
        egress_id = egress.get("prog_id") if egress and _plan.is_ours(egress) else None
        if observation["maps_match"] and egress_id:
            observation["maps_match"] = _pins.program_uses_pins(pin, egress_id)
    return observation


def desire(
    tc: _tc.Tc, pin_root: str, ns_key: str, ifname: str, params: Params, template: str
) -> tuple[str, Desired]:
    """The rendered source and desired state for one interface (validates everything)."""
    config = _render.validate(
        params["port"],
        params["limit"],
        params["action"],
        l2_kind(tc, ifname),
        _names.pin_dir(pin_root, ns_key, ifname),
        params["frame_max"],
        params["strict"],
    )
    source = _render.render(config, template)
    # Overrides live in a map, not in the source: they are not part of the digest, so
    # changing them alone plans an update, not a compile.
    config["overrides"] = _overrides.validate(params.get("overrides"))
    return source, {"config": config, "digest": _render.source_digest(source)}


def pick_interfaces(tc: _tc.Tc, requested: list[str] | None, netns: str | None) -> list[str]:
    """The listed interfaces (each must exist), or those of the default routes."""
    ifnames = requested
    if ifnames is None:
        ifnames = tc.default_route_interfaces()
        if not ifnames:
            raise LimiterError(
                "interfaces: no default route in %s to take them from; list the interfaces"
                % (netns or "the host's namespace")
            )
    for ifname in ifnames:
        tc.interface_index(ifname)  # an unknown interface fails here, untouched
    return list(ifnames)


# -- changing things --------------------------------------------------------------------------


def deploy(
    tc: _tc.Tc,
    ifname: str,
    source: str,
    desired: Desired,
    observed: Observation,
    prime: Any = None,
) -> int:
    """Compile, attach (atomic replace) and record. Returns the new program id.

    prime: called with (ifname, pin directory) once the maps exist and before the program
    goes live (seeding from the broker: _seed.Seeder).

    Until the attach succeeds nothing the user relies on has changed: a failure before it
    removes what this call created (new pins, a new clsact) and leaves the previous
    filter in place and working.
    """
    config, digest = desired["config"], desired["digest"]
    pin = config["pin_dir"]
    new_pins = [name for name in _layout.MAP_NAMES if not os.path.exists(os.path.join(pin, name))]
    created_clsact = False
    progs = None
    overrides_before = (observed.get("config") or {}).get("overrides")
    try:
        progs = _compile.compile_programs_isolated(source, pin)
        # Before the attach, so that the new program limits by source from its first packet.
        _overrides.sync(pin, config.get("overrides") or [])
        if prime is not None:
            prime(ifname, pin)
        created_clsact = tc.ensure_clsact(ifname)
        _clear_foreign(tc, ifname, observed.get("filter"))
        _clear_foreign(tc, ifname, observed.get("egress_filter"), "egress")
        # The pair under one name: ingress first (the limit), then egress (the broker's
        # cancels), each swapped in place.
        tc.attach(
            ifname,
            progs.ingress,
            _plan.filter_name(digest),
            _constants.FILTER_PREF,
            _constants.FILTER_HANDLE,
        )
        # Only now that the new ingress program has replaced the old one: until then the old
        # one walked long segments on through this (pinned, shared) array, into its own
        # continuation; from now on the new one does, into this one.
        _compile.fill_continuation(pin, progs.more)
        tc.attach(
            ifname,
            progs.egress,
            _plan.filter_name(digest),
            _constants.EGRESS_FILTER_PREF,
            _constants.EGRESS_FILTER_HANDLE,
            "egress",
        )
    except Exception:
        if created_clsact:
            tc.remove_clsact_if_empty(ifname)
        if _overrides.MAP_NAME not in new_pins and overrides_before is not None:
            _overrides.sync(pin, overrides_before)  # the old program keeps its overrides
        if len(new_pins) == len(_layout.MAP_NAMES):
            _pins.unpin_interface(pin)  # nothing was here: leave no directory either
        else:
            _pins.unpin(pin, new_pins)
        for fd in progs or ():
            _bpfsys.close(fd)
        raise
    try:
        previously = (observed.get("config") or {}).get("created_clsact", False)
        _pins.write_config(pin, config, digest, created_clsact or previously)
        # The pins of an older release's layout: its program was just replaced.
        _pins.unpin_other_layouts(pin)
        return _program_id(progs.ingress)
    finally:
        for fd in progs:
            _bpfsys.close(fd)


def _program_id(prog_fd: int) -> int:
    return int(_bpfsys.prog_info(prog_fd)["id"])


def _clear_foreign(
    tc: _tc.Tc, ifname: str, found: dict[str, Any] | None, hook: str = "ingress"
) -> None:
    """Delete a foreign filter in our slot that attach cannot swap in place.

    The kernel keeps one classifier kind and one protocol per pref, so a replace at our
    pref/handle over, say, a "protocol ip" bpf filter or a flower filter fails with
    "Protocol mismatch" / "kind does not match". Our slot is ours (see the module's notes):
    such a filter goes first, by its own kind and protocol. A foreign bpf filter for all
    protocols is left to the attach, which replaces it atomically.
    """
    if found is None or _plan.is_ours(found):
        return
    if found.get("kind") == "bpf" and found.get("protocol") == _tc.ETH_P_ALL:
        return
    tc.delete_filter(ifname, found["kind"], found["protocol"], found["pref"], found["handle"], hook)


def remove(tc: _tc.Tc, ifname: str, observed: Observation) -> None:
    """Detach our filter, drop the clsact qdisc if we made it and it is empty, unpin."""
    if observed.get("exists"):
        if _plan.is_ours(observed.get("filter")):
            tc.detach(ifname, _constants.FILTER_PREF, _constants.FILTER_HANDLE)
        if _plan.is_ours(observed.get("egress_filter")):
            tc.detach(
                ifname, _constants.EGRESS_FILTER_PREF, _constants.EGRESS_FILTER_HANDLE, "egress"
            )
        if (observed.get("config") or {}).get("created_clsact"):
            tc.remove_clsact_if_empty(ifname)
    _pins.unpin_interface(observed["pin_dir"])
    _pins.unpin_other_layouts(observed["pin_dir"])


# -- the apply path ----------------------------------------------------------------------------


def apply(
    params: Params,
    template: str | None = None,
    check_mode: bool = False,
    wait: float = 0,
    result: ApplyResult | None = None,
) -> ApplyResult:
    """Bring the host to params (rabbit_tc_limit's options) and report what was done.

    wait: seconds to wait for the namespace, interfaces or default route (at boot).
    result: filled in as interfaces are done, so a caller keeps what happened before a
    failure.
    """
    result = ApplyResult() if result is None else result
    present = params.get("state", "present") == "present"
    # Every state: nothing outside bpffs is ever touched.
    params = dict(params, pin_dir=_render.check_pin_dir(params["pin_dir"]))
    if present:
        validate_options(params)
        if template is None:
            raise LimiterError("the classifier template is needed to deploy")
    _host.check_bpffs()
    deadline = time.time() + wait
    path = _tc.netns_path(params["netns"])
    while path is not None and not os.path.exists(path) and time.time() < deadline:
        time.sleep(1)  # a container's namespace may come up late
    with _host.host_lock(params["lock_timeout"]):
        _pins.check_tree(params["pin_dir"])
        if present:
            _present(params, cast(str, template), check_mode, deadline, result)
        elif params["interfaces"] is None and params["netns"] is None:
            for ns_key in _pins.pinned_namespaces(params["pin_dir"]):
                _absent_namespace(params["pin_dir"], ns_key, check_mode, result)
        else:
            _absent(params, check_mode, result)
    return result


def _wait_for_interfaces(tc: _tc.Tc, params: Params, deadline: float) -> list[str]:
    while True:
        try:
            return pick_interfaces(tc, params["interfaces"], params["netns"])
        except LimiterError:
            if time.time() >= deadline:
                raise
            time.sleep(1)


def _present(
    params: Params, template: str, check_mode: bool, deadline: float, result: ApplyResult
) -> None:
    pin_root, netns = params["pin_dir"], params["netns"]
    ns_key = _names.namespace_key(netns)
    with _tc.open_netns(netns) as tc:
        ifnames = _wait_for_interfaces(tc, params, deadline)
        desired, sources = {}, {}
        for ifname in ifnames:
            sources[ifname], desired[ifname] = desire(
                tc, pin_root, ns_key, ifname, params, template
            )
        observed = observe(tc, pin_root, ns_key, ifnames)
        actions = _plan.plan(observed, desired)
        for ifname in ifnames:
            result.warnings += _plan.shadow_warnings(
                _label(ns_key, ifname), observed[ifname], _constants.FILTER_PREF
            )
        if not check_mode and any(a in BUILDS for a, _r in actions.values()):
            tree = _host.check_kernel_headers(params["kernel_headers"])
            if tree is not None:
                os.environ["BCC_KERNEL_SOURCE"] = tree
        seeder = _seed.Seeder(tc, params)
        _act(tc, ns_key, actions, observed, desired, sources, check_mode, result, seeder)
        result.warnings += seeder.warnings


def _label(ns_key: str, ifname: str) -> str:
    return ifname if ns_key == _names.HOST_KEY else "%s/%s" % (ns_key, ifname)


def _absent(params: Params, check_mode: bool, result: ApplyResult) -> None:
    pin_root, netns = params["pin_dir"], params["netns"]
    path = _tc.netns_path(netns)
    if path is not None and not os.path.exists(path):
        if "/" in path and netns is not None and "/" in netns:
            raise LimiterError(_gone_path_message(pin_root, netns))
        # A named namespace that is gone: its filters went with it, its pins are left.
        ns_key = _names.namespace_key(netns)
        _absent_namespace(pin_root, ns_key, check_mode, result, params["interfaces"])
        return
    ns_key = _names.namespace_key(netns)
    with _tc.open_netns(netns) as tc:
        ifnames = params["interfaces"]
        if ifnames is None:
            ifnames = _pins.pinned_interfaces(pin_root, ns_key)
        observed = observe(tc, pin_root, ns_key, ifnames)
        observed = {i: o for i, o in observed.items() if i in ifnames}
        _act(tc, ns_key, _plan.plan(observed, {}), observed, {}, {}, check_mode, result)


def _gone_path_message(pin_root: str, netns: str) -> str:
    """What to say for netns=<a path that is gone>: its pins are keyed by the inode it had."""
    left = []
    for ns_key in _pins.pinned_namespaces(pin_root):
        if ns_key.startswith("ns-") and not _names.resolve_namespace(ns_key)[0]:
            names = ", ".join(_pins.pinned_interfaces(pin_root, ns_key))
            left.append("%s (%s)" % (_names.namespace_dir(pin_root, ns_key), names))
    return "netns %s: no such namespace, so the pins it had cannot be told apart%s" % (
        netns,
        "; pins of namespaces that are gone: %s - state=absent with neither netns nor "
        "interfaces removes them" % "; ".join(left)
        if left
        else " (no pins of a namespace that is gone are left)",
    )


def _absent_namespace(
    pin_root: str,
    ns_key: str,
    check_mode: bool,
    result: ApplyResult,
    interfaces: list[str] | None = None,
) -> None:
    """Remove the limiter from one namespace the pins name; it may be gone already."""
    found, netns = _names.resolve_namespace(ns_key)
    if found:
        with _tc.open_netns(netns) as tc:
            observed = observe(tc, pin_root, ns_key, [])
            _act(tc, ns_key, _plan.plan(observed, {}), observed, {}, {}, check_mode, result)
        return
    # The namespace (and its filters) no longer exist: only the pins are left to remove.
    for ifname in _pins.pinned_interfaces(pin_root, ns_key):
        if interfaces is not None and ifname not in interfaces:
            continue
        pin = _names.pin_dir(pin_root, ns_key, ifname)
        result.outcomes.append(
            Outcome(
                namespace=ns_key,
                interface=ifname,
                action=_plan.REMOVE,
                reason="the namespace is gone",
                before=_plan.public_config(_pins.read_config(pin)),
                pin_dir=pin,
            )
        )
        if not check_mode:
            _pins.unpin_interface(pin)


def _act(
    tc: _tc.Tc,
    ns_key: str,
    actions: dict[str, tuple[str, str | None]],
    observed: dict[str, Observation],
    desired: dict[str, Desired],
    sources: dict[str, str],
    check_mode: bool,
    result: ApplyResult,
    prime: Any = None,
) -> None:
    for ifname, (action, reason) in sorted(actions.items()):
        seen = observed.get(ifname, {})
        want = desired.get(ifname)
        outcome = Outcome(
            namespace=ns_key,
            interface=ifname,
            action=action,
            reason=reason,
            before=_plan.public_config(seen.get("config"))
            if _plan.is_ours(seen.get("filter"))
            else None,
            after=_plan.public_config(want["config"]) if want else None,
            program_id=(seen.get("filter") or {}).get("prog_id") if want else None,
            pin_dir=want["config"]["pin_dir"] if want else seen.get("pin_dir"),
        )
        if not check_mode:
            if action in BUILDS and want is not None:  # a build is always of something wanted
                outcome.program_id = deploy(tc, ifname, sources[ifname], want, seen, prime)
                outcome.compiled = True
            elif action == _plan.UPDATE and want is not None:
                _overrides.sync(want["config"]["pin_dir"], want["config"]["overrides"])
            elif action == _plan.REMOVE:
                remove(tc, ifname, seen)
        result.outcomes.append(outcome)
