"""rabbit_tc_limit run by Ansible on this machine (-c local) when a prerequisite is missing:
one clear line naming the fix, and nothing changed. Also the respawn into the system Python.

Each case runs against a throwaway namespace (rgpre, 198.18.253.0/24) with its own pin
root, so it never meets a lab or another test.
"""

import os
import shutil
import subprocess
import tempfile
import venv

import pytest

from .local import ansible, make_namespace, remove_namespace

pytestmark = pytest.mark.bpf

NETNS = "rgpre"
HOST_END = "rgpre0"
PIN_DIR = "/sys/fs/bpf/rgpre"


def limiter_args(extra=""):
    return "netns=%s interfaces=eth0 pin_dir=%s %s" % (NETNS, PIN_DIR, extra)


def filters():
    out = subprocess.run(
        ["ip", "netns", "exec", NETNS, "tc", "filter", "show", "dev", "eth0", "ingress"],
        stdout=subprocess.PIPE,
        check=True,
    )
    return out.stdout.decode()


@pytest.fixture(scope="module")
def host():
    make_namespace(NETNS, HOST_END)
    yield
    shutil.rmtree(PIN_DIR, ignore_errors=True)
    # Nothing these runs start may live on in the namespace (seeding's rabbitmqctl once left
    # an epmd there, which held the deleted namespace and its veth pair for ever).
    left = remove_namespace(NETNS, HOST_END)
    assert not left, "left running in %s: %r" % (NETNS, left)


@pytest.fixture
def hollow_kernel_tree(tmp_path):
    """A kernel tree that looks right from outside but holds no real headers: BCC's clang
    fails on it (on this machine it even crashes), after the module's headers check."""
    linux = tmp_path / "tree" / "include" / "linux"
    linux.mkdir(parents=True)
    (linux / "kconfig.h").write_text("")
    return str(tmp_path / "tree")


def test_respawns_into_the_system_python(host, tmp_path):
    # A Python that cannot import BCC, as an interpreter Ansible may pick on a host.
    venv.create(str(tmp_path / "bare"), system_site_packages=False, with_pip=False)
    rc, result = ansible(limiter_args("limit=2"), interpreter=str(tmp_path / "bare/bin/python3"))
    assert rc == 0, result
    assert result["interfaces"]["netns-%s" % NETNS]["eth0"]["action"] == "create"
    assert "rabbitguard-" in filters()
    rc, result = ansible("state=absent " + limiter_args())
    assert rc == 0 and result["changed"]
    assert "rabbitguard" not in filters()


def test_missing_kernel_headers(host):
    rc, result = ansible(limiter_args("kernel_headers=/nonexistent/build"))
    assert rc != 0
    expected = "no kernel headers at /nonexistent/build: install linux-headers-"
    assert result["msg"].startswith(expected)
    assert "kernel-devel" in result["msg"] and "\n" not in result["msg"]
    assert filters() == ""
    assert not os.path.exists(PIN_DIR)


def test_missing_bpffs(host):
    # A mount namespace of our own where /sys/fs/bpf is not bpffs.
    rc, result = ansible(
        limiter_args(),
        prefix=[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'umount -l /sys/fs/bpf 2>/dev/null; exec "$@"',
            "sh",
        ],
    )
    assert rc != 0
    assert result["msg"].startswith("bpffs is not mounted at /sys/fs/bpf: mount it with")
    assert filters() == ""


def test_not_root(host):
    home = tempfile.mkdtemp(prefix="rgpre-nobody-")  # pytest's own tmp is root-only
    os.chown(home, 65534, 65534)
    try:
        rc, result = ansible(
            limiter_args(),
            prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
            env_extra={
                "HOME": home,
                "ANSIBLE_LOCAL_TEMP": os.path.join(home, "t"),
                "ANSIBLE_REMOTE_TEMP": os.path.join(home, "r"),
            },
        )
    finally:
        shutil.rmtree(home)
    assert rc != 0
    assert "must run as root" in result["msg"] and "become: true" in result["msg"]
    assert filters() == ""


def test_failed_compile_leaves_the_previous_limiter_working(host, hollow_kernel_tree):
    rc, first = ansible(limiter_args("limit=2"))
    assert rc == 0, first
    before = filters()
    program_id = first["interfaces"]["netns-%s" % NETNS]["eth0"]["program_id"]
    assert "id %d " % program_id in before
    rc, result = ansible(limiter_args("limit=3 kernel_headers=%s" % hollow_kernel_tree))
    assert rc != 0
    assert result["msg"].startswith("compiling and loading the limiter")
    assert filters() == before
    rc, again = ansible(limiter_args("limit=2"))
    assert rc == 0 and not again["changed"], again
    assert again["interfaces"]["netns-%s" % NETNS]["eth0"]["program_id"] == program_id
    ansible("state=absent " + limiter_args())


def test_failed_first_deploy_leaves_nothing(host, hollow_kernel_tree):
    rc, result = ansible(limiter_args("kernel_headers=%s" % hollow_kernel_tree))
    assert rc != 0 and "compiling and loading the limiter" in result["msg"]
    assert filters() == ""
    assert not os.path.exists(PIN_DIR)
    qdiscs = subprocess.run(
        ["ip", "netns", "exec", NETNS, "tc", "qdisc", "show", "dev", "eth0"],
        stdout=subprocess.PIPE,
        check=True,
    ).stdout.decode()
    assert "clsact" not in qdiscs
