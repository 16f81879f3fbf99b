# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The two modules' main flows: prerequisites, then _deploy.apply (or the read-only
description for the info module), and the result or the failure turned into JSON.

Kept apart from the module files so that those stay documentation plus argument_spec.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import os
import sys
from importlib.util import find_spec
from typing import Any

from ansible.module_utils.common.respawn import (
    has_respawned,
    probe_interpreters_for_module,
    respawn_module,
)

from . import _deploy, _describe, _metrics, _render
from ._errors import LimiterError

# Where distro packages put BCC's and pyroute2's bindings.
SYSTEM_PYTHONS = ["/usr/bin/python3", "/usr/libexec/platform-python", "/usr/bin/python"]
PACKAGES = {
    "bcc": "python3-bpfcc (Debian/Ubuntu) or python3-bcc (RHEL family)",
    "pyroute2": "python3-pyroute2 (Debian/Ubuntu, RHEL family via EPEL)",
    "jinja2": "python3-jinja2 (Debian/Ubuntu, RHEL family)",
}


def ensure_python_libs(module: Any, names: list[str]) -> None:
    """Respawn into a system Python that has the bindings, or fail with the fix.

    BCC exists only as a distro package for the system Python (ansible.posix's
    seboolean does the same for selinux). find_spec looks without importing.
    """
    missing = [name for name in names if find_spec(name) is None]
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


def check_root(module: Any) -> None:
    if os.geteuid() != 0:
        module.fail_json(
            msg="%s must run as root to attach tc filters and pin BPF maps: "
            "use become: true" % module._name
        )


def _template(params: dict[str, Any]) -> str:
    path = params.get("_template_path")
    if path:
        try:
            return _render.read_template(str(path))
        except OSError as e:
            raise LimiterError(
                "the classifier template the action plugin sent cannot be read (%s): run the "
                "task again" % e
            ) from e
    # Without the action plugin (a module test, a direct run from the collection tree).
    try:
        return _render.read_template()
    except OSError as e:
        raise LimiterError(
            "the classifier template was not passed to the module: run it "
            "as rabbitguard.limiter.rabbit_tc_limit (its action plugin sends it)"
        ) from e


def _failure(e: Exception) -> dict[str, Any]:
    """fail_json's arguments for an error: the message and what it carries (the compiler's
    output, an errno, the interface), as _errors promises."""
    out: dict[str, Any] = {"msg": str(e)}
    if isinstance(e, LimiterError):
        context = dict(e.context)
        # The compiler's output is what a user reads next: Ansible shows stderr as such.
        if "compiler_output" in context:
            out["stderr"] = context["compiler_output"]
        out["context"] = context
    return out


# -- rabbit_tc_limit ----------------------------------------------------------------------


def run_limit(module: Any) -> None:
    params = module.params
    present = params["state"] == "present"
    check_root(module)
    ensure_python_libs(module, ["pyroute2", "bcc", "jinja2"] if present else ["pyroute2"])
    result = _deploy.ApplyResult()
    try:
        template = _template(params) if present else None
        _deploy.apply(params, template, check_mode=module.check_mode, result=result)
    except (LimiterError, _render.ConfigError) as e:
        module.fail_json(**_failure(e), **_limit_result(module, result))
    module.exit_json(**_limit_result(module, result))


def _limit_result(module: Any, result: _deploy.ApplyResult) -> dict[str, Any]:
    out = result.as_module_result()
    if module._diff:
        out["diff"] = result.diff()
    # module.warn, not a "warnings" key: ansible-core 2.19 deprecates passing that key to
    # exit_json/fail_json (removed in 2.23); the task result shows them the same way.
    for warning in result.warnings:
        module.warn(warning)
    return out


# -- rabbit_tc_limit_info ----------------------------------------------------------------------


def run_info(module: Any) -> None:
    params = module.params
    check_root(module)
    ensure_python_libs(module, ["pyroute2"])
    limiters: list[dict[str, Any]] = []
    prometheus = params.get("format") == "prometheus"
    wanted = dict(params)
    if prometheus:  # the gauges need every connection; the listing stays as asked
        wanted.update(connections=True, min_consumers=0)
    try:
        limiters = _describe.describe_all(wanted, limiters)
    except (LimiterError, _render.ConfigError) as e:
        module.fail_json(**_failure(e), limiters=limiters)
    out: dict[str, Any] = {"changed": False}
    if prometheus:
        out["prometheus"] = _metrics.render(limiters)
        for entry in limiters:
            if params["connections"]:
                entry["connections"] = [
                    c for c in entry["connections"] if c["consumers"] >= params["min_consumers"]
                ]
            else:
                entry["connections"] = []
                entry.pop("connection_count", None)
    module.exit_json(limiters=limiters, **out)


# Kept under their old names: the info module's entries are built in _describe now (the
# boot program's metrics mode uses them too, without Ansible).
describe_all = _describe.describe_all
describe = _describe.describe
