# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The tc_limiter role's pieces that need no host: its variable declarations, the boot
unit's program (built by files/make_reattach_pyz.py) and the stored-config loader.

The role itself runs against real SSH hosts in extensions/molecule/default.
"""

import json
import os
import subprocess
import sys
import zipfile

import pytest
import yaml

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _reattach
from ansible_collections.rabbitguard.limiter.plugins.module_utils._errors import LimiterError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROLE = os.path.join(REPO, "roles", "tc_limiter")
BUILDER = os.path.join(ROLE, "files", "make_reattach_pyz.py")


def _yaml(*parts):
    with open(os.path.join(ROLE, *parts)) as handle:
        return yaml.safe_load(handle)


def test_every_variable_is_declared_defaulted_and_prefixed():
    specs = _yaml("meta", "argument_specs.yml")["argument_specs"]
    defaults = _yaml("defaults", "main.yml")
    declared = {}
    for entry in specs.values():
        for name, option in entry["options"].items():
            assert name.startswith("tc_limiter_"), name
            assert option.get("type") and option.get("description"), name
            declared[name] = option["default"]
    assert sorted(declared) == sorted(defaults)
    for name, default in declared.items():
        assert defaults[name] == default, name


def test_internal_variables_start_with_an_underscore():
    for name in _yaml("vars", "main.yml"):
        assert name.startswith("_tc_limiter_"), name


def _build(tmp_path, name):
    out = str(tmp_path / name)
    subprocess.run([sys.executable, BUILDER, out, REPO], check=True, capture_output=True)
    return out


def test_boot_program_is_reproducible_and_holds_no_ansible_code(tmp_path):
    first, second = _build(tmp_path, "a.pyz"), _build(tmp_path, "b.pyz")
    with open(first, "rb") as a, open(second, "rb") as b:
        assert a.read() == b.read()  # an unchanged collection copies nothing
    names = zipfile.ZipFile(first).namelist()
    assert "__main__.py" in names
    assert "rabbitguard_limiter/rabbit_limiter.c.j2" in names
    assert "rabbitguard_limiter/_reattach.py" in names
    assert "rabbitguard_limiter/_runner.py" not in names  # the one that imports Ansible


def test_boot_program_runs_without_ansible_and_reports_a_bad_config(tmp_path):
    pyz = _build(tmp_path, "r.pyz")
    config = tmp_path / "limiter.json"
    config.write_text(json.dumps({"limit": 5, "colour": "red"}))
    # -I: isolated, no site-packages of the venv (so no Ansible).
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", pyz, str(config)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1
    assert "unknown keys colour" in proc.stderr


def test_load_config_fills_in_the_module_defaults(tmp_path):
    path = tmp_path / "limiter.json"
    path.write_text(
        json.dumps(
            {
                "limit": 5,
                "action": "reset",
                "interfaces": None,
                "netns": None,
                "kernel_headers": None,
            }
        )
    )
    params = _reattach.load_config(str(path))
    assert params["limit"] == 5 and params["action"] == "reset"
    assert params["port"] == 5672 and params["interfaces"] is None
    assert params["pin_dir"] == "/sys/fs/bpf/rabbitguard"


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"limit": "ten"}), "limit must be an integer"),
        (json.dumps({"action": "explode"}), "action must be one of"),
        (json.dumps({"interfaces": "eth0"}), "interfaces must be a list"),
    ],
)
def test_load_config_refuses_bad_content(tmp_path, content, message):
    path = tmp_path / "limiter.json"
    path.write_text(content)
    with pytest.raises(LimiterError, match=message):
        _reattach.load_config(str(path))


def test_boot_unit_is_a_valid_systemd_unit(tmp_path):
    """The rendered boot unit passes `systemd-analyze verify` (no mount unit for bpffs:
    systemd mounts that API file system itself and refuses units for it)."""
    import shutil

    import jinja2

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["int"] = int
    with open(os.path.join(ROLE, "templates", "rabbitguard-limiter.service.j2")) as handle:
        text = env.from_string(handle.read()).render(
            ansible_managed="Ansible managed",
            tc_limiter_boot_wait=120,
            _tc_limiter_config_file="/etc/rabbitguard/limiter.json",
            _tc_limiter_pyz="/usr/local/lib/rabbitguard/limiter/rabbitguard-reattach.pyz",
        )
    unit = tmp_path / "rabbitguard-limiter.service"
    unit.write_text(text)
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        env=dict(os.environ, SYSTEMD_UNIT_PATH="%s:" % tmp_path),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ExecStart=/usr/bin/python3 /usr/local/lib/rabbitguard/limiter/" in text


SURVEY = os.path.join(ROLE, "files", "survey.py")


def _survey(request):
    """Run survey.py the way the role does: /usr/bin/python3 -c SOURCE REQUEST."""
    with open(SURVEY, encoding="utf-8") as handle:
        source = handle.read()
    out = subprocess.run(
        ["/usr/bin/python3", "-c", source, json.dumps(request)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def _sha1(text):
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()


@pytest.mark.skipif(os.geteuid() != 0, reason="files owned by root:root are the spec")
def test_survey_names_exactly_the_boot_files_that_differ(tmp_path):
    good = tmp_path / "good.json"
    good.write_text("{}\n")
    good.chmod(0o644)
    stale = tmp_path / "stale.json"
    stale.write_text('{"limit": 1}\n')
    stale.chmod(0o644)
    loose = tmp_path / "loose.json"
    loose.write_text("{}\n")
    loose.chmod(0o666)
    (tmp_path / "dir").mkdir(mode=0o755)
    os.chmod(tmp_path / "dir", 0o755)
    (tmp_path / "link").symlink_to(good)
    (tmp_path / "wrong-link").symlink_to(stale)
    (tmp_path / "left").write_text("x")
    want_file = {"type": "file", "mode": "0644", "sha1": _sha1("{}\n")}
    paths = {
        str(good): want_file,
        str(stale): want_file,
        str(loose): want_file,
        str(tmp_path / "missing.json"): want_file,
        str(tmp_path / "dir"): {"type": "directory", "mode": "0755"},
        str(tmp_path / "missing-dir"): {"type": "directory", "mode": "0755"},
        str(good) + "-as-dir": {"type": "directory", "mode": "0755"},
        str(tmp_path / "link"): {"type": "link", "src": str(good)},
        str(tmp_path / "wrong-link"): {"type": "link", "src": str(good)},
        str(tmp_path / "left"): {"type": "absent"},
        str(tmp_path / "gone"): {"type": "absent"},
    }
    differ = _survey({"paths": paths})["differ"]
    assert differ == [
        str(stale),
        str(loose),
        str(tmp_path / "missing.json"),
        str(tmp_path / "missing-dir"),
        str(good) + "-as-dir",
        str(tmp_path / "wrong-link"),
        str(tmp_path / "left"),
    ]


def test_survey_reads_the_facts_the_role_uses_and_the_build_tree_release(tmp_path):
    tree = tmp_path / "build"
    (tree / "include" / "generated").mkdir(parents=True)
    (tree / "include" / "generated" / "utsrelease.h").write_text(
        '#define UTS_RELEASE "6.1.0-99-amd64"\n'
    )
    answer = _survey({"headers": str(tree)})
    assert answer["kernel"] == os.uname().release
    assert answer["os_family"] == "Debian"  # the machines this runs on (Debian 12)
    assert answer["headers"] is True
    assert answer["headers_release"] == "6.1.0-99-amd64"
    # No include/: no build tree, whatever else is there.
    assert _survey({"headers": str(tmp_path)})["headers"] is False
    # The play's facts win over the survey's own reading.
    assert _survey({"os_family": "RedHat"})["os_family"] == "RedHat"


def test_survey_lists_the_packages_that_dpkg_does_not_have_installed():
    names = ["dpkg", "python3-bpfcc", "rabbitguard-no-such-package"]
    answer = _survey(
        {"packages_by_family": {"Debian": names}, "manager_by_family": {"Debian": "dpkg"}}
    )
    assert answer["missing_packages"] == ["rabbitguard-no-such-package"]
    # Another family's list is not this host's business.
    answer = _survey(
        {"os_family": "Debian", "packages_by_family": {"RedHat": ["bcc"]}, "manager_by_family": {}}
    )
    assert answer["missing_packages"] == []


def test_survey_tells_a_bpffs_that_others_can_write_to():
    bpffs = _survey({})["bpffs"]
    assert bpffs["mounted"] is (
        subprocess.run(["findmnt", "-n", "-t", "bpf", "/sys/fs/bpf"], check=False).returncode == 0
    )
    if bpffs["mounted"]:
        mode = os.stat("/sys/fs/bpf").st_mode & 0o7777
        assert bpffs["mode"] == "%04o" % mode
        assert bpffs["writable_by_others"] is bool(mode & 0o022)


def test_deploy_and_remove_roll_out_to_a_canary_first_and_stop_at_the_first_failure():
    for name in ("deploy-limiter.yml", "remove-limiter.yml"):
        with open(os.path.join(REPO, "playbooks", name)) as handle:
            (play,) = yaml.safe_load(handle)
        assert play["serial"] == "{{ rabbitguard_limiter_serial | default([1, '100%']) }}", name
        assert play["max_fail_percentage"] == (
            "{{ rabbitguard_limiter_max_fail_percentage | default(0) }}"
        ), name
        assert play["gather_facts"] is False, name


INSTALLER = os.path.join(ROLE, "files", "install_files.py")


def _install(request):
    """Run install_files.py the way the role does: the request on stdin."""
    with open(INSTALLER, encoding="utf-8") as handle:
        source = handle.read()
    return subprocess.run(
        ["/usr/bin/python3", "-c", source],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        check=False,
    )


def _entry(path, data, mode="0644"):
    import base64
    import hashlib

    return {
        "path": str(path),
        "mode": mode,
        "sha1": hashlib.sha1(data).hexdigest(),
        "content_b64": base64.b64encode(data).decode(),
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="writes files owned by root:root")
def test_installer_writes_what_differs_and_nothing_in_check_mode(tmp_path):
    prog, unit = tmp_path / "prog.pyz", tmp_path / "unit.service"
    unit.write_bytes(b"[Unit]\n")
    unit.chmod(0o644)
    files = [_entry(prog, b"PK\x03\x04 program", "0755"), _entry(unit, b"[Unit]\n")]
    check = _install({"check": True, "files": files})
    assert json.loads(check.stdout) == {"changed": [str(prog)]}
    assert not prog.exists()
    done = _install({"check": False, "files": files})
    assert json.loads(done.stdout) == {"changed": [str(prog)]}
    assert prog.read_bytes() == b"PK\x03\x04 program"
    assert (os.stat(prog).st_mode & 0o7777, os.stat(prog).st_uid) == (0o755, 0)
    assert json.loads(_install({"check": False, "files": files}).stdout) == {"changed": []}
    # A mode that drifted is put back, the content alone.
    os.chmod(prog, 0o777)
    assert json.loads(_install({"check": False, "files": files}).stdout) == {"changed": [str(prog)]}
    assert os.stat(prog).st_mode & 0o7777 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prog.pyz", "unit.service"]


def test_installer_refuses_content_that_does_not_match_its_checksum(tmp_path):
    entry = _entry(tmp_path / "x", b"right")
    entry["sha1"] = "0" * 40
    proc = _install({"check": False, "files": [entry]})
    assert proc.returncode != 0 and "does not match its SHA-1" in proc.stderr
    assert not (tmp_path / "x").exists()
