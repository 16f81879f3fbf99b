# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Re-attach the limiter at boot from the configuration the tc_limiter role stored.

tc filters and bpffs pins do not survive a reboot, and the module's code lives on the
controller. So the rabbitguard.limiter.tc_limiter role installs, on every host, a copy of
this directory's plain-Python helpers (everything but _runner.py, the one that imports
Ansible) as the package ``rabbitguard_limiter`` in one zip application with the
classifier's C template, the role's stored configuration (JSON), and a boot-time systemd
unit that runs::

    /usr/bin/python3 <lib>/limiter/rabbitguard-reattach.pyz --wait 120 /etc/rabbitguard/limiter.json

This does what rabbit_tc_limit with state=present does with the same arguments (the same
validation, rendering, digest, plan and deploy functions), without Ansible: the program it
attaches is identical, so a later run of the role finds nothing to change.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import argparse
import json
import os
import subprocess
import sys
import time

from . import _bpfsys, _deploy, _plan, _render, _tc
from ._errors import LimiterError

# The stored configuration: rabbit_tc_limit's options for state=present, and their defaults.
DEFAULTS = {
    "port": 5672,
    "limit": 10,
    "action": "drop",
    "frame_max": _render.DEFAULT_FRAME_MAX,
    "interfaces": None,
    "netns": None,
    "pin_dir": _deploy.DEFAULT_PIN_ROOT,
    "kernel_headers": None,
    "lock_timeout": 120,
}
TEMPLATE_NAME = _render.TEMPLATE_NAME


def load_config(path):
    """The stored configuration as rabbit_tc_limit parameters; LimiterError if unusable."""
    try:
        with open(path) as handle:
            stored = json.load(handle)
    except (IOError, OSError) as e:
        raise LimiterError("reading the stored configuration %s: %s" % (path, e.strerror))
    except ValueError as e:
        raise LimiterError("reading the stored configuration %s: not JSON: %s" % (path, e))
    if not isinstance(stored, dict):
        raise LimiterError("stored configuration %s: expected a JSON object" % path)
    unknown = sorted(set(stored) - set(DEFAULTS))
    if unknown:
        raise LimiterError(
            "stored configuration %s: unknown keys %s (known: %s)"
            % (path, ", ".join(unknown), ", ".join(sorted(DEFAULTS)))
        )
    params = dict(DEFAULTS)
    params.update((key, value) for key, value in stored.items() if value is not None)
    if params["interfaces"] is not None and (
        not isinstance(params["interfaces"], list)
        or not all(isinstance(i, str) and i for i in params["interfaces"])
    ):
        raise LimiterError("stored configuration %s: interfaces must be a list of names" % path)
    if not params["interfaces"]:
        params["interfaces"] = None
    # Option errors first, as the module does: they name the option and touch nothing.
    try:
        _render.validate(
            params["port"],
            params["limit"],
            params["action"],
            "ethernet",
            _render.BPFFS_ROOT + "/check",
            params["frame_max"],
        )
    except _render.ConfigError as e:
        raise LimiterError("stored configuration %s: %s" % (path, e))
    return params


def ensure_bpffs():
    """Mount bpffs at /sys/fs/bpf if nothing is mounted there (early boot, no mount unit)."""
    if _bpfsys.is_bpffs(_render.BPFFS_ROOT):
        return False
    try:
        if not os.path.isdir(_render.BPFFS_ROOT):
            os.makedirs(_render.BPFFS_ROOT)
        subprocess.check_call(["mount", "-t", "bpf", "bpf", _render.BPFFS_ROOT])
    except (OSError, subprocess.CalledProcessError) as e:
        raise LimiterError("mounting bpffs at %s: %s" % (_render.BPFFS_ROOT, e))
    return True


def _interfaces(tc, params, deadline):
    """The interfaces to limit; at boot, wait until they (or a default route) exist."""
    while True:
        try:
            ifnames = params["interfaces"]
            if ifnames is None:
                ifnames = tc.default_route_interfaces()
                if not ifnames:
                    raise LimiterError(
                        "interfaces: no default route in %s to take them from"
                        % (params["netns"] or "the host's namespace")
                    )
            for ifname in ifnames:
                tc.interface_index(ifname)
            return ifnames
        except LimiterError:
            if time.time() >= deadline:
                raise
            time.sleep(1)


def reattach(params, template, wait=0):
    """Deploy the stored configuration; returns [(namespace key, interface, action, reason)]."""
    deadline = time.time() + wait
    pin_root, netns = params["pin_dir"], params["netns"]
    ns_key = _deploy.namespace_key(netns)
    _deploy.check_bpffs()
    done = []
    path = _tc.netns_path(netns)
    while path is not None and not os.path.exists(path) and time.time() < deadline:
        time.sleep(1)  # a container's namespace may come up late
    with _deploy.host_lock(params["lock_timeout"]), _tc.open_netns(netns) as tc:
        ifnames = _interfaces(tc, params, deadline)
        desired, sources = {}, {}
        for ifname in ifnames:
            sources[ifname], desired[ifname] = _deploy.desire(
                tc, pin_root, ns_key, ifname, params, template
            )
        observed = _deploy.observe(tc, pin_root, ns_key, ifnames)
        actions = _plan.plan(observed, desired)
        if any(a in (_plan.CREATE, _plan.REPLACE, _plan.REPAIR) for a, _r in actions.values()):
            tree = _deploy.check_kernel_headers(params["kernel_headers"])
            if params["kernel_headers"]:
                os.environ["BCC_KERNEL_SOURCE"] = tree
        for ifname, (action, reason) in sorted(actions.items()):
            if action in (_plan.CREATE, _plan.REPLACE, _plan.REPAIR):
                _deploy.deploy(
                    tc, ifname, sources[ifname], desired[ifname], observed.get(ifname, {})
                )
            elif action == _plan.REMOVE:
                _deploy.remove(tc, ifname, observed[ifname])
            done.append((ns_key, ifname, action, reason))
    return done


def main(argv=None, template=None):
    """Command line entry; template is the classifier's template text (from the zip app)."""
    parser = argparse.ArgumentParser(
        prog="rabbitguard-reattach",
        description="Re-attach the rabbitguard AMQP consumer limiter from the configuration "
        "stored by the rabbitguard.limiter.tc_limiter role (run at boot).",
    )
    parser.add_argument("config", help="the stored configuration (JSON)")
    parser.add_argument(
        "--template",
        help="the classifier's C template (%s); default, the "
        "one bundled with this program" % TEMPLATE_NAME,
    )
    parser.add_argument(
        "--wait",
        type=int,
        default=0,
        metavar="SECONDS",
        help="wait this long for the namespace, interfaces or default route",
    )
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        params = load_config(args.config)
        if args.template or template is None:
            path = args.template or _render.default_template_path()
            try:
                template = _render.read_template(path)
            except (IOError, OSError) as e:
                raise LimiterError("reading the classifier template %s: %s" % (path, e.strerror))
        if ensure_bpffs():
            sys.stdout.write("%s: mounted bpffs at %s\n" % (prog, _render.BPFFS_ROOT))
        for ns_key, ifname, action, reason in reattach(params, template, args.wait):
            sys.stdout.write(
                "%s: %s/%s: %s%s (limit %d, action %s, port %d)\n"
                % (
                    prog,
                    ns_key,
                    ifname,
                    action,
                    " (%s)" % reason if reason else "",
                    params["limit"],
                    params["action"],
                    params["port"],
                )
            )
    except (LimiterError, _render.ConfigError) as e:
        sys.stderr.write("%s: error: %s\n" % (prog, e))
        return 1
    return 0
