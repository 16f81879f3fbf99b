# -*- coding: utf-8 -*-
# Copyright: rabbitguard contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Validate the limiter's configuration and render the classifier's C source.

Only validated integers and enum names reach the template (plus a pin directory that
matches a strict pattern): nothing the user types is pasted into C unchecked.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import hashlib
import os
import re
from typing import Any

from . import _constants, _layout

# Kept here too for callers of _render (tests, benchmarks); the values are _constants'.
ACTIONS = _constants.ACTIONS
L2_KINDS = _constants.L2_KINDS
DEFAULT_FRAME_MAX = _constants.DEFAULT_FRAME_MAX
MAX_FRAMES = _constants.MAX_FRAMES
BPFFS_ROOT = _constants.BPFFS_ROOT
# No dots: bpffs refuses names that hold one. '%' escapes (see _names.path_component).
_PIN_DIR_RE = re.compile(r"^%s(/[A-Za-z0-9_%%@:+-]+)+$" % re.escape(BPFFS_ROOT))

TEMPLATE_NAME = "rabbit_limiter.c.j2"


class ConfigError(ValueError):
    """A configuration value is out of range or of the wrong type."""


def _integer(name: str, value: Any, low: int, high: int) -> int:
    # bool is an int in Python; "true" as a limit is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            "%s must be an integer between %d and %d, got %r" % (name, low, high, value)
        )
    if not low <= value <= high:
        raise ConfigError("%s must be between %d and %d, got %d" % (name, low, high, value))
    return value


def check_pin_dir(pin_dir: Any) -> str:
    """A pin directory on bpffs made only of names bpffs accepts; ConfigError otherwise."""
    if not isinstance(pin_dir, str) or not _PIN_DIR_RE.match(pin_dir.rstrip("/")):
        raise ConfigError(
            "pin_dir must be a directory under %s made of letters, digits and _%%@:+- "
            "(bpffs allows no dots), got %r" % (BPFFS_ROOT, pin_dir)
        )
    return pin_dir.rstrip("/")


def validate(
    port: Any,
    limit: Any,
    action: Any,
    l2: Any,
    pin_dir: Any,
    frame_max: Any = DEFAULT_FRAME_MAX,
    strict: Any = _constants.DEFAULT_STRICT,
) -> dict[str, Any]:
    """Return the configuration as a dict, or raise ConfigError naming the bad value.

    Besides the user's values it holds what the template renders from _constants:
    max_frames, and action_code / action_codes (an action's number in the C enum)."""
    if action not in ACTIONS:
        raise ConfigError("action must be one of %s, got %r" % (", ".join(ACTIONS), action))
    if l2 not in L2_KINDS:
        raise ConfigError("l2 must be one of %s, got %r" % (", ".join(L2_KINDS), l2))
    pin_dir = check_pin_dir(pin_dir)
    if not isinstance(strict, bool):
        raise ConfigError("strict must be a boolean, got %r" % (strict,))
    return {
        "port": _integer("port", port, *_constants.PORT_RANGE),
        "limit": _integer("limit", limit, *_constants.LIMIT_RANGE),
        "action": action,
        "l2": l2,
        "frame_max": _integer("frame_max", frame_max, *_constants.FRAME_MAX_RANGE),
        "pin_dir": pin_dir,
        "strict": strict,
        "max_frames": MAX_FRAMES,
        "max_overrides": _constants.MAX_OVERRIDES,
    }


def template_values(config: dict[str, Any]) -> dict[str, Any]:
    """The variables a template sees: the config and the enums' numbers from _constants."""
    codes = {name: number for number, name in enumerate(ACTIONS)}
    return dict(
        config,
        action_code=codes[config["action"]],
        action_codes=codes,
        # A test may render a smaller bound, to reach the tail-call limit in one packet.
        egress_max_frames=config.get("egress_max_frames", _constants.EGRESS_MAX_FRAMES),
        egress_more_slot=_constants.EGRESS_MORE_SLOT,
        egress_slot_bits=_layout.EGRESS_SLOT_BITS,
        egress_stale_jiffies=_constants.EGRESS_STALE_JIFFIES,
        missed_causes=_layout.MISSED_CAUSES,
        missed_slots=_layout.MISSED_SLOTS,
    )


def default_template_path() -> str:
    """files/bpf/ of the collection this file belongs to (controller side, tests)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(os.path.dirname(os.path.dirname(here)), "files", "bpf", TEMPLATE_NAME)


def read_template(path: str | None = None) -> str:
    with open(path or default_template_path()) as handle:
        return handle.read()


def render(config: dict[str, Any], template_text: str) -> str:
    """Render the validated config into C source. Jinja2 is imported here only."""
    from jinja2 import Environment, StrictUndefined

    env = Environment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return env.from_string(template_text).render(**template_values(config))


def source_digest(source: str) -> str:
    """sha256 of the rendered source: two deployments with equal digests are identical."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()
