# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Names and paths: namespace keys and the pin layout.

Layout under the pin root (default /sys/fs/bpf/rabbitguard):
    v<LAYOUT_VERSION>/<namespace key>/<interface>/<each of _layout.MAP_NAMES>
The namespace key is "host", "netns-<name>" for a named network namespace, or
"ns-<inode>" for one given by path (/proc/PID/ns/net).
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import os
import re
import string

from . import _layout
from ._errors import LimiterError

HOST_KEY = "host"
NETNS_RUN_DIR = "/run/netns"
_NETNS_NAME_RE = re.compile(r"^[A-Za-z0-9_.@:+-]+$")
_PLAIN = frozenset(string.ascii_letters + string.digits + "_-")


def path_component(name: str) -> str:
    """A name as a bpffs directory name: bpffs refuses dots (eth0.100, a VLAN), so every
    byte but letters, digits, '_' and '-' is %-escaped, reversibly."""
    return "".join(chr(b) if chr(b) in _PLAIN else "%%%02x" % b for b in name.encode("utf-8"))


def from_path_component(component: str) -> str:
    out, i = bytearray(), 0
    while i < len(component):
        if component[i] == "%":
            start, end = i + 1, i + 3
            out.append(int(component[start:end], 16))
            i = end
        else:
            out.append(ord(component[i]))
            i += 1
    return out.decode("utf-8")


def namespace_key(netns: str | None) -> str:
    """The directory name that identifies a network namespace under the pin root."""
    if netns is None:
        return HOST_KEY
    if "/" not in netns:
        if not _NETNS_NAME_RE.match(netns):
            raise LimiterError("netns %r: a name may hold letters, digits and ._@:+- only" % netns)
        return "netns-" + path_component(netns)
    try:
        return "ns-%d" % os.stat(netns).st_ino
    except OSError as e:
        raise LimiterError("netns %s: %s" % (netns, e.strerror)) from e


def _entries(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def resolve_namespace(key: str) -> tuple[bool, str | None]:
    """(found, netns argument) for a namespace key read back from the pins."""
    if key == HOST_KEY:
        return True, None
    if key.startswith("netns-"):
        name = from_path_component(key.partition("-")[2])
        return os.path.exists(os.path.join(NETNS_RUN_DIR, name)), name
    if key.startswith("ns-"):
        inode = int(key.partition("-")[2])
        candidates = [os.path.join(NETNS_RUN_DIR, n) for n in _entries(NETNS_RUN_DIR)]
        candidates += ["/proc/%s/ns/net" % p for p in _entries("/proc") if p.isdigit()]
        for path in candidates:
            try:
                if os.stat(path).st_ino == inode:
                    return True, path
            except OSError:
                continue
    return False, None


def layout_root(pin_root: str) -> str:
    return os.path.join(pin_root, "v%d" % _layout.LAYOUT_VERSION)


def namespace_dir(pin_root: str, ns_key: str) -> str:
    return os.path.join(layout_root(pin_root), ns_key)


def pin_dir(pin_root: str, ns_key: str, ifname: str) -> str:
    return os.path.join(namespace_dir(pin_root, ns_key), path_component(ifname))
