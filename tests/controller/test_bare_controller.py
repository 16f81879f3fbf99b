# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A bare controller: ansible-core and nothing else, as a new user has it.

For each ansible-core release of the CI matrix (``ansible-core-versions.txt`` beside this
file; scripts/setup-host.sh makes ``.venv-ansible-<major.minor>`` with ansible-core from PyPI
and no system site packages), against a lab of two hosts of its own:

* from a fresh clone (a clean copy of the tracked tree: no ``.venv``, no ``.collections``,
  nothing scripts/setup-host.sh makes), with the README's Usage commands run from the clone's
  root: the deploy playbook, the status playbook, the ad hoc ``ansible rabbit -m
  rabbit_tc_limit -a state=absent`` (short name, with its action plugin) and the remove
  playbook;
* from a directory that is not the repository, with the collection built from that clone and
  installed as the README says (``ansible-galaxy collection install <tarball>``, into the
  user's default collections path) and used by FQCN: the playbooks by their path in the
  installed collection (a playbook FQCN with a hyphen, ``rabbitguard.limiter.deploy-limiter``,
  is not a valid FQCN), the module as ``rabbitguard.limiter.rabbit_tc_limit``.

Between the deploy and the status, a real AMQP client over the limit is refused. The
environment of every run is built from nothing (PATH with the bare venv first, a fresh HOME,
no ANSIBLE_* variable), so nothing of this machine's set-up can make the commands work.
"""

import os
import re
import shutil
import subprocess

import pytest

import lab
from tests.lib import clients

pytestmark = pytest.mark.integration

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))


def _matrix():
    with open(os.path.join(HERE, "ansible-core-versions.txt")) as handle:
        return [v.strip() for v in handle if v.strip() and not v.lstrip().startswith("#")]


VERSIONS = _matrix()
# A lab of its own, beside the developer's (rg/0), the integration suite's (rgi/240), the lab
# tests' (rgt/250) and Molecule's (rgm/230). The directories the role writes are private to
# each host, as on real hosts.
CFG = lab.Config(
    prefix="rgc",
    subnet=220,
    state_dir="/run/rabbitguard-lab-rgc",
    extra_private_dirs=(
        "/etc/rabbitguard",
        "/usr/local/lib/rabbitguard",
        "/etc/systemd/system",
        "/run/lock",
    ),
)
N_HOSTS = 2
QUEUE = "rgc-q"
LIMIT = 2
PIN_ROOT = "/sys/fs/bpf/rabbitguard"
STORED_CONFIG = "/etc/rabbitguard/limiter.json"
INSTALLED = os.path.join(".ansible", "collections", "ansible_collections", "rabbitguard", "limiter")


class _Log(list):
    def __call__(self, msg):
        self.append(msg)


# ---------------------------------------------------------------------------------------------
# Fixtures: the lab, a clean tree, a bare environment
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab_hosts():
    """{name: host dict} of this module's lab; down at the end, whatever happened."""
    log = _Log()
    try:
        lab.down(cfg=CFG, log=log)  # leftovers of an interrupted run
        hosts = lab.up(n=N_HOSTS, cfg=CFG, log=log)
        for host in hosts:
            clients.declare_queues(host["ipv4"], [QUEUE])
        yield {h["name"]: h for h in hosts}
    finally:
        lab.down(cfg=CFG, log=log)


@pytest.fixture(scope="module")
def inventory(lab_hosts, tmp_path_factory):
    path = tmp_path_factory.mktemp("rgc-inventory") / "hosts.yml"
    path.write_text(lab.render_inventory(CFG, N_HOSTS))
    return str(path)


def _tracked_files():
    """What a clone of this working tree gets: the tracked files, as they are in the working
    tree (so the tests see uncommitted changes; ``git archive HEAD`` would test the last commit
    instead), and new files not yet added, unless ignored. Ignored files (.venv*, .collections,
    caches, tests/output) are what a fresh clone does not have."""
    proc = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    )
    return sorted({p for p in proc.stdout.decode().split("\0") if p})


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory):
    """A copy of the tree as a fresh clone has it (symlinks kept as symlinks)."""
    root = str(tmp_path_factory.mktemp("rgc-clone") / "limiter")
    for rel in _tracked_files():
        src, dst = os.path.join(REPO_ROOT, rel), os.path.join(root, rel)
        if not os.path.lexists(src):  # deleted in the working tree, not yet in git
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    for absent in (".venv", ".collections", ".ansible"):
        assert not os.path.lexists(os.path.join(root, absent)), absent
    assert os.path.isfile(
        os.path.join(root, "collections/ansible_collections/rabbitguard/limiter/galaxy.yml")
    ), "the committed collections/ link is missing from the clean tree"
    return root


class Bare:
    """Runs ansible-core commands of one bare venv, in an environment made from nothing."""

    def __init__(self, version, home):
        self.version = version
        self.bin = os.path.join(REPO_ROOT, ".venv-ansible-%s" % version.rsplit(".", 1)[0], "bin")
        self.home = home
        os.makedirs(home, exist_ok=True)
        self.env = {
            "PATH": os.pathsep.join((self.bin, "/usr/local/bin", "/usr/bin", "/bin")),
            "HOME": home,
            "LANG": "C.UTF-8",
            "ANSIBLE_NOCOLOR": "1",  # output only: plain text to match on
        }

    def check_venv(self):
        """The venv has ansible-core of this version and nothing the project needs besides."""
        assert os.access(os.path.join(self.bin, "ansible"), os.X_OK), (
            "%s is missing: scripts/setup-host.sh makes it" % self.bin
        )
        with open(os.path.join(os.path.dirname(self.bin), "pyvenv.cfg")) as handle:
            assert "include-system-site-packages = false" in handle.read()
        proc = self.run(["python", "-m", "pip", "list", "--format=freeze"], cwd=self.home)
        installed = {line.split("==")[0].lower(): line for line in proc.stdout.split()}
        assert installed.get("ansible-core") == "ansible-core==%s" % self.version, installed
        # Not even BCC or pyroute2: the controller only sends the module.
        for name in ("bcc", "pyroute2", "pika", "molecule", "pytest"):
            assert name not in installed, installed

    def run(self, argv, cwd, check=True):
        if not os.path.isabs(argv[0]):
            argv = [os.path.join(self.bin, argv[0])] + list(argv[1:])
        proc = subprocess.run(
            argv, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=900
        )
        if check:
            assert proc.returncode == 0, "%s (ansible-core %s) exited %d:\n%s\n%s" % (
                " ".join(argv),
                self.version,
                proc.returncode,
                proc.stdout[-6000:],
                proc.stderr[-4000:],
            )
        return proc


# ---------------------------------------------------------------------------------------------
# What a user notices on the hosts
# ---------------------------------------------------------------------------------------------
def _host_run(name, argv):
    return lab.run(name, argv, cfg=CFG, check=False, timeout=60)


def _leftovers(name):
    """What the limiter has on a host: bpf filters on eth0 ingress, pins, stored config."""
    found = []
    filters = _host_run(name, ["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout
    found += ["filter: " + line for line in filters.splitlines() if " bpf " in line]
    pins = _host_run(name, ["find", PIN_ROOT, "-mindepth", "1"]).stdout.split()
    found += ["pin: " + pin for pin in pins]
    if _host_run(name, ["test", "-e", STORED_CONFIG]).returncode == 0:
        found.append("config: " + STORED_CONFIG)
    return found


def _attached(name):
    filters = _host_run(name, ["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout
    return [line for line in filters.splitlines() if " bpf " in line]


@pytest.fixture
def clean_hosts(lab_hosts, inventory):
    """The hosts start clean and are left clean (with the main venv's Ansible, should a test
    fail half-way), so the tests do not depend on each other's order."""
    assert not any(_leftovers(name) for name in lab_hosts), {n: _leftovers(n) for n in lab_hosts}
    yield
    if any(_leftovers(name) for name in lab_hosts):
        subprocess.run(
            [os.path.join(REPO_ROOT, ".venv", "bin", "ansible-playbook"), "-i", inventory]
            + [os.path.join(REPO_ROOT, "playbooks", "remove-limiter.yml")],
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=600,
            check=False,
        )


def _recap_ok(proc, hosts):
    for name in hosts:
        match = re.search(r"^%s\s*:.*$" % re.escape(name), proc.stdout, re.M)
        assert match, "no recap line for %s:\n%s" % (name, proc.stdout[-4000:])
        assert re.search(r"\bfailed=0\b", match.group(0)) and re.search(
            r"\bunreachable=0\b", match.group(0)
        ), match.group(0)


def _assert_limit_enforced(lab_hosts):
    """A client that opens LIMIT + 1 consumers on one connection gets LIMIT of them, and the
    next is refused on its channel only. Returns {host: the refused client's port}."""
    refused = {}
    for name, host in sorted(lab_hosts.items()):
        client = clients.connect("pika", host["ipv4"], name="rgc-%s" % name)
        try:
            outcome = clients.open_consumers(client, QUEUE, LIMIT + 1)
            alive = client.alive
            refused[name] = client.local_port
        finally:
            client.close(timeout=1)
        assert outcome.count == LIMIT, "%s: %r" % (name, outcome)
        assert isinstance(outcome.error, clients.ConsumeFailed), "%s: %r" % (name, outcome)
        # The role's default action, refuse: a channel error, and the connection stays open.
        assert outcome.error.kind == "channel", "%s: %r" % (name, outcome)
        assert alive, "%s: the connection did not survive the refusal" % name
    return refused


def _assert_status(proc, lab_hosts, refused):
    for name in lab_hosts:
        assert "rabbitguard limiter on %s: 1 interface(s)" % name in proc.stdout, proc.stdout
    # interface, namespace, attached, program, port, limit, action
    rows = re.findall(r"eth0 +\S+ +yes +\d+ +5672 +%d +refuse" % LIMIT, proc.stdout)
    assert len(rows) == len(lab_hosts), proc.stdout
    # The refusal log: the refused client, its channel, the consumers it held, the action.
    # (The table is a debug msg: without a YAML callback its lines are joined by "\n".)
    for name, port in refused.items():
        pattern = r"\dT[\d:.+]+ +\S+:%d +\d+ +%d +refuse\b" % (port, LIMIT)
        assert re.search(pattern, proc.stdout), (name, port, proc.stdout)


def _assert_absent_cleaned(proc, lab_hosts):
    for name in lab_hosts:
        assert re.search(r"^%s \| CHANGED" % re.escape(name), proc.stdout, re.M), proc.stdout
        assert not _attached(name), (name, _attached(name))
        pins = _host_run(name, ["find", PIN_ROOT, "-mindepth", "1"]).stdout.split()
        assert not pins, (name, pins)


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_fresh_clone_runs_the_usage_commands(
    version, clean_tree, inventory, lab_hosts, clean_hosts, tmp_path
):
    bare = Bare(version, str(tmp_path / "home"))
    bare.check_venv()
    hosts = sorted(lab_hosts)

    # The README's Usage commands, from the clone's root (its ansible.cfg), any inventory.
    proc = bare.run(
        ["ansible-playbook", "-i", inventory, "playbooks/deploy-limiter.yml"]
        + ["-e", "tc_limiter_limit=%d" % LIMIT],
        cwd=clean_tree,
    )
    _recap_ok(proc, hosts)
    assert all(_attached(name) for name in hosts)
    refused = _assert_limit_enforced(lab_hosts)

    proc = bare.run(
        ["ansible-playbook", "-i", inventory, "playbooks/limiter-status.yml"], clean_tree
    )
    _recap_ok(proc, hosts)
    _assert_status(proc, lab_hosts, refused)

    proc = bare.run(
        ["ansible", "rabbit", "-i", inventory, "-m", "rabbit_tc_limit", "-a", "state=absent"],
        clean_tree,
    )
    _assert_absent_cleaned(proc, lab_hosts)

    proc = bare.run(
        ["ansible-playbook", "-i", inventory, "playbooks/remove-limiter.yml"], clean_tree
    )
    _recap_ok(proc, hosts)
    for name in hosts:
        assert _leftovers(name) == [], name
    # Nothing was made in the clone but Ansible's own local state.
    assert not os.path.lexists(os.path.join(clean_tree, ".collections"))


@pytest.mark.parametrize("version", VERSIONS)
def test_installed_collection_runs_by_fqcn(
    version, clean_tree, inventory, lab_hosts, clean_hosts, tmp_path
):
    bare = Bare(version, str(tmp_path / "home"))
    bare.check_venv()
    hosts = sorted(lab_hosts)
    elsewhere = str(tmp_path / "elsewhere")  # no ansible.cfg, not the repository
    os.makedirs(elsewhere)

    # The README's "Installing" commands: build from the clone, install for the user.
    bare.run(
        ["ansible-galaxy", "collection", "build", "--output-path", elsewhere, clean_tree], elsewhere
    )
    tarballs = [f for f in os.listdir(elsewhere) if f.startswith("rabbitguard-limiter-")]
    assert len(tarballs) == 1, tarballs
    bare.run(["ansible-galaxy", "collection", "install", "--offline", tarballs[0]], elsewhere)
    installed = os.path.join(bare.home, INSTALLED)
    assert os.path.isfile(os.path.join(installed, "MANIFEST.json"))
    assert not os.path.islink(installed)

    proc = bare.run(["ansible-doc", "rabbitguard.limiter.rabbit_tc_limit"], elsewhere)
    assert installed in proc.stdout and "limit" in proc.stdout, proc.stdout[:2000]
    proc = bare.run(["ansible-doc", "-t", "role", "rabbitguard.limiter.tc_limiter"], elsewhere)
    assert "tc_limiter_limit" in proc.stdout, proc.stdout[:2000]

    playbooks = os.path.join(installed, "playbooks")
    proc = bare.run(
        ["ansible-playbook", "-i", inventory, os.path.join(playbooks, "deploy-limiter.yml")]
        + ["-e", "tc_limiter_limit=%d" % LIMIT],
        elsewhere,
    )
    _recap_ok(proc, hosts)
    refused = _assert_limit_enforced(lab_hosts)

    proc = bare.run(
        ["ansible-playbook", "-i", inventory, os.path.join(playbooks, "limiter-status.yml")],
        elsewhere,
    )
    _recap_ok(proc, hosts)
    _assert_status(proc, lab_hosts, refused)

    proc = bare.run(
        ["ansible", "rabbit", "-i", inventory, "-m", "rabbitguard.limiter.rabbit_tc_limit"]
        + ["-a", "state=absent"],
        elsewhere,
    )
    _assert_absent_cleaned(proc, lab_hosts)

    proc = bare.run(
        ["ansible-playbook", "-i", inventory, os.path.join(playbooks, "remove-limiter.yml")],
        elsewhere,
    )
    _recap_ok(proc, hosts)
    for name in hosts:
        assert _leftovers(name) == [], name
