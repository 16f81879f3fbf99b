# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The bpf(2) syscall through ctypes: pinned objects, program and map info, map
access and BPF_PROG_TEST_RUN. No BCC needed, so the info module and tests can read
what is deployed without compiling anything.

Layouts follow include/uapi/linux/bpf.h. x86_64 and aarch64 are both LP64 and
little-endian, so only the syscall number differs. Every function that returns an
fd hands ownership to the caller: wrap it in ``owned_fd()`` or call ``close()``.
Failures raise LimiterError; ``err.context['errno']`` keeps the errno.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._errors import LimiterError

_NR_BPF = {"x86_64": 321, "aarch64": 280}

# enum bpf_cmd
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_MAP_GET_NEXT_ID = 12
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15

# map_update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_PROG_TYPE_SCHED_CLS = 3
BPF_FS_MAGIC = 0xCAFE4A11
POSSIBLE_CPUS_PATH = "/sys/devices/system/cpu/possible"


class _MapElemAttr(ctypes.Structure):
    # BPF_MAP_*_ELEM, BPF_MAP_GET_NEXT_KEY; 'value' doubles as next_key
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjAttr(ctypes.Structure):
    # BPF_OBJ_PIN, BPF_OBJ_GET
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _TestRunAttr(ctypes.Structure):
    # BPF_PROG_TEST_RUN ('test' member of the union); duration is ns per run
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
    ]


class _GetIdAttr(ctypes.Structure):
    # BPF_*_GET_FD_BY_ID, BPF_*_GET_NEXT_ID (start_id in 'id')
    _fields_ = [
        ("id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    # BPF_OBJ_GET_INFO_BY_FD
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _ProgInfo(ctypes.Structure):
    # struct bpf_prog_info up to 'verified_insns' (5.16); the kernel fills min(its size,
    # ours), so older kernels leave the later fields zero.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),
    ]


class _MapInfo(ctypes.Structure):
    # struct bpf_map_info up to 'name'
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _Statfs(ctypes.Structure):
    # struct statfs starts with a long f_type on both LP64 targets; the rest is
    # room for the remaining fields (120 bytes in all on x86_64 and aarch64)
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_uint8 * 248)]


_libc = None


def _get_libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc


def _bpf(cmd: int, attr: Any, what: str, tolerate: tuple[int, ...] = ()) -> int:
    """Run one bpf(2) command; returns its result, or -errno for errnos in tolerate."""
    machine = os.uname()[4]
    if machine not in _NR_BPF:
        raise LimiterError(
            "%s: bpf(2) on unsupported architecture %s (supported: %s)"
            % (what, machine, ", ".join(sorted(_NR_BPF)))
        )
    nr = _NR_BPF[machine]
    ret = _get_libc().syscall(
        ctypes.c_long(nr),
        ctypes.c_long(cmd),
        ctypes.byref(attr),
        ctypes.c_long(ctypes.sizeof(attr)),
    )
    if ret < 0:
        err = ctypes.get_errno()
        if err in tolerate:
            return -err
        raise LimiterError("%s: %s" % (what, os.strerror(err)), {"errno": err})
    return ret


def _addr(obj: Any) -> int:
    return ctypes.addressof(obj)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def close(fd: int | None) -> None:
    """Close an fd returned by this module; None is ignored."""
    if fd is not None:
        os.close(fd)


@contextmanager
def owned_fd(fd: int) -> Iterator[int]:
    """``with owned_fd(obj_get(path)) as fd:`` closes fd on the way out."""
    try:
        yield fd
    finally:
        close(fd)


# -- pinned objects ----------------------------------------------------------


def obj_get(path: str) -> int:
    """Open the program or map pinned at path; returns a new fd."""
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=_addr(cpath))
    return _bpf(BPF_OBJ_GET, attr, "opening pinned BPF object %s" % path)


def obj_pin(fd: int, path: str) -> None:
    """Pin the program or map behind fd at path (a new name on a bpffs)."""
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=_addr(cpath), bpf_fd=fd)
    _bpf(BPF_OBJ_PIN, attr, "pinning BPF object fd %d at %s" % (fd, path))


def is_bpffs(path: str) -> bool:
    """True if path is on a BPF filesystem; False if it is not or does not exist."""
    buf = _Statfs()
    if _get_libc().statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise LimiterError(
            "checking filesystem type of %s: %s" % (path, os.strerror(err)), {"errno": err}
        )
    return (buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


# -- programs ----------------------------------------------------------------


def _get_info(fd: int, info: Any, what: str) -> Any:
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=_addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, what)
    return info


def prog_info(fd: int) -> dict[str, Any]:
    """dict(id, tag (16 hex digits, as bpftool and tc show it), name, type, map_ids,
    run_time_ns and run_cnt (counted while sysctl kernel.bpf_stats_enabled is 1),
    verified_insns)."""
    what = "reading info of BPF program fd %d" % fd
    info = _get_info(fd, _ProgInfo(), what)
    map_ids = []
    if info.nr_map_ids:
        ids = (ctypes.c_uint32 * info.nr_map_ids)()
        again = _ProgInfo(nr_map_ids=info.nr_map_ids, map_ids=_addr(ids))
        _get_info(fd, again, what)
        map_ids = list(ids)[: again.nr_map_ids]
    return {
        "id": info.id,
        "tag": bytes(bytearray(info.tag)).hex(),
        "name": _cstr(info.name),
        "type": info.type,
        "map_ids": map_ids,
        "run_time_ns": info.run_time_ns,
        "run_cnt": info.run_cnt,
        "verified_insns": info.verified_insns,
        "btf_id": info.btf_id,
        "load_time": info.load_time,
    }


def prog_get_fd_by_id(prog_id: int) -> int:
    """Open the loaded program with this id; returns a new fd."""
    attr = _GetIdAttr(id=prog_id)
    return _bpf(BPF_PROG_GET_FD_BY_ID, attr, "opening BPF program id %d" % prog_id)


def prog_test_run(
    prog_fd: int, data: bytes, repeat: int = 1, data_out_size: int | None = None
) -> tuple[int, int, bytes]:
    """Run the program on one packet (BPF_PROG_TEST_RUN).

    Returns (retval, duration_ns per run, data_out bytes). A SCHED_CLS program
    needs at least an Ethernet header (14 bytes) of data. data_out_size bounds the
    output buffer (default: input + 256 bytes, room for pushed headers).
    """
    data = bytes(data)
    size_out = data_out_size if data_out_size is not None else len(data) + 256
    buf_in = ctypes.create_string_buffer(data, len(data))
    buf_out = ctypes.create_string_buffer(max(size_out, 1))
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(data),
        data_size_out=size_out,
        data_in=_addr(buf_in),
        data_out=_addr(buf_out),
        repeat=repeat,
    )
    _bpf(
        BPF_PROG_TEST_RUN, attr, "test-running BPF program fd %d on %d bytes" % (prog_fd, len(data))
    )
    return attr.retval, attr.duration, buf_out.raw[: attr.data_size_out]


# -- maps --------------------------------------------------------------------


def map_info(fd: int) -> dict[str, Any]:
    """dict(id, type, key_size, value_size, max_entries, flags, name)."""
    info = _get_info(fd, _MapInfo(), "reading info of BPF map fd %d" % fd)
    return {
        "id": info.id,
        "type": info.type,
        "key_size": info.key_size,
        "value_size": info.value_size,
        "max_entries": info.max_entries,
        "flags": info.map_flags,
        "name": _cstr(info.name),
    }


def map_get_fd_by_id(map_id: int) -> int:
    """Open the map with this id (e.g. from prog_info()['map_ids']); returns a new fd."""
    attr = _GetIdAttr(id=map_id)
    return _bpf(BPF_MAP_GET_FD_BY_ID, attr, "opening BPF map id %d" % map_id)


def map_exists(map_id: int) -> bool:
    """Whether a map with this id is still in the kernel, asked without opening it.
    Opening a map by id takes a user reference, and dropping the last one again makes the
    kernel clear a prog array once more (prog_array_map_clear takes a reference for its
    queued work), and a test that polled a removed `walk_more` that way while its first
    clear was still queued left it in the kernel for good on 6.18: empty, with no pin, fd
    or program holding it. So whoever waits for a map to go asks this instead."""
    attr = _GetIdAttr(id=map_id - 1)
    if _bpf(BPF_MAP_GET_NEXT_ID, attr, "listing BPF map ids", tolerate=(errno.ENOENT,)) < 0:
        return False
    return attr.next_id == map_id


# The kernel copies key_size and value bytes to and from our buffers without being
# told their size, so every call checks the sizes against map_info() first: a wrong
# size is an error here rather than memory corrupted in this process.
# BPF_MAP_TYPE_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH, _PERCPU_CGROUP_STORAGE
_PERCPU_MAP_TYPES = (5, 6, 10, 21)


def _value_bytes(info: dict[str, Any]) -> int:
    """Bytes per element: value_size, or one 8-byte-aligned slot per possible CPU."""
    if info["type"] in _PERCPU_MAP_TYPES:
        return ((info["value_size"] + 7) & ~7) * possible_cpus()
    return info["value_size"]


def _checked(
    fd: int,
    what: str,
    key_size: int | None = None,
    value_size: int | None = None,
    percpu: bool | None = None,
) -> dict[str, Any]:
    info = map_info(fd)
    name = "BPF map %s (fd %d)" % (info["name"], fd)
    is_percpu = info["type"] in _PERCPU_MAP_TYPES
    if percpu is not None and percpu != is_percpu:
        raise LimiterError(
            "%s %s: a %sper-CPU map, use %s"
            % (
                what,
                name,
                "" if is_percpu else "non-",
                "map_lookup_percpu" if is_percpu else "map_lookup",
            )
        )
    for label, got, want in (
        ("key", key_size, info["key_size"]),
        ("value", value_size, info["value_size"]),
    ):
        if got is not None and got != want:
            raise LimiterError("%s %s: %s size %d, the map has %d" % (what, name, label, got, want))
    return info


def _lookup(fd: int, key: bytes, size: int, what: str) -> bytes | None:
    kbuf = ctypes.create_string_buffer(bytes(key), len(key))
    vbuf = ctypes.create_string_buffer(size)
    attr = _MapElemAttr(map_fd=fd, key=_addr(kbuf), value=_addr(vbuf))
    ret = _bpf(BPF_MAP_LOOKUP_ELEM, attr, what, tolerate=(errno.ENOENT,))
    return None if ret < 0 else vbuf.raw


def map_lookup(fd: int, key: bytes, value_size: int | None = None) -> bytes | None:
    """The value (bytes) stored under key, or None if the key is absent.
    value_size, if given, must be the map's (a check on the caller's layout)."""
    what = "looking up key %s in" % bytes(key).hex()
    info = _checked(fd, what, len(key), value_size, percpu=False)
    return _lookup(fd, key, info["value_size"], "%s BPF map fd %d" % (what, fd))


def map_lookup_percpu(fd: int, key: bytes, value_size: int | None = None) -> list[bytes] | None:
    """Per-CPU map lookup: a list with one value (bytes) per possible CPU, or None.
    The kernel hands back one slot per CPU, each rounded up to 8 bytes."""
    what = "looking up key %s in" % bytes(key).hex()
    info = _checked(fd, what, len(key), value_size, percpu=True)
    raw = _lookup(fd, key, _value_bytes(info), "%s BPF map fd %d" % (what, fd))
    if raw is None:
        return None
    size = info["value_size"]
    slot = (size + 7) & ~7
    return [raw[i * slot : i * slot + size] for i in range(len(raw) // slot)]


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """Store value under key (flags: BPF_ANY, BPF_NOEXIST, BPF_EXIST). For a per-CPU
    map, value holds every CPU's slot (value_size rounded up to 8) back to back."""
    what = "updating key %s in" % bytes(key).hex()
    info = _checked(fd, what, len(key))
    if len(value) != _value_bytes(info):
        raise LimiterError(
            "%s BPF map %s (fd %d): value is %d bytes, the map takes %d"
            % (what, info["name"], fd, len(value), _value_bytes(info))
        )
    kbuf = ctypes.create_string_buffer(bytes(key), len(key))
    vbuf = ctypes.create_string_buffer(bytes(value), len(value))
    attr = _MapElemAttr(map_fd=fd, key=_addr(kbuf), value=_addr(vbuf), flags=flags)
    _bpf(BPF_MAP_UPDATE_ELEM, attr, "%s BPF map fd %d" % (what, fd))


def map_delete(fd: int, key: bytes) -> bool:
    """Delete key; False if it was not there."""
    what = "deleting key %s in" % bytes(key).hex()
    _checked(fd, what, len(key))
    kbuf = ctypes.create_string_buffer(bytes(key), len(key))
    attr = _MapElemAttr(map_fd=fd, key=_addr(kbuf))
    ret = _bpf(BPF_MAP_DELETE_ELEM, attr, "%s BPF map fd %d" % (what, fd), tolerate=(errno.ENOENT,))
    return ret == 0


def _next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    kbuf = None if key is None else ctypes.create_string_buffer(bytes(key), key_size)
    nbuf = ctypes.create_string_buffer(key_size)
    attr = _MapElemAttr(map_fd=fd, key=_addr(kbuf) if kbuf is not None else 0, value=_addr(nbuf))
    ret = _bpf(
        BPF_MAP_GET_NEXT_KEY, attr, "iterating keys of BPF map fd %d" % fd, tolerate=(errno.ENOENT,)
    )
    return None if ret < 0 else nbuf.raw


def map_get_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """The key after key (None: the first key), or None at the end of the map."""
    _checked(fd, "iterating keys of", key_size)
    if key is not None and len(key) != key_size:
        raise LimiterError(
            "iterating keys of BPF map fd %d: key is %d bytes, not %d" % (fd, len(key), key_size)
        )
    return _next_key(fd, key, key_size)


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Iterate over the keys of a map (a snapshot is not guaranteed under updates)."""
    _checked(fd, "iterating keys of", key_size)
    key = _next_key(fd, None, key_size)
    while key is not None:
        yield key
        key = _next_key(fd, key, key_size)


def possible_cpus(path: str = POSSIBLE_CPUS_PATH) -> int:
    """Number of possible CPUs, from a list such as '0-3' or '0,2-5'."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError as e:
        raise LimiterError("reading possible CPUs from %s: %s" % (path, e)) from e
    count = 0
    for part in text.split(","):
        lo, _sep, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count
