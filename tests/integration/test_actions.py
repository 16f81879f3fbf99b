# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The limit, as an application and the broker see it, with each action.

rabbit_tc_limit deploys limit=3 on rabbit1 through ansible-playbook; real clients (pika,
py-amqp, aio-pika) open consumers one by one from the root namespace.
"""

import concurrent.futures

import pytest

from tests.integration.common import (
    broker_connections,
    broker_consumers,
    connection_of,
    ensure,
    info,
    limiter_entry,
    wait_for,
)
from tests.lib.clients import open_consumers

pytestmark = pytest.mark.integration

HOST = "rabbit1"
LIMIT = 3


def refused_so_far(ansible):
    return limiter_entry(info(ansible, HOST, connections=False))["counters"]["consumes_refused"]


def test_drop_stalls_the_consume_over_the_limit(ansible, lab_hosts, queues, client_pool):
    ensure(ansible, HOST, limit=LIMIT, action="drop")
    refused_before = refused_so_far(ansible)
    # Two applications, two client libraries: each gets exactly `limit` consumers...
    apps = [
        client_pool(library, lab_hosts[HOST]["ipv4"], "drop-" + library)
        for library in ("pika", "aio-pika")
    ]
    channels = [client.channel() for client in apps]
    for client, channel in zip(apps, channels):
        outcome = open_consumers(client, queues, LIMIT, channels=[channel])
        assert outcome.count == LIMIT and outcome.error is None, (client, outcome)

    # ... and the next consume (both at once) never gets its consume-ok.
    with concurrent.futures.ThreadPoolExecutor(len(apps)) as pool:
        over = list(
            pool.map(
                lambda pair: open_consumers(pair[0], queues, 2, channels=[pair[1]]),
                zip(apps, channels),
            )
        )
    for client, outcome in zip(apps, over):
        assert outcome.count == 0 and outcome.error.kind == "timeout", (client, outcome)
    # The broker holds exactly `limit` on each: the refused consume never reached it.
    seen = broker_connections(HOST)
    for client in apps:
        assert sum(seen[client.local_port]["channels"].values()) == LIMIT, (client, seen)
    # The stream is stalled: the broker's heartbeat ends the connection (seconds, heartbeat 2).
    for client in apps:
        assert client.wait_lost(15), "the broker did not close the stalled connection"
    assert wait_for(lambda: not {c.local_port for c in apps} & set(broker_connections(HOST)), 10)
    # Each refusal was counted (a retransmission of it is refused, and counted, again).
    assert refused_so_far(ansible) >= refused_before + len(apps)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_reset_fails_the_client_fast_and_frees_the_connection(
    ansible, lab_hosts, queues, client_pool, family
):
    ensure(ansible, HOST, limit=LIMIT, action="reset")
    client = client_pool("aio-pika", lab_hosts[HOST][family], "reset-" + family)

    outcome = open_consumers(client, queues, LIMIT + 3)

    assert outcome.count == LIMIT, outcome
    # Connection reset, at once: no waiting for a heartbeat.
    assert outcome.error.kind == "connection", outcome
    assert "reset" in outcome.error.detail.lower(), outcome
    assert outcome.error.elapsed < 1.5, outcome
    assert not client.alive
    # The broker let go of the connection as well (its side got the RST), and so did the
    # limiter.
    assert wait_for(lambda: client.local_port not in broker_connections(HOST), 5), (
        broker_connections(HOST)
    )
    assert connection_of(limiter_entry(info(ansible, HOST)), client) is None


def test_monitor_refuses_nothing_and_reports_what_it_would_have(
    ansible, lab_hosts, queues, client_pool
):
    ensure(ansible, HOST, limit=LIMIT, action="monitor")
    refused_before = refused_so_far(ansible)
    client = client_pool("pika", lab_hosts[HOST]["ipv4"], "monitor")

    outcome = open_consumers(client, queues, LIMIT + 2)

    assert outcome.count == LIMIT + 2 and outcome.error is None, outcome
    assert broker_consumers(HOST, client) == LIMIT + 2
    entry = limiter_entry(info(ansible, HOST))
    assert entry["config"]["action"] == "monitor" and entry["config"]["limit"] == LIMIT
    assert entry["counters"]["consumes_refused"] == refused_before + 2
    conn = connection_of(entry, client)
    assert conn is not None, entry["connections"]
    assert conn["consumers"] == LIMIT + 2 > entry["config"]["limit"]
    assert conn["refused"] == 2
    assert client.alive


def test_port_selects_the_traffic_and_limit_zero_refuses_every_consume(
    ansible, lab_hosts, queues, client_pool
):
    host = lab_hosts[HOST]
    ensure(ansible, HOST, limit=0, action="reset", port=5673)
    other_port = client_pool("pika", host["ipv4"], "port-5673")
    outcome = open_consumers(other_port, queues, 5)
    assert outcome.count == 5 and outcome.error is None, outcome

    ensure(ansible, HOST, limit=0, action="reset")
    zero = client_pool("aio-pika", host["ipv6"], "limit-0")
    outcome = open_consumers(zero, queues, 2)
    assert outcome.count == 0 and outcome.error.kind == "connection", outcome
