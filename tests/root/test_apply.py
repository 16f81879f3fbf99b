"""_deploy.apply and the info module's reader against the running kernel: real tc, real
bpffs, real BCC, in a throwaway named network namespace with a veth pair and a pin root of
its own (/sys/fs/bpf/rgap-<id>), so it never meets a lab or another test.

The holes a careful operator found (issue 11), each shown closed: drift reported by info,
pin_dir checked for every state, absent on a namespace that is gone, the host lock and pin
directories that only root may hold, the attached program's maps checked against the pins,
filters that run before ours reported, and an explicit kernel_headers naming the default.
"""

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import (
    _compile,
    _deploy,
    _host,
    _names,
    _pins,
    _plan,
    _render,
    _tc,
)
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from ansible_collections.rabbitguard.limiter.plugins.module_utils._errors import LimiterError

from .sites import IFACE, only, sh

pytestmark = pytest.mark.bpf

NOBODY = 65534


def test_info_reports_a_filter_whose_pins_are_gone(site, template):
    created = only(_deploy.apply(site.params(), template))
    assert created.action == "create"
    subprocess.run(["rm", "-r", site.pin_root], check=True)  # or bpffs remounted

    (entry,) = site.info()

    assert entry["interface"] == IFACE and entry["namespace"] == site.ns_key
    assert entry["drift"] == _plan.PINS_GONE
    assert entry["attached"] is False and entry["program_id"] == created.program_id
    assert entry["counters"] is None
    # ...and the module repairs what info reported.
    assert only(_deploy.apply(site.params(), template)).reason == _plan.PINS_GONE


def test_absent_with_a_pin_dir_outside_bpffs_touches_nothing(site, template):
    _deploy.apply(site.params(), template)
    decoy_root = tempfile.mkdtemp(prefix="rgap-decoy-")
    try:
        decoy = os.path.join(_names.pin_dir(decoy_root, site.ns_key, IFACE), "conns")
        os.makedirs(os.path.dirname(decoy))
        open(decoy, "w").close()

        for params in (
            site.params(state="absent", pin_dir=decoy_root),
            site.params(state="absent", pin_dir=decoy_root, interfaces=None),
        ):
            with pytest.raises(_render.ConfigError, match="pin_dir must be a directory under"):
                _deploy.apply(params)

        assert os.path.exists(decoy)
        assert len(site.ours()) == 1  # the limiter still runs
    finally:
        shutil.rmtree(decoy_root)


def test_absent_on_a_namespace_that_is_gone_removes_its_pins(site, template):
    _deploy.apply(site.params(), template)
    assert _pins.pins_present(site.pin)
    sh("ip", "netns", "del", site.netns)

    removed = only(_deploy.apply(site.params(state="absent")))

    assert (removed.action, removed.reason) == ("remove", "the namespace is gone")
    assert not os.path.exists(site.pin) and not os.path.exists(site.pin_root)


def test_a_pin_directory_a_user_made_is_refused(site, template):
    os.mkdir(site.pin_root)
    os.chown(site.pin_root, NOBODY, -1)  # as if a local user had made it first
    with pytest.raises(LimiterError, match="belongs to uid %d, not root" % NOBODY):
        _deploy.apply(site.params(), template)
    assert site.filters() == [] and os.listdir(site.pin_root) == []

    os.chown(site.pin_root, 0, -1)
    os.chmod(site.pin_root, 0o777)
    with pytest.raises(LimiterError, match="writable by group or others"):
        _deploy.apply(site.params(), template)
    with pytest.raises(LimiterError, match="writable by group or others"):
        site.info()
    assert site.filters() == []


def test_a_program_that_does_not_use_the_pinned_maps_is_repaired(site, template):
    created = only(_deploy.apply(site.params(), template))
    # The pins are made again behind the attached program's back: same config, new maps.
    with _tc.open_netns(site.netns) as tc:
        source, desired = _deploy.desire(
            tc, site.pin_root, site.ns_key, IFACE, site.params(), template
        )
    _pins.unpin(site.pin, list(os.listdir(site.pin)))
    os.close(_compile.compile_isolated(source, site.pin))
    _pins.write_config(site.pin, desired["config"], desired["digest"], True)
    assert not _pins.program_uses_pins(site.pin, created.program_id)
    (entry,) = site.info()
    assert entry["drift"] == _plan.MAPS_DIFFER and entry["attached"] is False

    repaired = only(_deploy.apply(site.params(), template))

    assert (repaired.action, repaired.reason) == ("repair", _plan.MAPS_DIFFER)
    assert _pins.program_uses_pins(site.pin, repaired.program_id)
    assert only(_deploy.apply(site.params(), template)).action == "none"


def test_a_filter_before_ours_is_a_warning_and_default_headers_are_accepted(site, template):
    sh("ip", "netns", "exec", site.netns, "tc", "qdisc", "add", "dev", IFACE, "clsact")
    sh(
        *("ip", "netns", "exec", site.netns, "tc", "filter", "add", "dev", IFACE, "ingress"),
        *("pref", "1", "protocol", "all", "u32", "match", "u32", "0", "0", "classid", "1:1"),
    )
    headers = "/lib/modules/%s/build" % os.uname().release  # the default, named

    result = _deploy.apply(site.params(kernel_headers=headers), template)

    assert only(result).action == "create"
    assert len(result.warnings) == 1, result.warnings  # one filter, one warning
    (warning,) = result.warnings
    assert "a u32 filter at pref 1" in warning and "pref %d" % C.FILTER_PREF in warning
    (entry,) = site.info()
    assert entry["attached"] is True and entry["drift"] is None
    assert entry["warnings"] and "u32 filter at pref 1" in entry["warnings"][0]


@contextmanager
def scratch_dir():
    path = tempfile.mkdtemp(prefix="rgap-lock-")
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_the_host_lock_refuses_what_a_user_could_have_put_there():
    with scratch_dir() as d:
        lock = os.path.join(d, "limiter.lock")
        os.symlink("/etc/hostname", lock)
        with pytest.raises(LimiterError, match="is a symlink"), _host.host_lock(1, path=lock):
            pass
        os.unlink(lock)
        os.mkdir(lock)
        with pytest.raises(LimiterError, match="Is a directory"), _host.host_lock(1, path=lock):
            pass
        os.rmdir(lock)
        with _host.host_lock(1, path=lock):
            assert os.stat(lock).st_uid == 0
        os.chmod(d, 0o777)
        with (
            pytest.raises(LimiterError, match="writable by group or others"),
            _host.host_lock(1, path=lock),
        ):
            pass
        os.chmod(d, 0o700)
        os.chown(d, NOBODY, -1)
        with (
            pytest.raises(LimiterError, match="belongs to uid %d" % NOBODY),
            _host.host_lock(1, path=lock),
        ):
            pass


def test_a_user_cannot_take_the_host_lock():
    with _host.host_lock(1):
        pass
    assert oct(os.stat(C.LOCK_DIR).st_mode & 0o777) == "0o700"
    probe = (
        "import fcntl, sys\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        fcntl.flock(open(path, 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "    except OSError as e:\n"
        "        print(e.errno)\n"
        "    else:\n"
        "        print('taken')\n"
    )
    proc = subprocess.run(
        ["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups"]
        + ["/usr/bin/python3", "-c", probe, _host.LOCK_PATH, C.LOCK_DIR + "/other"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.split() == ["13", "13"]  # EACCES both: open nor create
