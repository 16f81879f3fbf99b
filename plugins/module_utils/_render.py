# -*- coding: utf-8 -*-
# Copyright: rabbitguard contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Validate the limiter's configuration and render the classifier's C source.

Only validated integers and enum names reach the template (plus a pin directory that
matches a strict pattern): nothing the user types is pasted into C unchecked.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import os
import re

ACTIONS = ("drop", "reset", "monitor")
L2_KINDS = ("ethernet", "none")
DEFAULT_FRAME_MAX = 131072
# Frames walked per segment: a bounded loop the verifier unrolls, so it is not a user knob.
MAX_FRAMES = 256
BPFFS_ROOT = "/sys/fs/bpf"
# No dots: bpffs refuses names that hold one. '%' escapes (see _deploy.path_component).
_PIN_DIR_RE = re.compile(r"^/sys/fs/bpf(/[A-Za-z0-9_%@:+-]+)+$")

TEMPLATE_NAME = "rabbit_limiter.c.j2"


class ConfigError(ValueError):
    """A configuration value is out of range or of the wrong type."""


def _integer(name, value, low, high):
    # bool is an int in Python; "true" as a limit is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            "%s must be an integer between %d and %d, got %r" % (name, low, high, value)
        )
    if not low <= value <= high:
        raise ConfigError("%s must be between %d and %d, got %d" % (name, low, high, value))
    return value


def validate(port, limit, action, l2, pin_dir, frame_max=DEFAULT_FRAME_MAX):
    """Return the configuration as a dict, or raise ConfigError naming the bad value."""
    if action not in ACTIONS:
        raise ConfigError("action must be one of %s, got %r" % (", ".join(ACTIONS), action))
    if l2 not in L2_KINDS:
        raise ConfigError("l2 must be one of %s, got %r" % (", ".join(L2_KINDS), l2))
    if not isinstance(pin_dir, str) or not _PIN_DIR_RE.match(pin_dir):
        raise ConfigError(
            "pin_dir must be a directory under %s made of letters, digits and _%%@:+- "
            "(bpffs allows no dots), got %r" % (BPFFS_ROOT, pin_dir)
        )
    return {
        "port": _integer("port", port, 1, 65535),
        "limit": _integer("limit", limit, 0, 65535),
        "action": action,
        "l2": l2,
        "frame_max": _integer("frame_max", frame_max, 4096, 1 << 28),
        "pin_dir": pin_dir.rstrip("/"),
        "max_frames": MAX_FRAMES,
    }


def default_template_path():
    """files/bpf/ of the collection this file belongs to (controller side, tests)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(os.path.dirname(os.path.dirname(here)), "files", "bpf", TEMPLATE_NAME)


def read_template(path=None):
    with open(path or default_template_path()) as handle:
        return handle.read()


def render(config, template_text):
    """Render the validated config into C source. Jinja2 is imported here only."""
    from jinja2 import Environment, StrictUndefined

    env = Environment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return env.from_string(template_text).render(**config)


def source_digest(source):
    """sha256 of the rendered source: two deployments with equal digests are identical."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()
