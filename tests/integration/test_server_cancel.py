# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Consumers the broker cancels itself free their slots (the egress program), on rabbit1
with real clients: a queue deleted under a consumer makes the broker send basic.cancel,
which the client does not answer.

action=reset, limit 3, as in test_accounting.
"""

import pytest

from tests.integration.common import (
    broker_consumers,
    connection_of,
    ensure,
    info,
    limiter_entry,
    run,
    wait_for,
)
from tests.lib.clients import declare_queues, open_consumers

pytestmark = pytest.mark.integration

HOST = "rabbit1"
LIMIT = 3


@pytest.fixture
def limited(ansible, lab_hosts, queues):
    ensure(ansible, HOST, limit=LIMIT, action="reset")
    return lab_hosts[HOST]


def delete_queue(name):
    run(HOST, ["rabbitmqctl", "-q", "delete_queue", name])


def test_the_pair_is_attached(ansible, limited):
    egress = run(HOST, ["tc", "filter", "show", "dev", "eth0", "egress"]).stdout
    ingress = run(HOST, ["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout
    assert "rabbitguard-" in egress and "rabbitguard-" in ingress
    entry = limiter_entry(info(ansible, HOST))
    assert entry["attached"] is True and entry["egress_program_id"], entry


def test_resubscribing_after_server_cancels_is_never_refused(ansible, limited, client_pool):
    client = client_pool("pika", limited["ipv4"], "server-cancel")
    channel = client.channel()
    names = ["rgi-sc-%d" % i for i in range(11)]
    declare_queues(limited["ipv4"], names)
    try:
        first = open_consumers(client, names[0], 1, channels=[channel])
        assert first.count == 1 and first.error is None, first
        for i in range(10):
            delete_queue(names[i])  # the broker cancels the consumer, the client is silent
            assert wait_for(lambda: broker_consumers(HOST, client) == 0, 10)
            again = open_consumers(client, names[i + 1], 1, channels=[channel])
            assert again.count == 1 and again.error is None, (i, again)
        assert client.alive
        conn = connection_of(limiter_entry(info(ansible, HOST, connections=True)), client)
        assert conn is not None and conn["consumers"] == 1, conn
    finally:
        for name in names:
            run(HOST, ["rabbitmqctl", "-q", "delete_queue", name], check=False)


def test_a_client_holding_the_limit_is_still_refused(limited, queues, client_pool):
    client = client_pool("pika", limited["ipv4"], "server-cancel-full")
    held = open_consumers(client, queues, LIMIT)
    assert held.count == LIMIT and held.error is None, held
    names = ["rgi-sc-full"]
    declare_queues(limited["ipv4"], names)
    try:
        more = open_consumers(client, names[0], 1)
        assert more.count == 0 and more.error is not None, more
        assert more.error.kind == "connection", more
    finally:
        run(HOST, ["rabbitmqctl", "-q", "delete_queue", names[0]], check=False)
