# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Someone (or something) broke the deployed limiter on rabbit2 by hand; the next run of
rabbit_tc_limit repairs it, and consumers are limited again.

Each test first shows that the breakage is real (no limit any more), then that the run
repairs it (action repair, with the reason) and that the limit holds again.
"""

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils._layout import LAYOUT_VERSION
from tests.integration.common import (
    HANDLE,
    IFACE,
    PIN_ROOT,
    PREF,
    add_foreign_filter,
    delete_our_filter,
    deploy,
    ensure,
    eth0,
    forget,
    info,
    limiter_entry,
    pins,
    run,
    tc_filters,
)
from tests.lib.clients import open_consumers

pytestmark = pytest.mark.integration

HOST = "rabbit2"
LIMIT = 2
CONFIG = dict(limit=LIMIT, action="reset")
MAPS = ("channels", "config", "conns", "counters")


def limited(host, queue, client_pool, name):
    """Does a fresh connection get exactly LIMIT consumers, the next one refused?"""
    client = client_pool("pika", host["ipv4"], name)
    outcome = open_consumers(client, queue, LIMIT + 2)
    return (
        outcome.count == LIMIT and outcome.error is not None and outcome.error.kind == "connection"
    )


def unlimited(host, queue, client_pool, name):
    client = client_pool("aio-pika", host["ipv4"], name)
    outcome = open_consumers(client, queue, LIMIT + 2)
    return outcome.count == LIMIT + 2 and outcome.error is None


def our_filter_lines(text):
    return [line for line in text.splitlines() if "handle 0x%x" % HANDLE in line]


@pytest.fixture
def deployed(ansible, lab_hosts, queues, client_pool):
    """The limiter deployed and limiting (a failed test before may have left it broken)."""
    ensure(ansible, HOST, **CONFIG)
    host = lab_hosts[HOST]
    if not limited(host, queues, client_pool, "before"):
        forget(HOST)
        deploy(ansible, HOST, **CONFIG)
        assert limited(host, queues, client_pool, "before-again")
    return host


def repair_run(ansible, reason_words):
    result = deploy(ansible, HOST, **CONFIG)
    assert result["changed"] is True, result
    entry = eth0(result)
    assert entry["action"] == "repair", entry
    assert all(w in entry["reason"] for w in reason_words), entry
    assert entry["compiled"] is True
    (line,) = our_filter_lines(tc_filters(HOST))
    assert "rabbitguard-" in line and "id %d " % entry["program_id"] in line + " ", line
    return entry


def test_a_filter_deleted_by_hand_is_repaired(ansible, deployed, queues, client_pool):
    delete_our_filter(HOST)
    assert our_filter_lines(tc_filters(HOST)) == []
    assert unlimited(deployed, queues, client_pool, "filter-gone")

    repair_run(ansible, ["filter is gone"])

    assert limited(deployed, queues, client_pool, "filter-repaired")
    # And a run after the repair has nothing to do.
    assert deploy(ansible, HOST, **CONFIG)["changed"] is False


def test_pins_deleted_by_hand_are_repaired(ansible, deployed, queues, client_pool):
    run(HOST, ["rm", "-r", PIN_ROOT])
    assert pins(HOST) == []
    # The filter keeps limiting on its own maps; info says the pins are gone (drift), not
    # that nothing is deployed.
    drifted = limiter_entry(info(ansible, HOST))
    assert drifted["drift"] == "the filter is there but its pinned maps are gone", drifted
    assert drifted["attached"] is False and isinstance(drifted["program_id"], int)
    assert drifted["counters"] is None

    repair_run(ansible, ["pinned maps are gone"])

    pinned = pins(HOST)
    for name in MAPS:
        assert "%s/v%d/host/%s/%s" % (PIN_ROOT, LAYOUT_VERSION, IFACE, name) in pinned, pinned
    assert limited(deployed, queues, client_pool, "pins-repaired")
    entry = limiter_entry(info(ansible, HOST))
    assert entry["attached"] is True and entry["config"]["limit"] == LIMIT
    assert entry["counters"]["consumes_refused"] >= 1


@pytest.mark.parametrize("protocol", ["all", "ip"])
def test_a_foreign_program_at_our_pref_and_handle_is_replaced(
    ansible, deployed, queues, client_pool, protocol
):
    # Another tool's classifier (classic BPF "return 0": passes everything) takes our slot.
    run(HOST, ["tc", "filter", "del", "dev", IFACE, "ingress", "pref", str(PREF)])
    add_foreign_filter(HOST, PREF, hex(HANDLE), protocol)
    (line,) = our_filter_lines(tc_filters(HOST))
    assert "rabbitguard-" not in line and "bytecode" in line
    assert unlimited(deployed, queues, client_pool, "foreign-" + protocol)

    repair_run(ansible, ["another program"])

    assert limited(deployed, queues, client_pool, "foreign-repaired-" + protocol)
    assert deploy(ansible, HOST, **CONFIG)["changed"] is False
