# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a host must offer before the limiter touches it, and the lock that serialises runs."""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import errno
import fcntl
import os
import stat
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


def check_kernel_headers(kernel_headers: str | None) -> str | None:
    """BCC compiles against a kernel tree; say how to get one when there is none.

    Returns the tree BCC must be pointed at (BCC_KERNEL_SOURCE), or None for the running
    kernel's own, which BCC finds itself: the default, or an explicit path naming it."""
    release = os.uname().release
    default = "/lib/modules/%s/build" % release
    tree = kernel_headers or default
    # Debian splits a tree in two (build -> ...-amd64, source -> ...-common); BCC reads both
    # when left to find them, so an explicit path that names the default is the default.
    own = os.path.normpath(tree) == default
    candidates = [tree, "/lib/modules/%s/source" % release] if own else [tree]
    if any(os.path.isfile(os.path.join(t, "include", "linux", "kconfig.h")) for t in candidates):
        return None if own else tree
    raise LimiterError(
        "no kernel headers at %s: install linux-headers-%s (Debian/Ubuntu) or "
        "kernel-devel-%s (RHEL family), or point kernel_headers at a kernel build tree"
        % (tree, release, release)
    )


def check_private_dir(path: str, what: str) -> None:
    """path is a real directory (no symlink), owned by root, that no group or other user may
    write: else a local user could have made it, and could delete or swap what is in it."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise LimiterError("checking %s %s: %s" % (what, path, e.strerror)) from e
    if not stat.S_ISDIR(st.st_mode):
        raise LimiterError(
            "%s %s is not a directory (%s): remove it and run again"
            % (what, path, "a symlink" if stat.S_ISLNK(st.st_mode) else "a file")
        )
    if st.st_uid != 0:
        raise LimiterError(
            "%s %s belongs to uid %d, not root: someone else made it; remove it after "
            "checking what it holds, and run again" % (what, path, st.st_uid)
        )
    if st.st_mode & 0o022:
        raise LimiterError(
            "%s %s is writable by group or others (mode %04o): chmod go-w %s"
            % (what, path, stat.S_IMODE(st.st_mode), path)
        )


def _lock_dir(directory: str) -> None:
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise LimiterError("creating the lock directory %s: %s" % (directory, e.strerror)) from e
    check_private_dir(directory, "the lock directory")


def _open_lock(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LimiterError("the lock %s is a symlink: remove it and run again" % path) from e
        raise LimiterError("opening the lock %s: %s" % (path, e.strerror)) from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
        os.close(fd)
        raise LimiterError(
            "the lock %s is not a regular file of root's: remove it and run again" % path
        )
    return fd


@contextmanager
def host_lock(timeout: float, path: str = LOCK_PATH) -> Iterator[None]:
    """Serialise runs on one host: a second run waits, never interleaves."""
    _lock_dir(os.path.dirname(path))
    fd = _open_lock(path)
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
