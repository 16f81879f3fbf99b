# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Hands the classifier's C template (files/bpf/ of this collection) to the module.

The module renders and compiles it on the managed host, where the interfaces are, but a
module only ships Python to the host: the template is copied into the task's remote
temporary directory, and the module is given its path (_template_path).
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
    # A file, not a module argument: ansible-core's respawn_module (into the system Python,
    # for BCC) writes the whole argument payload into a pipe before it starts the child that
    # reads it, so arguments over the pipe's 64 KiB would hang the module for ever; the
    # template alone is over 100 KiB.
    TRANSFERS_FILES = True

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        module_args = dict(self._task.args)
        if "_template_path" in module_args:
            raise AnsibleActionFail("_template_path is set by the action plugin, not by tasks")
        try:
            _overrides.check_shape(module_args.get("overrides"))
        except _overrides.OverrideError as e:
            raise AnsibleActionFail(str(e)) from e
        try:
            if module_args.get("state", "present") != "absent":  # a removal compiles nothing
                module_args["_template_path"] = self._send_template()
            result.update(
                self._execute_module(
                    module_name="rabbitguard.limiter.rabbit_tc_limit",
                    module_args=module_args,
                    task_vars=task_vars,
                )
            )
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        return result

    def _send_template(self):
        """Copy the collection's template into the remote temporary directory; its path."""
        path = os.path.join(collection_root(), TEMPLATE)
        try:
            with open(path) as handle:
                text = handle.read()
        except OSError as e:
            raise AnsibleActionFail("reading the classifier template %s: %s" % (path, e)) from e
        tmpdir = self._connection._shell.tmpdir or self._make_tmp_path()
        remote = self._connection._shell.join_path(tmpdir, _render.TEMPLATE_NAME)
        self._transfer_data(remote, text)
        self._fixup_perms2((tmpdir, remote))
        return remote
