# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The throwaway site the _deploy.apply tests work in (a named namespace with a veth pair and
a pin root of its own, /sys/fs/bpf/rgap-<id>, so it never meets a lab or another test), and
the module's and the info module's parameters as those tests give them."""

import json
import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _names, _runner

IFACE = "rgap-x0"


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

    def params(self, **overrides):
        return module_params(self.netns, self.pin_root, IFACE, **overrides)

    def info(self):
        return describe(self.netns, self.pin_root)

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
