"""AMQP 0-9-1 frames as bytes, for crafted test traffic (client to broker only).

Layouts from the 0-9-1 spec; class and method ids from rabbitmq-codegen.
"""

import struct

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_END = 0xCE

METHOD, HEADER, BODY, HEARTBEAT = 1, 2, 3, 8

CONNECTION_CLOSE = (10, 50)
CONNECTION_CLOSE_OK = (10, 51)
CHANNEL_OPEN = (20, 10)
CHANNEL_CLOSE = (20, 40)
CHANNEL_CLOSE_OK = (20, 41)
BASIC_QOS = (60, 10)
BASIC_CONSUME = (60, 20)
BASIC_CANCEL = (60, 30)
BASIC_PUBLISH = (60, 40)
BASIC_ACK = (60, 80)


def frame(frame_type, channel, payload):
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + bytes([FRAME_END])


def shortstr(text):
    raw = text.encode()
    return bytes([len(raw)]) + raw


def method(channel, class_method, args=b""):
    class_id, method_id = class_method
    return frame(METHOD, channel, struct.pack(">HH", class_id, method_id) + args)


def consume(channel, queue="q", tag="ctag", no_ack=False, no_wait=False):
    """basic.consume; its tag is cancel()'s by default (tag="": the broker makes one up,
    told in its consume-ok)."""
    bits = (0x02 if no_ack else 0x00) | (0x08 if no_wait else 0x00)
    args = struct.pack(">H", 0) + shortstr(queue) + shortstr(tag) + bytes([bits])
    return method(channel, BASIC_CONSUME, args + struct.pack(">I", 0))  # empty table


def cancel(channel, tag="ctag"):
    return method(channel, BASIC_CANCEL, shortstr(tag) + b"\x00")


def channel_open(channel):
    return method(channel, CHANNEL_OPEN, shortstr(""))


def channel_close(channel):
    return method(
        channel, CHANNEL_CLOSE, struct.pack(">H", 200) + shortstr("bye") + struct.pack(">HH", 0, 0)
    )


def channel_close_ok(channel):
    return method(channel, CHANNEL_CLOSE_OK)


def connection_close():
    return method(
        0, CONNECTION_CLOSE, struct.pack(">H", 200) + shortstr("bye") + struct.pack(">HH", 0, 0)
    )


def connection_close_ok():
    return method(0, CONNECTION_CLOSE_OK)


def heartbeat():
    return frame(HEARTBEAT, 0, b"")


def publish(channel, body, exchange="", routing_key="q", frame_max=131072):
    """basic.publish, its content header and the body split into body frames."""
    out = method(
        channel,
        BASIC_PUBLISH,
        struct.pack(">H", 0) + shortstr(exchange) + shortstr(routing_key) + b"\x00",
    )
    out += frame(HEADER, channel, struct.pack(">HHQH", 60, 0, len(body), 0))
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        out += frame(BODY, channel, body[start : start + chunk])
    return out


def consume_lookalike_body():
    """Body bytes that look like a complete basic.consume method frame."""
    return consume(1) * 3


# -- broker to client ------------------------------------------------------------------------
BASIC_DELIVER = (60, 60)
BASIC_CONSUME_OK = (60, 21)
BASIC_CANCEL_OK = (60, 31)


def consume_ok(channel, tag="ctag"):
    return method(channel, BASIC_CONSUME_OK, shortstr(tag))


def cancel_ok(channel, tag="ctag"):
    return method(channel, BASIC_CANCEL_OK, shortstr(tag))


def server_cancel(channel, tag="ctag"):
    """basic.cancel as the broker sends it (queue deleted): nowait set, no answer."""
    return method(channel, BASIC_CANCEL, shortstr(tag) + b"\x01")


def deliver(channel, body, tag="ctag", delivery_tag=1, frame_max=131072):
    """basic.deliver, its content header and the body split into body frames."""
    args = shortstr(tag) + struct.pack(">Q", delivery_tag) + b"\x00" + shortstr("") + shortstr("q")
    out = method(channel, BASIC_DELIVER, args)
    out += frame(HEADER, channel, struct.pack(">HHQH", 60, 0, len(body), 0))
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        out += frame(BODY, channel, body[start : start + chunk])
    return out
