# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Per-source limits: the ``overrides`` option, its pinned LPM trie, effective limits.

An override is ``{"source": CIDR, "limit": N}``. Connections from a client address inside
``source`` get ``limit`` instead of the deployed default; the longest matching prefix wins.
The classifier reads the pinned ``overrides`` map at each basic.consume, so changing the
overrides is a map update: no compile, the same program stays attached.

Keys are the conn_key's addresses: IPv4 is stored v4-mapped, so 10.0.0.0/8 is the trie
key ::ffff:10.0.0.0/104. A source with host bits set (10.0.0.1/8) is refused rather than
silently widened: it is usually a typo for a host (/32) or for another network.

The normal form (what validate returns, what read() returns, what the diff shows) is a
list of {"source": str, "limit": int} sorted by (family, network).
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import ctypes
import ipaddress
import os
from typing import Any, Dict, List

from . import _bpfsys, _constants, _layout
from ._render import ConfigError

Override = Dict[str, Any]
Overrides = List[Override]

MAP_NAME = "overrides"
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
_KEYS = ("source", "limit")


class OverrideError(ConfigError):
    """An overrides entry is unusable; the message names the option and the entry."""


def _network(source: Any, where: str) -> Any:
    if not isinstance(source, str) or not source.strip():
        raise OverrideError(
            "%s: source must be a CIDR such as 10.0.0.0/8, got %r" % (where, source)
        )
    try:
        return ipaddress.ip_network(source.strip(), strict=True)
    except ValueError as e:
        if "host bits set" in str(e):
            iface = ipaddress.ip_interface(source.strip())
            raise OverrideError(
                "%s: source %s has host bits set: write %s (the network) or %s/%d (one host)"
                % (where, source, iface.network, iface.ip, iface.network.max_prefixlen)
            ) from e
        raise OverrideError("%s: source %r is not a CIDR: %s" % (where, source, e)) from e


def key_of(network: Any) -> tuple[int, bytes]:
    """(prefixlen, 16 address bytes) of a network in the trie's form."""
    if network.version == 4:
        return network.prefixlen + 96, _V4_MAPPED + network.network_address.packed
    return network.prefixlen, network.network_address.packed


def text_of(prefixlen: int, addr: bytes) -> str:
    """The CIDR a trie key stands for (v4-mapped prefixes of /96 or longer as IPv4)."""
    if prefixlen >= 96 and addr.startswith(_V4_MAPPED):
        return str(ipaddress.IPv4Network((addr[12:], prefixlen - 96)))
    return str(ipaddress.IPv6Network((addr, prefixlen)))


def _sort_key(entry: Override) -> tuple[int, Any]:
    net = ipaddress.ip_network(entry["source"])
    return net.version, net


def normal(entries: dict[tuple[int, bytes], int]) -> Overrides:
    """{trie key: limit} as the normal form."""
    out = [{"source": text_of(p, a), "limit": limit} for (p, a), limit in entries.items()]
    return sorted(out, key=_sort_key)


def check_shape(value: Any) -> None:
    """A list of dicts, or OverrideError naming `overrides`. The action plugin checks this on
    the controller: Ansible's own conversion of a non-dict element fails with a message that
    names no option."""
    if value is None:
        return
    if not isinstance(value, list):
        # str/dict by name: Ansible hands tagged subclasses of them (_AnsibleTaggedStr).
        kind = next((t.__name__ for t in (str, dict, int) if isinstance(value, t)), None)
        raise OverrideError(
            "overrides must be a list of {source: CIDR, limit: N}, got %s %r"
            % (kind or type(value).__name__, str(value))
        )
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise OverrideError(
                "overrides[%d] must be a dict {source: CIDR, limit: N}, got %r" % (index, entry)
            )


def validate(value: Any) -> Overrides:
    """The option's value in normal form, or OverrideError naming `overrides`."""
    if value is None:
        return []
    check_shape(value)
    if len(value) > _constants.MAX_OVERRIDES:
        raise OverrideError(
            "overrides: at most %d entries, got %d" % (_constants.MAX_OVERRIDES, len(value))
        )
    low, high = _constants.LIMIT_RANGE
    entries: dict[tuple[int, bytes], int] = {}
    first: dict[tuple[int, bytes], str] = {}
    for index, entry in enumerate(value):
        where = "overrides[%d]" % index
        missing = [k for k in _KEYS if k not in entry]
        unknown = sorted(str(k) for k in entry if k not in _KEYS)
        if missing or unknown:
            raise OverrideError(
                "%s: %s (an entry has exactly the keys source and limit)"
                % (
                    where,
                    "; ".join(
                        (["missing key %s" % ", ".join(missing)] if missing else [])
                        + (["unknown key %s" % ", ".join(unknown)] if unknown else [])
                    ),
                )
            )
        network = _network(entry["source"], where)
        limit = entry["limit"]
        if isinstance(limit, bool) or not isinstance(limit, int) or not low <= limit <= high:
            raise OverrideError(
                "%s: limit must be an integer between %d and %d, got %r" % (where, low, high, limit)
            )
        key = key_of(network)
        if key in entries:
            raise OverrideError(
                "%s: source %s is the same as %s's" % (where, entry["source"], first[key])
            )
        entries[key] = limit
        first[key] = where
    return normal(entries)


def effective_limit(address: str, overrides: Overrides, default: int) -> int:
    """The limit the classifier applies to a client address (longest prefix wins)."""
    addr = ipaddress.ip_address(address)
    best, limit = -1, default
    for entry in overrides:
        net = ipaddress.ip_network(entry["source"])
        if net.version == addr.version and addr in net and net.prefixlen > best:
            best, limit = net.prefixlen, entry["limit"]
    return limit


# -- the pinned map ---------------------------------------------------------------------------


def _raw_key(key: tuple[int, bytes]) -> bytes:
    value = _layout.OverrideKey(prefixlen=key[0])
    value.addr[:] = list(key[1])
    return bytes(value)


def _read_entries(fd: int) -> dict[tuple[int, bytes], int]:
    out = {}
    size = ctypes.sizeof(_layout.OverrideKey)
    for raw in _bpfsys.map_keys(fd, size):
        value = _bpfsys.map_lookup(fd, raw, ctypes.sizeof(_layout.OVERRIDE_VALUE))
        if value is None:
            continue
        key = _layout.decode(_layout.OverrideKey, raw)
        out[(key.prefixlen, bytes(key.addr))] = int.from_bytes(value[:4], "little")
    return out


def read(pin: str) -> Overrides | None:
    """The overrides in the pinned map, or None when the map is not pinned."""
    path = os.path.join(pin, MAP_NAME)
    if not os.path.exists(path):
        return None
    with _bpfsys.owned_fd(_bpfsys.obj_get(path)) as fd:
        return normal(_read_entries(fd))


def sync(pin: str, wanted: Overrides) -> bool:
    """Make the pinned map hold exactly `wanted` (normal form). Returns whether it changed.

    Adds and updates first, deletes last: a connection whose source moves from a /16 to a
    /24 override is never left without one in between."""
    target = {}
    for entry in wanted:
        target[key_of(ipaddress.ip_network(entry["source"]))] = entry["limit"]
    with _bpfsys.owned_fd(_bpfsys.obj_get(os.path.join(pin, MAP_NAME))) as fd:
        current = _read_entries(fd)
        changed = False
        for key, limit in sorted(target.items()):
            if current.get(key) != limit:
                _bpfsys.map_update(fd, _raw_key(key), limit.to_bytes(4, "little"))
                changed = True
        for key in sorted(set(current) - set(target)):
            _bpfsys.map_delete(fd, _raw_key(key))
            changed = True
    return changed
