# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A connection's overflow channels (beyond the 8 slots of its entry in ``conns``) with a
real broker and real clients, on rabbit1: the limiter's counts follow the broker's as
consumers on channels 9 and up come and go, and the ``channels`` map (read from its pin in
the host's bpffs) holds nothing of a connection once it ends, whichever way it ends. The
crafted-packet version is tests/bpf/test_overflow_channels.py.

Channel n's consumers live in slot n mod 8 of the connection's entry; a channel whose slot
another holds goes to the ``channels`` map, listed in the entry at place n mod 16 (README,
Limitations). Clients number channels 1, 2, ... (lowest free first), so with twelve
channels, 9 to 12 are overflow entries; channel 30 (opened by number) shares place 14 of
the list with channel 14.

action=reset and a limit of 30, so that a new connection's 31st consume fails at once.
"""

import json
import socket
import struct

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _names
from tests.integration.common import (
    HOST,
    IFACE,
    PIN_ROOT,
    broker_connections,
    connection_of,
    info,
    limited_host,
    limiter_entry,
    run,
    wait_for,
)
from tests.lib.ansible_run import REPO_ROOT
from tests.lib.clients import open_consumers

pytestmark = pytest.mark.integration

LIMIT = 30
limited = limited_host(LIMIT, "reset")
CHANNELS = 12  # 1-8 in the entry's slots, 9-12 in the channels map
PIN = _names.pin_dir(PIN_ROOT, _names.HOST_KEY, IFACE)

# Run by the host's /usr/bin/python3 inside the lab host (its bpffs is private to it): the
# raw entries of the pinned conns and channels maps, as JSON.
_READ_MAPS = r"""
import ctypes, json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "collections"))
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _bpfsys, _layout
pin = sys.argv[2]

def entries(name, key_type, value_type, row):  # row(key, value) of each entry of a pinned map
    rows = []
    with _bpfsys.owned_fd(_bpfsys.obj_get(os.path.join(pin, name))) as fd:
        for raw_key in _bpfsys.map_keys(fd, ctypes.sizeof(key_type)):
            raw = _bpfsys.map_lookup(fd, raw_key, ctypes.sizeof(value_type))
            if raw is not None:
                key = _layout.decode(key_type, raw_key)
                rows.append(row(key, _layout.decode(value_type, raw)))
    return rows

out = {
    "conns": entries("conns", _layout.ConnKey, _layout.ConnState, lambda key, st: {
        "client_port": key.client_port, "epoch": st.epoch, "ended": st.ended,
        "consumers": st.consumers, "over": [c for c in st.over if c]}),
    "channels": entries("channels", _layout.ChanKey, _layout.ChanState, lambda key, value: {
        "client_port": key.conn.client_port, "channel": key.channel, "epoch": value.epoch,
        "consumers": value.consumers}),
}
print(json.dumps(out))
"""


def pinned_maps():
    proc = run(HOST, ["/usr/bin/python3", "-I", "-c", _READ_MAPS, REPO_ROOT, PIN])
    return json.loads(proc.stdout)


def overflow_entries(client_port):
    """{channel: consumers} of the channels map's entries for this client port (every
    entry, whatever its epoch: what is left in the map, not what counts)."""
    return {
        e["channel"]: e["consumers"]
        for e in pinned_maps()["channels"]
        if e["client_port"] == client_port
    }


def conn_entry(maps, client_port):
    found = [c for c in maps["conns"] if c["client_port"] == client_port]
    return found[0] if found else None


def broker_channels(client):
    """{channel: consumers} the broker lists for this client (channels with consumers)."""
    conn = broker_connections(HOST).get(client.local_port)
    assert conn is not None, "the broker lists no connection from port %s" % client.local_port
    return {ch: n for ch, n in conn["channels"].items() if n}


def limiter_channels(ansible, client):
    """{channel: consumers} rabbit_tc_limit_info reports for this client's connection."""
    conn = connection_of(limiter_entry(info(ansible, HOST, connections=True)), client)
    assert conn is not None, "the limiter does not list %r" % client
    assert conn["consumers"] == sum(conn["channels"].values()), conn
    return {int(ch): n for ch, n in conn["channels"].items() if n}


def open_channel_number(client, number):
    """Open channel ``number`` on a pika client (clients.PikaClient numbers its channels
    the library's way, lowest free first; this one asks pika for a number)."""

    def opening():
        ch = client._conn.channel(channel_number=number)  # noqa: SLF001
        client._channels[number] = ch  # noqa: SLF001
        return ch.channel_number

    return client._call("channel.open %d" % number, opening, None)  # noqa: SLF001


def pika_socket(client):
    return client._conn._impl._transport._sock  # noqa: SLF001


# -- the ways a connection ends ------------------------------------------------------------
def end_client_close(client):
    """connection.close from the client (Node amqplib sends it with its channels still
    open), close-ok from the broker, then FIN."""
    client.close()


def end_pika_close(client):
    """pika's close: channel.close on every open channel first, then connection.close."""
    client.close()


def end_rst(client):
    """The client's socket closed with SO_LINGER 0: its kernel sends a RST (at the sequence
    number the broker expects next), no AMQP close, no FIN."""

    def reset():
        sock = pika_socket(client)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client._conn._impl._transport.abort()  # noqa: SLF001 - closes the socket: RST

    client._call("RST", reset, None)  # noqa: SLF001
    client._stop = True  # noqa: SLF001


def end_fin(client):
    """The client's TCP ends the stream (FIN) with no AMQP close: a process that exits."""
    client._call("FIN", lambda: pika_socket(client).shutdown(socket.SHUT_WR), None)  # noqa: SLF001


def end_broker_close(client):
    """The broker closes the connection (rabbitmqctl close_connection: its connection.close,
    seen by the egress program), the client answers close-ok and closes."""
    out = run(HOST, ["rabbitmqctl", "-q", "list_connections", "pid", "peer_port"]).stdout
    (pid,) = [
        line.split()[0] for line in out.splitlines() if line.split()[1:] == [str(client.local_port)]
    ]
    run(HOST, ["rabbitmqctl", "-q", "close_connection", pid, "rgi overflow test"])


# name: (client library, how it ends)
ENDS = {
    "client_close": ("amqplib", end_client_close),
    "pika_close": ("pika", end_pika_close),
    "rst": ("pika", end_rst),
    "fin": ("pika", end_fin),
    "broker_close": ("pika", end_broker_close),
}


def assert_full_limit(limited, queues, client_pool, name):
    """A new connection gets exactly LIMIT consumers (spread over 15 channels, so that its
    own overflow entries count too), and the next one is refused."""
    client = client_pool("pika", limited["ipv4"], name)
    channels = [client.channel() for _ in range(15)]
    got = open_consumers(client, queues, LIMIT + 1, channels=channels)
    assert got.count == LIMIT, got
    assert got.error is not None and got.error.kind == "connection", got
    return client


@pytest.mark.parametrize("how", sorted(ENDS))
def test_overflow_channels_follow_the_broker_and_go_with_the_connection(
    ansible, limited, queues, client_pool, how
):
    library, end = ENDS[how]
    client = client_pool(library, limited["ipv4"], "overflow-%s" % how)
    channels = [client.channel() for _ in range(CHANNELS)]
    assert channels == list(range(1, CHANNELS + 1)), channels
    # One consumer on every channel, a second on 9 and 10: 14 in all, 6 of them in the
    # channels map.
    opened = open_consumers(client, queues, CHANNELS, channels=channels)
    assert opened.count == CHANNELS and opened.error is None, opened
    tags = {}
    for channel, tag in opened.opened:
        tags.setdefault(channel, []).append(tag)
    for channel in (9, 10):
        more = open_consumers(client, queues, 1, channels=[channel])
        assert more.count == 1 and more.error is None, more
        tags[channel].append(more.opened[0][1])

    want = dict.fromkeys(range(1, CHANNELS + 1), 1)
    want.update({9: 2, 10: 2})
    assert broker_channels(client) == want
    assert limiter_channels(ansible, client) == want
    assert overflow_entries(client.local_port) == {9: 2, 10: 2, 11: 1, 12: 1}

    # Cancels on overflow channels (one of two on 9, both on 10) and a close (11).
    client.cancel(9, tags[9][0])
    for tag in tags[10]:
        client.cancel(10, tag)
    client.close_channel(11)
    want.update({9: 1})
    del want[10], want[11]
    assert wait_for(lambda: broker_channels(client) == want, 5), broker_channels(client)
    assert limiter_channels(ansible, client) == want
    assert overflow_entries(client.local_port) == {9: 1, 12: 1}

    port = client.local_port
    forgotten = limiter_entry(info(ansible, HOST, connections=False))["counters"]
    end(client)
    assert wait_for(lambda: port not in broker_connections(HOST), 10), "broker still lists it"
    assert wait_for(lambda: conn_entry(pinned_maps(), port) is None, 5), conn_entry(
        pinned_maps(), port
    )
    maps = pinned_maps()
    assert [e for e in maps["channels"] if e["client_port"] == port] == [], maps["channels"]
    entry = limiter_entry(info(ansible, HOST, connections=True))
    assert [c for c in entry["connections"] if c["client_port"] == port] == []
    assert entry["counters"]["conns_forgotten"] > forgotten["conns_forgotten"]
    assert entry["counters"]["missed"] == forgotten["missed"], entry["counters"]

    assert_full_limit(limited, queues, client_pool, "overflow-after-%s" % how)


def test_an_unlisted_overflow_channel_behaves_as_documented(ansible, limited, queues, client_pool):
    """Channels 14 and 30 share place 14 of the list: the one put in the map last is
    listed, the other is not. An unlisted entry leaves the map when its consumers go; one
    still there when the connection ends stays behind, counted for nothing (README,
    Limitations: stale, aged out by the LRU)."""
    client = client_pool("pika", limited["ipv4"], "overflow-unlisted")
    channels = [client.channel() for _ in range(14)]
    assert channels == list(range(1, 15)), channels
    opened = open_consumers(client, queues, 14, channels=channels)
    assert opened.count == 14 and opened.error is None, opened
    tag14 = opened.opened[13][1]
    assert open_channel_number(client, 30) == 30
    on30 = open_consumers(client, queues, 1, channels=[30])
    assert on30.count == 1 and on30.error is None, on30

    want = dict.fromkeys(list(range(1, 15)) + [30], 1)
    assert broker_channels(client) == want
    assert limiter_channels(ansible, client) == want
    port = client.local_port
    listed = conn_entry(pinned_maps(), port)["over"]
    assert 30 in listed and 14 not in listed, listed  # 30 took place 14
    assert overflow_entries(port) == {9: 1, 10: 1, 11: 1, 12: 1, 13: 1, 14: 1, 30: 1}

    # The unlisted entry leaves the map when its consumer goes.
    client.cancel(14, tag14)
    del want[14]
    assert wait_for(lambda: broker_channels(client) == want, 5)
    assert limiter_channels(ansible, client) == want
    assert 14 not in overflow_entries(port)

    # A consumer on 14 again takes place 14 back: now 30 is the unlisted one.
    again = open_consumers(client, queues, 1, channels=[14])
    assert again.count == 1 and again.error is None, again
    want[14] = 1
    assert broker_channels(client) == want
    assert limiter_channels(ansible, client) == want
    listed = conn_entry(pinned_maps(), port)["over"]
    assert 14 in listed and 30 not in listed, listed

    # The connection ends with a consumer on the unlisted 30 (FIN, no AMQP close: pika's
    # close would close channel 30 first): every listed entry goes, 30's stays behind, and
    # nothing counts it.
    end_fin(client)
    assert wait_for(lambda: port not in broker_connections(HOST), 10)
    assert wait_for(lambda: conn_entry(pinned_maps(), port) is None, 5)
    assert overflow_entries(port) == {30: 1}
    entry = limiter_entry(info(ansible, HOST, connections=True))
    assert [c for c in entry["connections"] if c["client_port"] == port] == []
    assert_full_limit(limited, queues, client_pool, "overflow-after-unlisted")
