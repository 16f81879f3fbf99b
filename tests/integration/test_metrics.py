# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Prometheus metrics against what real clients did, read with prometheus_client's text
parser: rabbit_tc_limit_info format=prometheus, and the boot program's metrics mode run on
the lab host as the role's timer runs it (no Ansible there)."""

import json
import os
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _layout
from tests.integration.common import CFG, deploy, info, run
from tests.lib.clients import open_consumers

pytestmark = pytest.mark.integration

HOST = "rabbit2"
LIMIT = 3
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAULTY = os.path.join(REPO, "scripts", "faulty_client.py")
P = "rabbitguard_limiter_"
ETH0 = {"namespace": "host", "interface": "eth0"}


def samples(text):
    """{sample name: (family type, labels, value)} of the eth0 entries; a series split by
    cause is named name{cause=...}, one entry per cause."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("interface") == "eth0":
                name = s.name
                if "cause" in s.labels:
                    name += "{cause=%s}" % s.labels["cause"]
                assert name not in out, s
                out[name] = (family.type, s.labels, s.value)
    return out


def scrape(ansible):
    result = info(ansible, HOST, format="prometheus", connections=False)
    assert result["limiters"][0]["connections"] == []  # the listing stays as asked
    print(result["prometheus"])  # shown with -s, or when the test fails
    return samples(result["prometheus"])


def test_metrics_count_what_real_clients_did(ansible, lab_hosts, queues, client_pool, tmp_path):
    target = lab_hosts[HOST]
    deploy(ansible, HOST, limit=LIMIT, action="reset")
    before = scrape(ansible)

    # One faulty client: LIMIT consumers, then its consume is refused (reset).
    proc = subprocess.run(
        [sys.executable, FAULTY, target["ipv4"], "--json", "--max=20"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(proc.stdout)["consumers"] == LIMIT
    # One well-behaved client holding exactly LIMIT consumers: at 100 % of its limit.
    held = client_pool("pika", target["ipv4"], "metrics-held")
    assert open_consumers(held, queues, LIMIT).count == LIMIT

    after = scrape(ansible)

    def delta(name):
        return after[P + name][2] - before[P + name][2]

    assert after[P + "info"] == (
        "info" if after[P + "info"][0] == "info" else "gauge",
        dict(ETH0, action="reset", port="5672", limit=str(LIMIT)),
        1.0,
    )
    assert delta("consumes_allowed_total") == 2 * LIMIT
    assert delta("consumes_refused_total") == 1
    assert delta("connections_tracked_total") >= 2
    assert after[P + "segments_total"][0] == "counter" and delta("segments_total") > 0
    assert after[P + "unparsed_total"][2] == 0
    # The missed frames by cause: one series per cause, adding up to missed_total.
    by_cause = {
        n: v for n, (_t, _l, v) in after.items() if n.startswith(P + "missed_frames_total{")
    }
    assert len(by_cause) == len(_layout.MISSED_CAUSES), sorted(by_cause)
    assert sum(by_cause.values()) == after[P + "missed_total"][2]
    for gauge in ("connections", "connections_near_limit", "consumers", "attached"):
        assert after[P + gauge][0] == "gauge" and after[P + gauge][1] == ETH0, gauge
    assert after[P + "attached"][2] == 1
    assert after[P + "connections_near_limit"][2] == 1  # the held one; the faulty one is gone
    assert after[P + "consumers"][2] == LIMIT
    assert after[P + "connections"][2] >= 1

    # The boot program's metrics mode, on the host, as the role's timer runs it.
    pyz = str(tmp_path / "rabbitguard-reattach.pyz")
    builder = os.path.join(REPO, "roles", "tc_limiter", "files", "make_reattach_pyz.py")
    subprocess.run([sys.executable, builder, pyz, REPO], check=True, capture_output=True)
    config = tmp_path / "limiter.json"
    config.write_text(json.dumps({"limit": LIMIT, "action": "reset"}))
    out_dir = "/tmp/rgi-metrics-%s" % CFG.prefix
    run(HOST, ["rm", "-rf", out_dir])
    proc = run(HOST, ["/usr/bin/python3", "-I", pyz, "--metrics", out_dir, str(config)])
    listing = run(HOST, ["ls", "-A", out_dir]).stdout.split()
    assert listing == ["rabbitguard_limiter.prom"]  # renamed into place, no temporary left
    written = samples(run(HOST, ["cat", out_dir + "/rabbitguard_limiter.prom"]).stdout)
    run(HOST, ["rm", "-rf", out_dir])
    assert set(written) == set(after), proc
    for name in ("consumes_allowed_total", "consumes_refused_total", "connections_near_limit"):
        assert written[P + name] == after[P + name], name
