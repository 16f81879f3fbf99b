"""Seeding from the broker (module_utils/_seed.py) without root: option checks, command
lines, rabbitmqctl's JSON, and a broker that cannot be asked."""

import json

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _render, _seed

PID_A = "<rabbit@localhost.1670000000.1234.0>"
PID_B = "<rabbit@localhost.1670000000.1240.0>"
CONNECTIONS = json.dumps(
    [
        {"pid": PID_A, "peer_host": "198.18.240.1", "peer_port": 40100,
         "host": "198.18.240.11", "port": 5672},
        {"pid": PID_B, "peer_host": "fd00:5267:0:f0::1", "peer_port": 40200,
         "host": "fd00:5267:0:f0::b", "port": 5672},
        {"pid": "<rabbit@localhost.1.2.3>", "peer_host": "::ffff:198.18.240.2",
         "peer_port": 40300, "host": "::ffff:198.18.240.11", "port": 5672},
        # RabbitMQ 3.10's JSON formatter gives Erlang address tuples as lists.
        {"pid": "<rabbit@localhost.1.2.4>", "peer_host": [0, 0, 0, 0, 0, 65535, 50706, 61441],
         "peer_port": 40400, "host": [198, 18, 240, 11], "port": 5672},
    ]
)  # fmt: skip
CHANNELS = json.dumps(
    [
        {"connection": PID_A, "number": 1, "consumer_count": 3},
        {"connection": PID_A, "number": 2, "consumer_count": 2},
        {"connection": PID_A, "number": 3, "consumer_count": 0},
        {"connection": PID_B, "number": 1, "consumer_count": 1},
        {"connection": "<rabbit@localhost.9.9.9>", "number": 1, "consumer_count": 7},
        {"connection": "<rabbit@localhost.1.2.4>", "number": 9, "consumer_count": 4},
    ]
)


def test_parse_joins_channels_to_their_connections():
    assert _seed.parse(CONNECTIONS, CHANNELS) == [
        {
            "client": "198.18.240.1",
            "client_port": 40100,
            "broker": "198.18.240.11",
            "broker_port": 5672,
            "channels": {1: 3, 2: 2},
        },
        {
            "client": "fd00:5267:0:f0::1",
            "client_port": 40200,
            "broker": "fd00:5267:0:f0::b",
            "broker_port": 5672,
            "channels": {1: 1},
        },
        {
            "client": "198.18.240.1",
            "client_port": 40400,
            "broker": "198.18.240.11",
            "broker_port": 5672,
            "channels": {9: 4},
        },
    ]


def test_parse_of_an_idle_broker_is_empty():
    assert _seed.parse("[]\n", "[]\n") == []
    assert _seed.parse("", "") == []


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        '[{"pid": 1}]',
        '{"a": 1}',
        '[{"pid": 1, "peer_host": [1, 2], "peer_port": 1, "host": "::1", "port": 1}]',
    ],
)
def test_unreadable_output_is_a_seed_error(bad):
    with pytest.raises(_seed.SeedError, match="could not be read"):
        _seed.parse(bad, "[]")


@pytest.mark.parametrize("node", ["rabbit@localhost", "rabbit@host-1.example.org", "r_2@h"])
def test_node_names(node):
    assert _seed.validate_node(node) == node


@pytest.mark.parametrize("node", ["rabbit", "@host", "rabbit@", "a@b@c", "rabbit@ho st", "-n x"])
def test_not_a_node_name_is_a_one_line_error_naming_the_option(node):
    with pytest.raises(_render.ConfigError) as err:
        _seed.validate_node(node)
    assert str(err.value).startswith("broker_node must be a RabbitMQ node name")
    assert "\n" not in str(err.value)


def test_no_node_means_rabbitmqctls_own_default():
    assert _seed.validate_node(None) is None and _seed.validate_node("") is None
    argv = _seed.rabbitmqctl_argv(None, None, ["list_channels"])
    assert argv == ["rabbitmqctl", "-q", "--formatter", "json", "list_channels"]


def test_command_lines_run_inside_the_namespace():
    argv = _seed.rabbitmqctl_argv("rabbit@localhost", "rg1", ["list_connections", "pid"])
    assert argv == [
        "ip", "netns", "exec", "rg1",
        "rabbitmqctl", "-q", "--formatter", "json", "-n", "rabbit@localhost",
        "list_connections", "pid",
    ]  # fmt: skip
    assert _seed.rabbitmqctl_argv(None, "/proc/1/ns/net", ["x"])[:3] == [
        "nsenter",
        "--net=/proc/1/ns/net",
        "--",
    ]


def test_a_broker_that_cannot_be_asked_is_a_warning_not_a_failure(tmp_path):
    def down(argv):
        raise _seed.SeedError("rabbitmqctl failed (exit 69): Error: unable to perform an operation")

    seeded, warnings = _seed.seed([str(tmp_path)], 5672, None, None, run=down)
    assert seeded == 0
    (warning,) = warnings
    assert warning.startswith("consumer counts not seeded from the broker, counting starts at zero")
    assert "exit 69" in warning


def test_no_rabbitmqctl_names_the_cause(monkeypatch):
    monkeypatch.setattr(_seed.shutil, "which", lambda name: None)
    with pytest.raises(_seed.SeedError, match="rabbitmqctl is not installed on this host"):
        _seed.read_broker(None, None)


def test_seeded_state_is_flagged_for_the_classifier():
    from ansible_collections.rabbitguard.limiter.plugins.module_utils import _layout

    value, overflow = _seed.conn_value(5, 77)
    state = _layout.decode(_layout.ConnState, value)
    assert (state.consumers, state.epoch, state.flags, state.synced) == (5, 77, 0x40, 0)
    assert overflow == {}


def test_seeded_channels_take_the_classifiers_slots_and_overflow_to_the_map():
    from ansible_collections.rabbitguard.limiter.plugins.module_utils import _layout

    value, overflow = _seed.conn_value(6, 77, {1: 2, 2: 1, 9: 3})
    state = _layout.decode(_layout.ConnState, value)
    assert _layout.slot_channels(state) == {1: 2, 2: 1}
    assert overflow == {9: 3}
    assert state.flags == 0x40 | 0x10


# rabbitmqctl 3.10's error output where epmd runs and no node does, and where no epmd runs
# (with CLI_ERL_FLAGS), as it printed them (the CLI's suggestions left out).
NODE_DOWN = """Error: unable to perform an operation on node 'rabbit@vm'. Please see diagnostics \
information and suggestions below.

Most common reasons for this are:

 * Target node is unreachable (e.g. due to hostname resolution, TCP connection or firewall issues)

DIAGNOSTICS
===========

attempted to contact: [rabbit@vm]

rabbit@vm:
  * connected to epmd (port 4369) on vm
  * epmd reports: node 'rabbit' not running at all
                  no other nodes on vm
  * suggestion: start the node

Current node details:
 * node name: 'rabbitmqcli-659-rabbit@vm'
"""
NO_EPMD = """Error: unable to perform an operation on node 'rabbit@vm'. Please see diagnostics \
information and suggestions below.

DIAGNOSTICS
===========

attempted to contact: [rabbit@vm]

rabbit@vm:
  * unable to connect to epmd (port 4369) on vm: address (cannot connect to host/port)


Current node details:
 * node name: 'rabbitmqcli-997-rabbit@vm'
"""


@pytest.mark.parametrize(
    "output, line",
    [
        (
            NODE_DOWN,
            "rabbit@vm: connected to epmd (port 4369) on vm; "
            "epmd reports: node 'rabbit' not running at all",
        ),
        (
            NO_EPMD,
            "rabbit@vm: unable to connect to epmd (port 4369) on vm: "
            "address (cannot connect to host/port)",
        ),
        ("Error: something else\nand more\n", "Error: something else"),
        ("", "no output"),
    ],
)
def test_a_cli_failure_is_one_line_naming_the_node_and_what_was_found(output, line):
    assert _seed.cli_failure(output) == line


def test_no_answer_names_the_namespace(tmp_path):
    def down(argv):
        raise _seed.NoAnswer(_seed.cli_failure(NO_EPMD) + " (rabbitmqctl exit 69)")

    _, (warning,) = _seed.seed([str(tmp_path)], 5672, None, "rg1", run=down)
    assert warning == (
        "consumer counts not seeded from the broker, counting starts at zero: "
        "no broker answered in namespace rg1: rabbit@vm: unable to connect to epmd (port 4369) "
        "on vm: address (cannot connect to host/port) (rabbitmqctl exit 69)"
    )
    _, (warning,) = _seed.seed([str(tmp_path)], 5672, None, None, run=down)
    assert "no broker answered on this host: rabbit@vm: " in warning
