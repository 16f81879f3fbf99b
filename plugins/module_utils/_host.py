# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a host must offer before the limiter touches it, and the lock that serialises runs."""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from . import _bpfsys, _constants
from ._errors import LimiterError

LOCK_PATH = os.path.join(_constants.LOCK_DIR, _constants.LOCK_NAME)


def check_bpffs() -> None:
    root = _constants.BPFFS_ROOT
    if not _bpfsys.is_bpffs(root):
        raise LimiterError(
            "bpffs is not mounted at %s: mount it with 'mount -t bpf -o mode=700 bpf %s' "
            "(the rabbitguard.limiter.tc_limiter role does this persistently)" % (root, root)
        )


def check_kernel_headers(kernel_headers: str | None) -> str:
    """BCC compiles against a kernel tree; say how to get one when there is none."""
    release = os.uname().release
    default = "/lib/modules/%s/build" % release
    tree = kernel_headers or default
    # Debian splits a tree in two (build -> ...-amd64, source -> ...-common); BCC reads both.
    # An explicit path that names the default tree is the default tree.
    candidates = [tree]
    if os.path.normpath(tree) == default:
        candidates.append("/lib/modules/%s/source" % release)
    if any(os.path.isfile(os.path.join(t, "include", "linux", "kconfig.h")) for t in candidates):
        return tree
    raise LimiterError(
        "no kernel headers at %s: install linux-headers-%s (Debian/Ubuntu) or "
        "kernel-devel-%s (RHEL family), or point kernel_headers at a kernel build tree"
        % (tree, release, release)
    )


@contextmanager
def host_lock(timeout: float, path: str = LOCK_PATH) -> Iterator[None]:
    """Serialise runs on one host: a second run waits, never interleaves."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.time() >= deadline:
                    raise LimiterError(
                        "another rabbit_tc_limit run holds %s; waited %d s "
                        "(raise lock_timeout to wait longer)" % (path, timeout)
                    ) from e
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)
