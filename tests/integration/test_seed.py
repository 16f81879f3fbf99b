# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Counts seeded from the broker: a connection that predates the limiter keeps its count.

A client holds 5 consumers before the limiter is deployed with limit 3: rabbit_tc_limit_info
shows it at 5 at once, and its next consume is refused (in place: a channel error).
A broker that cannot be asked is a warning; a broker_node that is not a node name is a
one-line error naming the option, and nothing changes.
"""

import pytest

from tests.integration.common import (
    connection_of,
    deploy,
    info,
    limiter_entry,
    remove,
    snapshot,
    status_table,
)
from tests.lib import clients

pytestmark = pytest.mark.integration

HOST = "rabbit1"
LIMIT = 3


def test_a_connection_older_than_the_limiter_keeps_its_count(ansible, lab_hosts, client_pool):
    addr = lab_hosts[HOST]["ipv4"]
    queue = "rgi-seed"
    clients.declare_queues(addr, [queue])
    remove(ansible, HOST)
    client = client_pool("pika", addr, "seed-5")
    first, second = client.channel(), client.channel()
    for channel in (first, first, first, second, second):
        client.consume(channel, queue)

    result = deploy(ansible, HOST, limit=LIMIT, action="refuse")
    assert not result.get("warnings"), result
    entry = limiter_entry(info(ansible, HOST))
    conn = connection_of(entry, client)
    assert conn is not None, entry["connections"]
    assert conn["consumers"] == 5 and conn["channels"] == {str(first): 3, str(second): 2}, conn

    third = client.channel()
    with pytest.raises(clients.ConsumeFailed) as refused:
        client.consume(third, queue)
    assert refused.value.kind == "channel" and "404" in refused.value.detail, refused.value
    assert client.alive
    entry = limiter_entry(info(ansible, HOST))
    assert connection_of(entry, client)["consumers"] == 5
    newest = entry["refusals"][0]
    assert (newest["client_port"], newest["consumers"], newest["action"]) == (
        client.local_port,
        5,
        "refuse",
    )


def test_monitor_shows_a_connection_already_over_the_limit(ansible, lab_hosts, client_pool):
    """The dry run before switching to refuse: deployed with monitor, the status table lists
    at once the connection that already holds more than the limit, and refuses nothing."""
    addr = lab_hosts[HOST]["ipv4"]
    queue = "rgi-seed-monitor"
    clients.declare_queues(addr, [queue])
    remove(ansible, HOST)
    client = client_pool("amqp", addr, "seed-monitor-5")
    channel = client.channel()
    for _ in range(5):
        client.consume(channel, queue)

    result = deploy(ansible, HOST, limit=LIMIT, action="monitor")
    assert not result.get("warnings"), result
    table = status_table(ansible, HOST)
    assert "host/eth0: 1 connection(s) at 80% of the limit (3)" in table, table
    (row,) = [line.split() for line in table.splitlines() if ":%d " % client.local_port in line]
    # client -> broker, consumers, refused, synced, consumers per channel
    assert row[3:5] == ["5", "0"] and row[-1] == "%d:5" % channel, (row, table)

    client.consume(channel, queue)  # monitor refuses nothing, and reports it
    assert client.alive
    entry = limiter_entry(info(ansible, HOST))
    assert connection_of(entry, client)["consumers"] == 6
    newest = entry["refusals"][0]
    assert (newest["client_port"], newest["consumers"], newest["action"]) == (
        client.local_port,
        5,
        "monitor",
    )


def test_a_broker_that_does_not_answer_is_a_warning(ansible, lab_hosts):
    remove(ansible, HOST)
    result = deploy(ansible, HOST, limit=LIMIT, action="refuse", broker_node="rabbit@nosuchnode")
    (warning,) = [w for w in result.get("warnings", []) if "seeded" in w]
    assert warning.startswith("consumer counts not seeded from the broker"), warning
    assert "rabbit@nosuchnode" in warning, warning
    assert limiter_entry(info(ansible, HOST))["attached"]


def test_a_broker_node_that_is_not_a_node_name_is_refused(ansible):
    before = snapshot(HOST)
    result = ansible.run(HOST, "rabbitguard.limiter.rabbit_tc_limit", limit=4, broker_node="nonode")
    assert result.get("failed"), result
    assert result["msg"].startswith("broker_node must be a RabbitMQ node name"), result["msg"]
    assert "\n" not in result["msg"]
    assert snapshot(HOST) == before
