# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The two modules' main flows: prerequisites, lock, observe, plan, act, report.

Kept apart from the module files so that those stay documentation plus argument_spec.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import sys

try:
    from importlib.util import find_spec
except ImportError:  # Python 2.7 on an old managed host: no respawn probing there
    find_spec = None

from ansible.module_utils.common.respawn import (
    has_respawned,
    probe_interpreters_for_module,
    respawn_module,
)

from . import _deploy, _plan, _render, _tc
from ._errors import LimiterError

# Where distro packages put BCC's and pyroute2's bindings.
SYSTEM_PYTHONS = ["/usr/bin/python3", "/usr/libexec/platform-python", "/usr/bin/python"]
PACKAGES = {
    "bcc": "python3-bpfcc (Debian/Ubuntu) or python3-bcc (RHEL family)",
    "pyroute2": "python3-pyroute2 (Debian/Ubuntu, RHEL family via EPEL)",
    "jinja2": "python3-jinja2 (Debian/Ubuntu, RHEL family)",
}


def _importable(name):
    if find_spec is None:
        try:
            __import__(name)
            return True
        except ImportError:
            return False
    return find_spec(name) is not None


def ensure_python_libs(module, names):
    """Respawn into a system Python that has the bindings, or fail with the fix.

    BCC exists only as a distro package for the system Python (ansible.posix's
    seboolean does the same for selinux). find_spec looks without importing.
    """
    missing = [name for name in names if not _importable(name)]
    if not missing:
        return
    if not has_respawned():
        interpreter = probe_interpreters_for_module(SYSTEM_PYTHONS, missing[0])
        if interpreter:
            respawn_module(interpreter)  # does not return
    module.fail_json(
        msg="%s not importable by %s nor by the system Python: install %s"
        % (", ".join(missing), sys.executable, "; ".join(PACKAGES[name] for name in missing))
    )


def check_root(module):
    if os.geteuid() != 0:
        module.fail_json(
            msg="%s must run as root to attach tc filters and pin BPF maps: "
            "use become: true" % module._name
        )


def _template(params):
    if params.get("_template"):
        return params["_template"]
    # Without the action plugin (a module test, a direct run from the collection tree).
    try:
        return _render.read_template()
    except (IOError, OSError):
        raise LimiterError(
            "the classifier template was not passed to the module: run it "
            "as rabbitguard.limiter.rabbit_tc_limit (its action plugin sends it)"
        )


# -- rabbit_tc_limit ----------------------------------------------------------------------


def run_limit(module):
    params = module.params
    present = params["state"] == "present"
    check_root(module)
    ensure_python_libs(module, ["pyroute2", "bcc", "jinja2"] if present else ["pyroute2"])
    result = {"changed": False, "interfaces": {}}
    diff = {"before": {}, "after": {}}
    try:
        if present:
            # Option errors first: they name the option and nothing has been touched.
            _render.validate(
                params["port"],
                params["limit"],
                params["action"],
                "ethernet",
                _render.BPFFS_ROOT + "/check",
                params["frame_max"],
            )
        _deploy.check_bpffs()
        with _deploy.host_lock(params["lock_timeout"]):
            if present:
                _present(module, result, diff)
            elif params["interfaces"] is None and params["netns"] is None:
                for ns_key in _deploy.pinned_namespaces(params["pin_dir"]):
                    _absent_namespace(module, ns_key, result, diff)
            else:
                _absent(module, result, diff)
    except (LimiterError, _render.ConfigError) as e:
        module.fail_json(msg=str(e), **result)
    if module._diff:
        result["diff"] = diff
    module.exit_json(**result)


def _present(module, result, diff):
    params = module.params
    pin_root, netns = params["pin_dir"], params["netns"]
    ns_key = _deploy.namespace_key(netns)
    template = _template(params)
    with _tc.open_netns(netns) as tc:
        ifnames = params["interfaces"]
        if ifnames is None:
            ifnames = tc.default_route_interfaces()
            if not ifnames:
                raise LimiterError(
                    "interfaces: no default route in %s to take them from; "
                    "list the interfaces" % (netns or "the host's namespace")
                )
        desired, sources = {}, {}
        for ifname in ifnames:
            tc.interface_index(ifname)  # an unknown interface fails here, untouched
            sources[ifname], desired[ifname] = _deploy.desire(
                tc, pin_root, ns_key, ifname, params, template
            )
        observed = _deploy.observe(tc, pin_root, ns_key, ifnames)
        actions = _plan.plan(observed, desired)
        compiling = [
            i for i, (a, _r) in actions.items() if a in (_plan.CREATE, _plan.REPLACE, _plan.REPAIR)
        ]
        if compiling and not module.check_mode:
            tree = _deploy.check_kernel_headers(params["kernel_headers"])
            if params["kernel_headers"]:
                os.environ["BCC_KERNEL_SOURCE"] = tree
        _act(module, tc, ns_key, actions, observed, desired, sources, result, diff)


def _absent(module, result, diff):
    params = module.params
    ns_key = _deploy.namespace_key(params["netns"])
    with _tc.open_netns(params["netns"]) as tc:
        ifnames = params["interfaces"]
        if ifnames is None:
            ifnames = _deploy.pinned_interfaces(params["pin_dir"], ns_key)
        observed = _deploy.observe(tc, params["pin_dir"], ns_key, ifnames)
        observed = dict((i, o) for i, o in observed.items() if i in ifnames)
        _act(module, tc, ns_key, _plan.plan(observed, {}), observed, {}, {}, result, diff)


def _absent_namespace(module, ns_key, result, diff):
    """Remove the limiter from one namespace the pins name; it may be gone already."""
    pin_root = module.params["pin_dir"]
    found, netns = _deploy.resolve_namespace(ns_key)
    if found:
        with _tc.open_netns(netns) as tc:
            observed = _deploy.observe(tc, pin_root, ns_key, [])
            _act(module, tc, ns_key, _plan.plan(observed, {}), observed, {}, {}, result, diff)
        return
    # The namespace (and its filters) no longer exist: only the pins are left to remove.
    for ifname in _deploy.pinned_interfaces(pin_root, ns_key):
        pin = _deploy.pin_dir(pin_root, ns_key, ifname)
        before = _plan.public_config(_deploy.read_config(pin))
        _record(
            result,
            diff,
            ns_key,
            ifname,
            _plan.REMOVE,
            "the namespace is gone",
            before,
            None,
            None,
            False,
            pin,
        )
        if not module.check_mode:
            _deploy.unpin_interface(pin)


def _act(module, tc, ns_key, actions, observed, desired, sources, result, diff):
    for ifname, (action, reason) in sorted(actions.items()):
        seen = observed.get(ifname, {})
        want = desired.get(ifname)
        before = (
            _plan.public_config(seen.get("config")) if _plan.is_ours(seen.get("filter")) else None
        )
        after = _plan.public_config(want["config"]) if want else None
        program_id = (seen.get("filter") or {}).get("prog_id") if want else None
        compiled = False
        if not module.check_mode:
            if action in (_plan.CREATE, _plan.REPLACE, _plan.REPAIR):
                program_id = _deploy.deploy(tc, ifname, sources[ifname], want, seen)
                compiled = True
            elif action == _plan.REMOVE:
                _deploy.remove(tc, ifname, seen)
        pin = want["config"]["pin_dir"] if want else seen.get("pin_dir")
        _record(
            result, diff, ns_key, ifname, action, reason, before, after, program_id, compiled, pin
        )


def _record(result, diff, ns_key, ifname, action, reason, before, after, program_id, compiled, pin):
    result["interfaces"].setdefault(ns_key, {})[ifname] = {
        "action": action,
        "reason": reason,
        "config": after,
        "program_id": program_id,
        "compiled": compiled,
        "pin_dir": pin,
    }
    if action != _plan.NONE:
        result["changed"] = True
    label = "%s/%s" % (ns_key, ifname)
    diff["before"][label] = before
    diff["after"][label] = after


# -- rabbit_tc_limit_info ----------------------------------------------------------------------


def run_info(module):
    params = module.params
    check_root(module)
    ensure_python_libs(module, ["pyroute2"])
    pin_root = params["pin_dir"]
    limiters = []
    try:
        _deploy.check_bpffs()
        if params["netns"] is not None:
            ns_keys = [_deploy.namespace_key(params["netns"])]
        else:
            ns_keys = _deploy.pinned_namespaces(pin_root)
        for ns_key in ns_keys:
            found, netns = _deploy.resolve_namespace(ns_key)
            if params["netns"] is not None:
                found, netns = True, params["netns"]
            ifnames = _deploy.pinned_interfaces(pin_root, ns_key)
            if params["interfaces"] is not None:
                ifnames = [i for i in ifnames if i in params["interfaces"]]
            if not ifnames:
                continue
            if found:
                with _tc.open_netns(netns) as tc:
                    limiters += [_describe(tc, pin_root, ns_key, i, params) for i in ifnames]
            else:
                limiters += [_describe(None, pin_root, ns_key, i, params) for i in ifnames]
    except LimiterError as e:
        module.fail_json(msg=str(e), limiters=limiters)
    module.exit_json(changed=False, limiters=limiters)


def _describe(tc, pin_root, ns_key, ifname, params):
    pin = _deploy.pin_dir(pin_root, ns_key, ifname)
    tc_filter = None
    if tc is not None and _deploy.interface_exists(tc, ifname):
        tc_filter = _deploy.our_slot(tc, ifname)
    config = _deploy.read_config(pin)
    entry = {
        "namespace": ns_key,
        "interface": ifname,
        "pin_dir": pin,
        "config": _plan.public_config(config),
        "attached": _plan.is_ours(tc_filter)
        and config is not None
        and tc_filter["name"] == _plan.filter_name(config["digest"]),
        "program_id": tc_filter["prog_id"] if _plan.is_ours(tc_filter) else None,
        "counters": _deploy.counters(pin) if _deploy.pins_present(pin) else None,
        "connections": [],
    }
    if params["connections"] and _deploy.pins_present(pin):
        conns = _deploy.connections(pin)
        entry["connections"] = [c for c in conns if c["consumers"] >= params["min_consumers"]]
        entry["connection_count"] = len(conns)
    return entry
