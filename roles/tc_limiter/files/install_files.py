# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Write several files of the tc_limiter role in one remote call.

    python3 -c "$(cat install_files.py)" < REQUEST

The role runs this with ansible.builtin.command, only for the files that the survey
(survey.py) found different: one remote call instead of three per file (stat, transfer,
copy) for the boot unit's program and unit file. Each file is written as ansible.builtin.copy
writes it: to a temporary file in the same directory, owned by root:root with its mode, then
renamed over the old one, so a reader sees the old file or the new one, never a part.

Request (JSON on stdin): {"check": bool, "files": [{"path", "mode", "sha1", "content_b64"}]}.
A file whose content, mode and ownership already match is left alone.
Answer (JSON on stdout): {"changed": [paths written, or that would be in check mode]}.
Standard library only; runs on the Python 3.6 of the oldest supported hosts.
"""

import base64
import hashlib
import json
import os
import stat
import sys
import tempfile


def matches(path, mode, digest):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or (st.st_uid, st.st_gid) != (0, 0):
        return False
    if stat.S_IMODE(st.st_mode) != mode:
        return False
    with open(path, "rb") as handle:
        return hashlib.sha1(handle.read()).hexdigest() == digest


def write(path, mode, data):
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchown(handle.fileno(), 0, 0)
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main():
    request = json.load(sys.stdin)
    changed = []
    for entry in request["files"]:
        data = base64.b64decode(entry["content_b64"])
        if hashlib.sha1(data).hexdigest() != entry["sha1"]:
            sys.exit("%s: the content does not match its SHA-1 %s" % (entry["path"], entry["sha1"]))
        mode = int(entry["mode"], 8)
        if matches(entry["path"], mode, entry["sha1"]):
            continue
        if not request.get("check"):
            write(entry["path"], mode, data)
        changed.append(entry["path"])
    json.dump({"changed": changed}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
