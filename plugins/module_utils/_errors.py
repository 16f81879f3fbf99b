# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one exception class of rabbitguard.limiter's module_utils.

Every helper raises LimiterError with a message that says what was being done and
to what ("attaching filter to eth0: ..."). Modules turn it into
``fail_json(msg=err.msg, **err.context)``.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

from typing import Any


class LimiterError(Exception):
    """What failed, on what; ``context`` holds extra machine-readable details."""

    def __init__(self, msg: str, context: dict[str, Any] | None = None) -> None:
        super(LimiterError, self).__init__(msg)
        self.msg = msg
        self.context = dict(context or {})

    def __str__(self) -> str:
        return self.msg
