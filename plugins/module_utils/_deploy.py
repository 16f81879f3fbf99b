# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Deploy, observe and remove the limiter on a host: the pinned maps are the truth.

Layout under the pin root (default /sys/fs/bpf/rabbitguard):
    v<LAYOUT_VERSION>/<namespace key>/<interface>/{conns,channels,counters,config}
The namespace key is "host", "netns-<name>" for a named network namespace, or
"ns-<inode>" for one given by path (/proc/PID/ns/net). The config map records what is
deployed (with the digest of the rendered source); the tc filter's name carries the
same digest, so the state check needs no compiler.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ctypes
import errno
import fcntl
import os
import re
import string
import time
from contextlib import contextmanager

from . import _bpfsys, _compile, _layout, _plan, _render, _tc
from ._errors import LimiterError

DEFAULT_PIN_ROOT = "/sys/fs/bpf/rabbitguard"
# Our slot on the clsact ingress hook: a fixed pref and handle, so a replace swaps our
# filter in place and never adds a second one.
FILTER_PREF = 49152
FILTER_HANDLE = 0x5247
LOCK_PATH = "/run/lock/rabbitguard-limiter.lock"
HOST_KEY = "host"
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
_NETNS_NAME_RE = re.compile(r"^[A-Za-z0-9_.@:+-]+$")
_PLAIN = frozenset(string.ascii_letters + string.digits + "_-")


# -- names and paths --------------------------------------------------------------------


def path_component(name):
    """A name as a bpffs directory name: bpffs refuses dots (eth0.100, a VLAN), so every
    byte but letters, digits, '_' and '-' is %-escaped, reversibly."""
    return "".join(
        chr(b) if chr(b) in _PLAIN else "%%%02x" % b for b in bytearray(name.encode("utf-8"))
    )


def from_path_component(component):
    out, i = bytearray(), 0
    while i < len(component):
        if component[i] == "%":
            out.append(int(component[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(component[i]))
            i += 1
    return out.decode("utf-8")


def namespace_key(netns):
    """The directory name that identifies a network namespace under the pin root."""
    if netns is None:
        return HOST_KEY
    if "/" not in netns:
        if not _NETNS_NAME_RE.match(netns):
            raise LimiterError("netns %r: a name may hold letters, digits and ._@:+- only" % netns)
        return "netns-" + path_component(netns)
    try:
        return "ns-%d" % os.stat(netns).st_ino
    except OSError as e:
        raise LimiterError("netns %s: %s" % (netns, e.strerror))


def resolve_namespace(key):
    """(found, netns argument) for a namespace key read back from the pins."""
    if key == HOST_KEY:
        return True, None
    if key.startswith("netns-"):
        name = from_path_component(key.partition("-")[2])
        return os.path.exists(os.path.join("/run/netns", name)), name
    if key.startswith("ns-"):
        inode = int(key.partition("-")[2])
        candidates = [os.path.join("/run/netns", n) for n in _listdir("/run/netns")]
        candidates += ["/proc/%s/ns/net" % p for p in _listdir("/proc") if p.isdigit()]
        for path in candidates:
            try:
                if os.stat(path).st_ino == inode:
                    return True, path
            except OSError:
                continue
    return False, None


def layout_root(pin_root):
    return os.path.join(pin_root, "v%d" % _layout.LAYOUT_VERSION)


def pin_dir(pin_root, ns_key, ifname):
    return os.path.join(layout_root(pin_root), ns_key, path_component(ifname))


def pinned_namespaces(pin_root):
    return sorted(_listdir(layout_root(pin_root)))


def pinned_interfaces(pin_root, ns_key):
    return sorted(
        from_path_component(name) for name in _listdir(os.path.join(layout_root(pin_root), ns_key))
    )


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return []
        raise LimiterError("listing %s: %s" % (path, e.strerror))


# -- host checks and the lock -------------------------------------------------------------


def check_bpffs():
    if not _bpfsys.is_bpffs(_render.BPFFS_ROOT):
        raise LimiterError(
            "bpffs is not mounted at %s: mount it with 'mount -t bpf bpf %s' "
            "(the rabbitguard.limiter.tc_limiter role does this persistently)"
            % (_render.BPFFS_ROOT, _render.BPFFS_ROOT)
        )


def check_kernel_headers(kernel_headers):
    """BCC compiles against a kernel tree; say how to get one when there is none."""
    release = os.uname()[2]
    tree = kernel_headers or "/lib/modules/%s/build" % release
    # Debian splits a tree in two (build -> ...-amd64, source -> ...-common); BCC reads both.
    candidates = [tree] if kernel_headers else [tree, "/lib/modules/%s/source" % release]
    if any(os.path.isfile(os.path.join(t, "include", "linux", "kconfig.h")) for t in candidates):
        return tree
    raise LimiterError(
        "no kernel headers at %s: install linux-headers-%s (Debian/Ubuntu) or "
        "kernel-devel-%s (RHEL family), or point kernel_headers at a kernel build tree"
        % (tree, release, release)
    )


@contextmanager
def host_lock(timeout):
    """Serialise runs on one host: a second run waits, never interleaves."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except (IOError, OSError) as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.time() >= deadline:
                    raise LimiterError(
                        "another rabbit_tc_limit run holds %s; waited %d s "
                        "(raise lock_timeout to wait longer)" % (LOCK_PATH, timeout)
                    )
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


# -- reading what is deployed ---------------------------------------------------------------


def _read_map(pin, name, key, value_type, percpu=False):
    path = os.path.join(pin, name)
    with _bpfsys.owned_fd(_bpfsys.obj_get(path)) as fd:
        if percpu:
            return _bpfsys.map_lookup_percpu(fd, key, ctypes.sizeof(value_type))
        return _bpfsys.map_lookup(fd, key, ctypes.sizeof(value_type))


def read_config(pin):
    """The config pinned for one interface, or None if absent or never written."""
    if not os.path.exists(os.path.join(pin, "config")):
        return None
    raw = _read_map(pin, "config", b"\x00" * 4, _layout.DeployedConfig)
    value = _layout.decode(_layout.DeployedConfig, raw) if raw else None
    if value is None or not any(value.digest):
        return None
    return {
        "port": value.port,
        "limit": value.limit,
        "action": _layout.ACTION_NAMES[value.action]
        if value.action < len(_layout.ACTION_NAMES)
        else "unknown",
        "l2": "ethernet" if value.ethernet else "none",
        "frame_max": value.frame_max,
        "digest": bytes(bytearray(value.digest)).hex(),
        "created_clsact": bool(value.flags & _layout.FLAG_CREATED_CLSACT),
    }


def write_config(pin, config, digest, created_clsact):
    value = _layout.DeployedConfig(
        port=config["port"],
        limit=config["limit"],
        action=_layout.ACTION_NAMES.index(config["action"]),
        ethernet=1 if config["l2"] == "ethernet" else 0,
        frame_max=config["frame_max"],
        flags=_layout.FLAG_CREATED_CLSACT if created_clsact else 0,
    )
    value.digest[:] = list(bytearray.fromhex(digest))
    with _bpfsys.owned_fd(_bpfsys.obj_get(os.path.join(pin, "config"))) as fd:
        _bpfsys.map_update(fd, b"\x00" * 4, bytes(value))


def pins_present(pin):
    return all(os.path.exists(os.path.join(pin, name)) for name in _layout.MAP_NAMES)


def our_slot(tc, ifname):
    """The filter at our pref/handle on ifname's ingress, or None."""
    for tc_filter in tc.list_filters(ifname):
        if tc_filter["pref"] == FILTER_PREF and tc_filter["handle"] == FILTER_HANDLE:
            return tc_filter
    return None


def interface_exists(tc, ifname):
    return bool(tc.ipr.link_lookup(ifname=ifname))


def l2_kind(tc, ifname):
    """'ethernet' when tc sees an Ethernet header on ifname (loopback too), else 'none'."""
    link = tc.ipr.get_links(tc.interface_index(ifname))[0]
    return "ethernet" if link["ifi_type"] in (ARPHRD_ETHER, ARPHRD_LOOPBACK) else "none"


def observe(tc, pin_root, ns_key, ifnames):
    """{ifname: observation} for the named interfaces and every interface with pins."""
    observed = {}
    for ifname in sorted(set(ifnames) | set(pinned_interfaces(pin_root, ns_key))):
        pin = pin_dir(pin_root, ns_key, ifname)
        exists = interface_exists(tc, ifname)
        observed[ifname] = {
            "exists": exists,
            "pins": pins_present(pin),
            "pin_dir": pin,
            "config": read_config(pin),
            "filter": our_slot(tc, ifname) if exists else None,
        }
    return observed


# -- desired state ------------------------------------------------------------------------


def desire(tc, pin_root, ns_key, ifname, params, template):
    """The rendered source and desired state for one interface (validates everything)."""
    config = _render.validate(
        params["port"],
        params["limit"],
        params["action"],
        l2_kind(tc, ifname),
        pin_dir(pin_root, ns_key, ifname),
        params["frame_max"],
    )
    source = _render.render(config, template)
    return source, {"config": config, "digest": _render.source_digest(source)}


# -- changing things --------------------------------------------------------------------------


def deploy(tc, ifname, source, desired, observed):
    """Compile, attach (atomic replace) and record. Returns the new program id.

    Until the attach succeeds nothing the user relies on has changed: a failure before it
    removes what this call created (new pins, a new clsact) and leaves the previous
    filter in place and working.
    """
    config, digest = desired["config"], desired["digest"]
    pin = config["pin_dir"]
    new_pins = [name for name in _layout.MAP_NAMES if not os.path.exists(os.path.join(pin, name))]
    created_clsact = False
    prog_fd = None
    try:
        prog_fd = _compile.compile_isolated(source, pin)
        created_clsact = tc.ensure_clsact(ifname)
        _clear_foreign(tc, ifname, observed.get("filter"))
        tc.attach(ifname, prog_fd, _plan.filter_name(digest), FILTER_PREF, FILTER_HANDLE)
    except Exception:
        if created_clsact:
            tc.remove_clsact_if_empty(ifname)
        if len(new_pins) == len(_layout.MAP_NAMES):
            unpin_interface(pin)  # nothing was here: leave no directory either
        else:
            _unpin(pin, new_pins)
        if prog_fd is not None:
            _bpfsys.close(prog_fd)
        raise
    try:
        previously = (observed.get("config") or {}).get("created_clsact", False)
        write_config(pin, config, digest, created_clsact or previously)
        return _bpfsys.prog_info(prog_fd)["id"]
    finally:
        _bpfsys.close(prog_fd)


def _clear_foreign(tc, ifname, found):
    """Delete a foreign filter in our slot that attach cannot swap in place.

    The kernel keeps one classifier kind and one protocol per pref, so a replace at our
    pref/handle over, say, a "protocol ip" bpf filter or a flower filter fails with
    "Protocol mismatch" / "kind does not match". Our slot is ours (see the module's notes):
    such a filter goes first, by its own kind and protocol. A foreign bpf filter for all
    protocols is left to the attach, which replaces it atomically.
    """
    if found is None or _plan.is_ours(found):
        return
    if found.get("kind") == "bpf" and found.get("protocol") == _tc.ETH_P_ALL:
        return
    try:
        tc.ipr.tc(
            "del-filter",
            found["kind"],
            tc.interface_index(ifname),
            FILTER_HANDLE,
            parent=_tc.TC_H_INGRESS_HOOK,
            prio=FILTER_PREF,
            protocol=found["protocol"],
        )
    except _tc._NL_ERRORS as e:
        raise LimiterError(
            "removing the foreign %s filter (protocol 0x%04x) at pref %d, "
            "handle 0x%x of %s ingress: %s"
            % (found["kind"], found["protocol"], FILTER_PREF, FILTER_HANDLE, ifname, _tc._reason(e))
        )


def remove(tc, ifname, observed):
    """Detach our filter, drop the clsact qdisc if we made it and it is empty, unpin."""
    if observed.get("exists"):
        if _plan.is_ours(observed.get("filter")):
            tc.detach(ifname, FILTER_PREF, FILTER_HANDLE)
        if (observed.get("config") or {}).get("created_clsact"):
            tc.remove_clsact_if_empty(ifname)
    unpin_interface(observed["pin_dir"])


def unpin_interface(pin):
    _unpin(pin, _listdir(pin))
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
            raise LimiterError("removing %s: %s" % (directory, e.strerror))


def _unpin(pin, names):
    for name in names:
        path = os.path.join(pin, name)
        try:
            os.unlink(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise LimiterError("unpinning %s: %s" % (path, e.strerror))


# -- what the data plane knows ----------------------------------------------------------------


def counters(pin):
    per_cpu = _read_map(pin, "counters", b"\x00" * 4, _layout.Counters, percpu=True) or []
    total = dict.fromkeys([name for name, _type in _layout.Counters._fields_], 0)
    for raw in per_cpu:
        for name, value in _layout.as_dict(_layout.decode(_layout.Counters, raw)).items():
            total[name] += value
    return total


def connections(pin):
    """Live connections (closed and reset ones left out), with consumers per channel."""
    key_size = ctypes.sizeof(_layout.ConnKey)
    live = {}
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
                "channels": {},
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
