# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The limiter's pinned maps as userspace reads them, without BCC.

Mirrors the structs of files/bpf/rabbit_limiter.c.j2 field by field; a BPF test
compares these layouts with the ones BCC derives from the C source, so the two cannot
drift apart unnoticed. Bump LAYOUT_VERSION whenever a pinned struct changes, or what a
pinned value means does (9: the consumer tags' hashes in conns, now of 4 words for a tag of
up to 32 octets): pins of another version are never reused.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import ctypes
import ipaddress
import struct
from typing import Any

LAYOUT_VERSION = 9
MAP_NAMES = (
    "conns",
    "channels",
    "counters",
    "config",
    "refusals",
    "overrides",
    "egress",
    "egress_slots",
    "walk_more",
    "tag_key",
)
REFUSAL_LOG_LEN = 64
ENDED_NO, ENDED_CLOSED, ENDED_RESET = 0, 1, 2
FLAG_CREATED_CLSACT = 1
FLAG_STRICT = 2
# DeployedConfig.action holds an action's index in _constants.ACTIONS (the C enum's order).
_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


class ConnKey(ctypes.Structure):
    _fields_ = [
        ("client_addr", ctypes.c_uint8 * 16),
        ("broker_addr", ctypes.c_uint8 * 16),
        ("client_port", ctypes.c_uint16),
        ("broker_port", ctypes.c_uint16),
    ]


# Channels kept in a connection's own entry (the C's CHAN_SLOTS); more go to "channels".
CHAN_SLOTS = 8
# Channels in "channels" that the entry lists, to delete them with it (the C's OVER_SLOTS):
# channel n at over[n % OVER_SLOTS].
OVER_SLOTS = 16
# Live consumers' tags a connection keeps (the C's TAG_SLOTS): a cancel frees a slot only
# for a consumer it knows (or one of its `untagged` consumers).
TAG_SLOTS = 16


class ChanSlot(ctypes.Structure):
    _fields_ = [
        ("channel", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("consumers", ctypes.c_uint32),
    ]


class ConnState(ctypes.Structure):
    _fields_ = [
        ("epoch", ctypes.c_uint64),
        ("next_hdr", ctypes.c_uint32),
        ("consumers", ctypes.c_uint32),
        ("refused", ctypes.c_uint32),
        ("rcv_nxt", ctypes.c_uint32),
        ("ooo_start", ctypes.c_uint32),
        ("ooo_end", ctypes.c_uint32),
        ("far_start", ctypes.c_uint32),
        ("far_end", ctypes.c_uint32),
        ("syn_next", ctypes.c_uint32),
        ("synced", ctypes.c_uint8),
        ("ended", ctypes.c_uint8),
        ("after_frame", ctypes.c_uint8),
        ("stash_len", ctypes.c_uint8),
        ("stash", ctypes.c_uint8 * 11),
        ("flags", ctypes.c_uint8),
        ("chans", ChanSlot * CHAN_SLOTS),
        ("over", ctypes.c_uint16 * OVER_SLOTS),
        ("tags", ctypes.c_uint64 * TAG_SLOTS),
        ("untagged", ctypes.c_uint32),
        ("anon", ctypes.c_uint32),
    ]


def slot_channels(state: ConnState) -> dict[int, int]:
    """{channel: consumers} of the channels kept in a connection's entry."""
    return {slot.channel: slot.consumers for slot in state.chans if slot.consumers}


class ChanKey(ctypes.Structure):
    _fields_ = [("conn", ConnKey), ("channel", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class ChanState(ctypes.Structure):
    _fields_ = [
        ("epoch", ctypes.c_uint64),
        ("consumers", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


# Why a frame went unseen: the places in the data plane that count one in Counters.missed,
# in the order of Counters.missed_by_cause (the template's MISSED_* numbers are rendered
# from this tuple; it needs adrift just before awaiting_resync, and frame_bound just after
# lost_sync). Append only: a pinned counters map of this layout keeps its order.
MISSED_CAUSES = (
    # ingress (client to broker)
    "unparsed_packet",  # a packet to the broker port whose IP/TCP headers were not parsed
    "untracked_connection",  # no state (no SYN seen) and not starting on a frame
    "table_full",  # the connections map took no new entry
    "adrift",  # a connection no longer followed (see header_ahead_of_hole), until it ends
    "awaiting_resync",  # sync lost earlier; out of order or not starting on a frame
    "header_ahead_of_hole",  # bytes passed ahead of a hole held a frame header
    "lost_sync",  # the walk met what is not a frame: type, size, end octet, unreadable header,
    # or a basic.consume the broker would not take (channel 0, no end octet)
    "frame_bound",  # a tail call to the continuation failed (over 34 x MAX_FRAMES frames)
    "continuation_lost",  # the continuation found no walk of this segment to go on with
    # egress (broker to client)
    "egress_bad_frame",  # not a frame (or unreadable) in the broker's stream
    "egress_frame_bound",  # a tail call of the egress walk failed (over 34 x its 256 frames)
    "egress_gap",  # broker bytes after a gap or lost sync, not starting on a frame
)
# Counters.missed_by_cause's length: a power of two (the data plane bounds a cause by a
# mask); the slots past the causes stay zero.
MISSED_SLOTS = 16


class Counters(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "segments",
            "amqp_segments",
            "consumes_allowed",
            "consumes_refused",
            "cancels",
            "channel_closes",
            "conns_tracked",
            "conns_forgotten",
            "resyncs",
            "unparsed",
            "held",
            "passed_ahead",
            "missed",
            "cancels_unknown",
            "cancels_blind",
            "tags_unreadable",
        )
    ] + [("missed_by_cause", ctypes.c_uint64 * MISSED_SLOTS)]


class Refusal(ctypes.Structure):
    _fields_ = [
        ("time_ns", ctypes.c_uint64),
        ("client_addr", ctypes.c_uint8 * 16),
        ("client_port", ctypes.c_uint16),
        ("channel", ctypes.c_uint16),
        ("consumers", ctypes.c_uint32),
        ("action", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class RefusalLog(ctypes.Structure):
    _fields_ = [
        ("next", ctypes.c_uint64),
        ("rewrites", ctypes.c_uint64),
        ("fallbacks", ctypes.c_uint64),
        ("pad", ctypes.c_uint64),
        ("ring", Refusal * REFUSAL_LOG_LEN),
    ]


class EgressState(ctypes.Structure):
    """The broker-to-client stream position of one connection (rabbit_limiter_egress)."""

    _fields_ = [
        ("next_hdr", ctypes.c_uint32),
        ("synced", ctypes.c_uint8),
        ("stash_len", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
        ("stash", ctypes.c_uint8 * 11),
        ("pad2", ctypes.c_uint8 * 5),
    ]


# egress_slots: 2**EGRESS_SLOT_BITS direct-mapped stream positions (the C's EGRESS_SLOTS), a
# connection's at egress_slot_index(its key); "egress" (LRU) holds the ones that collide.
EGRESS_SLOT_BITS = 16
# The multiplier of the slot hash (2**64 / the golden ratio, Fibonacci hashing).
EGRESS_SLOT_MULT = 0x9E3779B97F4A7C15


class EgressSlot(ctypes.Structure):
    """One slot of egress_slots: the connection that owns it, when it last sent (low 32 bits
    of jiffies, odd; 0: free for another), and its position."""

    _fields_ = [
        ("key", ConnKey),
        ("seen", ctypes.c_uint32),
        ("state", EgressState),
    ]


def egress_slot_index(key: bytes) -> int:
    """The slot of egress_slots a connection's key (36 octets, as ConnKey) maps to: the C's
    egress_slot_of, the four 64-bit words and the last 32-bit word of the key folded by xor,
    times EGRESS_SLOT_MULT (mod 2**64), top EGRESS_SLOT_BITS bits. The BPF target is
    little-endian, as every host this runs on."""
    words = struct.unpack("<4QI", bytes(key))
    folded = words[0] ^ words[1] ^ words[2] ^ words[3] ^ words[4]
    return ((folded * EGRESS_SLOT_MULT) & (2**64 - 1)) >> (64 - EGRESS_SLOT_BITS)


class DeployedConfig(ctypes.Structure):
    _fields_ = [
        ("port", ctypes.c_uint32),
        ("limit", ctypes.c_uint32),
        ("action", ctypes.c_uint32),
        ("ethernet", ctypes.c_uint32),
        ("frame_max", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("digest", ctypes.c_uint8 * 32),
    ]


class TagKey(ctypes.Structure):
    """The consumer-tag hash's secret key (the tag_key map), random, made by the loader."""

    _fields_ = [("k0", ctypes.c_uint64), ("k1", ctypes.c_uint64)]


class OverrideKey(ctypes.Structure):
    """A key of the overrides LPM trie: a prefix of a conn_key client address."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


OVERRIDE_VALUE = ctypes.c_uint32


def address_text(raw16: Any) -> str:
    """A conn_key address as text: IPv4 for v4-mapped addresses, else IPv6."""
    raw = bytes(raw16)
    if raw.startswith(_V4_MAPPED_PREFIX):
        return str(ipaddress.IPv4Address(raw[12:]))
    return str(ipaddress.IPv6Address(raw))


def address_bytes(text: str) -> bytes:
    """The 16 bytes a conn_key holds for an address given as text."""
    addr = ipaddress.ip_address(text)
    if addr.version == 4:
        return _V4_MAPPED_PREFIX + addr.packed
    return addr.packed


def conn_key(client: str, client_port: int, broker: str, broker_port: int) -> ConnKey:
    key = ConnKey()
    key.client_addr[:] = list(address_bytes(client))
    key.broker_addr[:] = list(address_bytes(broker))
    key.client_port, key.broker_port = client_port, broker_port
    return key


def decode(struct_type: Any, raw: bytes) -> Any:
    return struct_type.from_buffer_copy(raw[: ctypes.sizeof(struct_type)])


def as_dict(value: Any) -> dict[str, Any]:
    """Plain Python values of a ctypes struct (arrays become lists)."""
    out: dict[str, Any] = {}
    for name, _ctype in value._fields_:
        field = getattr(value, name)
        if isinstance(field, ctypes.Array):
            field = list(field)
        elif isinstance(field, ctypes.Structure):
            field = as_dict(field)
        out[name] = field
    return out
