"""A TCP-realistic differential harness for the classifier (issue 7, item 2).

Three models around the real program:

* ``ClientGen`` writes an AMQP client's byte stream (protocol header, channel opens,
  consumes, cancels, channel closes, close-oks, heartbeats, publishes whose bodies span
  segments and hold consume look-alikes). An honest stream never has more than ``limit``
  live consumers; a faulty one asks for more.
* ``TcpRun`` is the client's TCP: it cuts the stream into segments the way a sender does
  (an MSS cut anywhere, inside the protocol header and frame headers too), keeps sending
  new segments while an earlier one waits for retransmission, retransmits exactly,
  partially or coalesced with new bytes, and, per perturbation family, reorders, loses
  segments before the classifier and injects RST/SYN/FIN in and out of the window. Every
  segment goes through the real program (BPF_PROG_TEST_RUN); what it passes goes to
* ``BrokerTcp``, the broker's receiving TCP: it delivers bytes in order only (holding
  out-of-order data until the hole is filled), accepts a RST only at exactly rcv_nxt and
  ignores a SYN on the established connection (RFC 5961), and never sees a dropped segment.

The oracle is the reference model (tests/lib/model.py) fed what the broker's TCP delivered:
it must never see more than ``limit`` live consumers (bar b). The honest check is the same
model on the client's intended stream: an honest stream must reach the broker whole, never
dropped, never reset (bar a).

Runs are deterministic in their seed; ``shrink`` removes operations from a failing stream
while it still fails, for a short reproducible report.
"""

import random
import re
import struct

from . import amqp, packets
from .dataplane import TC_ACT_OK, TC_ACT_SHOT
from .model import ConnectionModel

FRAME_MAX = 4096
WINDOW = 65535  # the broker's receive window, in bytes
MAX_STALLS = 4  # retransmission rounds without progress before the client gives up
CLIENT_PORT_BASE = 1024


# -- the client's AMQP stream ------------------------------------------------------------
class ClientGen:
    """Random client operations with the live-consumer bookkeeping an honest client keeps.

    ``ops`` is the list of (name, args) the stream is made of; ``render(ops)`` gives its
    bytes, so a shrinker can drop operations and re-render.
    """

    def __init__(self, rng, limit, honest):
        self.rng, self.limit, self.honest = rng, limit, honest
        self.live = {}  # channel -> live consumers, as the client knows them
        self.open = set()

    def _consume(self, ops, ch):
        if ch not in self.open:
            ops.append(("channel_open", ch))
            self.open.add(ch)
        ops.append(("consume", ch))
        self.live[ch] = self.live.get(ch, 0) + 1

    def fill(self, ops):
        """Consumes up to the limit: the state of a busy, long-lived connection."""
        while sum(self.live.values()) < self.limit:
            self._consume(ops, self.rng.randint(1, 4))

    def ops(self, count):
        rng, out = self.rng, []
        for _ in range(count):
            roll = rng.random()
            ch = rng.randint(1, 4)
            total = sum(self.live.values())
            if roll < 0.34:
                if self.honest and total >= self.limit:
                    # An honest client frees a slot before it subscribes again.
                    busy = sorted(c for c, n in self.live.items() if n)
                    victim = rng.choice(busy)
                    if rng.random() < 0.7:
                        out.append(("cancel", victim))
                        self.live[victim] -= 1
                    else:
                        out.append(("channel_close", victim))
                        self.live[victim] = 0
                        self.open.discard(victim)
                self._consume(out, ch)
            elif roll < 0.46:
                busy = sorted(c for c, n in self.live.items() if n)
                if busy and not self.honest and rng.random() < 0.3:
                    # A faulty client cancels a tag that was never its consumer: the broker
                    # answers cancel-ok and cancels nothing.
                    out.append(("cancel_made_up", rng.choice(busy)))
                elif busy:
                    victim = rng.choice(busy)
                    out.append(("cancel", victim))
                    self.live[victim] -= 1
            elif roll < 0.52:
                out.append((rng.choice(("channel_close", "channel_close_ok")), ch))
                self.live[ch] = 0
                self.open.discard(ch)
            elif roll < 0.62:
                out.append(("heartbeat", None))
            elif roll < 0.67:
                out.append(("qos", ch))
            else:
                kind = rng.random()
                if kind < 0.4:
                    size = rng.randint(0, 300)
                elif kind < 0.7:
                    size = rng.randint(FRAME_MAX - 100, 2 * FRAME_MAX + 50)
                else:
                    size = rng.randint(300, 3000)
                lookalike = rng.random() < 0.5
                out.append(("publish", (ch, size, lookalike)))
        return out


def _table(fields):
    raw = b"".join(
        amqp.shortstr(k.decode()) + b"S" + struct.pack(">I", len(v)) + v for k, v in fields
    )
    return struct.pack(">I", len(raw)) + raw


# What a client sends after the protocol header, before any channel: connection.start-ok
# (its properties table makes it a few hundred octets), tune-ok and connection.open.
HANDSHAKE = (
    amqp.method(
        0,
        (10, 11),
        _table([(b"product", b"rabbitguard-harness"), (b"platform", b"Python " + b"x" * 150)])
        + amqp.shortstr("PLAIN")
        + struct.pack(">I", 12)
        + b"\x00guest\x00guest"
        + amqp.shortstr("en_US"),
    )
    + amqp.method(0, (10, 31), struct.pack(">HIH", 2047, FRAME_MAX, 60))
    + amqp.method(0, (10, 40), amqp.shortstr("/") + amqp.shortstr("") + b"\x00")
)


def render(ops):
    out = [amqp.PROTOCOL_HEADER, HANDSHAKE]
    for name, arg in ops:
        if name == "publish":
            ch, size, lookalike = arg
            unit = amqp.consume(1) if lookalike else bytes(range(256))
            body = (unit * (size // len(unit) + 1))[:size]
            out.append(amqp.publish(ch, body, frame_max=FRAME_MAX))
        elif name == "heartbeat":
            out.append(amqp.heartbeat())
        elif name == "qos":
            out.append(amqp.method(arg, amqp.BASIC_QOS, struct.pack(">IHB", 0, 10, 0)))
        elif name == "connection_close":
            out.append(amqp.connection_close())
        elif name == "cancel_made_up":
            out.append(amqp.cancel(arg, tag="made-up"))
        else:
            out.append(getattr(amqp, name)(arg))
    return b"".join(out)


def over_limit(stream, limit):
    """Consumes over the limit in a stream, by the reference model (0: honest)."""
    if len(stream) <= len(amqp.PROTOCOL_HEADER):
        return 0
    model = ConnectionModel(limit, "monitor", frame_max=FRAME_MAX, broker=True)
    model.segment(0, bytes(stream))
    return model.counts["refused"]


def model_counts(stream, limit):
    model = ConnectionModel(limit, "monitor", frame_max=FRAME_MAX)
    model.segment(0, bytes(stream))
    return model.counts


def model_counts_passed(run, limit):
    """The model's counts fed the data segments the classifier passed, as they were cut
    (offsets from where it first saw the connection; the protocol header given whole, as
    the classifier must have had it); one that passed ahead of a hole waits for it, as the
    broker's TCP holds it. None where a hole stays, or the model cannot follow."""
    model = ConnectionModel(limit, "monitor", frame_max=FRAME_MAX)
    header = len(amqp.PROTOCOL_HEADER)
    first = run.start or header
    ahead = []
    model.segment(0, amqp.PROTOCOL_HEADER)
    for what, off, length, _flags, outcome in run.trace:
        if outcome != "pass" or not length or what.startswith("inject"):
            continue
        payload = run.stream[off : off + length]
        # Bytes before the header's end (or the pickup point) are not the walk's.
        if off + length <= first:
            continue
        if off < first:
            payload, off = payload[first - off :], first
        ahead.append((header + off - first, payload))
        fed = True
        while fed:
            fed = False
            for item in list(ahead):
                if item[0] > len(model.stream):
                    continue
                ahead.remove(item)
                try:
                    model.segment(item[0], item[1])
                except ValueError:
                    return None
                fed = True
    return None if ahead else model.counts


# -- the broker's TCP ----------------------------------------------------------------------
class BrokerTcp:
    """A receiver in ESTABLISHED state, offsets relative to the protocol header's seq."""

    def __init__(self, size):
        self.have = bytearray(size)  # 1 where a byte has been received
        self.rcv_nxt = 0
        self.reset = False
        self.fin = False

    def receive(self, off, length, flags):
        if self.reset:
            return
        if flags & packets.RST:
            # RFC 5961 3.2: only a RST at exactly rcv_nxt resets; any other gets a
            # challenge ACK and is otherwise ignored. Its payload is never data.
            if off == self.rcv_nxt:
                self.reset = True
            return
        if flags & packets.SYN:
            return  # RFC 5961 4.2: a SYN on an established connection: challenge ACK
        end = min(off + length, self.rcv_nxt + WINDOW, len(self.have))
        start = max(off, self.rcv_nxt)
        if start < end:
            self.have[start:end] = b"\x01" * (end - start)
            hole = self.have.find(0, self.rcv_nxt)
            self.rcv_nxt = len(self.have) if hole < 0 else hole
        if flags & packets.FIN and off + length == self.rcv_nxt == len(self.have):
            self.fin = True


# -- perturbation families ---------------------------------------------------------------
class Family:
    """How the client's TCP and the network behave.

    mss: callable(rng) -> segment size; flight: segments sent per round; retx: shapes of
    retransmission; spurious: chance of resending already delivered bytes; reorder
    ("network": adjacent swaps and reversed windows of 4; "hostile": every flight sent last
    segment first, by a client that reorders on purpose), loss: network effects before the
    classifier; control: injected RST/SYN/FIN.
    cut_header: the 8-octet protocol header may be cut, or coalesced with what follows
    (elsewhere it is the first segment, alone, as a client sends it before it waits for
    connection.start). send_while_stalled: new segments go out while an earlier one waits
    for retransmission (without it the client stops and waits: the in-order baselines).
    pickup: the classifier first sees the connection at a frame boundary mid-stream (it
    predates the limiter, or its entry was evicted); the bars apply to what it saw.
    """

    def __init__(
        self,
        name,
        mss,
        flight=(1, 1),
        retx=("exact",),
        spurious=0.0,
        reorder=None,
        loss=0.0,
        control=False,
        cut_header=False,
        send_while_stalled=True,
        pickup=False,
    ):
        self.cut_header, self.send_while_stalled = cut_header, send_while_stalled
        self.pickup = pickup
        self.name, self.mss, self.flight, self.retx = name, mss, flight, retx
        self.spurious, self.reorder, self.loss, self.control = spurious, reorder, loss, control


def _mss_real(rng):
    return rng.choice((1448, 1448, 536, rng.randint(200, 1448)))


def _mss_cuts(rng):
    return rng.choice((rng.randint(1, 12), rng.randint(1, 40), rng.randint(1, 300), 1448))


FAMILIES = {
    f.name: f
    for f in (
        Family("inorder", _mss_real, send_while_stalled=False),
        Family("cuts", _mss_cuts, send_while_stalled=False),
        Family("cuts_protocol_header", _mss_cuts, cut_header=True, send_while_stalled=False),
        Family("retx_after_later", _mss_cuts, flight=(2, 6)),
        Family(
            "retx_partial_coalesced",
            _mss_cuts,
            flight=(1, 5),
            retx=("exact", "partial", "coalesced"),
            spurious=0.25,
        ),
        Family("reorder", _mss_cuts, flight=(2, 8), retx=("exact", "coalesced"), reorder="network"),
        Family("reorder_hostile", _mss_cuts, flight=(2, 8), reorder="hostile"),
        Family("loss", _mss_cuts, flight=(1, 6), retx=("exact", "partial", "coalesced"), loss=0.2),
        Family("control", _mss_cuts, flight=(1, 4), control=True),
        Family("pickup", _mss_real, flight=(1, 4), pickup=True),
    )
}


# -- the client's TCP, through the classifier, to the broker ------------------------------
class TcpRun:
    """One connection: the client's TCP sending ``stream`` through ``dp`` to a broker."""

    def __init__(self, dp, stream, family, rng, client, client_port, isn, start=0):
        """start: where the classifier first sees the connection (0: from its SYN on; else
        a frame boundary: the broker already has the bytes before it)."""
        self.dp, self.stream, self.family, self.rng = dp, stream, family, rng
        self.client, self.client_port, self.isn = client, client_port, isn
        self.broker_addr = "fd00::1" if ":" in client else "198.18.0.1"
        self.broker = BrokerTcp(len(stream))
        self.start = self.snd_nxt = self.broker.rcv_nxt = start
        self.broker.have[:start] = b"\x01" * start
        self.sent_ends = {}  # segment start -> end, as first sent
        self.trace = []  # (what, offset, length, flags, outcome)
        self.refusals = 0  # segments dropped or turned into a RST by the classifier
        # strict: segments ahead of what the broker has, dropped to come again in order
        self.strict = bool(dp.config.get("strict"))
        self.held = 0
        self.changed = 0  # segments passed but altered otherwise (never allowed)
        self.stalls = 0
        self.gave_up = False

    # one segment through the classifier
    def _classify(self, what, off, payload=b"", flags=packets.ACK | packets.PSH):
        seq = (self.isn + off) & 0xFFFFFFFF
        packet = packets.tcp_packet(
            self.client, self.broker_addr, self.client_port, self.dp.port, seq, payload, flags
        )
        verdict, out = self.dp.run(packet)
        if verdict == TC_ACT_SHOT and self.strict and off > self.broker.rcv_nxt:
            # Not a refusal: strict holds it (a refused consume ahead of the broker is
            # refused again when it comes in order, and counted then).
            outcome = "HOLD"
            self.held += 1
        elif verdict == TC_ACT_SHOT:
            outcome = "DROP"
            self.refusals += 1
        elif verdict != TC_ACT_OK:
            outcome = "verdict %d" % verdict
            self.changed += 1
        elif out != packet:
            if packets.tcp_flags(out) & packets.RST and not flags & packets.RST:
                outcome = "RST"
                self.refusals += 1
                self.broker.receive(off, len(payload), flags | packets.RST)
            else:
                outcome = "CHANGED"
                self.changed += 1
        else:
            outcome = "pass"
            self.broker.receive(off, len(payload), flags)
        self.trace.append((what, off, len(payload), flags, outcome))
        return outcome

    def syn(self):
        self._classify("syn", -1, flags=packets.SYN)

    def _cut(self, start, limit_end):
        end = start + self.family.mss(self.rng)
        if start == 0 and not self.family.cut_header:
            # A client sends the protocol header alone, then waits for connection.start.
            end = len(amqp.PROTOCOL_HEADER)
        return start, min(limit_end, end)

    def _retransmission(self):
        """A retransmission from snd_una: exact, partial, or coalesced with more bytes."""
        una = self.broker.rcv_nxt
        rng = self.rng
        orig_end = None
        for start, end in self.sent_ends.items():
            if start <= una < end and (orig_end is None or end > orig_end):
                orig_end = end
        if orig_end is None:
            orig_end = min(self.snd_nxt, una + self.family.mss(rng))
        shape = rng.choice(self.family.retx)
        if shape == "partial" and orig_end - una > 1:
            end = rng.randint(una + 1, orig_end - 1)
        elif shape == "coalesced":
            end = min(len(self.stream), orig_end + rng.randint(1, 600))
        else:
            end = orig_end
        return una, max(end, una + 1), shape

    def _control(self):
        """An injected RST, SYN or FIN, in or out of the window (never at rcv_nxt)."""
        rng, nxt = self.rng, self.broker.rcv_nxt
        flag = rng.choice((packets.RST, packets.SYN, packets.FIN | packets.ACK))
        # In the window but not at rcv_nxt; a FIN only beyond the client's last byte, where
        # it ends nothing the client still sends (the broker queues it, never reaches it).
        low = len(self.stream) + 1 if flag & packets.FIN else nxt + 1
        if rng.random() < 0.5 and low < nxt + WINDOW:
            off = rng.randint(low, nxt + WINDOW - 1)
            kind = "in-window"
        else:
            off = nxt + rng.choice((WINDOW + rng.randint(1, 2**30), -rng.randint(1, 2**30)))
            kind = "out-of-window"
        if flag & packets.RST:
            flag |= packets.ACK
        return "inject %s %s" % (packets_flag_name(flag), kind), off, flag

    def advance(self, until=None):
        """Rounds of sending until the stream (or its first ``until`` bytes) is delivered,
        the broker reset the connection, or the client gives up."""
        until = len(self.stream) if until is None else until
        rng, fam = self.rng, self.family
        while not self.broker.reset and self.broker.rcv_nxt < until:
            flight = []
            una = self.broker.rcv_nxt
            if una < self.snd_nxt:
                start, end, shape = self._retransmission()
                flight.append(("retx-" + shape, start, end))
                self.snd_nxt = max(self.snd_nxt, end)
            if fam.spurious and rng.random() < fam.spurious and una > 0:
                start = rng.randint(max(0, una - 3000), una - 1)
                end = min(len(self.stream), start + fam.mss(rng))
                flight.append(("spurious", start, end))
                self.snd_nxt = max(self.snd_nxt, end)
            # Without send_while_stalled the client stops and waits for the missing segment.
            stop = flight and not fam.send_while_stalled
            for _ in range(0 if stop else rng.randint(*fam.flight)):
                if self.snd_nxt >= until or self.snd_nxt >= una + WINDOW:
                    break
                start, end = self._cut(self.snd_nxt, until)
                flight.append(("new", start, end))
                self.sent_ends.setdefault(start, end)
                self.snd_nxt = end
            if fam.reorder == "hostile":
                flight.reverse()
            elif fam.reorder and len(flight) > 1:
                flight = reorder(rng, flight)
            if fam.control and rng.random() < 0.5:
                flight.insert(rng.randint(0, len(flight)), self._control())
            before = self.broker.rcv_nxt
            for item in flight:
                what, off, third = item
                if what.startswith("inject"):
                    self._classify(what, off, flags=third)
                    continue
                # Loss before the classifier: a first transmission, never seen; the
                # retransmission that follows always gets through the network.
                if fam.loss and what == "new" and rng.random() < fam.loss:
                    self.trace.append(("lost " + what, off, third - off, 0, "-"))
                    continue
                self._classify(what, off, self.stream[off:third])
            if self.broker.rcv_nxt > before:
                self.stalls = 0
            else:
                self.stalls += 1
                if self.stalls > MAX_STALLS:
                    self.gave_up = True
                    return

    def close(self):
        """The client's normal end: a bare FIN at the end of its data."""
        if not (self.broker.reset or self.gave_up):
            self._classify("fin", len(self.stream), flags=packets.FIN | packets.ACK)

    @property
    def delivered(self):
        return self.stream[: self.broker.rcv_nxt]


def packets_flag_name(flags):
    return "+".join(
        name
        for name, bit in (("RST", packets.RST), ("SYN", packets.SYN), ("FIN", packets.FIN))
        if flags & bit
    )


def reorder(rng, flight):
    """Adjacent swaps, or a reversed window of 4, as a multi-path network does."""
    flight = list(flight)
    if rng.random() < 0.5 or len(flight) < 4:
        for i in range(len(flight) - 1):
            if rng.random() < 0.5:
                flight[i], flight[i + 1] = flight[i + 1], flight[i]
    else:
        i = rng.randint(0, len(flight) - 4)
        flight[i : i + 4] = reversed(flight[i : i + 4])
    return flight


# -- one stream, start to end ---------------------------------------------------------------
def endpoint(index, ipv6):
    """A 4-tuple of its own for each stream of a test."""
    port = CLIENT_PORT_BASE + index % 60000
    hi = index // 60000
    if ipv6:
        return "fd00::%x:2" % (hi + 2), port
    return "198.18.%d.%d" % (1 + hi // 250, 2 + hi % 250), port


def make_ops(seed, limit):
    rng = random.Random(seed)
    honest = rng.random() < 0.5
    gen = ClientGen(rng, limit, honest)
    ops = gen.ops(rng.randint(3, 30))
    if rng.random() < 0.2:
        ops.append(("connection_close", None))
    return ops


def run_stream(dp, family, limit, action, seed, index, ops=None, bars=("a", "b", "counts")):
    """Run one stream; returns (failures, run, ops)."""
    ops = make_ops(seed, limit) if ops is None else ops
    stream = render(ops)
    rng = random.Random(seed * 7919 + 1)
    # Every fourth stream IPv6; an ISN near the wrap-around in half of them.
    client, port = endpoint(index, rng.random() < 0.25)
    isn = rng.choice((rng.randint(0, 2**32 - 1), 2**32 - rng.randint(1, 200)))
    start = 0
    if family.pickup:
        start = len(render(ops[: rng.randint(0, len(ops))]))
    before = dp.counters()
    run = TcpRun(dp, stream, family, rng, client, port, isn, start)
    if not start:
        run.syn()
    run.advance()
    run.close()
    return judge(run, stream, limit, action, before, dp, bars), run, ops


def judge(run, stream, limit, action, counters_before, dp, bars=("a", "b", "counts")):
    """The bars. Returns a list of failure descriptions (empty: the stream passed)."""
    failures = []
    if run.changed:
        failures.append("a passed segment was altered")
    honest = over_limit(stream, limit) == 0
    if "a" in bars and (honest or action == "monitor"):
        if run.refusals:
            failures.append("(a) %d segments refused of an honest stream" % run.refusals)
        elif run.broker.rcv_nxt < len(stream) or run.broker.reset:
            failures.append(
                "(a) honest stream not delivered: %d of %d bytes%s"
                % (run.broker.rcv_nxt, len(stream), ", reset" if run.broker.reset else "")
            )
    # What the classifier can know of: the stream from where it first saw it. Consumers
    # from before that are the broker's, not the limiter's (an honest stream is honest here).
    seen = stream if not run.start else amqp.PROTOCOL_HEADER + stream[run.start :]
    # Consumer tags not whole in their segment take the documented fallback (README,
    # "Cancels by consumer tag"): a cancel frees a slot blindly, a consume counts untagged
    # (which a made-up cancel may free). Either leaves the limiter's count one below the
    # broker's, for as long as that consumer (or its channel) lives: one cut tag is one
    # consumer more at the broker, not one consume more. A faulty client at the limit can
    # then get a consume over it each time it frees a slot the honest way (e.g. a channel
    # close), so counting consumes over the limit would hold a cut tag against the limiter
    # several times over. The bar is therefore on consumers live at the broker: never more
    # than limit + the cut tags (counted, tags_unreadable); with none cut, never over limit.
    cut_tags = 0
    if counters_before is not None:
        # Cancels freed blindly where the tag step's budget ran out count the same way.
        now = dp.counters()
        cut_tags = sum(
            now[name] - counters_before[name] for name in ("tags_unreadable", "cancels_blind")
        )
    if "b" in bars and action != "monitor":
        delivered = seen[: len(seen) - len(stream) + run.broker.rcv_nxt]
        if over_limit(delivered, limit + cut_tags):
            failures.append(
                "(b) the broker held more than limit + cut tags (%d + %d) live consumers:"
                " %d consumes over the limit" % (limit, cut_tags, over_limit(delivered, limit))
            )
    if "counts" in bars and action == "monitor" and counters_before is not None:
        after = dp.counters()
        want, passed = model_counts(seen, limit), None
        if cut_tags:
            # Where a tag was cut, the model fed the stream whole has no cut to take the
            # fallback at; fed the segments the classifier passed, cut where they were, it
            # takes the same fallback (and a lower count may shift several consumes from
            # refused to allowed). Without a cut, both feeds count the same.
            passed = model_counts_passed(run, limit)
            want = passed or want
        got = {
            name: after[name] - counters_before[name]
            for name in ("consumes_allowed", "consumes_refused", "cancels", "channel_closes")
        }
        expect = {
            "consumes_allowed": want["allowed"],
            "consumes_refused": want["refused"],
            "cancels": want["cancels"],
            "channel_closes": want["closes"],
        }
        # Where the passed segments leave a hole, the whole stream's counts, with what each
        # cut tag may have shifted from refused to allowed (one each, as a rule).
        slack = expect["consumes_refused"] - got["consumes_refused"]
        shifted = got["consumes_allowed"] == expect["consumes_allowed"] + slack
        if cut_tags and not passed and 0 < slack <= cut_tags and shifted:
            got["consumes_allowed"] -= slack
            got["consumes_refused"] += slack
        if got != expect:
            failures.append("monitor counters %s, model %s" % (got, expect))
    return failures


def shrink(attempt, ops):
    """Remove operations while ``attempt(ops)`` still fails; the smallest failing ops."""
    changed = True
    while changed:
        changed = False
        i = 0
        while i < len(ops):
            candidate = ops[:i] + ops[i + 1 :]
            if attempt(candidate):
                ops, changed = candidate, True
            else:
                i += 1
    return ops


def describe(seed, family, ops, run, failures):
    lines = [
        "seed %d, family %s: %s" % (seed, family.name, "; ".join(failures)),
        "ops: %r" % (ops,),
        "stream %d bytes, isn %d; segments (what, offset, length, flags, outcome):"
        % (len(run.stream), run.isn),
    ]
    lines += ["  %r" % (t,) for t in run.trace[:80]]
    if len(run.trace) > 80:
        lines.append("  ... %d more" % (len(run.trace) - 80))
    return "\n".join(lines)


# -- map sizes, from the rendered template --------------------------------------------------
def map_size(source, name):
    """max_entries of the map called name, as the program declares it."""
    match = re.search(
        r"BPF_TABLE(?:_PINNED)?\(\s*\"[a-z_]+\"\s*,[^,]+,[^,]+,\s*%s\s*,\s*(\w+)" % name, source
    )
    if not match:
        raise ValueError("map %s not found in the program source" % name)
    size = match.group(1)
    for _ in range(5):
        if size.isdigit():
            return int(size)
        define = re.search(r"#define\s+%s\s+\(?\s*(\w+)" % re.escape(size), source)
        if not define:
            break
        size = define.group(1)
    raise ValueError("size of map %s not understood: %s" % (name, match.group(1)))
