# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Build the boot unit's program, a zip application, on the controller (run by the role).

    python3 make_reattach_pyz.py OUT COLLECTION_ROOT

OUT holds the package rabbitguard_limiter (the collection's plugins/module_utils/_*.py,
all but _runner.py, which imports Ansible), the classifier's template and a __main__ that
calls rabbitguard_limiter._reattach.main(). One file, so the role installs it with one copy;
built byte for byte the same from the same sources (fixed timestamps, sorted entries), so
an unchanged collection copies nothing.
"""

import os
import sys
import zipfile

MAIN = b"""# rabbitguard.limiter: re-attach the limiter after a reboot (see _reattach.py)
import pkgutil
import sys

from rabbitguard_limiter._reattach import main

template = pkgutil.get_data("rabbitguard_limiter", "rabbit_limiter.c.j2").decode("utf-8")
sys.exit(main(template=template))
"""
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def entries(root):
    utils = os.path.join(root, "plugins", "module_utils")
    yield "__main__.py", MAIN
    yield "rabbitguard_limiter/__init__.py", b"# rabbitguard.limiter's module_utils (no Ansible)\n"
    for name in sorted(os.listdir(utils)):
        if name.startswith("_") and name.endswith(".py") and name != "_runner.py":
            with open(os.path.join(utils, name), "rb") as handle:
                yield "rabbitguard_limiter/" + name, handle.read()
    with open(os.path.join(root, "files", "bpf", "rabbit_limiter.c.j2"), "rb") as handle:
        yield "rabbitguard_limiter/rabbit_limiter.c.j2", handle.read()


def main(out, root):
    tmp = "%s.%d.tmp" % (out, os.getpid())
    with open(tmp, "wb") as raw:
        raw.write(b"#!/usr/bin/python3\n")
        with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in entries(root):
                info = zipfile.ZipInfo(name, FIXED_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, data)
    os.replace(tmp, out)
    print(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: make_reattach_pyz.py OUT COLLECTION_ROOT")
    main(sys.argv[1], sys.argv[2])
