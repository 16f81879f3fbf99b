"""The real limiter program, rendered, compiled with BCC, fed packets by BPF_PROG_TEST_RUN.

Maps are pinned in a private directory under /sys/fs/bpf and read back through the same
userspace code the modules use (_bpfsys + _layout), not through BCC's table objects.
"""

import ctypes
import os
import shutil
import tempfile

from ansible_collections.rabbitguard.limiter.plugins.module_utils import (
    _bpfsys,
    _compile,
    _constants,
    _layout,
    _pins,
    _render,
)

from . import packets

TC_ACT_OK = 0
TC_ACT_SHOT = 2
BROKER_V4 = "198.18.0.1"
BROKER_V6 = "fd00::1"


BPF_MAP_UPDATE_BATCH = 26


class _BatchAttr(ctypes.Structure):
    # bpf_attr's BPF_MAP_*_BATCH member
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


def zero_array(fd, entries, value_size):
    """Zero every value of an array map in one bpf(2) call (65536 single updates take a
    fifth of a second, too long between property-test examples)."""
    keys = (ctypes.c_uint32 * entries)(*range(entries))
    values = ctypes.create_string_buffer(entries * value_size)
    attr = _BatchAttr(
        keys=ctypes.addressof(keys),
        values=ctypes.addressof(values),
        count=entries,
        map_fd=fd,
    )
    _bpfsys._bpf(BPF_MAP_UPDATE_BATCH, attr, "zeroing BPF array fd %d" % fd)
    assert attr.count == entries, attr.count


class Dataplane:
    """One compiled variant of the classifier with its pinned maps."""

    def __init__(
        self,
        limit=3,
        action="drop",
        port=5672,
        l2="ethernet",
        frame_max=_constants.DEFAULT_FRAME_MAX,
        template_path=None,
        force_skb_load_bytes=False,
        strict=False,
        max_frames=None,
        egress_max_frames=None,
    ):
        """template_path: another template (a benchmark's "before"); force_skb_load_bytes:
        the test-only variant that reads every payload byte through the helper."""
        self.pin_dir = tempfile.mkdtemp(prefix="rgtest-", dir=_constants.BPFFS_ROOT)
        try:
            self.config = _render.validate(
                port, limit, action, l2, self.pin_dir, frame_max, strict=strict
            )
            if force_skb_load_bytes:
                self.config = dict(self.config, force_skb_load_bytes=True)
            if max_frames is not None:  # a smaller walk bound, to reach the tail-call limit
                self.config = dict(self.config, max_frames=max_frames)
            if egress_max_frames is not None:  # likewise for the egress walk
                self.config = dict(self.config, egress_max_frames=egress_max_frames)
            self.source = _render.render(self.config, _render.read_template(template_path))
            # An older template (a benchmark's "before") has no continuation, no egress
            # program or map.
            self.bpf, self.function = _compile.compile_and_load(
                self.source, self.pin_dir, fill=_compile.CONTINUATION_FUNCTION in self.source
            )
            self.egress = None
            if _compile.EGRESS_FUNCTION in self.source:
                self.egress = _compile.load_egress(self.bpf)
            self.map_fds = {
                name: _bpfsys.obj_get(os.path.join(self.pin_dir, name))
                for name in _layout.MAP_NAMES
                if os.path.exists(os.path.join(self.pin_dir, name))
            }
        except Exception:
            shutil.rmtree(self.pin_dir, ignore_errors=True)
            raise

    @property
    def port(self):
        return self.config["port"]

    def run(self, packet):
        """(verdict, packet as the program left it)."""
        verdict, _ns, out = _bpfsys.prog_test_run(self.function.fd, packet)
        return verdict, out

    def run_egress(self, packet):
        """The egress program's verdict on a broker-to-client packet."""
        return _bpfsys.prog_test_run(self.egress.fd, packet)[0]

    def bench(self, packet, repeat):
        """Mean ns per run, as the kernel measured it."""
        return _bpfsys.prog_test_run(self.function.fd, packet, repeat=repeat)[1]

    # -- reading the maps ---------------------------------------------------------------
    def conn(self, client, client_port, broker=None):
        broker = broker or (BROKER_V6 if ":" in client else BROKER_V4)
        key = _layout.conn_key(client, client_port, broker, self.port)
        raw = _bpfsys.map_lookup(
            self.map_fds["conns"], bytes(key), ctypes.sizeof(_layout.ConnState)
        )
        return None if raw is None else _layout.decode(_layout.ConnState, raw)

    def channels(self, client, client_port, broker=None):
        """{channel: consumers} of the connection's current epoch, zero counts left out."""
        state = self.conn(client, client_port, broker)
        if state is None:
            return {}
        want = bytes(
            _layout.conn_key(
                client,
                client_port,
                broker or (BROKER_V6 if ":" in client else BROKER_V4),
                self.port,
            )
        )
        fd = self.map_fds["channels"]
        out = _layout.slot_channels(state)
        for raw_key in _bpfsys.map_keys(fd, ctypes.sizeof(_layout.ChanKey)):
            key = _layout.decode(_layout.ChanKey, raw_key)
            if bytes(key.conn) != want:
                continue
            raw = _bpfsys.map_lookup(fd, raw_key, ctypes.sizeof(_layout.ChanState))
            if raw is None:
                continue
            value = _layout.decode(_layout.ChanState, raw)
            if value.epoch == state.epoch and value.consumers:
                out[key.channel] = value.consumers
        return out

    def counters(self):
        """The counters as the info module reads them (the production reader)."""
        return _pins.counters(self.pin_dir)

    def reset_state(self):
        """Empty the connection maps and zero the counters between tests."""
        for name, key_type in (
            ("conns", _layout.ConnKey),
            ("channels", _layout.ChanKey),
            ("egress", _layout.ConnKey),
        ):
            fd = self.map_fds.get(name)
            if fd is None:
                continue
            for key in list(_bpfsys.map_keys(fd, ctypes.sizeof(key_type))):
                _bpfsys.map_delete(fd, key)
        slots = self.map_fds.get("egress_slots")
        if slots is not None:
            zero_array(slots, 1 << _layout.EGRESS_SLOT_BITS, ctypes.sizeof(_layout.EgressSlot))
        slot = (ctypes.sizeof(_layout.Counters) + 7) & ~7
        _bpfsys.map_update(
            self.map_fds["counters"], b"\x00" * 4, b"\x00" * (slot * _bpfsys.possible_cpus())
        )

    def close(self):
        for fd in self.map_fds.values():
            _bpfsys.close(fd)
        self.map_fds = {}
        self.bpf.cleanup()
        shutil.rmtree(self.pin_dir, ignore_errors=True)


def opened(dp, **kwargs):
    """A Flow (kwargs: Flow's) whose SYN and protocol header the program passed."""
    flow = Flow(dp, **kwargs)
    assert flow.handshake() == TC_ACT_OK
    return flow


class Flow:
    """One client connection: builds its segments and tracks its sequence number."""

    def __init__(
        self,
        dp,
        client="198.18.0.2",
        client_port=40000,
        broker=None,
        isn=1000,
        vlans=(),
        l2=True,
        ip_options=b"",
    ):
        self.dp = dp
        self.client, self.client_port = client, client_port
        self.broker = broker or (BROKER_V6 if ":" in client else BROKER_V4)
        self.seq = isn
        self.vlans, self.l2, self.ip_options = vlans, l2, ip_options

    def packet(self, payload=b"", seq=None, flags=packets.ACK | packets.PSH):
        return packets.tcp_packet(
            self.client,
            self.broker,
            self.client_port,
            self.dp.port,
            self.seq if seq is None else seq,
            payload,
            flags,
            vlans=self.vlans,
            l2=self.l2,
            ip_options=self.ip_options,
        )

    def send(self, payload=b"", seq=None, flags=packets.ACK | packets.PSH):
        """Run one segment; the sequence advances only past segments that passed."""
        start = self.seq if seq is None else seq
        verdict, out = self.dp.run(self.packet(payload, start, flags))
        self.last_out = out
        if verdict == TC_ACT_OK:
            self.seq = max(self.seq, start + len(payload))
        return verdict

    def handshake(self):
        """SYN, then the protocol header: the connection as a client opens it."""
        assert self.send(flags=packets.SYN, seq=self.seq - 1) == TC_ACT_OK
        from .amqp import PROTOCOL_HEADER

        return self.send(PROTOCOL_HEADER)

    def state(self):
        return self.dp.conn(self.client, self.client_port, self.broker)

    def channels(self):
        return self.dp.channels(self.client, self.client_port, self.broker)

    def consumers(self):
        state = self.state()
        return None if state is None else state.consumers
