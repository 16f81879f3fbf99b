# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Cancels free a slot only for a consumer that is live (issue 7), on rabbit1 with real
clients: RabbitMQ answers the cancel of a tag it does not know with cancel-ok and cancels
nothing, so a client that sends made-up cancels must still be refused at the limit, while
one that cancels its own consumers (tags it chose, or the broker made up) never is.

action=reset, limit 3, as in test_server_cancel.
"""

import pytest

from tests.integration.common import (
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


@pytest.fixture
def limited(ansible, lab_hosts, queues):
    ensure(ansible, HOST, limit=LIMIT, action="reset")
    return lab_hosts[HOST]


def test_cancels_of_made_up_tags_make_no_room(ansible, limited, queues, client_pool):
    # py-amqp sends basic.cancel for any tag it is given (pika drops unknown ones itself).
    client = client_pool("amqp", limited["ipv4"], "tags-made-up")
    held = open_consumers(client, queues, LIMIT)
    assert held.count == LIMIT and held.error is None, held
    channel = held.opened[0][0]
    for i in range(3):
        client.cancel(channel, "made-up-%d" % i)  # cancel-ok, and nothing cancelled
    assert broker_consumers(HOST, client) == LIMIT
    conn = connection_of(limiter_entry(info(ansible, HOST, connections=True)), client)
    assert conn is not None and conn["consumers"] == LIMIT, conn
    more = open_consumers(client, queues, 1, channels=[channel])
    assert more.count == 0 and more.error is not None, more
    assert more.error.kind == "connection", more
    counters = limiter_entry(info(ansible, HOST))["counters"]
    assert counters["cancels_unknown"] >= 3, counters


@pytest.mark.parametrize(
    "library",
    [
        pytest.param("pika", id="client-chosen-tags"),
        pytest.param("amqp", id="server-generated-tags"),
    ],
)
def test_cancelling_own_consumers_is_never_refused(ansible, limited, queues, client_pool, library):
    client = client_pool(library, limited["ipv4"], "tags-honest-%s" % library)
    held = open_consumers(client, queues, LIMIT)
    assert held.count == LIMIT and held.error is None, held
    live = list(held.opened)
    for i in range(8):
        channel, tag = live.pop(0)
        client.cancel(channel, tag)
        again = open_consumers(client, queues, 1, channels=[channel])
        assert again.count == 1 and again.error is None, (i, again)
        live += again.opened
    assert client.alive
    assert wait_for(lambda: broker_consumers(HOST, client) == LIMIT, 10)
    conn = connection_of(limiter_entry(info(ansible, HOST, connections=True)), client)
    assert conn is not None and conn["consumers"] == LIMIT, conn
