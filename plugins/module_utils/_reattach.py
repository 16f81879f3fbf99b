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
apply path, _deploy.apply), without Ansible: the program it
attaches is identical, so a later run of the role finds nothing to change.

With ``--metrics DIR`` it changes nothing: it reads what is deployed (as
rabbit_tc_limit_info does, through _describe) and writes the Prometheus metrics to
DIR/rabbitguard_limiter.prom atomically, for node_exporter's textfile collector (the role's
timer runs it every 15 s)::

    /usr/bin/python3 <lib>/limiter/rabbitguard-reattach.pyz
        --metrics /var/lib/prometheus/node-exporter /etc/rabbitguard/limiter.json
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from . import _bpfsys, _constants, _deploy, _describe, _metrics, _render
from ._errors import LimiterError

# The stored configuration: rabbit_tc_limit's options for state=present, and their defaults
# (the module's: the role always stores every value it sets).
DEFAULTS: dict[str, Any] = {
    "port": _constants.DEFAULT_PORT,
    "limit": _constants.DEFAULT_LIMIT,
    "action": _constants.MODULE_DEFAULT_ACTION,
    "frame_max": _constants.DEFAULT_FRAME_MAX,
    "strict": _constants.DEFAULT_STRICT,
    "interfaces": None,
    "netns": None,
    "pin_dir": _constants.DEFAULT_PIN_ROOT,
    "kernel_headers": None,
    "lock_timeout": _constants.DEFAULT_LOCK_TIMEOUT,
    "broker_node": None,
    "seed_from_broker": _constants.DEFAULT_SEED_FROM_BROKER,
    "overrides": [],
}
TEMPLATE_NAME = _render.TEMPLATE_NAME


def load_config(path: str) -> dict[str, Any]:
    """The stored configuration as rabbit_tc_limit parameters; LimiterError if unusable."""
    try:
        with open(path) as handle:
            stored = json.load(handle)
    except OSError as e:
        raise LimiterError("reading the stored configuration %s: %s" % (path, e.strerror)) from e
    except ValueError as e:
        raise LimiterError("reading the stored configuration %s: not JSON: %s" % (path, e)) from e
    if not isinstance(stored, dict):
        raise LimiterError("stored configuration %s: expected a JSON object" % path)
    unknown = sorted(set(stored) - set(DEFAULTS))
    if unknown:
        raise LimiterError(
            "stored configuration %s: unknown keys %s (known: %s)"
            % (path, ", ".join(unknown), ", ".join(sorted(DEFAULTS)))
        )
    params = dict(DEFAULTS)
    # An unset option may be stored as null or, by ansible-core before 2.19 (whose templates
    # render none as an empty string), as "": both mean "not set".
    params.update((key, value) for key, value in stored.items() if value not in (None, ""))
    if params["interfaces"] is not None and (
        not isinstance(params["interfaces"], list)
        or not all(isinstance(i, str) and i for i in params["interfaces"])
    ):
        raise LimiterError("stored configuration %s: interfaces must be a list of names" % path)
    if not params["interfaces"]:
        params["interfaces"] = None
    # Option errors first, as the module does: they name the option and touch nothing.
    try:
        _deploy.validate_options(params)
    except _render.ConfigError as e:
        raise LimiterError("stored configuration %s: %s" % (path, e)) from e
    params["state"] = "present"
    return params


def ensure_bpffs() -> bool:
    """Mount bpffs at /sys/fs/bpf if nothing is mounted there (early boot, no mount unit).

    mode=700: only root may create the pin directories (a local user who could would be
    able to delete root's pins)."""
    root = _constants.BPFFS_ROOT
    if _bpfsys.is_bpffs(root):
        return False
    try:
        if not os.path.isdir(root):
            os.makedirs(root)
        subprocess.check_call(["mount", "-t", "bpf", "-o", "mode=700", "bpf", root])
    except (OSError, subprocess.CalledProcessError) as e:
        raise LimiterError("mounting bpffs at %s: %s" % (root, e)) from e
    return True


def reattach(
    params: dict[str, Any], template: str, wait: float = 0, warnings: list[str] | None = None
) -> list[tuple[str, str, str, str | None]]:
    """Deploy the stored configuration; returns [(namespace key, interface, action, reason)].

    warnings, when given, receives what the run warned about (consumer counts not seeded
    from the broker, say), as the module's ``warnings``: the run did not fail for them."""
    result = _deploy.apply(params, template, wait=wait)
    if warnings is not None:
        warnings.extend(result.warnings)
    return [(o.namespace, o.interface, o.action, o.reason) for o in result.outcomes]


def metrics_text(params: dict[str, Any]) -> str:
    """The Prometheus text for everything pinned under the stored pin_dir."""
    wanted = {
        "pin_dir": params["pin_dir"],
        "netns": None,
        "interfaces": None,
        "connections": True,
        "min_consumers": 0,
    }
    return _metrics.render(_describe.describe_all(wanted, []))


def write_metrics(params: dict[str, Any], directory: str) -> str:
    """Write the metrics file in directory (made if missing); returns its path."""
    text = metrics_text(params)
    try:
        if not os.path.isdir(directory):
            os.makedirs(directory, 0o755)
        return _metrics.write(directory, text)
    except OSError as e:
        raise LimiterError("writing the metrics to %s: %s" % (directory, e.strerror)) from e


def main(argv: list[str] | None = None, template: str | None = None) -> int:
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
    parser.add_argument(
        "--metrics",
        metavar="DIR",
        help="change nothing: write the Prometheus metrics of what is deployed to "
        "DIR/%s (node_exporter's textfile collector)" % _constants.METRICS_FILE,
    )
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        params = load_config(args.config)
        if args.metrics:
            write_metrics(params, args.metrics)
            return 0
        if args.template or template is None:
            path = args.template or _render.default_template_path()
            try:
                template = _render.read_template(path)
            except OSError as e:
                raise LimiterError(
                    "reading the classifier template %s: %s" % (path, e.strerror)
                ) from e
        if ensure_bpffs():
            sys.stdout.write("%s: mounted bpffs at %s\n" % (prog, _constants.BPFFS_ROOT))
        warnings: list[str] = []
        for ns_key, ifname, action, reason in reattach(params, template, args.wait, warnings):
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
        for warning in warnings:
            sys.stderr.write("%s: warning: %s\n" % (prog, warning))
    except (LimiterError, _render.ConfigError) as e:
        sys.stderr.write("%s: error: %s\n" % (prog, e))
        return 1
    return 0
