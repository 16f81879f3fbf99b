# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The tc_limiter role's metrics writer without a host: its systemd service and timer pass
`systemd-analyze verify`, and the boot program's metrics mode runs without Ansible."""

import json
import os
import shutil
import subprocess
import sys

import jinja2
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROLE = os.path.join(REPO, "roles", "tc_limiter")
PYZ = "/usr/local/lib/rabbitguard/limiter/rabbitguard-reattach.pyz"


def _render(name, **values):
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    with open(os.path.join(ROLE, "templates", name + ".j2")) as handle:
        return env.from_string(handle.read()).render(ansible_managed="Ansible managed", **values)


def test_metrics_service_and_timer_are_valid_systemd_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    values = dict(
        _tc_limiter_pyz=PYZ,
        _tc_limiter_config_file="/etc/rabbitguard/limiter.json",
        _tc_limiter_unit_name="rabbitguard-limiter.service",
        _tc_limiter_metrics_service="rabbitguard-limiter-metrics.service",
        _tc_limiter_metrics_timer="rabbitguard-limiter-metrics.timer",
        _tc_limiter_metrics_file="/var/lib/prometheus/node-exporter/rabbitguard_limiter.prom",
        tc_limiter_metrics_dir="/var/lib/prometheus/node-exporter",
    )
    for name in ("rabbitguard-limiter-metrics.service", "rabbitguard-limiter-metrics.timer"):
        (tmp_path / name).write_text(_render(name, **values))
    service = (tmp_path / "rabbitguard-limiter-metrics.service").read_text()
    assert (
        "ExecStart=/usr/bin/python3 %s --metrics /var/lib/prometheus/node-exporter "
        "/etc/rabbitguard/limiter.json" % PYZ in service
    )
    timer = (tmp_path / "rabbitguard-limiter-metrics.timer").read_text()
    assert "OnUnitActiveSec=15s" in timer and "WantedBy=timers.target" in timer
    # the timer, and the service it starts (by name)
    for unit in ("rabbitguard-limiter-metrics.timer", "rabbitguard-limiter-metrics.service"):
        proc = subprocess.run(
            [analyze, "verify", "--man=no", str(tmp_path / unit)],
            capture_output=True,
            text=True,
            env=dict(os.environ, SYSTEMD_UNIT_PATH="%s:" % tmp_path),
            check=False,
        )
        assert proc.returncode == 0, (unit, proc.stderr)


def test_metrics_mode_runs_without_ansible_and_refuses_bad_overrides(tmp_path):
    pyz = str(tmp_path / "r.pyz")
    subprocess.run(
        [sys.executable, os.path.join(ROLE, "files", "make_reattach_pyz.py"), pyz, REPO],
        check=True,
        capture_output=True,
    )
    config = tmp_path / "limiter.json"
    config.write_text(json.dumps({"overrides": [{"source": "198.18.0.0/24", "limit": 9}]}))
    out = tmp_path / "textfile"
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", pyz, "--metrics", str(out), str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 and "bpffs" in proc.stderr:
        pytest.skip("no bpffs here: %s" % proc.stderr)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(out) == ["rabbitguard_limiter.prom"]
    config.write_text(json.dumps({"overrides": [{"source": "198.18.0.1/24", "limit": 9}]}))
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", pyz, "--metrics", str(out), str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "overrides[0]: source 198.18.0.1/24 has host bits set" in proc.stderr


def test_the_role_agrees_with_the_constants():
    import yaml

    from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C

    with open(os.path.join(ROLE, "defaults", "main.yml")) as handle:
        defaults = yaml.safe_load(handle)
    with open(os.path.join(ROLE, "vars", "main.yml")) as handle:
        internals = yaml.safe_load(handle)
    assert defaults["tc_limiter_metrics_dir"] == C.DEFAULT_METRICS_DIR
    assert internals["_tc_limiter_metrics_file"].endswith("/" + C.METRICS_FILE)
    assert defaults["tc_limiter_overrides"] == []
