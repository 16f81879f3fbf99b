"""_metrics: rabbit_tc_limit_info's entries -> Prometheus text, read back with
prometheus_client's own text parser (no root)."""

import json
import os
import stat

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _layout, _metrics

COUNTER_FIELDS = [name for name, _t in _layout.Counters._fields_ if name != "missed_by_cause"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(REPO, "files", "grafana", "rabbitguard-limiter.json")


def conn(client, consumers, limit):
    return {"client": client, "client_port": 40000, "consumers": consumers, "limit": limit}


def entry(ns="host", ifname="eth0", limit=10, conns=(), attached=True, **counters):
    return {
        "namespace": ns,
        "interface": ifname,
        "config": {
            "port": 5672,
            "limit": limit,
            "action": "reset",
            "frame_max": 131072,
            "l2": "ethernet",
            "overrides": [{"source": "198.18.0.0/24", "limit": 50}],
        },
        "attached": attached,
        "counters": dict(
            dict.fromkeys(COUNTER_FIELDS, 0),
            missed_by_cause=dict.fromkeys(_layout.MISSED_CAUSES, 0),
            **counters,
        ),
        "connections": list(conns),
        "connection_count": len(conns),
    }


def parse(text):
    """{family name: (type, {(sample name, labels tuple): value})}"""
    out = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = (
            family.type,
            {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples},
        )
    return out


HOST = (("interface", "eth0"), ("namespace", "host"))


def test_names_types_and_values():
    text = _metrics.render(
        [
            entry(
                conns=[conn("198.18.0.2", 8, 10), conn("198.18.0.3", 7, 10), conn("::1", 0, 0)],
                segments=120,
                consumes_allowed=15,
                consumes_refused=3,
                conns_tracked=4,
            )
        ]
    )
    metrics = parse(text)
    p = "rabbitguard_limiter_"
    # prometheus_client names a counter family without its _total; the samples keep it
    assert metrics[p + "segments"] == ("counter", {(p + "segments_total", HOST): 120.0})
    assert metrics[p + "consumes_allowed"][1] == {(p + "consumes_allowed_total", HOST): 15.0}
    assert metrics[p + "consumes_refused"][1] == {(p + "consumes_refused_total", HOST): 3.0}
    assert metrics[p + "connections_tracked"][1] == {(p + "connections_tracked_total", HOST): 4.0}
    for gauge, value in (
        ("connections", 3),
        ("connections_near_limit", 1),  # 8 of 10 is 80 %; 7 of 10 is not; 0 consumers never
        ("consumers", 15),
        ("attached", 1),
        ("overrides", 1),
    ):
        assert metrics[p + gauge] == ("gauge", {(p + gauge, HOST): float(value)}), gauge
    info = metrics[p + "info"]
    assert info[0] == "info" or info[0] == "gauge"
    ((name, labels), value), *_rest = info[1].items()
    assert dict(labels) == {
        "interface": "eth0",
        "namespace": "host",
        "action": "reset",
        "port": "5672",
        "limit": "10",
    }
    assert value == 1.0
    assert "# TYPE rabbitguard_limiter_segments_total counter" in text


def test_every_data_plane_counter_is_exported_with_total():
    names = {
        s.name
        for f in text_string_to_metric_families(_metrics.render([entry()]))
        for s in f.samples
    }
    for field in COUNTER_FIELDS:
        metric = _metrics.COUNTERS.get(field, (field + "_total",))[0]
        assert "rabbitguard_limiter_" + metric in names
    required = [
        "segments_total",
        "consumes_allowed_total",
        "consumes_refused_total",
        "cancels_total",
        "channel_closes_total",
        "connections_tracked_total",
        "connections_forgotten_total",
        "resyncs_total",
        "unparsed_total",
    ]
    for metric in required:
        assert "rabbitguard_limiter_" + metric in names


def test_a_counter_added_later_is_exported_too():
    e = entry()
    e["counters"]["held"] = 9
    metrics = parse(_metrics.render([e]))
    assert metrics["rabbitguard_limiter_held"] == (
        "counter",
        {("rabbitguard_limiter_held_total", HOST): 9.0},
    )


def test_labels_are_namespace_interface_and_a_fixed_cause_only_and_escaped():
    odd = entry(ns="netns-a", ifname='we"ird\\if', conns=[conn("198.18.0.2", 1, 1)])
    text = _metrics.render([entry(), odd])
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            keys = set(sample.labels)
            if family.name == "rabbitguard_limiter_info":
                assert keys == {"interface", "namespace", "action", "port", "limit"}
            elif family.name == "rabbitguard_limiter_missed_frames":
                # A fixed set of causes, never anything per connection.
                assert keys == {"interface", "namespace", "cause"}, sample
                assert sample.labels["cause"] in _layout.MISSED_CAUSES
            else:
                assert keys == {"interface", "namespace"}, sample
    metrics = parse(text)
    weird = (("interface", 'we"ird\\if'), ("namespace", "netns-a"))
    assert (
        metrics["rabbitguard_limiter_connections_near_limit"][1][
            ("rabbitguard_limiter_connections_near_limit", weird)
        ]
        == 1.0
    )


def test_an_interface_with_nothing_pinned_shows_only_that_it_is_not_attached():
    gone = {
        "namespace": "host",
        "interface": "eth1",
        "config": None,
        "attached": False,
        "counters": None,
        "connections": [],
    }
    metrics = parse(_metrics.render([gone]))
    assert set(metrics) == {"rabbitguard_limiter_attached"}
    assert _metrics.render([]) == ""


@pytest.mark.parametrize(
    "consumers, limit, near",
    [(8, 10, True), (7, 10, False), (0, 0, False), (1, 0, True), (4, 5, True), (400, 500, True)],
)
def test_near_limit_is_eighty_percent_with_one_consumer_at_least(consumers, limit, near):
    assert _metrics.near_limit(consumers, limit) is near


def test_write_replaces_the_file_atomically(tmp_path):
    path = _metrics.write(str(tmp_path), "a 1\n")
    assert path == str(tmp_path / "rabbitguard_limiter.prom")
    _metrics.write(str(tmp_path), "a 2\n")
    with open(path) as handle:
        assert handle.read() == "a 2\n"
    assert os.listdir(tmp_path) == ["rabbitguard_limiter.prom"]  # no temporary file left
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_the_grafana_dashboard_queries_metrics_that_exist():
    with open(DASHBOARD) as handle:
        dashboard = json.load(handle)
    text = _metrics.render([entry(conns=[conn("198.18.0.2", 9, 10)])])
    emitted = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    titles, used = [], set()
    for panel in dashboard["panels"]:
        titles.append(panel["title"].lower())
        for target in panel.get("targets", []):
            used |= {w for w in _words(target["expr"]) if w.startswith("rabbitguard_limiter_")}
    assert used and used <= emitted, used - emitted
    for needed in ("consumes_refused_total", "consumes_allowed_total", "connections_near_limit"):
        assert "rabbitguard_limiter_" + needed in used
    assert any("refus" in t for t in titles) and any("near" in t for t in titles)
    assert "instance" in json.dumps(dashboard)  # per host


def _words(expr):
    import re

    return re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)


def test_missed_frames_by_cause_is_one_labelled_series_per_cause():
    """The split of missed: a user sees which cause counted, and the series sum to missed."""
    e = entry(missed=5)
    e["counters"]["missed_by_cause"].update(adrift=3, egress_frame_bound=2)
    metrics = parse(_metrics.render([e]))
    kind, samples = metrics["rabbitguard_limiter_missed_frames"]
    assert kind == "counter"
    by_cause = {dict(labels)["cause"]: value for (_name, labels), value in samples.items()}
    assert set(by_cause) == set(_layout.MISSED_CAUSES)
    assert by_cause["adrift"] == 3 and by_cause["egress_frame_bound"] == 2
    assert sum(by_cause.values()) == 5
    total = metrics["rabbitguard_limiter_missed"][1]
    assert total == {("rabbitguard_limiter_missed_total", HOST): 5}
    assert "rabbitguard_limiter_missed_by_cause" not in metrics
