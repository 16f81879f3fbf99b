# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""tc clsact + direct-action BPF filters over netlink (pyroute2 0.7.x), in any netns.

    with open_netns('blue') as tc:            # None, a /run/netns name, or a path
        tc.ensure_clsact('eth0')
        tc.attach('eth0', prog_fd, 'rabbitguard-0123abcd', pref=49152, handle=1)
        tc.list_filters('eth0')

Why not pyroute2's NetNS: it forks a helper that sends the netlink requests, and the
kernel resolves TCA_BPF_FD in the sender's fd table. A program loaded after the
NetNS object was made is unknown to the helper (EBADF); one loaded before only works
because fork copied the fd. NetNS('x') and netns.pushns('x') also create a missing
namespace. So open_netns() opens the namespace file itself, setns()es this thread
into it just long enough to create the netlink socket (a netlink socket belongs to
the namespace it was created in), and switches straight back: the program fd is
sent from our own process and stays valid.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import ctypes
import errno
import os
import socket
import struct
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._errors import LimiterError

try:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
except ImportError:
    HAS_PYROUTE2 = False
    PYROUTE2_IMPORT_ERROR: str | None = traceback.format_exc()
    _NL_ERRORS: tuple[type[BaseException], ...] = (OSError,)
else:
    HAS_PYROUTE2 = True
    PYROUTE2_IMPORT_ERROR = None
    _NL_ERRORS = (NetlinkError, OSError)  # OSError: the socket itself failed

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

TC_H_CLSACT = 0xFFFFFFF1  # clsact and ingress qdiscs both sit here
TC_H_INGRESS_HOOK = 0xFFFFFFF2  # ffff:fff2, clsact ingress (tc ... ingress)
TC_H_EGRESS_HOOK = 0xFFFFFFF3  # ffff:fff3, clsact egress
# The two clsact hooks a filter sits on: the limiter's pair has one program on each.
HOOKS = {"ingress": TC_H_INGRESS_HOOK, "egress": TC_H_EGRESS_HOOK}
ETH_P_ALL = 0x0003
RTN_UNICAST = 1
RT_TABLE_MAIN = 254
# if_arp.h: the link types whose frames tc hands a classifier with an Ethernet header.
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772

# enum TCA_BPF_*: pyroute2 0.7.2 decodes up to TCA_BPF_FLAGS (8) only; the
# kernel's dump also carries FLAGS_GEN (9), TAG (10) and ID (11), left as raw
# 'UNKNOWN' attributes that we read ourselves.
TCA_BPF_FLAG_ACT_DIRECT = 1
TCA_BPF_TAG = 10
TCA_BPF_ID = 11
# cls_bpf's netlink policy: TCA_BPF_NAME is NLA_NUL_STRING with len
# CLS_BPF_NAME_LEN_MAX (256), the length without the NUL: 257 gets EINVAL.
# (Unrelated to the 16-byte BPF object name of the program itself.)
FILTER_NAME_MAX = 256


def _require_pyroute2() -> None:
    if not HAS_PYROUTE2:
        raise LimiterError(
            "using netlink: the Python library pyroute2 is missing "
            "(Debian/Ubuntu: python3-pyroute2; RHEL/Fedora: python3-pyroute2; "
            "pip: pyroute2)",
            {"exception": PYROUTE2_IMPORT_ERROR},
        )


# -- network namespaces -------------------------------------------------------


def netns_path(netns: str | None) -> str | None:
    """None -> None (current namespace); 'name' -> /run/netns/name; paths as given."""
    if netns is None:
        return None
    if "/" in netns:
        return netns
    return os.path.join(NETNS_RUN_DIR, netns)


def _setns(fd: int, what: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            raise LimiterError("%s: not a network namespace" % what, {"errno": err})
        raise LimiterError("%s: %s" % (what, os.strerror(err)), {"errno": err})


def _new_ipr() -> Any:
    # ext_ack: the kernel's own reason ("Specified filter kind does not match
    # existing one") comes back in NetlinkError instead of a bare EINVAL.
    # Kernels before 4.12 lack NETLINK_EXT_ACK and refuse the socket option.
    try:
        return IPRoute(ext_ack=True)
    except OSError:
        return IPRoute()


def _ipr_in(path: str, netns: str | None) -> Any:
    """An IPRoute whose netlink socket lives in the namespace at path."""
    what = "entering network namespace %s" % netns
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise LimiterError(
                "network namespace %s not found (%s)" % (netns, path),
                {"errno": e.errno, "netns": netns},
            ) from e
        raise LimiterError("%s: %s" % (what, e.strerror), {"errno": e.errno, "netns": netns}) from e
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    ipr = None
    try:
        _setns(target, what)
        try:
            ipr = _new_ipr()
        finally:
            # setns() moves this thread only; always come home, and never hand out
            # a socket if we could not
            try:
                _setns(home, "returning from network namespace %s" % netns)
            except LimiterError:
                if ipr is not None:
                    ipr.close()
                raise
    finally:
        os.close(home)
        os.close(target)
    return ipr


@contextmanager
def open_netns(netns: str | None = None) -> Iterator[Tc]:
    """A Tc for the given namespace: None (ours), a name in /run/netns, or a path
    such as /proc/PID/ns/net. A missing namespace raises LimiterError."""
    _require_pyroute2()
    path = netns_path(netns)
    ipr = _new_ipr() if path is None else _ipr_in(path, netns)
    try:
        yield Tc(ipr, netns)
    finally:
        ipr.close()


# -- helpers over pyroute2 messages -------------------------------------------


def _raw_attrs(msg: Any) -> dict[int, bytes]:
    """{type: payload bytes} for the attributes pyroute2 left undecoded."""
    out = {}
    for slot in msg.get("attrs", ()):
        if slot.name == "UNKNOWN":
            cell = slot.cell[1]  # undecoded: read the nlattr header ourselves
            length, nla_type = struct.unpack_from("=HH", cell.data, cell.offset)
            out[nla_type & 0x3FFF] = bytes(cell.data[cell.offset + 4 : cell.offset + length])
    return out


def _filter_view(msg: Any) -> dict[str, Any]:
    """Our dict for one RTM_NEWTFILTER message."""
    view = {
        "pref": msg["info"] >> 16,
        "protocol": socket.ntohs(msg["info"] & 0xFFFF),
        "handle": msg["handle"],
        "kind": msg.get_attr("TCA_KIND"),
        "name": None,
        "direct_action": False,
        "prog_id": None,
        "prog_tag": None,
    }
    opts = msg.get_attr("TCA_OPTIONS")
    if view["kind"] == "bpf" and opts is not None:
        raw = _raw_attrs(opts)
        prog_id = raw.get(TCA_BPF_ID)
        tag = raw.get(TCA_BPF_TAG)
        view.update(
            name=opts.get_attr("TCA_BPF_NAME"),
            direct_action=bool((opts.get_attr("TCA_BPF_FLAGS") or 0) & TCA_BPF_FLAG_ACT_DIRECT),
            prog_id=struct.unpack("=I", prog_id[:4])[0] if prog_id else None,
            prog_tag=tag.hex() if tag else None,
        )
    return view


def _code(err: BaseException) -> int | None:
    """The errno of a NetlinkError (.code) or OSError (.errno)."""
    return getattr(err, "code", None) or getattr(err, "errno", None)


def _reason(err: BaseException) -> str:
    """'Invalid argument: <the kernel's extack message>' from a NetlinkError/OSError."""
    code = _code(err)
    text = os.strerror(code) if code else str(err)
    detail = err.args[1] if len(err.args) > 1 else None
    if detail and detail != text:
        text = "%s: %s" % (text, detail)
    return text


def _check_name(name: Any) -> None:
    ok = (
        isinstance(name, str)
        and 0 < len(name) <= FILTER_NAME_MAX
        and all(" " < c <= "~" for c in name)
    )
    if not ok:
        raise LimiterError(
            "invalid tc filter name %r: 1 to %d printable ASCII characters, "
            "no spaces" % (name, FILTER_NAME_MAX)
        )


class Tc:
    """tc operations through one netlink socket; made by open_netns()."""

    def __init__(self, ipr: Any, netns: str | None = None) -> None:
        self.ipr = ipr
        self.netns = netns

    def _where(self, ifname: str) -> str:
        if self.netns is None:
            return ifname
        return "%s in netns %s" % (ifname, self.netns)

    def _error(self, doing: str, ifname: str, err: BaseException, **context: Any) -> LimiterError:
        """LimiterError('<doing> <ifname> [in netns X]: <reason>') for a netlink failure."""
        context.update(ifname=ifname, netns=self.netns, errno=_code(err))
        return LimiterError("%s %s: %s" % (doing, self._where(ifname), _reason(err)), context)

    def _dump_filters(self, ifname: str, parent: int) -> list[Any]:
        index = self.interface_index(ifname)
        try:  # without a clsact qdisc the kernel answers with an empty dump
            return list(self.ipr.get_filters(index=index, parent=parent))
        except _NL_ERRORS as e:
            raise self._error("listing tc filters on", ifname, e) from e

    # -- interfaces and routes -------------------------------------------------

    def interface_index(self, name: str) -> int:
        """ifindex of name; LimiterError if there is no such interface."""
        try:
            found = self.ipr.link_lookup(ifname=name)
        except _NL_ERRORS as e:
            raise self._error("looking up interface", name, e) from e
        if not found:
            raise LimiterError(
                "interface %s not found" % self._where(name), {"ifname": name, "netns": self.netns}
            )
        return found[0]

    def default_route_interfaces(self) -> list[str]:
        """Interfaces of the main table's default routes, IPv4 then IPv6, no repeats."""
        indexes = []
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                for route in self.ipr.get_default_routes(family=family, table=RT_TABLE_MAIN):
                    if route["type"] != RTN_UNICAST:  # skip unreachable, blackhole, ...
                        continue
                    oifs = [route.get_attr("RTA_OIF")]
                    oifs += [nh["oif"] for nh in route.get_attr("RTA_MULTIPATH") or ()]
                    indexes += [i for i in oifs if i and i not in indexes]
            return (
                [link.get_attr("IFLA_IFNAME") for link in self.ipr.get_links(*indexes)]
                if indexes
                else []
            )
        except _NL_ERRORS as e:
            where = "" if self.netns is None else " in netns %s" % self.netns
            raise LimiterError(
                "reading default routes%s: %s" % (where, _reason(e)),
                {"netns": self.netns, "errno": _code(e)},
            ) from e

    def interface_names(self) -> list[str]:
        """Every interface of the namespace."""
        try:
            return [str(link.get_attr("IFLA_IFNAME")) for link in self.ipr.get_links()]
        except _NL_ERRORS as e:
            where = "" if self.netns is None else " in netns %s" % self.netns
            raise LimiterError(
                "listing interfaces%s: %s" % (where, _reason(e)),
                {"netns": self.netns, "errno": _code(e)},
            ) from e

    def interface_exists(self, name: str) -> bool:
        try:
            return bool(self.ipr.link_lookup(ifname=name))
        except _NL_ERRORS as e:
            raise self._error("looking up interface", name, e) from e

    def link_type(self, name: str) -> int:
        """The interface's ARPHRD_* link type (ARPHRD_ETHER, ARPHRD_LOOPBACK, ...)."""
        index = self.interface_index(name)
        try:
            return int(self.ipr.get_links(index)[0]["ifi_type"])
        except _NL_ERRORS as e:
            raise self._error("reading the link type of", name, e) from e

    def has_ethernet_header(self, name: str) -> bool:
        """True when tc sees an Ethernet header on frames of this interface (loopback too)."""
        return self.link_type(name) in (ARPHRD_ETHER, ARPHRD_LOOPBACK)

    # -- qdisc -----------------------------------------------------------------

    def clsact_kind(self, ifname: str) -> str | None:
        """'clsact', 'ingress' or None: what sits at ffff: on ifname."""
        index = self.interface_index(ifname)
        try:
            qdiscs = self.ipr.get_qdiscs(index)
        except _NL_ERRORS as e:
            raise self._error("listing qdiscs on", ifname, e) from e
        for qdisc in qdiscs:
            if qdisc["parent"] == TC_H_CLSACT:
                return qdisc.get_attr("TCA_KIND")
        return None

    def ensure_clsact(self, ifname: str) -> bool:
        """Add a clsact qdisc unless there is one; True if it was added.

        Root qdiscs (fq_codel, mq, ...) are separate and left alone; an 'ingress'
        qdisc takes clsact's place and is refused rather than replaced."""
        kind = self.clsact_kind(ifname)
        if kind == "clsact":
            return False
        if kind is not None:
            raise LimiterError(
                "adding clsact qdisc to %s: an %r qdisc holds ffff: already; remove it "
                "(tc qdisc del dev %s ingress) after checking what uses it"
                % (self._where(ifname), kind, ifname),
                {"ifname": ifname, "netns": self.netns, "qdisc": kind},
            )
        try:
            self.ipr.tc("add", "clsact", self.interface_index(ifname))
        except _NL_ERRORS as e:
            if _code(e) == errno.EEXIST and self.clsact_kind(ifname) == "clsact":
                return False  # someone else was quicker
            raise self._error("adding clsact qdisc to", ifname, e) from e
        return True

    def remove_clsact_if_empty(self, ifname: str) -> bool:
        """Delete the clsact qdisc if neither ingress nor egress holds a filter."""
        if self.clsact_kind(ifname) != "clsact":
            return False
        if self._dump_filters(ifname, TC_H_INGRESS_HOOK) or self._dump_filters(
            ifname, TC_H_EGRESS_HOOK
        ):
            return False
        try:
            self.ipr.tc("del", "clsact", self.interface_index(ifname))
        except _NL_ERRORS as e:
            if _code(e) in (errno.ENOENT, errno.EINVAL):
                return False
            raise self._error("removing clsact qdisc from", ifname, e) from e
        return True

    # -- filters ---------------------------------------------------------------

    def list_filters(self, ifname: str, hook: str = "ingress") -> list[dict[str, Any]]:
        """Filters on ifname's clsact hook (ingress or egress), in dump order (by pref):
        dicts of pref, protocol, handle, kind, name, direct_action, prog_id,
        prog_tag (the last four None where the kind is not bpf)."""
        return [
            _filter_view(msg)
            for msg in self._dump_filters(ifname, HOOKS[hook])
            if msg["handle"] and msg.get_attr("TCA_OPTIONS") is not None
        ]

    def attach(
        self, ifname: str, prog_fd: int, name: str, pref: int, handle: int, hook: str = "ingress"
    ) -> None:
        """Put prog_fd at (pref, handle) on ifname's hook (ingress), direct-action, all
        protocols. Create-or-replace in one netlink request: an existing filter
        there is swapped atomically, and no second filter is ever added."""
        _check_name(name)
        for value, label in ((pref, "pref"), (handle, "handle")):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 0xFFFF:
                raise LimiterError(
                    "attaching %s to %s: %s must be 1..65535, not %r"
                    % (name, self._where(ifname), label, value)
                )
        index = self.interface_index(ifname)
        try:
            self.ipr.tc(
                "replace-filter",
                "bpf",
                index,
                handle,
                fd=prog_fd,
                name=name,
                parent=HOOKS[hook],
                prio=pref,
                protocol=ETH_P_ALL,
                direct_action=True,
            )
        except _NL_ERRORS as e:
            doing = "attaching BPF filter %s (pref %d, handle 0x%x) to %s of" % (
                name,
                pref,
                handle,
                hook,
            )
            raise self._error(doing, ifname, e, pref=pref, handle=handle) from e

    def find_filter(
        self, ifname: str, pref: int, handle: int, hook: str = "ingress"
    ) -> dict[str, Any] | None:
        """The filter at (pref, handle) on ifname's hook, or None."""
        for tc_filter in self.list_filters(ifname, hook):
            if tc_filter["pref"] == pref and tc_filter["handle"] == handle:
                return tc_filter
        return None

    def delete_filter(
        self, ifname: str, kind: str, protocol: int, pref: int, handle: int, hook: str = "ingress"
    ) -> None:
        """Delete the filter at (pref, handle) of this kind and protocol on the hook, whatever
        it is (the kernel matches a deletion on kind and protocol too)."""
        try:
            self.ipr.tc(
                "del-filter",
                kind,
                self.interface_index(ifname),
                handle,
                parent=HOOKS[hook],
                prio=pref,
                protocol=protocol,
            )
        except _NL_ERRORS as e:
            doing = "removing the %s filter (protocol 0x%04x) at pref %d, handle 0x%x of" % (
                kind,
                protocol,
                pref,
                handle,
            )
            raise self._error(doing, ifname, e, pref=pref, handle=handle) from e

    def detach(self, ifname: str, pref: int, handle: int, hook: str = "ingress") -> bool:
        """Delete the filter at (pref, handle) on the hook; False if there was none."""
        present = any(
            f["pref"] == pref and f["handle"] == handle for f in self.list_filters(ifname, hook)
        )
        if not present:
            return False
        try:
            self.ipr.tc(
                "del-filter",
                "bpf",
                self.interface_index(ifname),
                handle,
                parent=HOOKS[hook],
                prio=pref,
                protocol=ETH_P_ALL,
            )
        except _NL_ERRORS as e:
            if _code(e) == errno.ENOENT:
                return False
            doing = "detaching filter (pref %d, handle 0x%x) from %s of" % (pref, handle, hook)
            raise self._error(doing, ifname, e, pref=pref, handle=handle) from e
        return True
