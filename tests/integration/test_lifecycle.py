# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A limiter's life on a small fleet (group ``rabbit``: rabbit1, rabbit2), one
ansible-playbook run per step: check mode, first run, second run, a change in check and
diff mode, absent, absent again.

rabbit2 has a clsact qdisc of its own before we come, with someone else's filter at pref 1
(classic BPF "return 0": no verdict, traffic goes on to the next filter): the limiter works
behind it, and removing the limiter leaves both in place. On rabbit1 the module creates the
clsact qdisc, and removing the limiter removes it again.

Each test starts from the state it needs (the `clean` and `deployed` fixtures), so they run
in any order and alone.
"""

import pytest

from tests.integration.common import (
    HANDLE,
    IFACE,
    PREF,
    add_foreign_filter,
    forget,
    pins,
    run,
    snapshot,
    tc_filters,
    tc_qdiscs,
)
from tests.lib.ansible_run import LIMIT, task
from tests.lib.clients import open_consumers

pytestmark = pytest.mark.integration

HOSTS = ("rabbit1", "rabbit2")
CONFIG = dict(limit=4, action="reset")


def eth0_of(per_host):
    return dict((h, r["interfaces"]["host"][IFACE]) for h, r in per_host.items())


def our_filter(host):
    return [line for line in tc_filters(host).splitlines() if "handle 0x%x" % HANDLE in line]


@pytest.fixture(scope="module")
def fleet(ansible, lab_hosts, queues):
    """The two hosts; at the end, rabbit2's own filter is taken away again."""
    yield lab_hosts
    forget(*HOSTS)
    run("rabbit2", ["tc", "filter", "del", "dev", IFACE, "ingress", "pref", "1"], check=False)


@pytest.fixture
def clean(ansible, fleet):
    """Both hosts without the limiter; rabbit2 with a clsact qdisc and a filter of its own."""
    (results,) = ansible.play("rabbit", [task(LIMIT, state="absent")])
    assert not any(r["failed"] for r in results.values()), results
    forget(*HOSTS)
    run("rabbit1", ["tc", "qdisc", "del", "dev", IFACE, "clsact"], check=False)
    run("rabbit2", ["tc", "qdisc", "replace", "dev", IFACE, "clsact"])
    run("rabbit2", ["tc", "filter", "del", "dev", IFACE, "ingress"], check=False)
    add_foreign_filter("rabbit2", 1, 1)
    return fleet


@pytest.fixture
def deployed(ansible, clean):
    """The limiter with CONFIG on both hosts (from clean): {host: its program id}."""
    (results,) = ansible.play("rabbit", [task(LIMIT, **CONFIG)])
    assert not any(r["failed"] for r in results.values()), results
    return {host: entry["program_id"] for host, entry in eth0_of(results).items()}


def test_check_mode_predicts_a_change_and_attaches_nothing(ansible, clean):
    before = dict((h, snapshot(h)) for h in HOSTS)
    assert "clsact" not in before["rabbit1"]["qdiscs"]

    (results,) = ansible.play("rabbit", [task(LIMIT, check=True, diff=True, **CONFIG)])

    for host, result in results.items():
        assert result["failed"] is False and result["changed"] is True, result
        entry = result["interfaces"]["host"][IFACE]
        outcome = (entry["action"], entry["compiled"], entry["program_id"])
        assert outcome == ("create", False, None)
        assert result["diff"]["before"]["host/eth0"] is None
        assert result["diff"]["after"]["host/eth0"]["limit"] == CONFIG["limit"]
        assert snapshot(host) == before[host], host
    assert pins("rabbit1") == []


def test_first_run_attaches_and_limits(ansible, clean, queues, client_pool):
    (results,) = ansible.play("rabbit", [task(LIMIT, **CONFIG)])

    for host, entry in eth0_of(results).items():
        assert results[host]["changed"] is True
        assert entry["action"] == "create" and entry["compiled"] is True, entry
        assert isinstance(entry["program_id"], int)
        (line,) = our_filter(host)
        assert "rabbitguard-" in line and "direct-action" in line
        assert " id %d " % entry["program_id"] in line + " "
    assert "clsact" in tc_qdiscs("rabbit1")
    # rabbit2's own filter is still first in line, and the limit holds behind it.
    assert "pref 1 bpf" in tc_filters("rabbit2")
    for host in HOSTS:
        client = client_pool("aio-pika", clean[host]["ipv6"], "first-" + host)
        outcome = open_consumers(client, queues, CONFIG["limit"] + 1)
        assert outcome.count == CONFIG["limit"] and outcome.error.kind == "connection", outcome


def test_second_run_changes_and_compiles_nothing(ansible, deployed):
    (results,) = ansible.play("rabbit", [task(LIMIT, **CONFIG)])

    for host, entry in eth0_of(results).items():
        assert results[host]["changed"] is False, results[host]
        assert entry["action"] == "none"
        # The same program still runs: nothing was compiled or attached.
        assert entry["compiled"] is False
        assert entry["program_id"] == deployed[host]
        (line,) = our_filter(host)
        assert " id %d " % deployed[host] in line + " "


def test_a_change_in_check_then_diff_mode(ansible, deployed):
    before = dict((h, snapshot(h)) for h in HOSTS)
    changed = {"limit": CONFIG["limit"] + 3, "action": CONFIG["action"]}

    checked, applied = ansible.play(
        "rabbit", [task(LIMIT, check=True, diff=True, **changed), task(LIMIT, diff=True, **changed)]
    )

    for host in HOSTS:
        for result in (checked[host], applied[host]):
            assert result["changed"] is True, result
            entry = result["interfaces"]["host"][IFACE]
            assert entry["action"] == "replace"
            assert result["diff"]["before"]["host/eth0"]["limit"] == CONFIG["limit"]
            assert result["diff"]["after"]["host/eth0"]["limit"] == changed["limit"]
            assert result["diff"]["before"]["host/eth0"]["action"] == "reset"
        assert checked[host]["interfaces"]["host"][IFACE]["program_id"] == deployed[host]
        assert applied[host]["interfaces"]["host"][IFACE]["program_id"] != deployed[host]
        assert applied[host]["interfaces"]["host"][IFACE]["compiled"] is True
        # Check mode had touched nothing; the real run did.
        assert snapshot(host)["filters"] != before[host]["filters"]


def test_absent_restores_traffic_and_leaves_no_trace(ansible, fleet, deployed, queues, client_pool):
    # Check mode first: it predicts the removal and removes nothing.
    before = dict((h, snapshot(h)) for h in HOSTS)
    (checked,) = ansible.play("rabbit", [task(LIMIT, state="absent", check=True, diff=True)])
    for host, result in checked.items():
        assert result["changed"] is True, result
        assert result["interfaces"]["host"][IFACE]["action"] == "remove"
        assert result["diff"]["before"]["host/eth0"]["limit"] == CONFIG["limit"]
        assert result["diff"]["after"]["host/eth0"] is None
        assert snapshot(host) == before[host]

    (results,) = ansible.play("rabbit", [task(LIMIT, state="absent")])

    for host, result in results.items():
        assert result["changed"] is True, result
        entry = result["interfaces"]["host"][IFACE]
        assert entry["action"] == "remove" and entry["config"] is None, entry
        assert our_filter(host) == []
        assert "rabbitguard" not in tc_filters(host)
        # Nothing under /sys/fs/bpf/rabbitguard (the host's own bpffs).
        assert pins(host) == []
        # (maps.debug and progs.debug are the kernel's own, in every bpffs.)
        left = set(run(host, ["ls", "-A", "/sys/fs/bpf"]).stdout.split())
        assert left <= {"maps.debug", "progs.debug"}, left
    assert "clsact" not in tc_qdiscs("rabbit1")  # ours: gone with us
    assert "clsact" in tc_qdiscs("rabbit2")  # theirs: kept, with their filter
    assert "pref 1 bpf" in tc_filters("rabbit2")
    assert "pref %d" % PREF not in tc_filters("rabbit2")
    for host in HOSTS:
        for family, library in (("ipv4", "pika"), ("ipv6", "amqp")):
            client = client_pool(library, fleet[host][family], "free-%s-%s" % (host, family))
            outcome = open_consumers(
                client, queues, 20, channels=[client.channel(), client.channel()]
            )
            assert outcome.count == 20 and outcome.error is None, (host, family, outcome)


def test_absent_again_changes_nothing(ansible, clean):
    before = dict((h, snapshot(h)) for h in HOSTS)

    (results,) = ansible.play("rabbit", [task(LIMIT, state="absent")])

    for host, result in results.items():
        assert result["failed"] is False and result["changed"] is False, result
        assert result["interfaces"] == {}
        assert snapshot(host) == before[host]
