"""The status table (roles/tc_limiter/templates/status.txt.j2) shows drift and warnings
from rabbit_tc_limit_info, not "not deployed" while a filter runs."""

import os

import jinja2

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _plan

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE = os.path.join(REPO, "roles", "tc_limiter", "templates", "status.txt.j2")


def render(limiters):
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    with open(TEMPLATE) as handle:
        template = env.from_string(handle.read())
    return template.render(
        inventory_hostname="rabbit1",
        tc_limiter_status={"limiters": limiters},
        tc_limiter_pin_dir=C.DEFAULT_PIN_ROOT,
        tc_limiter_status_near_percent=80,
        tc_limiter_status_max_connections=10,
    )


def entry(**overrides):
    base = {
        "namespace": "host",
        "interface": "eth0",
        "pin_dir": C.DEFAULT_PIN_ROOT + "/v2/host/eth0",
        "config": None,
        "attached": False,
        "program_id": 42,
        "drift": _plan.PINS_GONE,
        "warnings": [],
        "counters": None,
        "connections": [],
    }
    base.update(overrides)
    return base


def test_a_filter_without_pins_is_drift_not_not_deployed():
    table = render([entry()])
    assert "not deployed" not in table
    assert "DRIFT host/eth0: %s" % _plan.PINS_GONE in table
    assert " NO " in table


def test_a_shadowing_filter_is_a_warning_in_the_table():
    warning = "eth0: a u32 filter at pref 1 (protocol 0x0003) runs before the limiter's"
    table = render([entry(drift=None, attached=True, warnings=[warning])])
    assert "WARNING host/eth0: " + warning in table
    assert "DRIFT" not in table


def test_nothing_at_all_is_not_deployed():
    assert "not deployed" in render([])


def test_the_table_shows_missed_frames_not_raw_unparsed():
    """Issue 8: segments passed ahead of a hole that lay inside a body lost nothing; the
    table shows the frames really missed."""
    counters = {"consumes_allowed": 5, "consumes_refused": 1, "unparsed": 977, "missed": 2}
    table = render([entry(drift=None, attached=True, counters=counters)])
    lines = [line for line in table.splitlines() if line.strip()]
    header, row = lines[1:3]
    assert header.split()[-1] == "missed"
    assert row.split()[-3:] == ["5", "1", "2"]
    assert "977" not in table
