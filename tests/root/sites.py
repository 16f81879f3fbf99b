# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The throwaway site the _deploy.apply tests work in (a named namespace with a veth pair and
a pin root of its own, /sys/fs/bpf/rgap-<id>, so it never meets a lab or another test), and
the module's and the info module's parameters as those tests give them; and the client and
server namespaces of the real paged-packet tests (Pair), with the recorder program that
proves what tc saw."""

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager

from ansible_collections.rabbitguard.limiter.plugins.module_utils import (
    _bpfsys,
    _names,
    _runner,
    _tc,
)
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C

IFACE = "rgap-x0"
OTHER = "rgap-y0"  # a second interface (Site.add_interface); sorts after IFACE


def module_params(netns, pin_root, ifname, **overrides):
    """rabbit_tc_limit's parameters for one interface: limit 3, drop, the defaults, and no
    seeding (no broker runs in these namespaces: tests/root/test_seed.py)."""
    params = dict(
        state="present",
        interfaces=[ifname],
        port=C.DEFAULT_PORT,
        limit=3,
        action="drop",
        frame_max=C.DEFAULT_FRAME_MAX,
        strict=C.DEFAULT_STRICT,
        netns=netns,
        pin_dir=pin_root,
        kernel_headers=None,
        lock_timeout=120,
        seed_from_broker=False,
    )
    params.update(overrides)
    return params


def describe(netns, pin_root, connections=False):
    """What rabbit_tc_limit_info reports for every interface of the namespace."""
    params = dict(
        netns=netns,
        interfaces=None,
        pin_dir=pin_root,
        connections=connections,
        min_consumers=0,
    )
    return _runner.describe_all(params, [])


def tc_filters(netns, ifname, hook):
    """`tc -j filter show` of one clsact hook (ingress, egress): every entry, the chain's too."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "tc", "-j", "filter", "show", "dev", ifname, hook],
        check=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ).stdout
    return json.loads(out or b"[]")


class Site:
    def __init__(self, netns, pin_root):
        self.netns, self.pin_root = netns, pin_root
        self.ns_key = _names.namespace_key(netns)
        self.pin = _names.pin_dir(pin_root, self.ns_key, IFACE)

    def add_interface(self, ifname=OTHER):
        """A second veth (its peer in the namespace too); returns the site."""
        peer = ifname[:-1] + "1"
        sh("ip", "-n", self.netns, "link", "add", ifname, "type", "veth", "peer", "name", peer)
        return self

    def pin_files(self):
        """Every pinned object under the pin root, relative to it."""
        found = []
        for top, _dirs, files in os.walk(self.pin_root):
            found += [os.path.relpath(os.path.join(top, f), self.pin_root) for f in files]
        return sorted(found)

    def pin_older_layout(self, version=3):
        """What a release with layout ``version`` left for IFACE: two of its maps (this
        deploy's conns and counters) pinned in its directory; returns that directory."""
        old = os.path.join(self.pin_root, "v%d" % version, self.ns_key, IFACE)
        os.makedirs(old, 0o700)
        os.chmod(os.path.dirname(old), 0o700)
        os.chmod(os.path.dirname(os.path.dirname(old)), 0o700)
        for name in ("conns", "counters"):
            with _bpfsys.owned_fd(_bpfsys.obj_get(os.path.join(self.pin, name))) as fd:
                _bpfsys.obj_pin(fd, os.path.join(old, name))
        return old

    def params(self, **overrides):
        return module_params(self.netns, self.pin_root, IFACE, **overrides)

    def info(self):
        return describe(self.netns, self.pin_root)

    def tc(self, ifname, hook):
        """tc_filters of one hook of one of the site's interfaces."""
        return tc_filters(self.netns, ifname, hook)

    def filters(self):
        """The ingress filters as iproute2 shows them (none without a clsact qdisc)."""
        return [f for f in tc_filters(self.netns, IFACE, "ingress") if "options" in f]

    def ours(self):
        return [f for f in self.filters() if f.get("pref") == C.FILTER_PREF]


def sh(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


@contextmanager
def made_site():
    tag = uuid.uuid4().hex[:6]
    netns, pin_root = "rgap-" + tag, os.path.join(C.BPFFS_ROOT, "rgap-" + tag)
    try:
        sh("ip", "netns", "add", netns)
        sh("ip", "-n", netns, "link", "add", IFACE, "type", "veth", "peer", "name", "rgap-x1")
        yield Site(netns, pin_root)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(pin_root, ignore_errors=True)


def only(result):
    (outcome,) = result.outcomes
    return outcome


# ---------------------------------------------------------------------------------------------
# Real paged packets: two namespaces on a veth pair, and a recorder of what tc sees
# (tests/root/test_gro_walk.py, client to server through GRO; tests/root/test_gso_egress.py,
# server to client through GSO)
# ---------------------------------------------------------------------------------------------
SUBNET, CLIENT, SERVER = "198.18.250.0/24", "198.18.250.1", "198.18.250.2"
CLIENT_IF, SERVER_IF = "rggro-c0", "rggro-s0"
PORT = C.DEFAULT_PORT
TCP_SYN = 0x02
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h; not in Python's socket


@contextmanager
def entered(netns):
    """This thread in network namespace netns (sockets made here stay there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    target = os.open("/run/netns/" + netns, os.O_RDONLY | os.O_CLOEXEC)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert libc.setns(target, 0) == 0, os.strerror(ctypes.get_errno())
        try:
            yield
        finally:
            assert libc.setns(home, 0) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(target)
        os.close(home)


class Pair:
    """Two namespaces and a veth between them (198.18.250.0/24), with a pin root of their
    own: client TSO off, server GRO on (veth then delivers the client's flow through NAPI
    and GRO, as a NIC would); a first flight (client) and a first window (server) of 64 KiB
    and more. ``server_gso`` also sends the server's flow as GSO packets of up to 64 KiB
    (veth's default TSO/GSO, said out loud) with a first flight of 64 KiB and more."""

    def __init__(self, limit=3, server_gso=False):
        tag = uuid.uuid4().hex[:6]
        self.client_ns, self.server_ns = "rggro-c-" + tag, "rggro-s-" + tag
        self.pin_root = os.path.join(C.BPFFS_ROOT, "rggro-" + tag)
        self.pin = _names.pin_dir(self.pin_root, _names.namespace_key(self.server_ns), SERVER_IF)
        self.limit, self.server_gso = limit, server_gso

    def up(self):
        c, s = self.client_ns, self.server_ns
        sh("ip", "netns", "add", c)
        sh("ip", "netns", "add", s)
        sh("ip", "-n", c, "link", "add", CLIENT_IF, "type", "veth", "peer", "name", SERVER_IF)
        sh("ip", "-n", c, "link", "set", SERVER_IF, "netns", s)
        for ns, dev, addr, windows in (
            (c, CLIENT_IF, CLIENT, ("initcwnd",)),
            (s, SERVER_IF, SERVER, ("initrwnd", "initcwnd") if self.server_gso else ("initrwnd",)),
        ):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", addr + "/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            route = ["ip", "-n", ns, "route", "replace", SUBNET, "dev", dev, "src", addr]
            for window in windows:
                route += [window, "100"]
            sh(*route)
        sh("ip", "netns", "exec", c, "ethtool", "-K", CLIENT_IF, "tso", "off")
        sh("ip", "netns", "exec", s, "ethtool", "-K", SERVER_IF, "gro", "on")
        if self.server_gso:
            sh("ip", "netns", "exec", s, "ethtool", "-K", SERVER_IF, "tso", "on", "gso", "on")

    def down(self):
        for ns in (self.client_ns, self.server_ns):
            subprocess.run(["ip", "netns", "del", ns], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.pin_root, ignore_errors=True)

    def params(self, **overrides):
        mine = dict(port=PORT, limit=self.limit, action="refuse")
        mine.update(overrides)
        return module_params(self.server_ns, self.pin_root, SERVER_IF, **mine)

    def info(self):
        (entry,) = describe(self.server_ns, self.pin_root, connections=True)
        return entry

    def connection(self, client):
        """info(), and in it the connection of the client socket client."""
        entry = self.info()
        (conn,) = [
            c
            for c in entry["connections"]
            if c["client"] == CLIENT and c["client_port"] == client.getsockname()[1]
        ]
        return entry, conn


@contextmanager
def made_pair(**kwargs):
    pair = Pair(**kwargs)
    try:
        pair.up()
        yield pair
    finally:
        pair.down()


RECORDER = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

struct rec {
    __u32 len;
    __u32 data_len;
    __u32 flags;  /* TCP flags, and the header length (Ethernet to TCP options) above */
    __u32 peer_port;  /* the other end's port */
};
BPF_HASH(recs, __u32, struct rec, RECORDS);  /* by sequence number */

int record(struct __sk_buff *skb)
{
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return TC_ACT_UNSPEC;
    struct iphdr ip;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.protocol != IPPROTO_TCP)
        return TC_ACT_UNSPEC;
    __u8 tcp[14];
    if (bpf_skb_load_bytes(skb, ETH_HLEN + ip.ihl * 4, tcp, sizeof(tcp)) < 0)
        return TC_ACT_UNSPEC;
    if (((tcp[PORT_AT] << 8) | tcp[PORT_AT + 1]) != PORT)
        return TC_ACT_UNSPEC;
    __u32 seq = ((__u32)tcp[4] << 24) | ((__u32)tcp[5] << 16) | ((__u32)tcp[6] << 8) | tcp[7];
    struct rec r = {};
    r.len = skb->len;
    long head = (long)skb->data_end - (long)skb->data;  /* the linear part */
    asm volatile("" : "+r"(head));  /* subtract the pointers first (root may) */
    r.data_len = skb->len - (__u32)head;  /* the rest sits in page fragments */
    r.flags = tcp[13] | ((ETH_HLEN + ip.ihl * 4 + (tcp[12] >> 4) * 4) << 8);
    r.peer_port = (tcp[2 - PORT_AT] << 8) | tcp[3 - PORT_AT];
    recs.update(&seq, &r);
    return TC_ACT_UNSPEC;
}
"""


class Record:
    def __init__(self, seq, value):
        self.seq, self.len, self.data_len, self.flags = seq, value.len, value.data_len, value.flags
        self.peer_port = value.peer_port


class Recorder:
    """Logs skb->len and skb->data_len of every TCP packet of the AMQP port that one clsact
    hook of an interface sees, by sequence number: on ingress the packets to the port, on
    egress those from it. Attached before ours on the same hook (pref 1), it returns
    TC_ACT_UNSPEC so ours runs next."""

    PREF = 1
    HANDLE = {"ingress": 0x7267, "egress": 0x7268}

    def __init__(self, hook, port=PORT, records=16384):
        from bcc import BPF  # only /usr/bin/python3's site sees BCC (DESIGN.md)

        self.hook = hook
        cflags = [
            "-DPORT=%d" % port,
            "-DPORT_AT=%d" % (2 if hook == "ingress" else 0),  # destination, source port
            "-DRECORDS=%d" % records,
        ]
        self.bpf = BPF(text=RECORDER.encode(), cflags=cflags)
        self.fd = self.bpf.load_func(b"record", BPF.SCHED_CLS).fd
        self.netns = self.ifname = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def attach(self, netns, ifname):
        with _tc.open_netns(netns) as tc:
            tc.attach(ifname, self.fd, "rg_recorder", self.PREF, self.HANDLE[self.hook], self.hook)
        self.netns, self.ifname = netns, ifname

    def clear(self):
        self.bpf[b"recs"].clear()

    def records(self):
        return [Record(k.value, v) for k, v in self.bpf[b"recs"].items()]

    def close(self):
        if self.netns is not None:
            with contextlib.suppress(Exception), _tc.open_netns(self.netns) as tc:
                tc.detach(self.ifname, self.PREF, self.HANDLE[self.hook], self.hook)
        self.bpf.cleanup()


def packet_at(records, isn, offset):
    """The recorded packet (its stream offset, payload bytes, data_len) holding the byte at
    stream offset (the stream whose SYN had sequence number isn); None if none did."""
    found = None
    for r in records:
        start = (r.seq - isn - 1) & 0xFFFFFFFF
        payload = r.len - (r.flags >> 8)
        if start <= offset < start + payload:
            found = (start, payload, r.data_len)
    return found
