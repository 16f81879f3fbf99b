# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Helpers the lab's real (root) tests share: a log sink and SSH as Ansible uses it."""

import subprocess


class Log(list):
    """A log callback for lab.up/down that keeps the lines (for a failure's message)."""

    def __call__(self, msg):
        self.append(msg)


def ssh(host, command, addr=None):
    """Run command as root on a lab host over SSH (its IPv4 address unless addr is given)."""
    argv = [
        "ssh",
        "-i",
        host["ssh_key"],
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "LogLevel=ERROR",
        f"root@{addr or host['ipv4']}",
        command,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
