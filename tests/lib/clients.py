# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Real AMQP 0-9-1 clients (pika, aio-pika, py-amqp) behind one small synchronous API.

The integration tests open consumers the way applications do and look at what they notice.
A consume the limiter refuses with ``drop`` never gets its consume-ok: the segment is gone
and the TCP stream stalls behind it until the broker's heartbeat gives up on the
connection. With ``reset`` the connection dies at once. So every call here waits for its
reply with a short timeout, and a refused consume comes back as ``ConsumeFailed`` with
``kind`` "timeout" (nothing came back) or "connection" (the connection died).

Each client runs its library in a thread of its own (pika and py-amqp: blocking calls on a
worker thread that services heartbeats while idle; aio-pika: an event loop thread), so a
connection stays alive, heartbeats included, while a test runs Ansible for a few seconds.

    client = connect("pika", "198.18.240.11", name="t1")
    outcome = open_consumers(client, "rgi-q", 5)       # consumers one by one
    outcome.count, outcome.error                       # 3, ConsumeFailed('timeout', ...)
"""

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import os
import queue as queue_module
import socket
import threading
import time

AMQP_PORT = 5672
AMQP_USER = "rguser"
AMQP_PASSWORD = "rgpass"
AMQP_VHOST = "/"
# Short on purpose: a refused consume must show up in seconds, not minutes.
HEARTBEAT = 2  # the broker closes a stalled connection after ~2 of these
SOCKET_TIMEOUT = 3  # connect, blocked connection, each library call
CONSUME_TIMEOUT = 2  # how long a consume waits for its consume-ok
LIBRARIES = ("pika", "aio-pika", "amqp")


class ClientError(Exception):
    """A client call failed: ``kind`` is "timeout" (no reply in time), "connection" (the
    connection is gone) or "channel" (the broker closed the channel)."""

    def __init__(self, what, kind, detail, elapsed):
        self.what, self.kind, self.detail, self.elapsed = what, kind, detail, elapsed
        super().__init__("%s: %s after %.2f s: %s" % (what, kind, elapsed, detail))


class ConsumeFailed(ClientError):
    """A basic.consume got no consume-ok."""


# ---------------------------------------------------------------------------------------------
# Which local port is ours (library-agnostic, from /proc)
# ---------------------------------------------------------------------------------------------
def _proc_address(text, family):
    raw = bytes.fromhex(text)
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def own_connections(addr, port=AMQP_PORT):
    """Local ports of this process's established TCP connections to addr:port."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink("/proc/self/fd/" + fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    want = ipaddress.ip_address(addr)
    ports = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open("/proc/self/net/" + name) as table:
            next(table)
            for line in table:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                raddr, rport = remote.split(":")
                if state != "01" or inode not in inodes or int(rport, 16) != port:
                    continue
                if ipaddress.ip_address(_proc_address(raddr, family)) == want:
                    ports.add(int(local.split(":")[1], 16))
    return ports


# ---------------------------------------------------------------------------------------------
# The common API
# ---------------------------------------------------------------------------------------------
class Client:
    """One AMQP connection. Channels are referred to by number."""

    library = None

    def __init__(
        self, addr, port=AMQP_PORT, name=None, heartbeat=HEARTBEAT, timeout=SOCKET_TIMEOUT
    ):
        self.addr, self.port, self.name = addr, port, name
        self.heartbeat, self.timeout = heartbeat, timeout
        self.delivered = 0  # messages received by this connection's consumers
        self.local_port = None
        self.lost = None  # why the connection went away, once it has

    def __repr__(self):
        return "<%s %s [%s]:%s from port %s%s>" % (
            type(self).__name__,
            self.name,
            self.addr,
            self.port,
            self.local_port,
            " lost: %s" % self.lost if self.lost else "",
        )

    def _connected(self, before):
        new = own_connections(self.addr, self.port) - before
        self.local_port = min(new) if len(new) == 1 else None

    # Each takes a timeout; each raises ClientError (ConsumeFailed for consume).
    def channel(self, timeout=None):
        raise NotImplementedError

    def consume(self, channel, queue, timeout=CONSUME_TIMEOUT):
        """Start a consumer; its tag once the consume-ok came."""
        raise NotImplementedError

    def cancel(self, channel, tag, timeout=None):
        raise NotImplementedError

    def close_channel(self, channel, timeout=None):
        raise NotImplementedError

    def publish(self, channel, queue, body, timeout=None):
        raise NotImplementedError

    def close(self, timeout=None):
        """A clean connection.close; abandons the connection if it does not complete."""
        raise NotImplementedError

    @property
    def alive(self):
        raise NotImplementedError

    def wait_lost(self, timeout):
        """Wait until the connection is gone (the broker or the network ended it)."""
        deadline = time.monotonic() + timeout
        while self.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.alive


class _ThreadClient(Client):
    """A blocking library driven from one worker thread (neither pika's BlockingConnection
    nor py-amqp is thread-safe). Between calls the worker services heartbeats."""

    IDLE_SLICE = 0.1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._calls = queue_module.Queue()
        self._conn = None
        self._channels = {}
        self._stop = False
        self._dead = threading.Event()
        before = own_connections(self.addr, self.port)
        ready = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._main, args=(ready,), daemon=True, name="%s %s" % (self.library, self.name)
        )
        self._thread.start()
        try:
            ready.result(self.timeout + 3)
        except Exception as exc:
            self._stop = True
            raise ClientError(
                "connect to %s" % self.addr, "connection", repr(exc), self.timeout
            ) from exc
        self._connected(before)

    def _main(self, ready):
        try:
            self._conn = self._open()
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            self.lost = repr(exc)
            self._dead.set()
            ready.set_exception(exc)
            return
        ready.set_result(True)
        try:
            while not self._stop:
                try:
                    fn, future = self._calls.get(timeout=self.IDLE_SLICE)
                except queue_module.Empty:
                    self._idle()
                    continue
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
                    if self._is_connection_error(exc):
                        self.lost = self.lost or repr(exc)
                        break
        except Exception as exc:  # noqa: BLE001 - the connection died while idle
            self.lost = self.lost or repr(exc)
        finally:
            self._dead.set()
            self._abandon()
            while True:  # nobody will run these any more
                try:
                    _fn, future = self._calls.get_nowait()
                except queue_module.Empty:
                    break
                if future.set_running_or_notify_cancel():
                    future.set_exception(ConnectionError("connection lost: %s" % self.lost))

    def _call(self, what, fn, timeout, error=ClientError):
        timeout = self.timeout if timeout is None else timeout
        start = time.monotonic()
        if self._dead.is_set():
            raise error(what, "connection", "connection lost: %s" % self.lost, 0.0)
        future = concurrent.futures.Future()
        self._calls.put((fn, future))
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise error(what, "timeout", "no reply", time.monotonic() - start) from None
        except Exception as exc:  # noqa: BLE001 - classified for the test
            kind = "connection" if self._is_connection_error(exc) else "channel"
            raise error(what, kind, repr(exc), time.monotonic() - start) from exc

    @property
    def alive(self):
        return not self._dead.is_set()

    def close(self, timeout=None):
        if self.alive:
            with contextlib.suppress(ClientError):
                self._call("close", self._close_connection, timeout)
        self._stop = True
        self._thread.join(timeout if timeout is not None else self.timeout)

    # Library specifics
    def _open(self):
        raise NotImplementedError

    def _idle(self):
        raise NotImplementedError

    def _abandon(self):
        raise NotImplementedError

    def _close_connection(self):
        raise NotImplementedError

    def _is_connection_error(self, exc):
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# pika (BlockingConnection on the worker thread)
# ---------------------------------------------------------------------------------------------
class PikaClient(_ThreadClient):
    library = "pika"

    def _open(self):
        import pika

        params = pika.ConnectionParameters(
            host=self.addr,
            port=self.port,
            virtual_host=AMQP_VHOST,
            credentials=pika.PlainCredentials(AMQP_USER, AMQP_PASSWORD),
            heartbeat=self.heartbeat,
            socket_timeout=self.timeout,
            blocked_connection_timeout=self.timeout,
            stack_timeout=self.timeout + 2,
            connection_attempts=1,
            retry_delay=0,
            client_properties={"connection_name": self.name or "rgi-pika"},
        )
        return pika.BlockingConnection(params)

    def _idle(self):
        self._conn.process_data_events(time_limit=0)
        if self._conn.is_closed:
            raise ConnectionError("connection closed")

    def _abandon(self):
        if self._conn is not None and self._conn.is_open:
            with contextlib.suppress(Exception):
                # Not a clean close: the stream may be stalled. Drop the socket.
                self._conn._impl._transport.abort()  # noqa: SLF001

    def _close_connection(self):
        self._conn.close()
        self._stop = True

    def _is_connection_error(self, exc):
        import pika.exceptions as pe

        return isinstance(
            exc, (pe.AMQPConnectionError, pe.ConnectionWrongStateError, ConnectionError, OSError)
        )

    def _on_message(self, channel, method, _properties, _body):
        self.delivered += 1

    def channel(self, timeout=None):
        def opening():
            ch = self._conn.channel()
            self._channels[ch.channel_number] = ch
            return ch.channel_number

        return self._call("channel.open", opening, timeout)

    def consume(self, channel, queue, timeout=CONSUME_TIMEOUT):
        ch = self._channels[channel]
        return self._call(
            "basic.consume on channel %d" % channel,
            lambda: ch.basic_consume(queue, self._on_message, auto_ack=True),
            timeout,
            ConsumeFailed,
        )

    def cancel(self, channel, tag, timeout=None):
        ch = self._channels[channel]
        return self._call("basic.cancel %s" % tag, lambda: ch.basic_cancel(tag), timeout)

    def close_channel(self, channel, timeout=None):
        ch = self._channels.pop(channel)
        return self._call("channel.close %d" % channel, ch.close, timeout)

    def publish(self, channel, queue, body, timeout=None):
        ch = self._channels[channel]
        return self._call("basic.publish", lambda: ch.basic_publish("", queue, body), timeout)


# ---------------------------------------------------------------------------------------------
# py-amqp (celery's amqp, blocking, on the worker thread)
# ---------------------------------------------------------------------------------------------
class AmqpClient(_ThreadClient):
    library = "amqp"

    def _open(self):
        import amqp

        host = self.addr
        if ":" in host:
            host = "[%s]" % host
        conn = amqp.Connection(
            host="%s:%d" % (host, self.port),
            userid=AMQP_USER,
            password=AMQP_PASSWORD,
            virtual_host=AMQP_VHOST,
            heartbeat=self.heartbeat,
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
            write_timeout=self.timeout,
            client_properties={"connection_name": self.name or "rgi-amqp"},
        )
        conn.connect()
        return conn

    def _idle(self):
        self._conn.heartbeat_tick()
        with contextlib.suppress(socket.timeout):
            self._conn.drain_events(timeout=self.IDLE_SLICE)

    def _abandon(self):
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.collect()  # closes the socket without a handshake

    def _close_connection(self):
        self._conn.close()
        self._stop = True

    def _is_connection_error(self, exc):
        import amqp.exceptions as ae

        return (
            isinstance(
                exc,
                (
                    ae.ConnectionError,
                    ae.RecoverableConnectionError,
                    ConnectionError,
                    OSError,
                    socket.timeout,
                ),
            )
            or self._conn is None
            or not self._conn.connected
        )

    def _on_message(self, _message):
        self.delivered += 1

    def channel(self, timeout=None):
        def opening():
            ch = self._conn.channel()
            self._channels[ch.channel_id] = ch
            return ch.channel_id

        return self._call("channel.open", opening, timeout)

    def consume(self, channel, queue, timeout=CONSUME_TIMEOUT):
        ch = self._channels[channel]
        return self._call(
            "basic.consume on channel %d" % channel,
            lambda: ch.basic_consume(queue, callback=self._on_message, no_ack=True),
            timeout,
            ConsumeFailed,
        )

    def cancel(self, channel, tag, timeout=None):
        ch = self._channels[channel]
        return self._call("basic.cancel %s" % tag, lambda: ch.basic_cancel(tag), timeout)

    def close_channel(self, channel, timeout=None):
        ch = self._channels.pop(channel)
        return self._call("channel.close %d" % channel, ch.close, timeout)

    def publish(self, channel, queue, body, timeout=None):
        import amqp

        ch = self._channels[channel]
        return self._call(
            "basic.publish",
            lambda: ch.basic_publish(amqp.Message(body), exchange="", routing_key=queue),
            timeout,
        )


# ---------------------------------------------------------------------------------------------
# aio-pika (an event loop on its own thread)
# ---------------------------------------------------------------------------------------------
class AioPikaClient(Client):
    library = "aio-pika"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="aio-pika %s" % self.name
        )
        self._thread.start()
        self._channels = {}
        self._queues = {}
        self._conn = None
        before = own_connections(self.addr, self.port)
        try:
            self._conn = self._run("connect", self._connect(), self.timeout + 2)
        except ClientError:
            self._stop_loop()
            raise
        self._connected(before)

    async def _connect(self):
        import aio_pika

        conn = await aio_pika.connect(
            host=self.addr,
            port=self.port,
            login=AMQP_USER,
            password=AMQP_PASSWORD,
            virtualhost=AMQP_VHOST,
            timeout=self.timeout,
            heartbeat=self.heartbeat,
            client_properties={"connection_name": self.name or "rgi-aio-pika"},
        )
        conn.close_callbacks.add(self._on_close)
        return conn

    def _on_close(self, _conn, exc=None):
        if not self.lost:
            self.lost = repr(exc) if exc else "closed"

    def _run(self, what, coro, timeout, error=ClientError):
        start = time.monotonic()
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self._loop)
        try:
            return future.result(timeout + 1)
        except (asyncio.TimeoutError, concurrent.futures.TimeoutError):
            raise error(what, "timeout", "no reply", time.monotonic() - start) from None
        except Exception as exc:  # noqa: BLE001 - classified for the test
            kind = (
                "connection"
                if (not self.alive or isinstance(exc, (ConnectionError, OSError)))
                else "channel"
            )
            raise error(what, kind, repr(exc), time.monotonic() - start) from exc

    @property
    def alive(self):
        return self._conn is not None and self._conn.connected.is_set() and not self._conn.is_closed

    def channel(self, timeout=None):
        async def opening():
            ch = await self._conn.channel(publisher_confirms=False)
            number = ch.number
            self._channels[number] = ch
            return number

        return self._run("channel.open", opening(), timeout or self.timeout)

    async def _queue(self, channel, name):
        key = (channel, name)
        if key not in self._queues:
            self._queues[key] = await self._channels[channel].get_queue(name, ensure=False)
        return self._queues[key]

    async def _on_message(self, _message):
        self.delivered += 1

    def consume(self, channel, queue, timeout=CONSUME_TIMEOUT):
        async def consuming():
            q = await self._queue(channel, queue)
            return await q.consume(self._on_message, no_ack=True)

        return self._run(
            "basic.consume on channel %d" % channel, consuming(), timeout, ConsumeFailed
        )

    def cancel(self, channel, tag, timeout=None):
        async def cancelling():
            ch = await self._channels[channel].get_underlay_channel()
            return await ch.basic_cancel(tag)

        return self._run("basic.cancel %s" % tag, cancelling(), timeout or self.timeout)

    def close_channel(self, channel, timeout=None):
        ch = self._channels.pop(channel)
        for key in [k for k in self._queues if k[0] == channel]:
            del self._queues[key]
        return self._run("channel.close %d" % channel, ch.close(), timeout or self.timeout)

    def publish(self, channel, queue, body, timeout=None):
        import aio_pika

        ch = self._channels[channel]
        return self._run(
            "basic.publish",
            ch.default_exchange.publish(aio_pika.Message(body), routing_key=queue),
            timeout or self.timeout,
        )

    def close(self, timeout=None):
        if self.alive:
            with contextlib.suppress(ClientError):
                self._run("close", self._conn.close(), timeout or self.timeout)
        self._stop_loop()

    def _stop_loop(self):
        if self._conn is not None and self.alive:
            # Abandon (a stalled stream never completes a close): drop the transport.
            with contextlib.suppress(Exception):
                transport = self._conn.transport.connection.writer.transport
                self._loop.call_soon_threadsafe(transport.abort)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(2)


# ---------------------------------------------------------------------------------------------
# Node amqplib (a node process per connection: tests/lib/amqplib_driver.js)
# ---------------------------------------------------------------------------------------------
NODE_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "amqplib_driver.js")
NODE_MODULES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "node", "node_modules"
)


class NodeAmqplibClient(Client):
    """amqplib in a Node process of its own, driven by JSON lines (scripts/setup-host.sh
    installs it under tests/node)."""

    library = "amqplib"

    def __init__(self, *args, **kwargs):
        import json
        import subprocess

        super().__init__(*args, **kwargs)
        self._json = json
        self._replies = {}
        self._lock = threading.Lock()
        self._next = 0
        self._dead = threading.Event()
        self._up = queue_module.Queue()
        self._proc = subprocess.Popen(
            [
                "node",
                NODE_DRIVER,
                self.addr,
                str(self.port),
                AMQP_USER,
                AMQP_PASSWORD,
                AMQP_VHOST,
                str(self.heartbeat),
                self.name or "rgi-amqplib",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True, name="amqplib reader")
        self._reader.start()
        try:
            event = self._up.get(timeout=self.timeout + 5)
        except queue_module.Empty:
            event = {"event": "lost", "detail": "no connection in time"}
        if event["event"] != "connected":
            self._stop_process()
            raise ClientError("connect", "connection", event.get("detail"), 0.0)
        self.local_port = event["local_port"]

    def _read(self):
        for line in self._proc.stdout:
            msg = self._json.loads(line)
            event = msg.get("event")
            if event == "connected":
                self._up.put(msg)
            elif event == "delivered":
                self.delivered += 1
            elif event == "lost":
                self.lost = self.lost or msg.get("detail")
                self._dead.set()
                self._up.put(msg)
            else:
                with self._lock:
                    future = self._replies.pop(msg["id"], None)
                if future is not None:
                    future.set_result(msg)
        self._dead.set()

    def _call(self, what, op, timeout=None, error=ClientError, **args):
        timeout = self.timeout if timeout is None else timeout
        start = time.monotonic()
        if self._dead.is_set():
            raise error(what, "connection", "connection lost: %s" % self.lost, 0.0)
        future = concurrent.futures.Future()
        with self._lock:
            self._next += 1
            ident = self._next
            self._replies[ident] = future
        self._proc.stdin.write(self._json.dumps(dict(args, id=ident, op=op)) + "\n")
        self._proc.stdin.flush()
        try:
            reply = future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise error(what, "timeout", "no reply", time.monotonic() - start) from None
        if "error" in reply:
            err = reply["error"]
            raise error(what, err["kind"], err["detail"], time.monotonic() - start)
        return reply["ok"]

    @property
    def alive(self):
        return not self._dead.is_set()

    def channel(self, timeout=None):
        return self._call("channel.open", "channel", timeout)

    def consume(self, channel, queue, timeout=CONSUME_TIMEOUT):
        what = "basic.consume on channel %d" % channel
        return self._call(what, "consume", timeout, ConsumeFailed, channel=channel, queue=queue)

    def cancel(self, channel, tag, timeout=None):
        return self._call("basic.cancel %s" % tag, "cancel", timeout, channel=channel, tag=tag)

    def close_channel(self, channel, timeout=None):
        return self._call("channel.close %d" % channel, "close_channel", timeout, channel=channel)

    def publish(self, channel, queue, body, timeout=None):
        import base64

        encoded = base64.b64encode(body).decode()
        return self._call("basic.publish", "publish", timeout, channel=channel, queue=queue,
                          body=encoded)  # fmt: skip

    def close(self, timeout=None):
        if self.alive:
            with contextlib.suppress(ClientError):
                self._call("close", "close", timeout)
        self._stop_process()

    def _stop_process(self):
        with contextlib.suppress(Exception):
            self._proc.stdin.close()
        try:
            self._proc.wait(2)
        except Exception:  # noqa: BLE001 - a stalled stream: end the process we started
            self._proc.kill()
            self._proc.wait(2)


# ---------------------------------------------------------------------------------------------
# Helpers the tests use
# ---------------------------------------------------------------------------------------------
CLIENTS = {
    "pika": PikaClient,
    "aio-pika": AioPikaClient,
    "amqp": AmqpClient,
    "amqplib": NodeAmqplibClient,
}


def connect(library, addr, name=None, **kwargs):
    """A connected client of the given library (see LIBRARIES)."""
    return CLIENTS[library](addr, name=name, **kwargs)


class Outcome:
    """What open_consumers saw: consumers opened, (channel, tag) each, and the first
    failure (a ConsumeFailed) or None."""

    def __init__(self):
        self.opened = []
        self.error = None

    @property
    def count(self):
        return len(self.opened)

    def __repr__(self):
        return "<Outcome %d opened, error %r>" % (self.count, self.error)


def open_consumers(client, queue, count, channels=None, timeout=CONSUME_TIMEOUT):
    """Open up to ``count`` consumers on ``client`` one by one, each waiting for its
    consume-ok (``timeout`` s); stop at the first that fails.

    channels: the channel numbers to use, round robin (default: one new channel).
    """
    outcome = Outcome()
    channels = list(channels) if channels else [client.channel()]
    for i in range(count):
        channel = channels[i % len(channels)]
        try:
            tag = client.consume(channel, queue, timeout=timeout)
        except ConsumeFailed as exc:
            outcome.error = exc
            break
        outcome.opened.append((channel, tag))
    return outcome


def declare_queues(addr, names):
    """Declare (durable=False, auto_delete=False) queues with a connection of its own."""
    import pika

    params = pika.ConnectionParameters(
        host=addr,
        port=AMQP_PORT,
        virtual_host=AMQP_VHOST,
        credentials=pika.PlainCredentials(AMQP_USER, AMQP_PASSWORD),
        heartbeat=HEARTBEAT,
        socket_timeout=SOCKET_TIMEOUT,
        blocked_connection_timeout=SOCKET_TIMEOUT,
        connection_attempts=1,
        client_properties={"connection_name": "rgi-admin"},
    )
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        for name in names:
            ch.queue_declare(name, durable=False, auto_delete=False)
    finally:
        conn.close()
