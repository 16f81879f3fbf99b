# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Test-suite wiring shared by every test under tests/.

* Imports: the repository root is on sys.path (``import tests.lib...``), and so is
  ``collections``, where ``ansible_collections/rabbitguard/limiter`` is a committed symlink to
  the repository: ``from ansible_collections.rabbitguard.limiter.plugins.module_utils import _x``.
* Markers: ``bpf`` (root + BCC + bpffs + kernel headers: loads real programs) and
  ``integration`` (root + a real RabbitMQ). Where a marked test cannot run here it is skipped
  with the reason; under CI it fails with that reason instead.
* Skips in CI: with CI set (CI=true), every skip, whatever its cause (skipif, importorskip,
  pytest.skip), is reported as a failure. A test skipped in CI is a test that did not run.
"""

import contextlib
import importlib
import os
import shutil
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIONS_DIR = os.path.join(REPO_ROOT, "collections")
COLLECTION_LINK = os.path.join(COLLECTIONS_DIR, "ansible_collections", "rabbitguard", "limiter")
BPFFS = "/sys/fs/bpf"


def in_ci():
    """True when the CI variable says so (CI=true, as `.ci/run` sets it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# ---------------------------------------------------------------------------------------------
# Import paths
# ---------------------------------------------------------------------------------------------
def _ensure_collection_link():
    """Check collections/ansible_collections/rabbitguard/limiter -> the repository root (committed;
    made here if a checkout lost it)."""
    if not os.path.islink(COLLECTION_LINK):
        os.makedirs(os.path.dirname(COLLECTION_LINK), exist_ok=True)
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            os.symlink(os.path.join("..", "..", ".."), COLLECTION_LINK)
    if not os.path.isfile(os.path.join(COLLECTION_LINK, "galaxy.yml")):
        raise pytest.UsageError(
            "%s does not lead to the repository root; git checkout %s"
            % (COLLECTION_LINK, COLLECTIONS_DIR)
        )


_ensure_collection_link()
for _path in (COLLECTIONS_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)
importlib.invalidate_caches()
# Ansible's own collection loader, where a test starts it, finds the collection here too.
os.environ.setdefault("ANSIBLE_COLLECTIONS_PATH", COLLECTIONS_DIR)


# ---------------------------------------------------------------------------------------------
# Markers and what they need
# ---------------------------------------------------------------------------------------------
MARKERS = {
    "bpf": "needs root, BCC (python3-bpfcc), bpffs at /sys/fs/bpf and kernel headers: "
    "compiles and loads real BPF programs",
    "integration": "needs root and a real RabbitMQ (rabbitmq-server): starts brokers in "
    "network namespaces and drives them with AMQP clients",
}


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", "%s: %s" % (name, text))
    _load_hypothesis_profile()


def _load_hypothesis_profile():
    """No per-example deadline (BPF test runs and a loaded 2-core CI machine vary)."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:
        return
    settings.register_profile(
        "rabbitguard", deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile(
        "rabbitguard-ci",
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )
    settings.load_profile(
        os.environ.get("HYPOTHESIS_PROFILE") or ("rabbitguard-ci" if in_ci() else "rabbitguard")
    )


def _is_root():
    return os.geteuid() == 0


def _missing_root():
    return None if _is_root() else "not running as root (use sudo)"


def _missing_bcc():
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        return (
            "BCC is not importable by %s (%s): apt-get install python3-bpfcc, and run tests "
            "with .venv/bin/python (made by scripts/setup-host.sh)" % (sys.executable, exc)
        )
    return None


def _missing_bpffs():
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[1] == BPFFS and fields[2] == "bpf":
                return None
    return "bpffs is not mounted at %s (mount -t bpf bpf %s)" % (BPFFS, BPFFS)


def _missing_headers():
    build = "/lib/modules/%s/build" % os.uname().release
    if os.path.isdir(os.path.join(build, "include")):
        return None
    return "no kernel headers at %s (run scripts/setup-host.sh)" % build


def _missing_rabbitmq():
    path = os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/usr/lib/rabbitmq/bin"))
    for tool in ("rabbitmq-server", "rabbitmqctl"):
        if not shutil.which(tool, path=path):
            return "%s not found (apt-get install rabbitmq-server)" % tool
    return None


REQUIREMENTS = {
    "bpf": (_missing_root, _missing_bcc, _missing_bpffs, _missing_headers),
    "integration": (_missing_root, _missing_rabbitmq),
}
_checked = {}


def _missing_for(marker):
    """The reasons the environment cannot run tests with this marker (checked once)."""
    if marker not in _checked:
        _checked[marker] = [r for r in (check() for check in REQUIREMENTS[marker]) if r]
    return _checked[marker]


def pytest_runtest_setup(item):
    for marker in REQUIREMENTS:
        if item.get_closest_marker(marker) is None:
            continue
        reasons = _missing_for(marker)
        if not reasons:
            continue
        text = "%s test cannot run here: %s" % (marker, "; ".join(reasons))
        if in_ci():
            pytest.fail("CI=true: " + text, pytrace=False)
        pytest.skip(text)


def pytest_report_header(config):
    lines = ["rabbitguard: CI=%s; a skipped test is a failure in CI" % in_ci()]
    for marker in sorted(REQUIREMENTS):
        reasons = _missing_for(marker)
        lines.append(
            "rabbitguard: %s tests %s"
            % (marker, "can run" if not reasons else "cannot run: " + "; ".join(reasons))
        )
    return lines


# ---------------------------------------------------------------------------------------------
# A skip in CI is a failure
# ---------------------------------------------------------------------------------------------
def _skip_reason(report):
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (
            "CI=true: skipped, so not run: %s\n(a test skipped in CI is a failure: make the "
            "machine able to run it, in scripts/setup-host.sh or .ci/run)" % _skip_reason(report)
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped:
        # e.g. a module-level pytest.importorskip("bcc"): the whole module would not run.
        report.outcome = "failed"
        report.longrepr = "CI=true: module skipped at collection, so not run: %s" % _skip_reason(
            report
        )
