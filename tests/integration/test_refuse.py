# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""action=refuse, as an application and the broker see it, with every client library.

Limit 3: two consumers on channel 1, then more on channel 2. The third is accepted, the
fourth gets a channel error (404 NOT_FOUND on the rewritten queue name), channel 1 still
receives a published message, the connection stays open, the limiter frees channel 2 when
the client confirms the close, and the refusal is in rabbit_tc_limit_info's `refusals`.
"""

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
from tests.lib import clients

pytestmark = pytest.mark.integration

HOST = "rabbit1"
LIMIT = 3


@pytest.mark.parametrize("library", [*clients.LIBRARIES, "amqplib"])
def test_refuse_closes_only_the_channel(ansible, lab_hosts, client_pool, library):
    ensure(ansible, HOST, limit=LIMIT, action="refuse")
    addr = lab_hosts[HOST]["ipv4"]
    queue = "rgi-refuse-" + library
    clients.declare_queues(addr, [queue])
    client = client_pool(library, addr, "refuse-" + library)

    first = client.channel()
    for _ in range(2):
        client.consume(first, queue)
    second = client.channel()
    client.consume(second, queue)  # the third: accepted
    with pytest.raises(clients.ConsumeFailed) as refused:
        client.consume(second, queue)  # the fourth
    assert refused.value.kind == "channel", refused.value
    assert "404" in refused.value.detail or "NOT_FOUND" in refused.value.detail, refused.value
    assert "amq.rabbitguard" in refused.value.detail, refused.value

    # The connection and channel 1 keep working.
    assert client.alive
    publisher = client.channel()
    client.publish(publisher, queue, b"still here")
    assert wait_for(lambda: client.delivered >= 1, 10), client
    seen = broker_connections(HOST)[client.local_port]
    assert sum(seen["channels"].values()) == 2, seen

    # The client confirmed the close: the limiter counts channel 1's two consumers only,
    # and a new channel gets the third place back.
    entry = limiter_entry(info(ansible, HOST))
    conn = connection_of(entry, client)
    assert conn["consumers"] == 2 and conn["channels"] == {str(first): 2}, conn
    third = client.channel()
    client.consume(third, queue)
    assert client.alive

    newest = entry["refusals"][0]
    assert newest["client_port"] == client.local_port, entry["refusals"]
    assert (newest["channel"], newest["consumers"], newest["action"]) == (second, 3, "refuse")
    assert entry["counters"]["refuse_rewrites"] >= 1


@pytest.mark.parametrize("queue", ["rq", "r"])
def test_refuse_on_a_short_queue_name(ansible, lab_hosts, client_pool, queue):
    """Names under 4 octets cannot become "amq....": they become NUL octets, which the
    broker does not find either (and which must stay valid UTF-8: 0xff octets make the
    broker close the whole connection with 501 FRAME_ERROR)."""
    ensure(ansible, HOST, limit=LIMIT, action="refuse")
    addr = lab_hosts[HOST]["ipv4"]
    clients.declare_queues(addr, [queue])
    client = client_pool("pika", addr, "refuse-short-" + queue)
    channel = client.channel()
    for _ in range(LIMIT):
        client.consume(channel, queue)
    other = client.channel()
    with pytest.raises(clients.ConsumeFailed) as refused:
        client.consume(other, queue)
    assert refused.value.kind == "channel" and "404" in refused.value.detail, refused.value
    assert client.alive
    assert sum(broker_connections(HOST)[client.local_port]["channels"].values()) == LIMIT


def test_an_empty_queue_name_falls_back_to_a_drop_and_is_counted(ansible, lab_hosts, client_pool):
    """An empty queue name means the channel's last declared queue: no rewrite can make the
    broker refuse it, so refuse drops that segment as `drop` would (README), counts it in
    refuse_fallbacks and logs the refusal as a drop. The consume never reaches the broker."""
    ensure(ansible, HOST, limit=LIMIT, action="refuse")
    addr = lab_hosts[HOST]["ipv4"]
    queue = "rgi-refuse-fallback"
    clients.declare_queues(addr, [queue])
    fallbacks = limiter_entry(info(ansible, HOST))["counters"]["refuse_fallbacks"]
    client = client_pool("pika", addr, "refuse-fallback")
    channel = client.channel()
    for _ in range(LIMIT):
        client.consume(channel, queue)
    other = client.channel()
    with pytest.raises(clients.ConsumeFailed) as refused:
        client.consume(other, "")
    assert refused.value.kind in ("timeout", "connection"), refused.value
    assert broker_consumers(HOST, client) in (LIMIT, None)

    entry = limiter_entry(info(ansible, HOST))
    assert entry["counters"]["refuse_fallbacks"] == fallbacks + 1, entry["counters"]
    newest = entry["refusals"][0]
    assert (newest["client_port"], newest["channel"], newest["consumers"], newest["action"]) == (
        client.local_port,
        other,
        LIMIT,
        "drop",
    )
