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
    HOST,
    broker_consumers,
    connection_of,
    delete_queue,
    deleted_after,
    info,
    limited_host,
    limiter_entry,
    tc_filters,
    wait_for,
)
from tests.lib.clients import declare_queues, open_consumers

pytestmark = pytest.mark.integration

LIMIT = 3
limited = limited_host(LIMIT, "reset")


def test_the_pair_is_attached(ansible, limited):
    egress, ingress = tc_filters(HOST, hook="egress"), tc_filters(HOST)
    assert "rabbitguard-" in egress and "rabbitguard-" in ingress
    entry = limiter_entry(info(ansible, HOST))
    assert entry["attached"] is True and entry["egress_program_id"], entry


def test_resubscribing_after_server_cancels_is_never_refused(ansible, limited, client_pool):
    client = client_pool("pika", limited["ipv4"], "server-cancel")
    channel = client.channel()
    names = ["rgi-sc-%d" % i for i in range(11)]
    declare_queues(limited["ipv4"], names)
    with deleted_after(HOST, names):
        first = open_consumers(client, names[0], 1, channels=[channel])
        assert first.count == 1 and first.error is None, first
        for i in range(10):
            delete_queue(HOST, names[i])  # the broker cancels the consumer, the client is silent
            assert wait_for(lambda: broker_consumers(HOST, client) == 0, 10)
            again = open_consumers(client, names[i + 1], 1, channels=[channel])
            assert again.count == 1 and again.error is None, (i, again)
        assert client.alive
        conn = connection_of(limiter_entry(info(ansible, HOST, connections=True)), client)
        assert conn is not None and conn["consumers"] == 1, conn


def test_a_client_holding_the_limit_is_still_refused(limited, queues, client_pool):
    client = client_pool("pika", limited["ipv4"], "server-cancel-full")
    held = open_consumers(client, queues, LIMIT)
    assert held.count == LIMIT and held.error is None, held
    names = ["rgi-sc-full"]
    declare_queues(limited["ipv4"], names)
    with deleted_after(HOST, names):
        more = open_consumers(client, names[0], 1)
        assert more.count == 0 and more.error is not None, more
        assert more.error.kind == "connection", more
