# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Seeding where no broker runs (tests/integration/test_seed.py has the broker that does):
rabbit_tc_limit, run by Ansible on this machine, attaches in a namespace of its own (rgseed)
with no RabbitMQ in it. The user sees a warning saying no broker answered there, and no
process is left behind in the namespace: RabbitMQ's Erlang CLI starts an epmd daemon where
none runs, which would live on and keep the namespace (and its veth) alive after it is
deleted.
"""

import shutil

import pytest

from .local import ansible, make_namespace, processes_in, remove_namespace

pytestmark = pytest.mark.bpf

NETNS = "rgseed"
HOST_END = "rgseed0"
PIN_DIR = "/sys/fs/bpf/rgseed"
ARGS = "netns=%s interfaces=eth0 pin_dir=%s" % (NETNS, PIN_DIR)


@pytest.fixture
def empty_namespace():
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed (the rabbitmq-server package)")
    make_namespace(NETNS, HOST_END)
    try:
        yield NETNS
    finally:
        ansible("state=absent " + ARGS)
        shutil.rmtree(PIN_DIR, ignore_errors=True)
        left = remove_namespace(NETNS, HOST_END)
        assert not left, "left running in %s: %r" % (NETNS, left)


@pytest.mark.parametrize(
    "node",
    [
        None,  # rabbitmqctl's default: rabbit@<this host>
        # A node on a host the namespace cannot resolve: the CLI may wait for the resolver
        # until the seeding's timeout; what it started is stopped with it.
        "rabbit@nosuchnode",
    ],
)
def test_seeding_where_no_broker_runs_warns_and_leaves_no_process(empty_namespace, node):
    rc, result = ansible("limit=2 " + ARGS + (" broker_node=%s" % node if node else ""))
    assert rc == 0 and result["changed"], result
    assert result["interfaces"]["netns-%s" % NETNS]["eth0"]["action"] == "create", result
    assert processes_in(NETNS) == []
    (warning,) = [w for w in result.get("warnings", []) if "seeded" in w]
    assert warning.startswith(
        "consumer counts not seeded from the broker, counting starts at zero: "
        "no broker answered in namespace %s: " % NETNS
    ), warning
    assert (node or "rabbit@") in warning, warning
