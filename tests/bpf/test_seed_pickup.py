"""Seeded connections meet the data plane: the counts _seed writes (from rabbitmqctl) are
kept when the classifier joins the connection's stream at its first well-formed frame."""

import re

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _render, _seed
from tests.lib import amqp
from tests.lib.dataplane import BROKER_V4, TC_ACT_OK, TC_ACT_SHOT, Flow

pytestmark = pytest.mark.bpf


def seed(dp, client_port, channels, client="198.18.0.2"):
    entry = {
        "client": client,
        "client_port": client_port,
        "broker": BROKER_V4,
        "broker_port": dp.port,
        "channels": channels,
    }
    return _seed.write(dp.pin_dir, [entry], dp.port)


@pytest.mark.parametrize("name", ["CONN_SEEDED", "CONN_OVERFLOW"])
def test_the_flags_are_the_templates(name):
    source = _render.read_template()
    match = re.search(r"#define %s\s+(0x[0-9a-f]+)" % name, source)
    assert int(match.group(1), 16) == getattr(_seed, name)


@pytest.mark.parametrize("action", ["drop", "refuse"])
def test_a_seeded_connection_keeps_its_count_and_is_refused(dataplanes, action):
    dp = dataplanes(limit=3, action=action)
    assert seed(dp, 40500, {1: 3, 2: 2}) == 1
    flow = Flow(dp, client_port=40500, isn=123456789)
    assert flow.consumers() == 5 and flow.channels() == {1: 3, 2: 2}
    # Mid-body bytes: not a frame, nothing is joined, the count stays.
    assert flow.send(b"\x00\x01garbage-of-a-body") == TC_ACT_OK
    assert flow.consumers() == 5
    # The first well-formed frame joins the stream with the seeded counts.
    assert flow.send(amqp.heartbeat()) == TC_ACT_OK
    assert flow.consumers() == 5
    assert flow.send(amqp.consume(4)) == (TC_ACT_SHOT if action == "drop" else TC_ACT_OK)
    assert flow.consumers() == 5


def test_a_seeded_connection_frees_channels_and_gets_room_again(dataplanes):
    dp = dataplanes(limit=3, action="refuse")
    seed(dp, 40501, {1: 3, 2: 2})
    flow = Flow(dp, client_port=40501, isn=5)
    assert flow.send(amqp.channel_close_ok(1)) == TC_ACT_OK
    assert flow.consumers() == 2 and flow.channels() == {2: 2}
    assert flow.send(amqp.consume(3)) == TC_ACT_OK
    assert flow.consumers() == 3
    assert flow.send(amqp.consume(3, queue="qq")) == TC_ACT_OK
    assert flow.consumers() == 3  # refused in place


def test_the_data_planes_own_entry_is_not_overwritten(dataplanes):
    dp = dataplanes(limit=3, action="refuse")
    flow = Flow(dp, client_port=40502)
    assert flow.handshake() == TC_ACT_OK
    flow.send(amqp.consume(1))
    assert seed(dp, 40502, {1: 7}) == 0
    assert flow.consumers() == 1 and flow.channels() == {1: 1}


def test_a_seeded_channel_whose_slot_is_taken_lives_in_the_map(dataplanes):
    # Channels 1 and 9 share a slot of the connection's entry: 9 is seeded into the
    # channels map, and the classifier finds it there.
    dp = dataplanes(limit=3, action="refuse")
    assert seed(dp, 40503, {1: 2, 9: 1}) == 1
    flow = Flow(dp, client_port=40503, isn=77)
    assert flow.channels() == {1: 2, 9: 1}
    assert flow.send(amqp.channel_close_ok(9)) == TC_ACT_OK
    assert flow.consumers() == 2 and flow.channels() == {1: 2}
    assert flow.send(amqp.consume(9)) == TC_ACT_OK
    assert flow.consumers() == 3 and flow.channels() == {1: 2, 9: 1}
    assert flow.send(amqp.consume(9, queue="qq")) == TC_ACT_OK
    assert flow.consumers() == 3  # refused in place
