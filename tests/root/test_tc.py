# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_tc against the running kernel: clsact + cls_bpf on throwaway veths in the
current namespace, in a named netns and in an anonymous one reached through
/proc/PID/ns/net. Traffic tests use two namespaces joined by a veth pair
(198.18.9.1 <-> 198.18.9.2) with static neighbours, so a dropped packet is dropped
by our filter and not by a missing ARP reply.

Root only: sudo .venv/bin/python -m pytest tests/root."""

import ctypes
import json
import os
import select
import socket
import struct
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _bpfsys, _tc
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from ansible_collections.rabbitguard.limiter.plugins.module_utils._errors import LimiterError

try:
    import bcc
except ImportError:  # tests/conftest.py skips (fails in CI) bpf tests without BCC
    bcc = None

pytestmark = pytest.mark.bpf

PREF = C.FILTER_PREF
HANDLE = 1  # not the limiter's: these tests attach programs of their own
ADDR_A, ADDR_B = "198.18.9.1", "198.18.9.2"
MAC_A, MAC_B = "02:00:c6:12:09:01", "02:00:c6:12:09:02"
UDP_PORT = 47000

SRC = r"""
#include <uapi/linux/pkt_cls.h>

BPF_ARRAY(seen, u64, 1);    // packets that reached any of these programs

static __always_inline void count(void) {
    u32 zero = 0;
    u64 *n = seen.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
}

int rg_pass(struct __sk_buff *skb) { count(); return TC_ACT_OK; }
int rg_shot(struct __sk_buff *skb) { count(); return TC_ACT_SHOT; }
int rg_shot_too(struct __sk_buff *skb) { count(); count(); return TC_ACT_SHOT; }
"""


def sh(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def tc_in(site, *argv):
    """iproute2's tc in the site's namespace."""
    sh("ip", "netns", "exec", site.netns, "tc", *argv)


def sh_quiet(*argv):
    """For cleanup: never raises, so one failure does not skip the rest."""
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def tc_json(ns_path, *argv):
    """The iproute2 tc view, as an oracle independent of pyroute2."""
    out = subprocess.run(
        ("nsenter", "--net=" + ns_path, "tc", "-j") + argv, check=True, stdout=subprocess.PIPE
    ).stdout
    return json.loads(out or b"[]")


def kernel_filters(ns_path, ifname):
    return [
        f for f in tc_json(ns_path, "filter", "show", "dev", ifname, "ingress") if "options" in f
    ]


def seen(programs):
    return programs[b"seen"][ctypes.c_uint32(0)].value


class Site:
    """An interface in some namespace, as open_netns() names it and as a path."""

    def __init__(self, netns, ns_path, ifname):
        self.netns, self.ns_path, self.ifname = netns, ns_path, ifname


def short_id():
    return uuid.uuid4().hex[:6]


@pytest.fixture(scope="module")
def programs():
    b = bcc.BPF(text=SRC.encode())
    try:
        yield b
    finally:
        b.cleanup()


def fd_of(programs, name):
    return programs.load_func(name.encode(), bcc.BPF.SCHED_CLS).fd


@contextmanager
def current_site():
    tag = short_id()
    ifname = "rgtc-%sc" % tag
    try:
        sh("ip", "link", "add", ifname, "type", "veth", "peer", "name", "rgtc-%sd" % tag)
        yield Site(None, "/proc/%d/ns/net" % os.getpid(), ifname)
    finally:
        sh_quiet("ip", "link", "del", ifname)


@contextmanager
def named_site():
    ns = "rgtc-%s" % short_id()
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "add", "rgtc-x0", "type", "veth", "peer", "name", "rgtc-x1")
        yield Site(ns, "/run/netns/" + ns, "rgtc-x0")
    finally:
        sh_quiet("ip", "netns", "del", ns)


@contextmanager
def pid_site():
    """An anonymous netns held by a sleeping child: reachable only as /proc/PID."""
    child = subprocess.Popen(["unshare", "--net", "sleep", "600"])
    try:
        path = "/proc/%d/ns/net" % child.pid
        deadline = time.monotonic() + 10
        while os.stat(path).st_ino == os.stat("/proc/self/ns/net").st_ino:
            assert time.monotonic() < deadline, "unshare did not enter a new netns"
            time.sleep(0.01)
        ifname = "rgtc-%sp" % short_id()
        sh(
            "ip",
            "link",
            "add",
            ifname,
            "netns",
            str(child.pid),
            "type",
            "veth",
            "peer",
            "name",
            "rgtc-p1",
            "netns",
            str(child.pid),
        )
        yield Site(path, path, ifname)
    finally:
        child.kill()
        child.wait()  # the namespace and its veth die with the child


SITES = {"current": current_site, "named": named_site, "pid": pid_site}


@pytest.fixture(params=sorted(SITES))
def site(request):
    with SITES[request.param]() as s:
        yield s


@pytest.fixture
def pair():
    """Namespaces a (198.18.9.1) and b (198.18.9.2) joined by veth ifa <-> ifb."""
    tag = short_id()
    ns_a, ns_b = "rgtc-%sa" % tag, "rgtc-%sb" % tag
    try:
        sh("ip", "netns", "add", ns_a)
        sh("ip", "netns", "add", ns_b)
        sh(
            "ip",
            "link",
            "add",
            "rgtc-%sa" % tag,
            "netns",
            ns_a,
            "address",
            MAC_A,
            "type",
            "veth",
            "peer",
            "name",
            "rgtc-%sb" % tag,
            "netns",
            ns_b,
            "address",
            MAC_B,
        )
        for ns, ifname, addr, peer, peer_mac in (
            (ns_a, "rgtc-%sa" % tag, ADDR_A, ADDR_B, MAC_B),
            (ns_b, "rgtc-%sb" % tag, ADDR_B, ADDR_A, MAC_A),
        ):
            sh("ip", "-n", ns, "addr", "add", addr + "/24", "dev", ifname)
            sh("ip", "-n", ns, "link", "set", ifname, "up")
            sh(
                "ip",
                "-n",
                ns,
                "neigh",
                "replace",
                peer,
                "lladdr",
                peer_mac,
                "dev",
                ifname,
                "nud",
                "permanent",
            )
        yield {
            "a": Site(ns_a, "/run/netns/" + ns_a, "rgtc-%sa" % tag),
            "b": Site(ns_b, "/run/netns/" + ns_b, "rgtc-%sb" % tag),
        }
    finally:
        sh_quiet("ip", "netns", "del", ns_a)
        sh_quiet("ip", "netns", "del", ns_b)


def socket_in(ns_path, *args):
    """A socket created inside another netns (it stays there once made)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(ns_path, os.O_RDONLY)
    try:
        _tc._setns(target, "test: entering " + ns_path)
        try:
            return socket.socket(*args)
        finally:
            _tc._setns(home, "test: leaving " + ns_path)
    finally:
        os.close(home)
        os.close(target)


def _checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(ns_path, dst, timeout=1.0):
    """One ICMP echo from the netns at ns_path to dst; True if answered."""
    sock = socket_in(ns_path, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    body = b"rabbitguard"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    packet = struct.pack("!BBHHH", 8, 0, _checksum(header + body), ident, 1) + body
    try:
        sock.sendto(packet, (dst, 0))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                return False
            reply = sock.recv(1500)
            icmp = reply[(reply[0] & 0x0F) * 4 :]
            if icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                return True
    finally:
        sock.close()


# -- namespaces and interfaces ------------------------------------------------


def test_missing_named_netns_is_an_error_and_not_created():
    name = "rgtc-%s-none" % short_id()
    with pytest.raises(LimiterError) as err, _tc.open_netns(name):
        pass
    assert name in err.value.msg
    assert not os.path.exists("/run/netns/" + name)  # pyroute2's NetNS would create it


def test_missing_pid_netns_is_an_error():
    with pytest.raises(LimiterError) as err, _tc.open_netns("/proc/999999999/ns/net"):
        pass
    assert "/proc/999999999/ns/net" in err.value.msg


def test_path_to_another_kind_of_namespace_is_refused():
    with pytest.raises(LimiterError) as err, _tc.open_netns("/proc/self/ns/mnt"):
        pass
    assert "not a network namespace" in err.value.msg


def test_open_netns_returns_to_our_namespace(site):
    ours = os.stat("/proc/thread-self/ns/net").st_ino
    with _tc.open_netns(site.netns) as tc:
        assert os.stat("/proc/thread-self/ns/net").st_ino == ours
        assert tc.interface_index(site.ifname) > 0  # yet the socket sees site's links


def test_missing_interface_is_named(site):
    with _tc.open_netns(site.netns) as tc, pytest.raises(LimiterError) as err:
        tc.ensure_clsact("rgtc-none0")
    assert "rgtc-none0" in err.value.msg
    if site.netns is not None:
        assert site.netns in err.value.msg


# -- the whole life cycle, in each kind of namespace ---------------------------


def test_life_cycle(site, programs):
    with _tc.open_netns(site.netns) as tc:
        assert tc.list_filters(site.ifname) == []
        assert tc.ensure_clsact(site.ifname) is True
        assert tc.ensure_clsact(site.ifname) is False
        assert tc.clsact_kind(site.ifname) == "clsact"

        # loaded after open_netns: the case pyroute2's forked NetNS gets EBADF for
        first = fd_of(programs, "rg_pass")
        tc.attach(site.ifname, first, "rabbitguard-0001", PREF, HANDLE)
        info = _bpfsys.prog_info(first)
        assert tc.list_filters(site.ifname) == [
            {
                "pref": PREF,
                "protocol": _tc.ETH_P_ALL,
                "handle": HANDLE,
                "kind": "bpf",
                "name": "rabbitguard-0001",
                "direct_action": True,
                "prog_id": info["id"],
                "prog_tag": info["tag"],
            }
        ]
        [kernel] = kernel_filters(site.ns_path, site.ifname)
        assert kernel["options"]["bpf_name"] == "rabbitguard-0001"
        assert kernel["options"]["prog"]["id"] == info["id"]

        second = fd_of(programs, "rg_shot")
        tc.attach(site.ifname, second, "rabbitguard-0002", PREF, HANDLE)
        [now] = tc.list_filters(site.ifname)
        assert (now["name"], now["prog_id"]) == (
            "rabbitguard-0002",
            _bpfsys.prog_info(second)["id"],
        )
        assert len(kernel_filters(site.ns_path, site.ifname)) == 1

        assert tc.remove_clsact_if_empty(site.ifname) is False  # still holds a filter
        assert tc.detach(site.ifname, PREF, HANDLE) is True
        assert tc.detach(site.ifname, PREF, HANDLE) is False
        assert tc.list_filters(site.ifname) == []
        assert kernel_filters(site.ns_path, site.ifname) == []
        assert tc.remove_clsact_if_empty(site.ifname) is True
        assert tc.clsact_kind(site.ifname) is None
        assert tc.remove_clsact_if_empty(site.ifname) is False
        assert tc_json(site.ns_path, "qdisc", "show", "dev", site.ifname, "ingress") == []


def test_replacing_many_times_keeps_exactly_one_filter(programs):
    fds = [fd_of(programs, "rg_shot"), fd_of(programs, "rg_shot_too")]
    ids = [_bpfsys.prog_info(fd)["id"] for fd in fds]
    with named_site() as site, _tc.open_netns(site.netns) as tc:
        tc.ensure_clsact(site.ifname)
        for step in range(20):
            tc.attach(site.ifname, fds[step % 2], "rabbitguard-%04d" % step, PREF, HANDLE)
            [only] = tc.list_filters(site.ifname)
            assert (only["name"], only["prog_id"]) == ("rabbitguard-%04d" % step, ids[step % 2])


def test_traffic_is_never_unfiltered_while_replacing(pair, programs):
    """Datagrams flood a -> b while the dropping filter on b is swapped 50 times
    between two dropping programs: not one may get through."""
    fds = [fd_of(programs, "rg_shot"), fd_of(programs, "rg_shot_too")]
    a, b = pair["a"], pair["b"]
    rx = socket_in(b.ns_path, socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket_in(a.ns_path, socket.AF_INET, socket.SOCK_DGRAM)
    stop = threading.Event()
    sent = []

    def flood():
        while not stop.is_set():
            tx.sendto(b"x", (ADDR_B, UDP_PORT))
            sent.append(1)

    def drain():
        got = 0
        while select.select([rx], [], [], 0.3)[0]:
            rx.recv(64)
            got += 1
        return got

    try:
        rx.bind((ADDR_B, UDP_PORT))
        with _tc.open_netns(b.netns) as tc:
            tc.ensure_clsact(b.ifname)
            tc.attach(b.ifname, fds[0], "rabbitguard-flood", PREF, HANDLE)
            before = seen(programs)
            flooder = threading.Thread(target=flood)
            flooder.start()
            try:
                for step in range(50):
                    tc.attach(b.ifname, fds[step % 2], "rabbitguard-flood", PREF, HANDLE)
                    assert len(tc.list_filters(b.ifname)) == 1
                    time.sleep(0.002)
            finally:
                stop.set()
                flooder.join()
            assert len(sent) > 100
            assert seen(programs) - before >= len(sent)  # each reached the hook...
            assert drain() == 0  # ...and none got past it

            tc.detach(b.ifname, PREF, HANDLE)  # control: the path is open
            tx.sendto(b"x", (ADDR_B, UDP_PORT))
            assert drain() == 1
    finally:
        rx.close()
        tx.close()


def test_shot_program_drops_ping_until_detached(pair, programs):
    a, b = pair["a"], pair["b"]
    assert ping(a.ns_path, ADDR_B)
    with _tc.open_netns(b.netns) as tc:
        tc.ensure_clsact(b.ifname)
        tc.attach(b.ifname, fd_of(programs, "rg_pass"), "rabbitguard-pass", PREF, HANDLE)
        assert ping(a.ns_path, ADDR_B)
        before = seen(programs)
        tc.attach(b.ifname, fd_of(programs, "rg_shot"), "rabbitguard-shot", PREF, HANDLE)
        assert not ping(a.ns_path, ADDR_B)
        assert seen(programs) > before
        assert tc.detach(b.ifname, PREF, HANDLE)
        assert ping(a.ns_path, ADDR_B)


# -- qdisc neighbours and refusals --------------------------------------------


def test_clsact_lives_beside_a_root_qdisc():
    with named_site() as site, _tc.open_netns(site.netns) as tc:
        tc_in(site, "qdisc", "add", "dev", site.ifname, "root", "handle", "1:", "htb")
        assert tc.ensure_clsact(site.ifname) is True
        assert tc.remove_clsact_if_empty(site.ifname) is True
        kinds = [q["kind"] for q in tc_json(site.ns_path, "qdisc", "show", "dev", site.ifname)]
        assert kinds == ["htb"]


def test_ingress_qdisc_is_refused_and_left_alone():
    with named_site() as site, _tc.open_netns(site.netns) as tc:
        tc_in(site, "qdisc", "add", "dev", site.ifname, "ingress")
        with pytest.raises(LimiterError) as err:
            tc.ensure_clsact(site.ifname)
        assert "'ingress' qdisc" in err.value.msg and site.ifname in err.value.msg
        assert tc.remove_clsact_if_empty(site.ifname) is False
        assert tc.clsact_kind(site.ifname) == "ingress"


def test_egress_filter_keeps_clsact(programs):
    with named_site() as site, _tc.open_netns(site.netns) as tc:
        tc.ensure_clsact(site.ifname)
        tc.ipr.tc(
            "add-filter",
            "bpf",
            tc.interface_index(site.ifname),
            1,
            fd=fd_of(programs, "rg_pass"),
            name="someone-else",
            parent=_tc.TC_H_EGRESS_HOOK,
            prio=1,
            direct_action=True,
        )
        assert tc.list_filters(site.ifname) == []  # ingress only
        assert tc.remove_clsact_if_empty(site.ifname) is False
        assert tc.clsact_kind(site.ifname) == "clsact"


def test_foreign_filter_at_our_pref_is_reported(programs):
    with named_site() as site, _tc.open_netns(site.netns) as tc:
        tc.ensure_clsact(site.ifname)
        tc_in(
            site,
            *("filter", "add", "dev", site.ifname, "ingress", "pref", str(PREF), "protocol"),
            *("all", "u32", "match", "u32", "0", "0", "classid", "1:1"),
        )
        with pytest.raises(LimiterError) as err:
            tc.attach(site.ifname, fd_of(programs, "rg_pass"), "rabbitguard-x", PREF, HANDLE)
        assert "filter kind does not match" in err.value.msg
        assert site.ifname in err.value.msg and "pref %d" % PREF in err.value.msg
        assert all(f["kind"] == "u32" for f in tc.list_filters(site.ifname))


def test_filter_name_limits(programs):
    fd = fd_of(programs, "rg_pass")
    with named_site() as site, _tc.open_netns(site.netns) as tc:
        tc.ensure_clsact(site.ifname)
        longest = "rabbitguard-" + "f" * (_tc.FILTER_NAME_MAX - len("rabbitguard-"))
        tc.attach(site.ifname, fd, longest, PREF, HANDLE)
        assert tc.list_filters(site.ifname)[0]["name"] == longest
        for bad in (longest + "f", "", "has space", "caf\u00e9"):
            with pytest.raises(LimiterError):
                tc.attach(site.ifname, fd, bad, PREF, HANDLE)
        assert tc.list_filters(site.ifname)[0]["name"] == longest
        # the kernel agrees about the limit
        with pytest.raises(NetlinkError):
            tc.ipr.tc(
                "replace-filter",
                "bpf",
                tc.interface_index(site.ifname),
                HANDLE,
                fd=fd,
                name=longest + "f",
                parent=_tc.TC_H_INGRESS_HOOK,
                prio=PREF,
                direct_action=True,
            )


def test_attach_with_a_bad_fd_says_what_and_where():
    with named_site() as site, _tc.open_netns(site.netns) as tc:
        tc.ensure_clsact(site.ifname)
        closed_fd = os.open("/dev/null", os.O_RDONLY)
        os.close(closed_fd)
        with pytest.raises(LimiterError) as err:
            tc.attach(site.ifname, closed_fd, "rabbitguard-x", PREF, HANDLE)
    assert "Bad file descriptor" in err.value.msg
    assert site.ifname in err.value.msg and site.netns in err.value.msg
    assert err.value.context["ifname"] == site.ifname


@pytest.mark.parametrize("pref, handle", [(0, 1), (1, 0), (0x10000, 1), ("1", 1), (True, 1)])
def test_attach_refuses_zero_or_oversized_pref_and_handle(programs, pref, handle):
    with current_site() as site, _tc.open_netns() as tc:
        with pytest.raises(LimiterError):
            tc.attach(site.ifname, fd_of(programs, "rg_pass"), "rabbitguard-x", pref, handle)
        assert tc.clsact_kind(site.ifname) is None


# -- default routes -----------------------------------------------------------


def test_default_route_interfaces_ipv4_then_ipv6_without_repeats():
    with named_site() as site:
        ns = site.netns
        sh("ip", "-n", ns, "link", "add", "rgtc-y0", "type", "veth", "peer", "name", "rgtc-y1")
        for ifname in ("rgtc-x0", "rgtc-x1", "rgtc-y0", "rgtc-y1"):
            sh("ip", "-n", ns, "link", "set", ifname, "up")
        with _tc.open_netns(ns) as tc:
            assert tc.default_route_interfaces() == []
            sh("ip", "-n", ns, "-6", "route", "add", "default", "dev", "rgtc-y0")
            sh("ip", "-n", ns, "addr", "add", "198.18.9.1/24", "dev", "rgtc-x0")
            sh("ip", "-n", ns, "route", "add", "default", "via", "198.18.9.2")
            assert tc.default_route_interfaces() == ["rgtc-x0", "rgtc-y0"]
            sh("ip", "-n", ns, "-6", "route", "replace", "default", "dev", "rgtc-x0")
            assert tc.default_route_interfaces() == ["rgtc-x0"]
            sh("ip", "-n", ns, "route", "add", "blackhole", "default", "metric", "500")
            assert tc.default_route_interfaces() == ["rgtc-x0"]
            sh("ip", "-n", ns, "addr", "add", "198.18.10.1/24", "dev", "rgtc-y0")
            sh(
                "ip",
                "-n",
                ns,
                "route",
                "replace",
                "default",
                "nexthop",
                "via",
                "198.18.10.2",
                "dev",
                "rgtc-y0",
                "nexthop",
                "via",
                "198.18.9.2",
                "dev",
                "rgtc-x0",
            )
            assert tc.default_route_interfaces() == ["rgtc-y0", "rgtc-x0"]


def test_default_route_interfaces_of_this_host():
    routes = json.loads(
        subprocess.run(
            ["ip", "-j", "route", "show", "default"], check=True, stdout=subprocess.PIPE
        ).stdout
    )
    routes += json.loads(
        subprocess.run(
            ["ip", "-j", "-6", "route", "show", "default"], check=True, stdout=subprocess.PIPE
        ).stdout
    )
    expected = []
    for route in routes:
        for dev in [route.get("dev")] + [nh.get("dev") for nh in route.get("nexthops", [])]:
            if dev and dev not in expected:
                expected.append(dev)
    with _tc.open_netns() as tc:
        assert tc.default_route_interfaces() == expected
