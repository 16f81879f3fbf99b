# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Per-source limits on a real broker: rabbit_tc_limit's `overrides` through Ansible.

Clients in the root namespace reach the lab hosts from the lab bridge's addresses; clients
run inside rabbit2's namespace come from rabbit2's. An override for the bridge's address
(IPv4 /32, IPv6 /128) gives the root namespace's clients their own limit while rabbit2's
keep the default: the same program (same id), no compile, rewritten map.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.integration.common import (
    CFG,
    PIN_ROOT,
    delete_our_filter,
    deploy,
    eth0,
    forget,
    info,
    limiter_entry,
    run,
    snapshot,
)
from tests.lib.clients import open_consumers

pytestmark = pytest.mark.integration

HOST, OTHER = "rabbit1", "rabbit2"
DEFAULT = 2
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAULTY = os.path.join(REPO, "scripts", "faulty_client.py")


def overrides_for_the_bridge(v4_limit, v6_limit):
    return [
        {"source": "%s/32" % CFG.gateway4, "limit": v4_limit},
        {"source": "%s/128" % CFG.gateway6, "limit": v6_limit},
    ]


def consumers_from_root(addr):
    """A real client (pika, scripts/faulty_client.py) from the root namespace: how many
    consumers it got before its consume was refused (reset)."""
    proc = subprocess.run(
        [sys.executable, FAULTY, addr, "--json", "--max=20"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    result = json.loads(proc.stdout)
    assert "reset" in result["stopped_by"].lower(), result
    return result["consumers"]


def consumers_from(host, addr):
    """The same client run inside another lab host's namespace (its own source address)."""
    proc = run(host, [sys.executable, FAULTY, addr, "--json", "--max=20"], check=False)
    result = json.loads(proc.stdout)
    assert "reset" in result["stopped_by"].lower(), result
    return result["consumers"]


def test_an_overrides_change_is_a_map_update_with_the_same_program(
    ansible, lab_hosts, queues, client_pool
):
    target = lab_hosts[HOST]
    first = deploy(ansible, HOST, limit=DEFAULT, action="reset")
    program = eth0(first)["program_id"]
    assert eth0(first)["config"]["overrides"] == []

    wanted = overrides_for_the_bridge(4, 5)
    predicted = ansible.run(
        HOST,
        "rabbitguard.limiter.rabbit_tc_limit",
        check=True,
        diff=True,
        limit=DEFAULT,
        action="reset",
        overrides=wanted,
    )
    assert predicted["changed"] is True and eth0(predicted)["action"] == "update"
    assert limiter_entry(info(ansible, HOST))["config"]["overrides"] == []  # nothing written

    before = snapshot(target["name"])
    done = deploy(ansible, HOST, diff=True, limit=DEFAULT, action="reset", overrides=wanted)
    assert done["changed"] is True
    assert eth0(done)["action"] == "update" and eth0(done)["compiled"] is False
    assert eth0(done)["program_id"] == program
    assert done["diff"]["before"]["host/eth0"]["overrides"] == []
    assert done["diff"]["after"]["host/eth0"]["overrides"] == wanted
    after = snapshot(target["name"])
    assert after["filters"] == before["filters"]  # the same filter, the same program id
    entry = limiter_entry(info(ansible, HOST))
    assert entry["program_id"] == program and entry["attached"] is True
    assert entry["config"]["overrides"] == wanted

    # From the overridden source (the bridge): the override's limit, over IPv4 and IPv6.
    assert consumers_from_root(target["ipv4"]) == 4
    assert consumers_from_root(target["ipv6"]) == 5
    # From another source (rabbit2's addresses): the default.
    assert consumers_from(OTHER, target["ipv4"]) == DEFAULT
    assert consumers_from(OTHER, target["ipv6"]) == DEFAULT

    # A held connection shows its effective limit in the info module.
    held = client_pool("pika", target["ipv4"], "overrides-held")
    assert open_consumers(held, queues, 3).count == 3
    conns = limiter_entry(info(ansible, HOST))["connections"]
    (mine,) = [c for c in conns if c["client_port"] == held.local_port]
    assert mine["limit"] == 4 and mine["consumers"] == 3

    # The live connection gets a changed override at its next consume.
    deploy(ansible, HOST, limit=DEFAULT, action="reset", overrides=overrides_for_the_bridge(3, 5))
    outcome = open_consumers(held, queues, 1, timeout=5)
    assert outcome.count == 0 and outcome.error is not None, outcome

    again = deploy(
        ansible, HOST, limit=DEFAULT, action="reset", overrides=overrides_for_the_bridge(3, 5)
    )
    assert again["changed"] is False
    cleared = deploy(ansible, HOST, limit=DEFAULT, action="reset")
    assert eth0(cleared)["action"] == "update" and eth0(cleared)["program_id"] == program
    assert consumers_from_root(target["ipv4"]) == DEFAULT


@pytest.mark.parametrize(
    "bad, words",
    [
        (
            [{"source": "198.18.0.1/24", "limit": 3}],
            "overrides[0]: source 198.18.0.1/24 has host bits",
        ),
        ([{"source": "not-a-net", "limit": 3}], "overrides[0]: source 'not-a-net' is not a CIDR"),
        ([{"source": "198.18.0.0/24", "limit": 70000}], "overrides[0]: limit must be an integer"),
        ([{"source": "198.18.0.0/24"}], "limit found in overrides"),
        ([{"source": "198.18.0.0/24", "limit": 1, "colour": 1}], "overrides.colour"),
        ("198.18.0.0/24", "overrides must be a list of {source: CIDR, limit: N}, got str"),
        (["198.18.0.0/24"], "overrides[0] must be a dict {source: CIDR, limit: N}"),
    ],
)
def test_bad_overrides_fail_naming_the_option_and_change_nothing(ansible, lab_hosts, bad, words):
    deploy(ansible, HOST, limit=DEFAULT, action="reset", overrides=overrides_for_the_bridge(4, 5))
    before = snapshot(HOST)
    overrides_before = limiter_entry(info(ansible, HOST))["config"]["overrides"]
    result = ansible.run(
        HOST, "rabbitguard.limiter.rabbit_tc_limit", limit=DEFAULT, action="reset", overrides=bad
    )
    assert result.get("failed"), result
    assert words in result["msg"] and "\n" not in result["msg"].strip(), result["msg"]
    assert snapshot(HOST) == before
    assert limiter_entry(info(ansible, HOST))["config"]["overrides"] == overrides_before
    forget(HOST)


def test_the_boot_program_restores_the_overrides(ansible, lab_hosts, tmp_path):
    """A reboot (filter and pins gone), then the boot program with the stored configuration
    the role writes: the overrides are back, and clients from the source get them."""
    target = lab_hosts[HOST]
    wanted = overrides_for_the_bridge(4, 5)
    deploy(ansible, HOST, limit=DEFAULT, action="reset", overrides=wanted)
    pyz = str(tmp_path / "rabbitguard-reattach.pyz")
    builder = os.path.join(REPO, "roles", "tc_limiter", "files", "make_reattach_pyz.py")
    subprocess.run([sys.executable, builder, pyz, REPO], check=True, capture_output=True)
    config = tmp_path / "limiter.json"
    config.write_text(
        json.dumps(
            {"limit": DEFAULT, "action": "reset", "overrides": wanted, "interfaces": ["eth0"]}
        )
    )
    delete_our_filter(HOST)
    run(HOST, ["rm", "-rf", PIN_ROOT])
    forget(HOST)
    assert "rabbitguard" not in snapshot(HOST)["filters"]

    proc = run(HOST, ["/usr/bin/python3", "-I", pyz, str(config)])
    assert "create" in proc.stdout, proc.stdout

    entry = limiter_entry(info(ansible, HOST))
    assert entry["attached"] is True and entry["config"]["overrides"] == wanted
    assert consumers_from_root(target["ipv4"]) == 4
    assert consumers_from_root(target["ipv6"]) == 5
    again = ansible.run(
        HOST, "rabbitguard.limiter.rabbit_tc_limit", limit=DEFAULT, action="reset", overrides=wanted
    )
    assert again["changed"] is False, again
