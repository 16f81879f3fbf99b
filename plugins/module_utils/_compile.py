# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Compile rendered classifier source with BCC and load it as a SCHED_CLS program.

BCC creates the pinned maps the source declares (BPF_TABLE_PINNED) or reuses the ones
already pinned at the same paths, which is how a reload keeps connection state.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import os
from typing import Any, NamedTuple

from . import _constants
from ._errors import LimiterError

ENTRY_FUNCTION = "rabbit_limiter"
# The broker-to-client program of the pair (clsact egress), from the same source and maps.
EGRESS_FUNCTION = "rabbit_limiter_egress"
# Walks the frames of a segment beyond MAX_FRAMES, tail-called through the walk_more array.
CONTINUATION_FUNCTION = "rabbit_limiter_more"
CONTINUATION_ARRAY = "walk_more"
# walk_more's slots: the ingress walk's continuation program, and the egress program, which
# goes on with a long broker segment in itself (the template's EGRESS_MORE_SLOT).
INGRESS_MORE_SLOT = 0
EGRESS_MORE_SLOT = _constants.EGRESS_MORE_SLOT
_CFLAGS: list[str] = []


def compile_and_load(source: str, pin_dir: str, fill: bool = True) -> tuple[Any, Any]:
    """Return (bpf, function): keep `bpf` alive as long as the fd is needed.

    fill: put the continuation program in the walk_more array now (see _fill_continuation);
    a deployment leaves it to fill_continuation, after the attach."""
    try:
        from bcc import BPF
    except ImportError as e:
        raise LimiterError("importing BCC (python3-bpfcc / python3-bcc): %s" % e) from e
    try:
        os.makedirs(pin_dir, 0o700)
    except OSError as e:
        if not os.path.isdir(pin_dir):
            raise LimiterError("creating pin directory %s: %s" % (pin_dir, e.strerror)) from e
    try:
        bpf = BPF(text=source.encode("utf-8"), cflags=_CFLAGS)
        _init_tag_key(bpf)
        function = bpf.load_func(ENTRY_FUNCTION.encode(), BPF.SCHED_CLS)
        if fill:
            _fill_continuation(bpf)
    except Exception as e:  # BCC raises bare Exception for compile and verifier errors
        raise LimiterError(
            "compiling and loading the limiter (pins in %s): %s" % (pin_dir, e), {"cause": str(e)}
        ) from e
    return bpf, function


def _init_tag_key(bpf: Any) -> None:
    """Give the consumer-tag hash its secret key: random octets, written once where the
    pinned tag_key map is new (zero), before any program of it sees traffic; a replace finds
    the pin and keeps the key, so the tags its predecessor recorded hash the same. Not in
    the source, so not in the digest (a source without the map: nothing to do)."""
    try:
        table = bpf[b"tag_key"]
    except KeyError:
        return
    key = table.Key(0)
    value = table[key]
    if value.k0 or value.k1:
        return
    value.k0 = int.from_bytes(os.urandom(8), "little") | 1
    value.k1 = int.from_bytes(os.urandom(8), "little")
    table[key] = value


def load_egress(bpf: Any) -> Any:
    """The egress program of a source compile_and_load compiled (same maps)."""
    from bcc import BPF

    try:
        return bpf.load_func(EGRESS_FUNCTION.encode(), BPF.SCHED_CLS)
    except Exception as e:  # BCC raises bare Exception for verifier errors
        raise LimiterError("loading the limiter's egress program: %s" % e, {"cause": str(e)}) from e


def load_continuation(bpf: Any) -> Any:
    """The continuation program (walks past MAX_FRAMES) of a compiled source."""
    from bcc import BPF

    try:
        return bpf.load_func(CONTINUATION_FUNCTION.encode(), BPF.SCHED_CLS)
    except Exception as e:  # BCC raises bare Exception for verifier errors
        raise LimiterError(
            "loading the limiter's continuation program: %s" % e, {"cause": str(e)}
        ) from e


def _fill_continuation(bpf: Any) -> None:
    """Load the continuation program and put it in its (pinned) program array, at once:
    for programs that are not attached (tests, benches). A deployment fills the slot only
    once its program is attached (_deploy.deploy, fill_continuation), because the program
    still attached uses the same pinned array."""
    import ctypes

    more = load_continuation(bpf)
    array = bpf[CONTINUATION_ARRAY.encode()]
    array[ctypes.c_int(INGRESS_MORE_SLOT)] = ctypes.c_int(more.fd)
    if array.max_entries > EGRESS_MORE_SLOT:  # an older template's array has one slot
        array[ctypes.c_int(EGRESS_MORE_SLOT)] = ctypes.c_int(load_egress(bpf).fd)


def fill_continuation(pin_dir: str, more_fd: int, slot: int = 0) -> None:
    """Put a program in a slot of the walk_more array pinned in pin_dir: the continuation
    program in INGRESS_MORE_SLOT, the egress program in EGRESS_MORE_SLOT."""
    import struct

    from . import _bpfsys

    with _bpfsys.owned_fd(_bpfsys.obj_get(os.path.join(pin_dir, CONTINUATION_ARRAY))) as array:
        _bpfsys.map_update(array, struct.pack("=I", slot), struct.pack("=I", more_fd))


def fill_egress_slot(pin_dir: str, egress_fd: int) -> None:
    """Put the egress program egress_fd in the walk_more array's EGRESS_MORE_SLOT, where it
    tail-calls itself to walk a broker segment beyond EGRESS_MAX_FRAMES frames."""
    fill_continuation(pin_dir, egress_fd, EGRESS_MORE_SLOT)


class Programs(NamedTuple):
    """The program fds of one compiled source, all using the maps pinned in its pin_dir:
    ingress (the limiter), egress (the broker's cancels), more (the walk's continuation,
    for the walk_more array: fill_continuation)."""

    ingress: int
    egress: int
    more: int


def compile_isolated(source: str, pin_dir: str) -> int:
    """The ingress program only (see compile_programs_isolated); the caller closes the fd."""
    from . import _bpfsys

    progs = compile_programs_isolated(source, pin_dir)
    _bpfsys.close(progs.egress)
    _bpfsys.close(progs.more)
    return progs.ingress


def compile_programs_isolated(source: str, pin_dir: str) -> Programs:
    """Compile and load in a child process; return the program fds (caller closes them).

    BCC writes compiler diagnostics to stdout (which would corrupt a module's JSON
    result) and can crash outright on a broken kernel tree (SIGSEGV in clang). The child
    compiles with both streams sent to a log, pins the loaded programs at temporary paths,
    and exits; the parent takes the programs from the pins and unpins them. A crash or
    error in the child becomes a LimiterError carrying the compiler's first error line.

    The walk_more array is left as it is: the program still attached uses it until the new
    one replaces it (the caller fills it then).
    """
    import tempfile

    from . import _bpfsys

    # bpffs refuses names with a dot in them.
    paths = [
        os.path.join(pin_dir, "loading-%s%d" % (what, os.getpid()))
        for what in ("", "egress-", "more-")
    ]
    with tempfile.TemporaryFile() as log:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            status = 1
            try:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                bpf, function = compile_and_load(source, pin_dir, fill=False)
                progs = (function, load_egress(bpf), load_continuation(bpf))
                for prog, path in zip(progs, paths):
                    _bpfsys.obj_pin(prog.fd, path)
                bpf.cleanup()
                status = 0
            except LimiterError as e:
                cause = e.context.get("cause", e.msg)
                os.write(2, ("\nrabbitguard: %s\n" % cause).encode("utf-8", "replace"))
            finally:
                os._exit(status)
        _pid, wait_status = os.waitpid(pid, 0)
        log.seek(0)
        output = log.read().decode("utf-8", "replace")
    try:
        if os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == 0:
            fds: list[int] = []
            try:
                for path in paths:
                    fds.append(_bpfsys.obj_get(path))
            except Exception:
                for fd in fds:
                    _bpfsys.close(fd)
                raise
            return Programs(*fds)
    finally:
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)
    if os.WIFSIGNALED(wait_status):
        how = "the compiler crashed (signal %d)" % os.WTERMSIG(wait_status)
    else:
        how = "it failed"
    raise LimiterError(
        "compiling and loading the limiter (pins in %s): %s: %s"
        % (pin_dir, how, _first_error(output)),
        {"compiler_output": output[-4000:]},
    )


def _first_error(output: str) -> str:
    """The line of compiler or verifier output that says what went wrong."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for marker in ("rabbitguard: ", "error:", "Unable to find kernel headers", "bpf: "):
        for line in lines:
            if marker in line:
                return line.split("rabbitguard: ", 1)[-1]
    return lines[-1] if lines else "no output"
