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
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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
        "continuation": None,
        "egress_continuation": None,
    }
    prog_id = found[0].get("prog_id") if found and _plan.is_ours(found[0]) else None
    if pins and prog_id:
        observation["continuation"] = _continuation_state(pin, prog_id)
        observation["maps_match"] = _pins.program_uses_pins(pin, prog_id)
        egress_id = egress.get("prog_id") if egress and _plan.is_ours(egress) else None
        if observation["maps_match"] and egress_id:
            observation["maps_match"] = _pins.program_uses_pins(pin, egress_id)
        if egress_id:
            observation["egress_continuation"] = _egress_slot_state(pin, egress_id)
    return observation


def _continuation_state(pin: str, prog_id: int) -> str | None:
    """ "ok", "empty" or "foreign": the walk_more slot against the attached ingress program
    (None: no walk_more array pinned, as with an older layout)."""
    try:
        more_id = _pins.continuation_id(pin)
        if more_id is None:
            return None
        if not more_id:
            return "empty"
        return "ok" if _pins.is_continuation_of(prog_id, more_id) else "foreign"
    except LimiterError:
        return "foreign"  # a program that went away while we looked


def _egress_slot_state(pin: str, egress_id: int) -> str | None:
    """ "ok", "empty" or "foreign": walk_more's egress slot against the attached egress
    program, which must be the program in it (None: no walk_more array pinned)."""
    try:
        slot_id = _pins.egress_slot_id(pin)
    except LimiterError:
        return "foreign"  # an array of an older layout, without the slot
    if slot_id is None:
        return None
    if not slot_id:
        return "empty"
    return "ok" if slot_id == egress_id else "foreign"


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


class Undo:
    """What one deploy or removal changed and how to put it back: the programs that were
    attached (held open by fd, so that they can be attached again), the walk_more slots,
    the config and overrides, the pins and the clsact qdisc this deploy made; for a removal
    (removal=True) also every pin (_pins.HeldPins) and whether it dropped the clsact qdisc.

    Taken before anything is touched; restore() brings the interface back to that state
    (the same program ids on both hooks and in walk_more, the same pinned maps); close()
    drops the fds once the run is over. tc is None where the namespace is gone (pins only).
    """

    def __init__(
        self,
        tc: _tc.Tc | None,
        ifname: str,
        pin: str,
        observed: Observation,
        removal: bool = False,
    ) -> None:
        self.tc, self.ifname, self.pin = tc, ifname, pin
        self.new_pins = _pins.missing(pin)
        self.config = observed.get("config")
        self.created_clsact = False
        self.dropped_clsact = False
        self.fds: list[int] = []
        self.held: _pins.HeldPins | None = None
        self.more: int | None = None
        self.egress_more: int | None = None
        # Filters _clear_foreign deleted: no program to put back (reported on failure).
        self.lost: list[str] = []
        try:
            self.held = _pins.HeldPins(pin) if removal else None
            # The bpf filters (ours or anyone's, for all protocols: those attach swaps in
            # place) that were in the two slots: (fd, name) or None.
            self.ingress = self._hold_filter(observed.get("filter"))
            self.egress = self._hold_filter(observed.get("egress_filter"))
            if _pins.CONTINUATION_ARRAY not in self.new_pins:
                more_id = _pins.continuation_id(pin)
                if more_id:
                    self.more = self._hold(more_id)
                egress_more_id = _pins.egress_slot_id(pin)
                if egress_more_id:
                    self.egress_more = self._hold(egress_more_id)
        except BaseException:
            self.close()  # what was taken so far: no caller holds this Undo to close it
            raise

    def _hold(self, prog_id: int) -> int | None:  # None: the program is gone
        try:
            fd = _bpfsys.prog_get_fd_by_id(prog_id)
        except LimiterError:
            return None
        self.fds.append(fd)
        return fd

    def _hold_filter(self, found: dict[str, Any] | None) -> tuple[int, str] | None:
        if not found or found.get("kind") != "bpf" or not found.get("prog_id"):
            return None
        if found.get("protocol") != _tc.ETH_P_ALL:
            return None
        fd = self._hold(found["prog_id"])
        return None if fd is None else (fd, found.get("name") or "")

    def _slot(self, held: tuple[int, str] | None, hook: str) -> None:
        pref, handle = (
            (_constants.FILTER_PREF, _constants.FILTER_HANDLE)
            if hook == "ingress"
            else (_constants.EGRESS_FILTER_PREF, _constants.EGRESS_FILTER_HANDLE)
        )
        tc = cast(_tc.Tc, self.tc)  # only called where the namespace is there
        if held is not None:
            tc.attach(self.ifname, held[0], held[1], pref, handle, hook)
        elif _plan.is_ours(tc.find_filter(self.ifname, pref, handle, hook)):
            tc.detach(self.ifname, pref, handle, hook)

    def restore(self) -> list[str]:
        """Put the interface back as it was; what could not be put back (empty: all was)."""
        failed: list[str] = []

        def step(what: str, do: Any, *args: Any) -> None:
            try:
                do(*args)
            except Exception as e:  # every step is tried, whatever the others do
                failed.append("%s: %s" % (what, e))

        there = self.tc is not None and self.tc.interface_exists(self.ifname)
        if self.held is not None:
            step("pins", self.held.repin)
        if there and self.dropped_clsact:
            step("clsact qdisc", cast(_tc.Tc, self.tc).ensure_clsact, self.ifname)
        if there:
            step("ingress filter", self._slot, self.ingress, "ingress")
        if _pins.CONTINUATION_ARRAY not in self.new_pins:
            if self.more is not None:
                step("walk_more", _compile.fill_continuation, self.pin, self.more)
            else:
                step("walk_more", self._empty_continuation)
        if self.config is not None:
            if _overrides.MAP_NAME not in self.new_pins:
                step("overrides", _overrides.sync, self.pin, self.config.get("overrides") or [])
            if "config" not in self.new_pins:
                step("config", self._write_old_config)
        if there:
            step("egress filter", self._slot, self.egress, "egress")
        if _pins.CONTINUATION_ARRAY not in self.new_pins:
            if self.egress_more is not None:
                step("walk_more egress slot", _compile.fill_egress_slot, self.pin, self.egress_more)
            else:
                step("walk_more egress slot", self._empty_continuation, _compile.EGRESS_MORE_SLOT)
            if there and self.created_clsact:
                step("clsact qdisc", cast(_tc.Tc, self.tc).remove_clsact_if_empty, self.ifname)
        if len(self.new_pins) == len(_layout.MAP_NAMES):
            step("pins", _pins.unpin_interface, self.pin)  # nothing was here: no directory
        elif self.new_pins:
            step("pins", _pins.unpin, self.pin, self.new_pins)
        failed += ["the %s filter that was in the limiter's slot" % f for f in self.lost]
        return failed

    def _empty_continuation(self, slot: int = 0) -> None:
        path = os.path.join(self.pin, _pins.CONTINUATION_ARRAY)
        if os.path.exists(path):
            with _bpfsys.owned_fd(_bpfsys.obj_get(path)) as fd:
                _bpfsys.map_delete(fd, slot.to_bytes(4, sys.byteorder))

    def _write_old_config(self) -> None:
        config = cast(Dict[str, Any], self.config)
        _pins.write_config(self.pin, config, config["digest"], config["created_clsact"])

    def close(self) -> None:
        for fd in self.fds:
            _bpfsys.close(fd)
        self.fds = []
        if self.held is not None:
            self.held.close()


def deploy(
    tc: _tc.Tc,
    ifname: str,
    source: str,
    desired: Desired,
    observed: Observation,
    prime: Any = None,
    undo: Undo | None = None,
) -> int:
    """Compile, attach the pair (each half swapped in place), fill walk_more and record.
    Returns the new ingress program id.

    prime: called with (ifname, pin directory) once the maps exist and before the program
    goes live (seeding from the broker: _seed.Seeder).

    undo: an Undo taken before (the caller keeps it to undo this deploy when a later one of
    the run fails); without it, one is taken here. A failure anywhere puts the interface
    back as it was (Undo.restore) and raises; if that cannot be done in full, the error
    says what is left as it stands.
    """
    config, digest = desired["config"], desired["digest"]
    pin = config["pin_dir"]
    own = undo is None
    undo = Undo(tc, ifname, pin, observed) if undo is None else undo
    progs = None
    try:
        progs = _compile.compile_programs_isolated(source, pin)
        # Before the attach, so that the new program limits by source from its first packet.
        _overrides.sync(pin, config.get("overrides") or [])
        if prime is not None:
            prime(ifname, pin)
        undo.created_clsact = tc.ensure_clsact(ifname)
        for found, hook in (
            (observed.get("filter"), "ingress"),
            (observed.get("egress_filter"), "egress"),
        ):
            if _clear_foreign(tc, ifname, found, hook):
                undo.lost.append("%s %s" % (found["kind"], hook) if found else hook)
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
        # Likewise the egress program's own slot, where it goes on with a long segment: the
        # old one, still attached until now, went on in itself.
        _compile.fill_egress_slot(pin, progs.egress)
        previously = (observed.get("config") or {}).get("created_clsact", False)
        _pins.write_config(pin, config, digest, undo.created_clsact or previously)
        return _program_id(progs.ingress)
    except Exception as e:
        if not own:
            raise  # the caller puts this and the run's other interfaces back
        raise rolled_back(e, [(_label_of(tc, ifname), undo)]) from e
    finally:
        for fd in progs or ():
            _bpfsys.close(fd)
        if own:
            undo.close()


def _label_of(tc: _tc.Tc, ifname: str) -> str:
    return ifname if tc.netns is None else "%s/%s" % (tc.netns, ifname)


def rolled_back(error: Exception, undos: list[tuple[str, Undo]]) -> Exception:
    """Undo (last first) and return the error to raise: the original one when everything
    is back as it was, else one that names what could not be put back."""
    left = []
    for label, undo in reversed(undos):
        failed = undo.restore()
        if failed:
            left.append("%s: %s" % (label, "; ".join(failed)))
    if not left:
        return error
    msg = getattr(error, "msg", None) or str(error)
    return LimiterError(
        "%s; putting things back as they were failed, so the host is NOT as before the run: "
        "%s (once the cause is fixed, the same task again finishes the job; rabbit_tc_limit_info "
        "shows the drift)" % (msg, " | ".join(left)),
        {"not_restored": left},
    )


def _program_id(prog_fd: int) -> int:
    return int(_bpfsys.prog_info(prog_fd)["id"])


def _clear_foreign(
    tc: _tc.Tc, ifname: str, found: dict[str, Any] | None, hook: str = "ingress"
) -> bool:
    """Delete a foreign filter in our slot that attach cannot swap in place.

    The kernel keeps one classifier kind and one protocol per pref, so a replace at our
    pref/handle over, say, a "protocol ip" bpf filter or a flower filter fails with
    "Protocol mismatch" / "kind does not match". Our slot is ours (see the module's notes):
    such a filter goes first, by its own kind and protocol. A foreign bpf filter for all
    protocols is left to the attach, which replaces it atomically.
    """
    if found is None or _plan.is_ours(found):
        return False
    if found.get("kind") == "bpf" and found.get("protocol") == _tc.ETH_P_ALL:
        return False
    tc.delete_filter(ifname, found["kind"], found["protocol"], found["pref"], found["handle"], hook)
    return True


def remove(tc: _tc.Tc, ifname: str, observed: Observation, undo: Undo) -> None:
    """Detach our pair, drop the clsact qdisc if we made it and it is empty, unpin (this
    layout's pins and older ones'). undo: taken before, with removal=True (the caller puts
    the interface back with it when this or a later step of the run fails)."""
    if observed.get("exists"):
        if _plan.is_ours(observed.get("filter")):
            tc.detach(ifname, _constants.FILTER_PREF, _constants.FILTER_HANDLE)
        if _plan.is_ours(observed.get("egress_filter")):
            tc.detach(
                ifname, _constants.EGRESS_FILTER_PREF, _constants.EGRESS_FILTER_HANDLE, "egress"
            )
        if (observed.get("config") or {}).get("created_clsact"):
            undo.dropped_clsact = tc.remove_clsact_if_empty(ifname)
    _pins.unpin_interface(observed["pin_dir"])
    _pins.unpin_other_layouts(observed["pin_dir"])


class Changes:
    """What one run changed, kept until it is over: the Undo of every interface it touched
    (put back last first when a later step fails), the netlink sockets of the namespaces
    they are in, and the outcomes, reported only once every step succeeded."""

    def __init__(self) -> None:
        self.undos: list[tuple[str, Undo]] = []
        self.outcomes: list[Outcome] = []
        self.sockets = ExitStack()

    def open_netns(self, netns: str | None) -> _tc.Tc:
        """A Tc for netns that stays open until the run is over (see _tc.open_netns)."""
        return self.sockets.enter_context(_tc.open_netns(netns))

    def undo(self, label: str, *args: Any, **kwargs: Any) -> Undo:
        """Take an Undo (Undo's arguments) before changing an interface."""
        undo = Undo(*args, **kwargs)
        self.undos.append((label, undo))
        return undo


@contextmanager
def all_or_nothing(result: ApplyResult) -> Iterator[Changes]:
    """The changes of one run: a failure anywhere in it puts back everything it changed
    (rolled_back) and raises; else the outcomes go to result."""
    changes = Changes()
    with changes.sockets:
        try:
            yield changes
        except Exception as e:
            raise rolled_back(e, changes.undos) from e
        finally:
            for _label, undo in changes.undos:
                undo.close()
    result.outcomes += changes.outcomes


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
            with all_or_nothing(result) as changes:  # every namespace or none
                for ns_key in _pins.pinned_namespaces(params["pin_dir"]):
                    _absent_namespace(params["pin_dir"], ns_key, check_mode, changes)
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
        with all_or_nothing(result) as changes:
            _act(tc, ns_key, actions, observed, desired, sources, check_mode, changes, seeder)
        result.warnings += seeder.warnings
        for outcome in changes.outcomes:
            if outcome.compiled and outcome.pin_dir:
                # The pins of an older release's layout: its program was just replaced.
                _pins.unpin_other_layouts(outcome.pin_dir)


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
        with all_or_nothing(result) as changes:
            _absent_namespace(pin_root, ns_key, check_mode, changes, params["interfaces"])
        return
    ns_key = _names.namespace_key(netns)
    with all_or_nothing(result) as changes:
        tc = changes.open_netns(netns)
        ifnames = params["interfaces"]
        if ifnames is None:
            ifnames = _pins.pinned_interfaces(pin_root, ns_key)
        observed = observe(tc, pin_root, ns_key, ifnames)
        observed = {i: o for i, o in observed.items() if i in ifnames}
        _act(tc, ns_key, _plan.plan(observed, {}), observed, {}, {}, check_mode, changes)


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
    changes: Changes,
    interfaces: list[str] | None = None,
) -> None:
    """Remove the limiter from one namespace the pins name; it may be gone already."""
    found, netns = _names.resolve_namespace(ns_key)
    if found:
        tc = changes.open_netns(netns)
        observed = observe(tc, pin_root, ns_key, [])
        _act(tc, ns_key, _plan.plan(observed, {}), observed, {}, {}, check_mode, changes)
        return
    # The namespace (and its filters) no longer exist: only the pins are left to remove.
    for ifname in _pins.pinned_interfaces(pin_root, ns_key):
        if interfaces is not None and ifname not in interfaces:
            continue
        pin = _names.pin_dir(pin_root, ns_key, ifname)
        changes.outcomes.append(
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
            changes.undo(_label(ns_key, ifname), None, ifname, pin, {}, removal=True)
            _pins.unpin_interface(pin)


def _act(
    tc: _tc.Tc,
    ns_key: str,
    actions: dict[str, tuple[str, str | None]],
    observed: dict[str, Observation],
    desired: dict[str, Desired],
    sources: dict[str, str],
    check_mode: bool,
    changes: Changes,
    prime: Any = None,
) -> None:
    """Do the actions: builds first, then overrides updates, then removals, each interface
    after taking its Undo in changes (see all_or_nothing: a failure puts every interface
    the run changed back as it was)."""
    outcomes = []
    for ifname, (action, reason) in sorted(actions.items()):
        seen = observed.get(ifname, {})
        want = desired.get(ifname)
        outcomes.append(
            Outcome(
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
        )
    changes.outcomes += outcomes
    if check_mode:
        return
    for kinds in (BUILDS, (_plan.UPDATE,), (_plan.REMOVE,)):
        for outcome in outcomes:
            ifname = outcome.interface
            seen, want = observed.get(ifname, {}), desired.get(ifname)
            label = _label(ns_key, ifname)
            if outcome.action not in kinds:
                continue
            if outcome.action in BUILDS and want is not None:
                undo = changes.undo(label, tc, ifname, want["config"]["pin_dir"], seen)
                outcome.program_id = deploy(tc, ifname, sources[ifname], want, seen, prime, undo)
                outcome.compiled = True
            elif outcome.action == _plan.UPDATE and want is not None:
                changes.undo(label, tc, ifname, want["config"]["pin_dir"], seen)
                _overrides.sync(want["config"]["pin_dir"], want["config"]["overrides"])
            elif outcome.action == _plan.REMOVE:
                undo = changes.undo(label, tc, ifname, seen["pin_dir"], seen, removal=True)
                remove(tc, ifname, seen, undo)
