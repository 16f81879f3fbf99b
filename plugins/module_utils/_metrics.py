# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The limiter's state as Prometheus metrics, in the text exposition format that
node_exporter's textfile collector reads.

Pure: rabbit_tc_limit_info's entries (see _describe) in, text out. The boot program's
metrics mode writes the text to a file atomically; rabbit_tc_limit_info returns it with
``format: prometheus``.

Conventions: one prefix, counters end in ``_total``, metadata in ``_info``; the only
labels are ``namespace`` and ``interface`` (``_info`` adds the deployed action, port and
limit; ``missed_frames_total`` the cause, one of a fixed set), never anything per
connection. No timestamps: the collector takes none.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import contextlib
import os
import re
import tempfile
from typing import Any, Iterable

from . import _constants, _layout

PREFIX = "rabbitguard_limiter_"

# Data-plane counter (a _layout.Counters field) -> (metric name without prefix, help).
# A counter not listed here (one added later) is exported as <field>_total all the same.
COUNTERS = {
    "segments": ("segments_total", "Client-to-broker TCP segments seen on the broker port."),
    "amqp_segments": ("amqp_segments_total", "Segments walked as AMQP frames."),
    "consumes_allowed": ("consumes_allowed_total", "basic.consume methods let through."),
    "consumes_refused": (
        "consumes_refused_total",
        "basic.consume methods over the limit (refused; in monitor mode, only counted).",
    ),
    "cancels": ("cancels_total", "basic.cancel methods seen."),
    "channel_closes": ("channel_closes_total", "channel.close and close-ok methods seen."),
    "conns_tracked": ("connections_tracked_total", "Client connections started being tracked."),
    "conns_forgotten": (
        "connections_forgotten_total",
        "Tracked connections forgotten (connection.close, FIN, RST).",
    ),
    "resyncs": ("resyncs_total", "Times a connection found the AMQP frame boundaries again."),
    "unparsed": ("unparsed_total", "Segments that could not be parsed and passed (fail open)."),
    "held": (
        "held_total",
        "Strict mode: segments ahead of the stream dropped, to come again in order.",
    ),
    "passed_ahead": (
        "passed_ahead_total",
        "Segments ahead of a hole passed unwalked (nothing missed unless missed_total says so).",
    ),
    "missed": (
        "missed_total",
        "Frames (or segments of frames) the limiter did not see; by cause in missed_frames_total.",
    ),
    "cancels_unknown": (
        "cancels_unknown_total",
        "basic.cancel methods (client's or broker's) of a consumer tag not live on the "
        "connection, which freed nothing (a made-up tag, or the second of crossed cancels).",
    ),
    "cancels_blind": (
        "cancels_blind_total",
        "basic.cancel methods that freed a slot with their consumer tag never looked at "
        "(the tag step's budget for the segment ran out): main's rule, a cancel frees.",
    ),
    "tags_unreadable": (
        "tags_unreadable_total",
        "Consumer tags not whole in their segment: taken the honest way (a cancel frees).",
    ),
    # From the refusal log (rabbit_tc_limit_info adds them to an entry's counters).
    "refuse_rewrites": (
        "refuse_rewrites_total",
        "Over-limit basic.consume methods refused by rewriting their queue name (refuse).",
    ),
    "refuse_fallbacks": (
        "refuse_fallbacks_total",
        "Over-limit basic.consume methods that could not be rewritten and were dropped (refuse).",
    ),
}

GAUGES = {
    "attached": "1 when the limiter's filter runs the pinned configuration, else 0.",
    "connections": "Client connections tracked now.",
    "connections_near_limit": (
        "Tracked connections with consumers at 80% or more of their effective limit "
        "(and at least one consumer)."
    ),
    "consumers": "Live consumers on all tracked connections.",
    "overrides": "Per-source limits (overrides) deployed.",
}
INFO_HELP = "The deployed configuration (value always 1)."
# The counters' missed_by_cause split: one series per cause (a fixed set, _layout's).
MISSED_BY_CAUSE = "missed_by_cause"
MISSED_FRAMES = (
    "missed_frames_total",
    "missed_total split by what caused the miss (see rabbit_tc_limit_info's missed_by_cause).",
)

_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


def near_limit(consumers: int, limit: int) -> bool:
    """At NEAR_LIMIT_FRACTION of the limit or more, with at least one consumer."""
    num, den = _constants.NEAR_LIMIT_FRACTION
    return consumers >= 1 and consumers * den >= limit * num


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, Any]) -> str:
    return "{%s}" % ",".join('%s="%s"' % (k, _escape(v)) for k, v in labels.items())


def _counter_names(limiters: list[dict[str, Any]]) -> list[str]:
    """Every counter field: _layout's order, then any other an entry carries."""
    names = [field[0] for field in _layout.Counters._fields_]
    for entry in limiters:
        for name in entry.get("counters") or {}:
            if name not in names:
                names.append(name)
    return names


def _family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
    lines = list(samples)
    if not lines:
        return []
    return ["# HELP %s %s" % (name, help_text), "# TYPE %s %s" % (name, kind)] + lines


def render(limiters: list[dict[str, Any]]) -> str:
    """The text for rabbit_tc_limit_info's entries (with their connections listed)."""
    keyed = [
        (_labels({"namespace": e["namespace"], "interface": e["interface"]}), e) for e in limiters
    ]
    out: list[str] = []
    out += _family(
        PREFIX + "info",
        "gauge",
        INFO_HELP,
        (
            "%s%s 1"
            % (
                PREFIX + "info",
                _labels(
                    {
                        "namespace": e["namespace"],
                        "interface": e["interface"],
                        "action": e["config"]["action"],
                        "port": e["config"]["port"],
                        "limit": e["config"]["limit"],
                    }
                ),
            )
            for _l, e in keyed
            if e.get("config")
        ),
    )
    for field in _counter_names(limiters):
        if field == MISSED_BY_CAUSE:
            continue
        metric, help_text = COUNTERS.get(
            field, ("%s_total" % _NAME_RE.sub("_", field), "Data-plane counter %s." % field)
        )
        name = PREFIX + metric
        out += _family(
            name,
            "counter",
            help_text,
            (
                "%s%s %d" % (name, labels, e["counters"][field])
                for labels, e in keyed
                if field in (e.get("counters") or {})
            ),
        )
    name = PREFIX + MISSED_FRAMES[0]
    out += _family(
        name,
        "counter",
        MISSED_FRAMES[1],
        (
            "%s%s %d"
            % (
                name,
                _labels({"namespace": e["namespace"], "interface": e["interface"], "cause": c}),
                n,
            )
            for _l, e in keyed
            for c, n in ((e.get("counters") or {}).get(MISSED_BY_CAUSE) or {}).items()
        ),
    )
    values: dict[str, list[tuple[str, int]]] = {name: [] for name in GAUGES}
    for labels, e in keyed:
        values["attached"].append((labels, 1 if e.get("attached") else 0))
        config = e.get("config") or {}
        if config:
            values["overrides"].append((labels, len(config.get("overrides") or [])))
        if e.get("counters") is None:
            continue  # nothing pinned: no connections to speak of
        conns = e.get("connections") or []
        default = config.get("limit")
        values["connections"].append((labels, e.get("connection_count", len(conns))))
        values["consumers"].append((labels, sum(c["consumers"] for c in conns)))
        values["connections_near_limit"].append(
            (
                labels,
                sum(
                    1
                    for c in conns
                    if c.get("limit", default) is not None
                    and near_limit(c["consumers"], c.get("limit", default))
                ),
            )
        )
    for gauge, help_text in GAUGES.items():
        name = PREFIX + gauge
        out += _family(
            name, "gauge", help_text, ("%s%s %d" % (name, lab, v) for lab, v in values[gauge])
        )
    return "\n".join(out) + "\n" if out else ""


def write(directory: str, text: str, name: str = _constants.METRICS_FILE) -> str:
    """Replace directory/name with text atomically (a temporary file in the same directory,
    then a rename): the collector never reads half a file. Returns the path."""
    path = os.path.join(directory, name)
    fd, tmp = tempfile.mkstemp(prefix="." + name + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
