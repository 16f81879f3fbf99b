# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_bpfsys against the running kernel: programs and maps loaded by BCC, checked
through our ctypes bpf(2) calls and cross-checked with BCC and /proc/self/fdinfo.

Root only: sudo .venv/bin/python -m pytest tests/root."""

import ctypes
import errno
import os
import shutil
import struct
import tempfile

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _bpfsys
from ansible_collections.rabbitguard.limiter.plugins.module_utils._errors import LimiterError

try:
    import bcc
except ImportError:  # tests/conftest.py skips (fails in CI) bpf tests without BCC
    bcc = None

pytestmark = pytest.mark.bpf

SRC = r"""
#include <uapi/linux/pkt_cls.h>

BPF_ARRAY(runs, u64, 1);            // bumped once per run
BPF_PERCPU_ARRAY(percpu, u32, 2);   // 4-byte values: slots are padded to 8
BPF_HASH(table, u32, u64, 64);      // written from user space only

int rg_mark_first_byte(struct __sk_buff *skb) {
    u32 zero = 0;
    u64 *n = runs.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    u32 *c = percpu.lookup(&zero);
    if (c)
        *c += 1;
    u8 mark = 0xAB;
    bpf_skb_store_bytes(skb, 0, &mark, 1, 0);
    return 0x1234;
}
"""

PACKET = bytes(range(14)) + b"\x08\x00" + bytes(range(16, 80))


def fdinfo(fd):
    with open("/proc/self/fdinfo/%d" % fd) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def u32(n):
    return struct.pack("=I", n)


def u64(n):
    return struct.pack("=Q", n)


@pytest.fixture(scope="module")
def loaded():
    b = bcc.BPF(text=SRC.encode())
    try:
        yield b, b.load_func(b"rg_mark_first_byte", bcc.BPF.SCHED_CLS)
    finally:
        b.cleanup()


@pytest.fixture
def pin_dir():
    path = tempfile.mkdtemp(prefix="rgtc-test-", dir="/sys/fs/bpf")
    try:
        yield path
    finally:
        shutil.rmtree(path)  # unlinking a pin drops its reference


def test_prog_test_run_returns_verdict_output_and_counts(loaded):
    b, fn = loaded
    before = b[b"runs"][ctypes.c_uint32(0)].value
    retval, duration, out = _bpfsys.prog_test_run(fn.fd, PACKET, repeat=5)
    assert retval == 0x1234
    assert duration >= 0
    assert out == b"\xab" + PACKET[1:]  # the program's write is visible
    assert b[b"runs"][ctypes.c_uint32(0)].value == before + 5


def test_prog_test_run_rejects_runt_frame(loaded):
    _b, fn = loaded
    with pytest.raises(LimiterError) as err:
        _bpfsys.prog_test_run(fn.fd, b"\x00" * 10)
    assert err.value.context["errno"] == errno.EINVAL
    assert "test-running BPF program fd %d" % fn.fd in err.value.msg


def test_prog_info_matches_kernel_fdinfo(loaded):
    b, fn = loaded
    info = _bpfsys.prog_info(fn.fd)
    kernel = fdinfo(fn.fd)
    assert info["id"] == int(kernel["prog_id"])
    assert info["tag"] == kernel["prog_tag"]
    assert info["type"] == int(kernel["prog_type"]) == _bpfsys.BPF_PROG_TYPE_SCHED_CLS
    assert info["name"] == "rg_mark_first_b"  # BPF_OBJ_NAME_LEN is 16 with the NUL
    ids = sorted(_bpfsys.map_info(b[name].map_fd)["id"] for name in (b"runs", b"percpu"))
    assert sorted(info["map_ids"]) == ids


def test_prog_get_fd_by_id_opens_the_same_program(loaded):
    _b, fn = loaded
    prog_id = _bpfsys.prog_info(fn.fd)["id"]
    with _bpfsys.owned_fd(_bpfsys.prog_get_fd_by_id(prog_id)) as fd:
        assert fd != fn.fd
        assert _bpfsys.prog_info(fd)["id"] == prog_id
    with pytest.raises(OSError):
        os.fstat(fd)  # owned_fd closed it


def test_map_info_matches_definition(loaded):
    b, _fn = loaded
    fd = b[b"table"].map_fd
    info = _bpfsys.map_info(fd)
    assert info["id"] == int(fdinfo(fd)["map_id"])
    assert (
        info["type"],
        info["key_size"],
        info["value_size"],
        info["max_entries"],
        info["name"],
    ) == (1, 4, 8, 64, "table")


def test_pinned_map_round_trip(loaded, pin_dir):
    b, _fn = loaded
    table = b[b"table"]
    path = os.path.join(pin_dir, "table")
    _bpfsys.obj_pin(table.map_fd, path)
    with _bpfsys.owned_fd(_bpfsys.obj_get(path)) as fd:
        assert _bpfsys.map_info(fd)["id"] == _bpfsys.map_info(table.map_fd)["id"]
        for k in (1, 2, 3):
            _bpfsys.map_update(fd, u32(k), u64(k * 100))
        assert table[ctypes.c_uint32(2)].value == 200  # BCC sees our writes
        table[ctypes.c_uint32(4)] = ctypes.c_uint64(400)  # we see BCC's
        assert _bpfsys.map_lookup(fd, u32(4), 8) == u64(400)
        assert _bpfsys.map_lookup(fd, u32(9), 8) is None
        assert sorted(_bpfsys.map_keys(fd, 4)) == [u32(k) for k in (1, 2, 3, 4)]
        with pytest.raises(LimiterError) as err:
            _bpfsys.map_update(fd, u32(1), u64(0), flags=_bpfsys.BPF_NOEXIST)
        assert err.value.context["errno"] == errno.EEXIST
        assert _bpfsys.map_delete(fd, u32(1)) is True
        assert _bpfsys.map_delete(fd, u32(1)) is False
        assert sorted(_bpfsys.map_keys(fd, 4)) == [u32(k) for k in (2, 3, 4)]
        table.clear()
        assert _bpfsys.map_get_next_key(fd, None, 4) is None


def test_pinned_program_survives_closing_our_fd(loaded, pin_dir):
    _b, fn = loaded
    path = os.path.join(pin_dir, "prog")
    _bpfsys.obj_pin(fn.fd, path)
    with _bpfsys.owned_fd(_bpfsys.obj_get(path)) as fd:
        assert _bpfsys.prog_info(fd)["id"] == _bpfsys.prog_info(fn.fd)["id"]
        assert _bpfsys.prog_test_run(fd, PACKET)[0] == 0x1234


def test_percpu_lookup_splits_padded_slots(loaded):
    b, fn = loaded
    percpu = b[b"percpu"]
    ncpus = _bpfsys.possible_cpus()
    assert ncpus == len(bcc.utils.get_possible_cpus())
    leaf = percpu.Leaf(*[1000 + i for i in range(ncpus)])  # BCC pads u32 to u64 slots
    percpu[ctypes.c_uint32(1)] = leaf
    values = _bpfsys.map_lookup_percpu(percpu.map_fd, u32(1), 4)
    assert values == [u32(1000 + i) for i in range(ncpus)]
    # the program's own increments land on whichever CPU ran it
    before = _bpfsys.map_lookup_percpu(percpu.map_fd, u32(0), 4)
    _bpfsys.prog_test_run(fn.fd, PACKET, repeat=3)
    after = _bpfsys.map_lookup_percpu(percpu.map_fd, u32(0), 4)
    total = sum(struct.unpack("=I", v)[0] for v in after)
    assert total == sum(struct.unpack("=I", v)[0] for v in before) + 3


def test_obj_get_missing_pin_names_it():
    with pytest.raises(LimiterError) as err:
        _bpfsys.obj_get("/sys/fs/bpf/rgtc-no-such-pin")
    assert err.value.context["errno"] == errno.ENOENT
    assert "/sys/fs/bpf/rgtc-no-such-pin" in err.value.msg


def test_is_bpffs(pin_dir):
    assert _bpfsys.is_bpffs("/sys/fs/bpf")
    assert _bpfsys.is_bpffs(pin_dir)
    assert not _bpfsys.is_bpffs("/proc")
    assert not _bpfsys.is_bpffs("/sys/fs/bpf/rgtc-missing/x")


@pytest.mark.parametrize("text, count", [("0", 1), ("0-3", 4), ("0,2-5", 5), ("0-1,4-7\n", 6)])
def test_possible_cpus_parses_ranges(tmp_path, text, count):
    path = tmp_path / "possible"
    path.write_text(text)
    assert _bpfsys.possible_cpus(str(path)) == count


def test_sizes_are_checked_before_the_kernel_copies(loaded):
    b, _fn = loaded
    table, percpu = b[b"table"].map_fd, b[b"percpu"].map_fd
    bad = [
        (lambda: _bpfsys.map_lookup(table, u32(1), 4), "table", "value size 4, the map has 8"),
        (lambda: _bpfsys.map_lookup(table, u64(1), 8), "table", "key size 8, the map has 4"),
        (lambda: _bpfsys.map_update(table, u32(1), u32(1)), "table", "value is 4 bytes"),
        (lambda: _bpfsys.map_delete(table, b"\x01"), "table", "key size 1"),
        (lambda: list(_bpfsys.map_keys(table, 8)), "table", "key size 8"),
        (lambda: _bpfsys.map_lookup(percpu, u32(0), 4), "percpu", "use map_lookup_percpu"),
        (lambda: _bpfsys.map_lookup_percpu(table, u32(0), 8), "table", "use map_lookup"),
    ]
    for call, name, text in bad:
        with pytest.raises(LimiterError) as err:
            call()
        assert "BPF map %s" % name in err.value.msg
        assert text in err.value.msg


def test_percpu_update_takes_every_cpus_slot(loaded):
    b, _fn = loaded
    fd = b[b"percpu"].map_fd
    ncpus = _bpfsys.possible_cpus()
    slots = b"".join(struct.pack("=Q", 7 + i) for i in range(ncpus))  # u32 in 8-byte slots
    _bpfsys.map_update(fd, u32(1), slots)
    assert _bpfsys.map_lookup_percpu(fd, u32(1)) == [u32(7 + i) for i in range(ncpus)]
    with pytest.raises(LimiterError):
        _bpfsys.map_update(fd, u32(1), u32(7) * ncpus)  # unpadded: refused
