# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Compile rendered classifier source with BCC and load it as a SCHED_CLS program.

BCC creates the pinned maps the source declares (BPF_TABLE_PINNED) or reuses the ones
already pinned at the same paths, which is how a reload keeps connection state.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

from ._errors import LimiterError

ENTRY_FUNCTION = "rabbit_limiter"
# asm/frame.h (pulled in by kernel headers) defines FRAME_END too; ours wins, silently.
_CFLAGS = ["-Wno-macro-redefined"]


def compile_and_load(source, pin_dir):
    """Return (bpf, function): keep `bpf` alive as long as the fd is needed."""
    try:
        from bcc import BPF
    except ImportError as e:
        raise LimiterError("importing BCC (python3-bpfcc / python3-bcc): %s" % e)
    try:
        os.makedirs(pin_dir, 0o700)
    except OSError:
        if not os.path.isdir(pin_dir):
            raise LimiterError("creating pin directory %s" % pin_dir)
    try:
        bpf = BPF(text=source.encode("utf-8"), cflags=_CFLAGS)
        function = bpf.load_func(ENTRY_FUNCTION.encode(), BPF.SCHED_CLS)
    except Exception as e:  # BCC raises bare Exception for compile and verifier errors
        raise LimiterError("compiling and loading the limiter (pins in %s): %s" % (pin_dir, e))
    return bpf, function
