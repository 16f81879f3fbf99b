# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Hands the classifier's C template (files/bpf/ of this collection) to the module.

The module renders and compiles it on the managed host, where the interfaces are, but a
module only ships Python to the host: the template travels as a module argument.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _overrides, _render

TEMPLATE = os.path.join("files", "bpf", "rabbit_limiter.c.j2")


def collection_root():
    # plugins/action/<this file> -> the collection's root
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ActionModule(ActionBase):
    TRANSFERS_FILES = False

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        module_args = dict(self._task.args)
        if "_template" in module_args:
            raise AnsibleActionFail("_template is set by the action plugin, not by tasks")
        try:
            _overrides.check_shape(module_args.get("overrides"))
        except _overrides.OverrideError as e:
            raise AnsibleActionFail(str(e)) from e
        path = os.path.join(collection_root(), TEMPLATE)
        try:
            with open(path) as handle:
                # Packed: a module payload over 64 KiB hangs ansible-core's respawn.
                module_args["_template"] = _render.pack_template(handle.read())
        except OSError as e:
            raise AnsibleActionFail("reading the classifier template %s: %s" % (path, e)) from e
        result.update(
            self._execute_module(
                module_name="rabbitguard.limiter.rabbit_tc_limit",
                module_args=module_args,
                task_vars=task_vars,
            )
        )
        return result
