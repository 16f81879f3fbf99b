# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read-only survey of a host for the tc_limiter role, in one remote call.

    python3 -c "$(cat survey.py)" '{"packages": [...], "manager": "dpkg", ...}'

The role runs this with ansible.builtin.command before it changes anything, and runs each
install step only where the survey found a difference, so a run that changes nothing costs
one remote call here instead of one or two per file. It changes nothing itself.

Request (JSON, argv[1]):
  os_family          Ansible's os_family fact if the play gathered it, else "" (then the
                     survey finds it from /etc/os-release: Debian, RedHat or the ID);
  packages_by_family {family: names of the packages that must be installed};
  manager_by_family  {family: "dpkg" or "rpm"};
  headers            a kernel build tree that must have an include/ directory (links
                     followed); "" for the running kernel's /lib/modules/RELEASE/build;
  bpffs              where bpffs must be mounted;
  paths              {path: spec}: spec type "file" (mode, sha1), "directory" (mode), "link"
                     (src) or "absent"; files and directories are owned by root:root.
Answer (JSON, stdout): the facts the role reads (kernel, os_family, service_mgr, as
  Ansible's setup module names them), missing_packages, headers (bool), headers_release (the
  tree's UTS_RELEASE, "" when it has none), bpffs {mounted, mode,
  writable_by_others}, differ (the paths of the request that are not as their spec says,
  in request order).
Standard library only; runs on the Python 3.6 of the oldest supported hosts.
"""

import hashlib
import json
import os
import stat
import subprocess
import sys

# /etc/os-release ID and ID_LIKE words of the families the role supports (as Ansible's
# distribution facts group them).
FAMILIES = (
    ("Debian", {"debian", "ubuntu"}),
    ("RedHat", {"rhel", "fedora", "centos", "rocky", "almalinux", "ol", "amzn"}),
)


def os_family():
    words = set()
    ident = ""
    try:
        with open("/etc/os-release") as handle:
            for line in handle:
                key, _sep, value = line.strip().partition("=")
                value = value.strip("\"'")
                if key == "ID":
                    ident = value
                    words.add(value)
                elif key == "ID_LIKE":
                    words.update(value.split())
    except OSError:
        return "unknown"
    for family, ids in FAMILIES:
        if words & ids:
            return family
    return ident or "unknown"


def service_mgr():
    """ "systemd" as sd_booted() tells it (Ansible's check too), else PID 1's name."""
    if os.path.isdir("/run/systemd/system"):
        return "systemd"
    try:
        with open("/proc/1/comm") as handle:
            return handle.read().strip() or "unknown"
    except OSError:
        return "unknown"


def missing_packages(manager, names):
    if not names or manager not in ("dpkg", "rpm"):
        return []
    if manager == "dpkg":
        argv = ["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n"] + names
    else:
        argv = ["rpm", "-q", "--qf", "%{NAME}\n"] + names
    try:
        proc = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            universal_newlines=True,  # noqa: UP021 - 3.6
            check=False,  # a package that is not installed makes the query fail: that is data
        )
    except OSError:
        return list(names)
    installed = set()
    for line in proc.stdout.splitlines():
        words = line.split()
        # dpkg: "NAME ii"; rpm: "NAME", or "package NAME is not installed".
        if (manager == "dpkg" and words[1:] == ["ii"]) or (manager == "rpm" and len(words) == 1):
            installed.add(words[0])
    return [name for name in names if name not in installed]


def bpffs(path):
    mounted = False
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fields[4] == path:  # the last mount on the path is the one visible
                mounted = fstype == "bpf"
    mode = stat.S_IMODE(os.stat(path).st_mode) if mounted else 0
    return {"mounted": mounted, "mode": "%04o" % mode, "writable_by_others": bool(mode & 0o022)}


def tree_release(tree):
    """UTS_RELEASE of a kernel build tree: the kernel its headers were made for, or ""."""
    try:
        with open(os.path.join(tree, "include", "generated", "utsrelease.h")) as handle:
            for line in handle:
                words = line.split()
                if words[:2] == ["#define", "UTS_RELEASE"] and len(words) == 3:
                    return words[2].strip('"')
    except OSError:
        pass
    return ""


def sha1(path):
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def differs(path, spec):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return spec["type"] != "absent"
    kind = spec["type"]
    if kind == "absent":
        return True
    if kind == "link":
        return not stat.S_ISLNK(st.st_mode) or os.readlink(path) != spec["src"]
    is_kind = stat.S_ISREG if kind == "file" else stat.S_ISDIR
    if (
        not is_kind(st.st_mode)
        or (st.st_uid, st.st_gid) != (0, 0)
        or stat.S_IMODE(st.st_mode) != int(spec["mode"], 8)
    ):
        return True
    return kind == "file" and sha1(path) != spec["sha1"]


def main():
    request = json.loads(sys.argv[1])
    kernel = os.uname()[2]
    family = request.get("os_family") or os_family()
    headers = request.get("headers") or os.path.join("/lib/modules", kernel, "build")
    answer = {
        "kernel": kernel,
        "os_family": family,
        "service_mgr": service_mgr(),
        "missing_packages": missing_packages(
            request.get("manager_by_family", {}).get(family, ""),
            list(request.get("packages_by_family", {}).get(family, [])),
        ),
        "headers": os.path.isdir(os.path.join(headers, "include")),
        "headers_release": tree_release(headers),
        "bpffs": bpffs(request.get("bpffs", "/sys/fs/bpf")),
        "differ": [path for path, spec in request.get("paths", {}).items() if differs(path, spec)],
    }
    json.dump(answer, sys.stdout, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
