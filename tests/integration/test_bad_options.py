# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A bad option fails the run with one line that names it, and leaves the host as it was.

On rabbit2, with a limiter deployed and live: each bad run is a task of one playbook, and
the host's filters (program ids included), qdiscs and pins are compared before and after.
"""

import os

import pytest

from tests.integration.common import ensure, snapshot
from tests.lib.ansible_run import task
from tests.lib.clients import open_consumers

pytestmark = pytest.mark.integration

HOST = "rabbit2"
CONFIG = dict(limit=2, action="reset")
# option values -> words the message must hold
BAD = {
    "port=0": (dict(port=0), ["port", "0"]),
    "limit=-1": (dict(limit=-1), ["limit", "-1"]),
    "frame_max=100": (dict(frame_max=100), ["frame_max", "100"]),
    "action=unknown": (dict(action="unknown"), ["action", "unknown"]),
    "interfaces=[nosuch0]": (dict(interfaces=["nosuch0"]), ["interface", "nosuch0"]),
    "netns=rgi-nosuch": (dict(netns="rgi-nosuch"), ["namespace", "rgi-nosuch"]),
    "netns=/proc/...": (dict(netns="/proc/999999999/ns/net"), ["/proc/999999999/ns/net"]),
}


@pytest.fixture(scope="module")
def bad_runs(ansible, lab_hosts, queues):
    ensure(ansible, HOST, **CONFIG)
    before = snapshot(HOST)
    tasks = []
    for args, _words in BAD.values():
        full = dict(CONFIG)
        full.update(args)
        tasks.append(task("rabbitguard.limiter.rabbit_tc_limit", **full))
    results = ansible.play(HOST, tasks)
    after = snapshot(HOST)
    return dict(zip(BAD, results)), before, after


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_option_fails_in_one_line_naming_it(bad_runs, case):
    results, _before, _after = bad_runs
    result = results[case]
    assert result["failed"] is True, result
    assert result["changed"] is False, result
    msg = result["msg"]
    assert "\n" not in msg.strip() and len(msg) < 300, msg
    for word in BAD[case][1]:
        assert word in msg, (word, msg)
    assert "Traceback" not in str(result)


def test_bad_runs_leave_the_host_as_it_was(bad_runs, lab_hosts, queues, client_pool):
    _results, before, after = bad_runs
    assert after == before
    assert "rabbitguard-" in after["filters"] and after["pins"]
    # No namespace was made for the missing one.
    assert not os.path.exists("/run/netns/rgi-nosuch")
    # And the deployed limiter still limits.
    client = client_pool("pika", lab_hosts[HOST]["ipv4"], "after-bad")
    outcome = open_consumers(client, queues, CONFIG["limit"] + 1)
    assert outcome.count == CONFIG["limit"] and outcome.error.kind == "connection", outcome
