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
from typing import Any

from ._errors import LimiterError

ENTRY_FUNCTION = "rabbit_limiter"
# Walks the frames of a segment beyond MAX_FRAMES, tail-called through the walk_more array.
CONTINUATION_FUNCTION = "rabbit_limiter_more"
CONTINUATION_ARRAY = "walk_more"
_CFLAGS: list[str] = []


def compile_and_load(source: str, pin_dir: str) -> tuple[Any, Any]:
    """Return (bpf, function): keep `bpf` alive as long as the fd is needed."""
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
        function = bpf.load_func(ENTRY_FUNCTION.encode(), BPF.SCHED_CLS)
        _fill_continuation(bpf, BPF)
    except Exception as e:  # BCC raises bare Exception for compile and verifier errors
        raise LimiterError(
            "compiling and loading the limiter (pins in %s): %s" % (pin_dir, e), {"cause": str(e)}
        ) from e
    return bpf, function


def _fill_continuation(bpf: Any, bpf_class: Any) -> None:
    """Load the continuation program and put it in its (pinned) program array."""
    import ctypes

    more = bpf.load_func(CONTINUATION_FUNCTION.encode(), bpf_class.SCHED_CLS)
    bpf[CONTINUATION_ARRAY.encode()][ctypes.c_int(0)] = ctypes.c_int(more.fd)


def compile_isolated(source: str, pin_dir: str) -> int:
    """Compile and load in a child process; return the program fd (caller closes it).

    BCC writes compiler diagnostics to stdout (which would corrupt a module's JSON
    result) and can crash outright on a broken kernel tree (SIGSEGV in clang). The child
    compiles with both streams sent to a log, pins the loaded program at a temporary path,
    and exits; the parent takes the program from the pin and unpins it. A crash or error
    in the child becomes a LimiterError carrying the compiler's first error line.
    """
    import tempfile

    from . import _bpfsys

    # bpffs refuses names with a dot in them.
    prog_pin = os.path.join(pin_dir, "loading-%d" % os.getpid())
    with tempfile.TemporaryFile() as log:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            status = 1
            try:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                bpf, function = compile_and_load(source, pin_dir)
                _bpfsys.obj_pin(function.fd, prog_pin)
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
    if os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == 0:
        try:
            return _bpfsys.obj_get(prog_pin)
        finally:
            os.unlink(prog_pin)
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
