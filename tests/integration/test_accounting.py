# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What frees a consumer slot, what each connection is charged, and what
rabbit_tc_limit_info shows, on rabbit1 with real clients.

action=reset throughout, so that a refused consume fails the client at once: a test that
expects "exactly N more" sees the (N+1)th fail within a second.
"""

import threading
import time

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from tests.integration.common import (
    HOST,
    broker_connections,
    connection_of,
    deploy,
    ensure,
    eth0,
    info,
    limited_host,
    limiter_entry,
    wait_for,
)
from tests.lib.clients import ClientError, open_consumers

pytestmark = pytest.mark.integration

LIMIT = 3
limited = limited_host(LIMIT, "reset")


class Publishing:
    """``with Publishing(client, channel, queue, body, pause) as p``: client publishes body
    to queue on channel in a thread (pause seconds apart) until the block ends; p.sent
    counts the publishes, p.errors holds the error that stopped it."""

    def __init__(self, client, channel, queue, body, pause=0.0):
        self.client, self.channel, self.queue, self.body = client, channel, queue, body
        self.pause, self.sent, self.errors = pause, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._publish, daemon=True)

    def _publish(self):
        while not self._stop.is_set():
            try:
                self.client.publish(self.channel, self.queue, self.body)
            except ClientError as exc:
                self.errors.append(exc)
                return
            self.sent += 1
            time.sleep(self.pause)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def refused_fast(outcome):
    return (
        outcome.error is not None
        and outcome.error.kind == "connection"
        and outcome.error.elapsed < 1.5
    )


def test_cancel_frees_a_slot(limited, queues, client_pool):
    client = client_pool("pika", limited["ipv4"], "cancel")
    first = open_consumers(client, queues, LIMIT)
    assert first.count == LIMIT and first.error is None, first
    channel, tag = first.opened[0]

    client.cancel(channel, tag)
    more = open_consumers(client, queues, 3, channels=[channel])

    # One cancel, one more consumer: not zero, not two.
    assert more.count == 1, more
    assert refused_fast(more), more


def test_closing_a_channel_frees_its_consumers(limited, queues, client_pool):
    client = client_pool("aio-pika", limited["ipv4"], "channel-close")
    ch_a, ch_b = client.channel(), client.channel()
    opened = open_consumers(client, queues, LIMIT, channels=[ch_a, ch_a, ch_b])
    assert opened.count == LIMIT and opened.error is None, opened

    client.close_channel(ch_a)  # held 2 of the 3
    more = open_consumers(client, queues, 4, channels=[ch_b])

    assert more.count == 2, more
    assert refused_fast(more), more


def test_closing_the_connection_forgets_it(ansible, limited, queues, client_pool):
    client = client_pool("pika", limited["ipv4"], "conn-close")
    ch_a, ch_b = client.channel(), client.channel()
    assert open_consumers(client, queues, LIMIT, channels=[ch_a, ch_b]).count == LIMIT
    conn = connection_of(limiter_entry(info(ansible, HOST)), client)
    assert conn is not None
    assert (conn["consumers"], conn["channels"]) == (LIMIT, {str(ch_a): 2, str(ch_b): 1})

    client.close()
    entry = limiter_entry(info(ansible, HOST))

    assert connection_of(entry, client) is None, entry["connections"]
    # A new connection from the same application starts from zero.
    again = client_pool("pika", limited["ipv4"], "conn-close-again")
    outcome = open_consumers(again, queues, LIMIT + 1)
    assert outcome.count == LIMIT and refused_fast(outcome), outcome


def test_ipv4_and_ipv6_connections_are_counted_separately(ansible, limited, queues, client_pool):
    v4 = client_pool("pika", limited["ipv4"], "sep-v4")
    v6 = client_pool("amqp", limited["ipv6"], "sep-v6")
    for client in (v4, v6):
        outcome = open_consumers(client, queues, LIMIT)
        assert outcome.count == LIMIT and outcome.error is None, (client, outcome)

    entry = limiter_entry(info(ansible, HOST))
    seen = dict(
        (c["client"], c["consumers"]) for c in (connection_of(entry, v4), connection_of(entry, v6))
    )
    assert seen == {"198.18.240.1": LIMIT, "fd00:5267:0:f0::1": LIMIT}, entry["connections"]

    # Each is at its own limit: the IPv6 connection is refused, the IPv4 one still works,
    # until it asks for one more as well.
    over6 = open_consumers(v6, queues, 1)
    assert over6.count == 0 and over6.error.kind in ("connection", "timeout"), over6
    assert v4.alive
    over4 = open_consumers(v4, queues, 1)
    assert over4.count == 0 and refused_fast(over4), over4


def test_info_while_traffic_flows(ansible, limited, queues, client_pool):
    consumer = client_pool("aio-pika", limited["ipv4"], "info-consumer")
    publisher = client_pool("pika", limited["ipv4"], "info-publisher")
    ch1, ch2 = consumer.channel(), consumer.channel()
    assert open_consumers(consumer, queues, LIMIT, channels=[ch1, ch1, ch2]).count == LIMIT
    # Frames spanning segments on the publisher's stream.
    with Publishing(publisher, publisher.channel(), queues, b"x" * 20000, 0.01) as publishing:
        assert wait_for(lambda: consumer.delivered > 10, 5), "no messages flow"
        entry = limiter_entry(info(ansible, HOST))
        delivered = consumer.delivered
        assert wait_for(lambda: consumer.delivered > delivered + 10, 5), "traffic stopped"
    assert not publishing.errors, publishing.errors

    assert entry["attached"] is True and isinstance(entry["program_id"], int)
    assert entry["config"] == {
        "port": C.DEFAULT_PORT,
        "limit": LIMIT,
        "action": "reset",
        "frame_max": C.DEFAULT_FRAME_MAX,
        "strict": C.DEFAULT_STRICT,
        "l2": "ethernet",
        "overrides": [],
    }
    conn = connection_of(entry, consumer)
    assert conn == {
        "client": "198.18.240.1",
        "client_port": consumer.local_port,
        "broker": limited["ipv4"],
        "broker_port": C.DEFAULT_PORT,
        "consumers": LIMIT,
        "limit": LIMIT,
        "channels": {str(ch1): 2, str(ch2): 1},
        "refused": 0,
        "synced": True,
    }
    pub = connection_of(entry, publisher)
    assert pub is not None and pub["consumers"] == 0 and pub["refused"] == 0, pub
    assert entry["connection_count"] >= 2
    counters = entry["counters"]
    assert counters["segments"] >= counters["amqp_segments"] > 0
    assert counters["consumes_allowed"] >= LIMIT
    # The broker agrees on the consumers.
    broker = broker_connections(HOST)[consumer.local_port]
    assert broker["channels"] == {ch1: 2, ch2: 1}
    # min_consumers: only the connections with that many.
    only = limiter_entry(info(ansible, HOST, min_consumers=LIMIT))
    assert consumer.local_port in [c["client_port"] for c in only["connections"]]
    assert all(c["consumers"] >= LIMIT for c in only["connections"])


def test_a_busy_connection_is_counted_exactly_in_strict_mode(
    ansible, lab_hosts, queues, client_pool
):
    """Consumes between large publishes on the same connection: frames span segments and
    segments hold many frames; with strict the count is still exact. (The lab's veth sends
    with TSO on, which reorders one flow across CPUs: without strict, a connection whose
    hole hides a frame header goes adrift and is no longer limited; see the README's Modes.)"""
    ensure(ansible, HOST, limit=LIMIT, action="reset", strict=True)
    client = client_pool("aio-pika", lab_hosts[HOST]["ipv4"], "busy")
    publishing, consuming = client.channel(), client.channel()
    # > frame_max: three body frames, many segments each.
    with Publishing(client, publishing, queues, b"p" * 300000) as publisher:
        assert wait_for(lambda: publisher.sent >= 3, 5), publisher.errors
        outcome = open_consumers(client, queues, LIMIT + 2, channels=[consuming])

    assert outcome.count == LIMIT and refused_fast(outcome), (outcome, publisher.sent)
    assert publisher.sent >= 3


def test_a_live_limit_change_keeps_the_counts(ansible, limited, queues, client_pool):
    # aio-pika keeps the connection's heartbeats going while Ansible runs.
    client = client_pool("aio-pika", limited["ipv4"], "live-change")
    channel = client.channel()
    assert open_consumers(client, queues, LIMIT, channels=[channel]).count == LIMIT

    result = deploy(ansible, HOST, diff=True, limit=LIMIT + 2, action="reset")

    assert result["changed"] is True
    assert eth0(result)["action"] == "replace"
    assert eth0(result)["config"]["limit"] == LIMIT + 2
    assert result["diff"]["before"]["host/eth0"]["limit"] == LIMIT
    assert result["diff"]["after"]["host/eth0"]["limit"] == LIMIT + 2
    assert client.alive, client
    # The same connection, its 3 consumers still counted: exactly 2 more.
    more = open_consumers(client, queues, 4, channels=[channel])
    assert more.count == 2, more
    assert refused_fast(more), more


def test_lowering_the_limit_keeps_live_consumers_and_refuses_new_ones(
    ansible, lab_hosts, queues, client_pool
):
    # Runs after the live change above (limit 5): one compile less.
    ensure(ansible, HOST, limit=LIMIT + 2, action="reset")
    client = client_pool("pika", lab_hosts[HOST]["ipv4"], "lower")
    channel = client.channel()
    opened = open_consumers(client, queues, 4, channels=[channel])
    assert opened.count == 4 and opened.error is None, opened

    result = deploy(ansible, HOST, limit=2, action="reset")
    assert eth0(result)["action"] == "replace"

    # Nothing live is taken away: the broker still has all 4, the connection works.
    assert sum(broker_connections(HOST)[client.local_port]["channels"].values()) == 4
    assert client.alive
    # Down to 1 of them: one more fits under the new limit of 2, not more.
    for _channel, tag in opened.opened[:3]:
        client.cancel(channel, tag)
    more = open_consumers(client, queues, 3, channels=[channel])
    assert more.count == 1 and refused_fast(more), more
