"""A pure-Python reference model of the limiter's accounting: the oracle for the BPF program.

It is written from the semantics (the README's "How it works"), not from the C: it keeps
the whole byte stream the broker has accepted, re-assembled by sequence number, and applies
each frame once, when the bytes that identify it (the 7-octet header, and the class and method ids
of a method frame) have all arrived. A segment that is refused adds nothing: not its
bytes, not its frames.

Scope: one connection, segments in order or overlapping earlier ones (retransmissions,
possibly coalesced with new bytes), never a gap. Gaps, resynchronisation and the
per-segment frame bound are specific to the classifier and covered by named tests.

Cancels free a slot only for a consumer known to be live (README, "Cancels by consumer
tag"): the tags of live consumers are kept, up to TAG_SLOTS per connection; a consumer
beyond them, or whose tag was not whole in the segment that completed its frame's header,
is "untagged", and a cancel of a tag not found takes one of those, if any. A cancel whose
tag is not whole in that segment frees as blindly as before.
``broker=True`` models the broker instead: every tag known, nothing untagged.
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
TAG_SLOTS = 16


class Malformed(Exception):
    """The stream stops being AMQP: the model has nothing more to say about it."""


class ConnectionModel:
    def __init__(self, limit, action="drop", frame_max=131072, broker=False):
        self.limit, self.action, self.frame_max = limit, action, frame_max
        self.broker = broker
        self.tags = []  # (channel, tag) of live consumers, at most TAG_SLOTS (unless broker)
        self.untagged = 0  # live consumers whose tag is not in self.tags
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
        saved = list(self.tags), self.untagged
        cursor, refused, closed = self._apply(candidate, self.cursor, channels, counts)
        if refused:
            self.tags, self.untagged = saved
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
        for name in ("allowed", "cancels", "closes", "cancels_unknown"):
            self.counts[name] += counts[name]
        if closed:
            self.closed = True
            self.channels = {}
            self.tags, self.untagged = [], 0
        return PASS

    def _tag(self, data, at):
        """The shortstr tag whose length octet is at `at`: bytes, or None where it does not
        end inside data (the segment that completed the frame's header; broker: whole)."""
        if at >= len(data) or at + 1 + data[at] > len(data):
            return None if not self.broker else b"?"
        return bytes(data[at + 1 : at + 1 + data[at]])

    def _record(self, channel, tag):
        if tag is None:
            self.untagged += 1
        elif tag == b"":
            pass  # its tag comes with the consume-ok (never, in a client-only stream)
        elif self.broker or len(self.tags) < TAG_SLOTS:
            self.tags.append((channel, tag))
        else:
            self.untagged += 1

    def _cancel_frees(self, channel, tag, counts):
        if tag is None:
            return True
        if (channel, tag) in self.tags:
            self.tags.remove((channel, tag))
            return True
        if self.untagged > 0:
            self.untagged -= 1
            return True
        counts["cancels_unknown"] += 1
        return False

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
                    # The tag follows the queue name (a reserved short first).
                    queue_len_at = cursor + 13
                    tag = None if not self.broker else b"?"
                    if queue_len_at < len(data):
                        tag = self._tag(data, queue_len_at + 1 + data[queue_len_at])
                    self._record(channel, tag)
                elif ids == amqp.BASIC_CANCEL:
                    counts["cancels"] += 1
                    if channels.get(channel) and self._cancel_frees(
                        channel, self._tag(data, cursor + 11), counts
                    ):
                        channels[channel] -= 1
                elif ids in (amqp.CHANNEL_CLOSE, amqp.CHANNEL_CLOSE_OK):
                    counts["closes"] += 1
                    channels.pop(channel, None)
                    self.tags = [t for t in self.tags if t[0] != channel]
                elif ids in (amqp.CONNECTION_CLOSE, amqp.CONNECTION_CLOSE_OK):
                    return end + 1, False, True
            cursor = end + 1
        return cursor, False, False

    def live_channels(self):
        return {channel: n for channel, n in self.channels.items() if n}
