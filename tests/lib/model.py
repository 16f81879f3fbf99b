"""A pure-Python reference model of the limiter's accounting: the oracle for the BPF program.

It is written from the semantics (the README's "How it works"), not from the C: it keeps
the whole byte stream the broker has accepted, re-assembled by sequence number, and applies
each frame once, when the bytes that identify it (the 7-octet header, and the class and method ids
of a method frame) have all arrived. A segment that is refused adds nothing: not its
bytes, not its frames.

Scope: one connection, segments in order or overlapping earlier ones (retransmissions,
possibly coalesced with new bytes), never a gap. Gaps, resynchronisation and the
per-segment frame bound are specific to the classifier and covered by named tests.
"""

import struct
from collections import Counter

from . import amqp

PASS, DROP, RST = "pass", "drop", "rst"
# refuse: a refused consume's queue name becomes this, cut or padded with "-" to its length
# (NUL octets for names of 1..3 octets, which cannot start with "amq.").
REFUSED_NAME = b"amq.rabbitguard.consumer-limit-refused"


def refused_name(length):
    if length < 4:
        return b"\x00" * length
    return (REFUSED_NAME + b"-" * 255)[:length]


_FRAME_TYPES = (amqp.METHOD, amqp.HEADER, amqp.BODY, amqp.HEARTBEAT)


class Malformed(Exception):
    """The stream stops being AMQP: the model has nothing more to say about it."""


class ConnectionModel:
    def __init__(self, limit, action="drop", frame_max=131072):
        self.limit, self.action, self.frame_max = limit, action, frame_max
        self.start_seq = None
        self.stream = bytearray()  # accepted bytes, protocol header first
        self.cursor = len(amqp.PROTOCOL_HEADER)  # next frame not yet applied
        self.channels = {}  # channel -> live consumers
        self.counts = Counter()  # allowed, refused, cancels, closes
        self.reset_sent = False
        self.closed = False
        self.mark = None  # refuse: (stream offset, length) of the last rewritten name
        self.output = b""  # refuse: the last segment as it reaches the broker

    @property
    def consumers(self):
        return sum(self.channels.values())

    def segment(self, seq, payload):
        """The verdict on one client-to-broker segment."""
        self.output = payload
        if self.reset_sent or self.closed:
            return PASS
        if self.start_seq is None:
            if not payload.startswith(amqp.PROTOCOL_HEADER):
                raise ValueError("the model starts at the protocol header")
            self.start_seq = seq
        offset = (seq - self.start_seq) & 0xFFFFFFFF
        if offset > len(self.stream):
            raise ValueError("the model does not cover gaps in the stream")
        overlap = len(self.stream) - offset
        candidate = self.stream + payload[overlap:]

        channels, counts = dict(self.channels), Counter()
        self._new_mark = None
        cursor, refused, closed = self._apply(candidate, self.cursor, channels, counts)
        self.output = payload
        self.counts["refused"] += counts["refused"]
        if refused:
            # The broker's TCP takes a RST only exactly at the next sequence number it
            # expects (RFC 5961): any other refused segment is dropped, even with reset.
            if self.action == "reset" and offset == len(self.stream):
                self.reset_sent = True
                self.channels = {}
                return RST
            return DROP
        self.stream, self.cursor, self.channels = candidate, cursor, channels
        # refuse: the name rewritten in this segment, else the last one (a retransmission,
        # or the rest of a name the previous segment cut), one range per segment.
        self.mark = self._new_mark or self.mark
        if self.mark:
            start, length = self.mark
            out = bytearray(payload)
            for i in range(max(start - offset, 0), min(start + length - offset, len(out))):
                out[i] = refused_name(length)[offset + i - start]
            self.output = bytes(out)
        for name in ("allowed", "cancels", "closes"):
            self.counts[name] += counts[name]
        if closed:
            self.closed = True
            self.channels = {}
        return PASS

    def _apply(self, data, cursor, channels, counts):
        """Apply every frame identifiable in data from cursor on.

        Returns (cursor, refused, connection_closed).
        """
        rewritten = None  # refuse: the channel whose consume this segment rewrites
        while True:
            # A frame's end octet is checked once the next frame's position is reached.
            after_frame = cursor > len(amqp.PROTOCOL_HEADER)
            if after_frame and cursor - 1 < len(data) and data[cursor - 1] != amqp.FRAME_END:
                raise Malformed("no frame-end octet at %d" % (cursor - 1))
            if cursor + 7 > len(data):
                break
            frame_type, channel, size = struct.unpack_from(">BHI", data, cursor)
            # AMQP's frame_max counts the 8 framing octets.
            if frame_type not in _FRAME_TYPES or size + 8 > self.frame_max:
                raise Malformed("frame at %d: type %d size %d" % (cursor, frame_type, size))
            end = cursor + 7 + size
            if frame_type == amqp.METHOD:
                if cursor + 11 > len(data):
                    break
                ids = struct.unpack_from(">HH", data, cursor + 7)
                if ids == amqp.BASIC_CONSUME:
                    # A consume the broker takes as a connection error is never counted.
                    if channel == 0:
                        raise Malformed("basic.consume on channel 0 at %d" % cursor)
                    if end < len(data) and data[end] != amqp.FRAME_END:
                        raise Malformed("basic.consume without its end octet at %d" % cursor)
                    if sum(channels.values()) >= self.limit:
                        counts["refused"] += 1
                        if self.action == "refuse":
                            # Refused in place (its queue name rewritten: the broker closes
                            # that channel), not counted; the walk goes on. Dropped instead
                            # when the name's length octet is not in this segment, the name
                            # is empty, or a second channel needs a rewrite in the segment;
                            # another one on the same channel needs none.
                            name_len_at = cursor + 13
                            if rewritten is None:
                                if name_len_at >= len(data) or data[name_len_at] == 0:
                                    return cursor, True, False
                                rewritten = channel
                                self._new_mark = (name_len_at + 1, data[name_len_at])
                            elif channel != rewritten:
                                return cursor, True, False
                            cursor = end + 1
                            continue
                        if self.action != "monitor":
                            return cursor, True, False
                    else:
                        counts["allowed"] += 1
                    channels[channel] = channels.get(channel, 0) + 1
                elif ids == amqp.BASIC_CANCEL:
                    counts["cancels"] += 1
                    if channels.get(channel):
                        channels[channel] -= 1
                elif ids in (amqp.CHANNEL_CLOSE, amqp.CHANNEL_CLOSE_OK):
                    counts["closes"] += 1
                    channels.pop(channel, None)
                elif ids in (amqp.CONNECTION_CLOSE, amqp.CONNECTION_CLOSE_OK):
                    return end + 1, False, True
            cursor = end + 1
        return cursor, False, False

    def live_channels(self):
        return {channel: n for channel, n in self.channels.items() if n}
