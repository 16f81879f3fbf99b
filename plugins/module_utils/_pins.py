# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The pinned state: what is deployed (the config map), what the data plane knows
(counters, connections), and removing pins. The pinned maps are the truth.

The config map records what is deployed (with the digest of the rendered source); the tc
filter's name carries the same digest, so the state check needs no compiler.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import ctypes
import datetime
import errno
import os
import stat
import struct
import time
from typing import Any

from . import _bpfsys, _constants, _host, _layout, _names, _overrides
from ._errors import LimiterError

_ZERO_KEY = b"\x00" * 4


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return []
        raise LimiterError("listing %s: %s" % (path, e.strerror)) from e


def pinned_namespaces(pin_root: str) -> list[str]:
    return sorted(_listdir(_names.layout_root(pin_root)))


def pinned_interfaces(pin_root: str, ns_key: str) -> list[str]:
    return sorted(
        _names.from_path_component(name)
        for name in _listdir(_names.namespace_dir(pin_root, ns_key))
    )


def pins_present(pin: str) -> bool:
    return all(os.path.exists(os.path.join(pin, name)) for name in _layout.MAP_NAMES)


def _read_map(pin: str, name: str, key: bytes, value_type: Any, percpu: bool = False) -> Any:
    path = os.path.join(pin, name)
    with _bpfsys.owned_fd(_bpfsys.obj_get(path)) as fd:
        if percpu:
            return _bpfsys.map_lookup_percpu(fd, key, ctypes.sizeof(value_type))
        return _bpfsys.map_lookup(fd, key, ctypes.sizeof(value_type))


def read_config(pin: str) -> dict[str, Any] | None:
    """The config pinned for one interface, or None if absent or never written."""
    if not os.path.exists(os.path.join(pin, "config")):
        return None
    raw = _read_map(pin, "config", _ZERO_KEY, _layout.DeployedConfig)
    value = _layout.decode(_layout.DeployedConfig, raw) if raw else None
    if value is None or not any(value.digest):
        return None
    return {
        "port": value.port,
        "limit": value.limit,
        "action": _constants.ACTIONS[value.action]
        if value.action < len(_constants.ACTIONS)
        else "unknown",
        "l2": "ethernet" if value.ethernet else "none",
        "frame_max": value.frame_max,
        "strict": bool(value.flags & _layout.FLAG_STRICT),
        "digest": bytes(value.digest).hex(),
        "created_clsact": bool(value.flags & _layout.FLAG_CREATED_CLSACT),
        "overrides": _overrides.read(pin) or [],
    }


def write_config(pin: str, config: dict[str, Any], digest: str, created_clsact: bool) -> None:
    value = _layout.DeployedConfig(
        port=config["port"],
        limit=config["limit"],
        action=_constants.ACTIONS.index(config["action"]),
        ethernet=1 if config["l2"] == "ethernet" else 0,
        frame_max=config["frame_max"],
        flags=(_layout.FLAG_CREATED_CLSACT if created_clsact else 0)
        | (_layout.FLAG_STRICT if config.get("strict") else 0),
    )
    value.digest[:] = list(bytes.fromhex(digest))
    with _bpfsys.owned_fd(_bpfsys.obj_get(os.path.join(pin, "config"))) as fd:
        _bpfsys.map_update(fd, _ZERO_KEY, bytes(value))


def map_ids(pin: str) -> dict[str, int | None]:
    """{map name: kernel id} of the maps pinned for one interface (None: not pinned)."""
    ids: dict[str, int | None] = {}
    for name in _layout.MAP_NAMES:
        path = os.path.join(pin, name)
        if not os.path.exists(path):
            ids[name] = None
            continue
        with _bpfsys.owned_fd(_bpfsys.obj_get(path)) as fd:
            ids[name] = _bpfsys.map_info(fd)["id"]
    return ids


def program_uses_pins(pin: str, prog_id: int) -> bool:
    """Whether the loaded program prog_id uses the maps pinned for this interface, each map
    it uses by one of our names being the pinned one (a program compiled against other maps,
    e.g. pins made again behind its back, counts nothing here). The program holds only the
    maps its code uses (not the config map, which userspace alone reads)."""
    prog_fd = _bpfsys.prog_get_fd_by_id(prog_id)
    try:
        used_ids = _bpfsys.prog_info(prog_fd)["map_ids"]
    finally:
        _bpfsys.close(prog_fd)
    pinned = map_ids(pin)
    checked = 0
    for map_id in used_ids:
        with _bpfsys.owned_fd(_bpfsys.map_get_fd_by_id(map_id)) as fd:
            name = _bpfsys.map_info(fd)["name"]
        if name in pinned:
            checked += 1
            if pinned[name] != map_id:
                return False
    return checked > 0


def check_tree(pin_root: str) -> None:
    """Every directory of the pin tree that exists is root's and no one else may write it.

    Where bpffs is mounted without mode=700, a local user could make these directories
    first and then delete or swap root's pins: refuse to use them."""
    if not os.path.lexists(pin_root):
        return
    _host.check_private_dir(pin_root, "the pin directory")
    layout = _names.layout_root(pin_root)
    if not os.path.lexists(layout):
        return
    _host.check_private_dir(layout, "the pin directory")
    for ns_key in _listdir(layout):
        ns_dir = os.path.join(layout, ns_key)
        _host.check_private_dir(ns_dir, "the pin directory")
        for name in _listdir(ns_dir):
            _host.check_private_dir(os.path.join(ns_dir, name), "the pin directory")


# -- removing pins ------------------------------------------------------------------------


def unpin(pin: str, names: list[str]) -> None:
    for name in names:
        path = os.path.join(pin, name)
        try:
            os.unlink(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise LimiterError("unpinning %s: %s" % (path, e.strerror)) from e


def unpin_interface(pin: str) -> None:
    """Remove one interface's pins and every parent directory left empty, up to the pin root."""
    unpin(pin, _listdir(pin))
    # The interface's directory, then its namespace's, the layout's and the pin root.
    parents = [pin]
    for _level in range(3):
        parents.append(os.path.dirname(parents[-1]))
    for directory in parents:
        try:
            os.rmdir(directory)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                break
            raise LimiterError("removing %s: %s" % (directory, e.strerror)) from e


def other_layouts(pin: str) -> list[str]:
    """This interface's pin directories of other layout versions (<pin root>/v<N>/<namespace>/
    <interface>, N not ours): a release with another layout left them, and their maps stay
    in the kernel for as long as the pins do. A directory a user could have made (see
    check_tree) is left out."""
    ns_dir = os.path.dirname(pin)
    layout = os.path.dirname(ns_dir)
    pin_root = os.path.dirname(layout)
    found = []
    for name in sorted(_listdir(pin_root)):
        if name == os.path.basename(layout) or not (name[:1] == "v" and name[1:].isdigit()):
            continue
        other_layout = os.path.join(pin_root, name)
        other = os.path.join(other_layout, os.path.basename(ns_dir), os.path.basename(pin))
        if not os.path.isdir(other):
            continue
        try:
            for directory in (other_layout, os.path.dirname(other), other):
                _host.check_private_dir(directory, "the pin directory")
        except LimiterError:
            continue
        found.append(other)
    return found


def unpin_other_layouts(pin: str) -> list[str]:
    """Remove the pins of other_layouts(pin); returns the directories removed."""
    removed = other_layouts(pin)
    for other in removed:
        unpin_interface(other)
    return removed


class HeldPins:
    """Every object pinned for one interface (in pin and in other_layouts(pin)), held open
    by fd, and the directories they sit in up to the pin root, with their modes: taken
    before a removal, so that a failure can pin the very same maps and program arrays again
    (repin). An open fd keeps a map and what it holds (counters, connections, walk_more's
    slots), so nothing of it is lost in between. close() once the run is over."""

    def __init__(self, pin: str) -> None:
        self.dirs: dict[str, int] = {}  # path: mode, parents first
        self.objects: list[tuple[str, int]] = []  # (path, fd)
        try:
            for directory in [pin] + other_layouts(pin):
                self._hold(directory)
        except Exception:
            self.close()
            raise

    def _hold(self, directory: str) -> None:
        # The interface's directory, its namespace's, the layout's and the pin root.
        parents = [directory]
        for _level in range(3):
            parents.append(os.path.dirname(parents[-1]))
        for path in reversed(parents):
            if path not in self.dirs and os.path.isdir(path):
                self.dirs[path] = stat.S_IMODE(os.lstat(path).st_mode)
        for name in sorted(_listdir(directory)):
            path = os.path.join(directory, name)
            if not os.path.isdir(path):  # bpffs holds pinned objects and directories only
                self.objects.append((path, _bpfsys.obj_get(path)))

    def repin(self) -> None:
        """Make the directories that went (with their modes) and pin what was unpinned;
        every object is tried, and the error names each that could not be pinned."""
        for path, mode in self.dirs.items():
            if os.path.isdir(path):
                continue
            try:
                os.mkdir(path, mode)
                os.chmod(path, mode)  # as it was, whatever the umask
            except OSError as e:
                raise LimiterError("making %s again: %s" % (path, e.strerror)) from e
        failed = []
        for path, fd in self.objects:
            try:
                if not os.path.lexists(path):
                    _bpfsys.obj_pin(fd, path)
            except LimiterError as e:
                failed.append(str(e))
        if failed:
            raise LimiterError("; ".join(failed))

    def close(self) -> None:
        for _path, fd in self.objects:
            _bpfsys.close(fd)
        self.objects = []


# -- what the data plane knows ----------------------------------------------------------------


def counters(pin: str) -> dict[str, Any]:
    """The counters map summed over CPUs, by field name (see sum_counters)."""
    per_cpu = _read_map(pin, "counters", _ZERO_KEY, _layout.Counters, percpu=True) or []
    return sum_counters(per_cpu)


def sum_counters(per_cpu: list[bytes]) -> dict[str, Any]:
    """Per-CPU raw Counters values summed by field name; missed_by_cause becomes
    {cause name: count} (see _layout.MISSED_CAUSES)."""
    total: dict[str, Any] = {}
    for field in _layout.Counters._fields_:
        total[field[0]] = 0
    causes = dict.fromkeys(_layout.MISSED_CAUSES, 0)
    for raw in per_cpu:
        for name, value in _layout.as_dict(_layout.decode(_layout.Counters, raw)).items():
            if name == "missed_by_cause":
                for cause, count in zip(_layout.MISSED_CAUSES, value):
                    causes[cause] += count
            else:
                total[name] += value
    total["missed_by_cause"] = causes
    return total


def connections(pin: str) -> list[dict[str, Any]]:
    """Live connections (closed and reset ones left out), with consumers per channel."""
    key_size = ctypes.sizeof(_layout.ConnKey)
    live: dict[bytes, dict[str, Any]] = {}
    with _bpfsys.owned_fd(_bpfsys.obj_get(os.path.join(pin, "conns"))) as fd:
        for raw_key in _bpfsys.map_keys(fd, key_size):
            raw = _bpfsys.map_lookup(fd, raw_key, ctypes.sizeof(_layout.ConnState))
            if raw is None:
                continue  # gone since the key was listed
            state = _layout.decode(_layout.ConnState, raw)
            if state.ended:
                continue
            key = _layout.decode(_layout.ConnKey, raw_key)
            live[bytes(raw_key)] = {
                "client": _layout.address_text(key.client_addr),
                "client_port": key.client_port,
                "broker": _layout.address_text(key.broker_addr),
                "broker_port": key.broker_port,
                "consumers": state.consumers,
                "refused": state.refused,
                "synced": bool(state.synced),
                "channels": {
                    str(channel): n for channel, n in _layout.slot_channels(state).items()
                },
                "_epoch": state.epoch,
            }
    with _bpfsys.owned_fd(_bpfsys.obj_get(os.path.join(pin, "channels"))) as fd:
        for raw_key in _bpfsys.map_keys(fd, ctypes.sizeof(_layout.ChanKey)):
            conn = live.get(bytes(raw_key[:key_size]))
            raw = _bpfsys.map_lookup(fd, raw_key, ctypes.sizeof(_layout.ChanState))
            if conn is None or raw is None:
                continue
            value = _layout.decode(_layout.ChanState, raw)
            if value.epoch == conn["_epoch"] and value.consumers:
                channel = _layout.decode(_layout.ChanKey, raw_key).channel
                conn["channels"][str(channel)] = value.consumers
    out = []
    for conn in live.values():
        del conn["_epoch"]
        out.append(conn)
    return sorted(out, key=lambda c: (-c["consumers"], c["client"], c["client_port"]))


def _boot_to_wall() -> float:
    """Seconds to add to a CLOCK_BOOTTIME reading to get the wall-clock time."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def refusals(pin: str) -> dict[str, Any]:
    """The refusal log: the last REFUSAL_LOG_LEN refusals, newest first, and its counters.

    An interface deployed before the log existed (no pin) reads as empty.
    """
    out: dict[str, Any] = {"refusals": [], "rewrites": 0, "fallbacks": 0, "logged": 0}
    if not os.path.exists(os.path.join(pin, "refusals")):
        return out
    raw = _read_map(pin, "refusals", _ZERO_KEY, _layout.RefusalLog)
    if raw is None:
        return out
    return decode_refusals(_layout.decode(_layout.RefusalLog, raw), _boot_to_wall())


def decode_refusals(log: Any, boot_to_wall: float) -> dict[str, Any]:
    """A RefusalLog as plain values (see refusals); boot_to_wall converts entry times."""
    size = _layout.REFUSAL_LOG_LEN
    entries = []
    for n in range(log.next - 1, max(log.next - size, 0) - 1, -1):
        entry = log.ring[n % size]
        if not entry.time_ns:
            continue  # reserved by the program, not written yet
        wall = entry.time_ns / 1e9 + boot_to_wall
        entries.append(
            {
                "time": datetime.datetime.fromtimestamp(wall, datetime.timezone.utc).isoformat(
                    timespec="milliseconds"
                ),
                "client": _layout.address_text(entry.client_addr),
                "client_port": entry.client_port,
                "channel": entry.channel,
                "consumers": entry.consumers,
                "action": _constants.ACTIONS[entry.action]
                if entry.action < len(_constants.ACTIONS)
                else "unknown(%d)" % entry.action,
            }
        )
    return {
        "refusals": entries,
        "rewrites": log.rewrites,
        "fallbacks": log.fallbacks,
        "logged": log.next,
    }


CONTINUATION_ARRAY = "walk_more"


def missing(pin: str) -> list[str]:
    """The names of the layout's maps not pinned in pin."""
    return [name for name in _layout.MAP_NAMES if not os.path.exists(os.path.join(pin, name))]


def continuation_id(pin: str, slot: int = 0) -> int | None:
    """The id of the program in a slot of the walk_more array (0: the slot is empty; None:
    the array is not pinned). Slot 0 holds the ingress walk's continuation."""
    path = os.path.join(pin, CONTINUATION_ARRAY)
    if not os.path.exists(path):
        return None
    with _bpfsys.owned_fd(_bpfsys.obj_get(path)) as fd:
        raw = _bpfsys.map_lookup(fd, struct.pack("=I", slot))
    return struct.unpack("=I", raw[:4])[0] if raw else 0


def egress_slot_id(pin: str) -> int | None:
    """The id of the program in walk_more's egress slot (the egress program, which goes on
    with a long broker segment in itself), as continuation_id."""
    return continuation_id(pin, _constants.EGRESS_MORE_SLOT)


def is_continuation_of(prog_id: int, more_id: int) -> bool:
    """Whether the loaded program more_id came from the same compile as prog_id (the pair's
    ingress program): BCC loads one BTF object per compile and every program of it refers to
    it. Without BTF, a program that uses this pair's maps is taken for its continuation."""
    infos = []
    for pid in (prog_id, more_id):
        with _bpfsys.owned_fd(_bpfsys.prog_get_fd_by_id(pid)) as fd:
            infos.append(_bpfsys.prog_info(fd))
    if infos[0]["btf_id"] or infos[1]["btf_id"]:
        return bool(infos[0]["btf_id"] == infos[1]["btf_id"])
    return set(infos[1]["map_ids"]) <= set(infos[0]["map_ids"]) and bool(infos[1]["map_ids"])
