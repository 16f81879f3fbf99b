"""The boot program mounts bpffs itself only where nothing is mounted, and then mode=700, so
that no local user can make the pin directories first (only the mount call is replaced)."""

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _bpfsys, _reattach
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C


def test_bpffs_is_mounted_mode_700(monkeypatch):
    calls = []
    monkeypatch.setattr(_bpfsys, "is_bpffs", lambda path: False)
    monkeypatch.setattr(_reattach.os.path, "isdir", lambda path: True)
    monkeypatch.setattr(_reattach.subprocess, "check_call", calls.append)

    assert _reattach.ensure_bpffs() is True
    assert calls == [["mount", "-t", "bpf", "-o", "mode=700", "bpf", C.BPFFS_ROOT]]


def test_a_mounted_bpffs_is_left_alone(monkeypatch):
    monkeypatch.setattr(_bpfsys, "is_bpffs", lambda path: True)
    monkeypatch.setattr(_reattach.subprocess, "check_call", lambda argv: 1 / 0)
    assert _reattach.ensure_bpffs() is False
