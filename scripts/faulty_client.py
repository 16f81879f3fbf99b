#!/usr/bin/env python3
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A faulty AMQP client: one connection that opens consumers without end.

    .venv/bin/python scripts/faulty_client.py HOST [--port 5672] [--expect N] [--json]

It declares a server-named queue, then calls basic.consume on it again and again (spread
over --channels channels) until something stops it, and prints how many consumers it got.
With the limiter deployed (action refuse, reset or drop), that is exactly the limit: the
consume over the limit is refused (refuse: a 404 channel error, the connection stays open;
reset: the connection dies at once; drop: when the 2 s heartbeat gives up). Without a
limiter it stops at --max and says so.

Exit status: 0, or 1 when --expect N is given and it did not get exactly N consumers, or
2 when it could not connect at all.
"""

import argparse
import contextlib
import json
import sys
import time

import pika
import pika.exceptions


def run(args):
    params = pika.ConnectionParameters(
        host=args.host,
        port=args.port,
        virtual_host=args.vhost,
        credentials=pika.PlainCredentials(args.user, args.password),
        heartbeat=args.heartbeat,
        socket_timeout=args.timeout,
        blocked_connection_timeout=args.timeout,
        stack_timeout=args.timeout * 2,
        connection_attempts=1,
    )
    started = time.monotonic()
    try:
        connection = pika.BlockingConnection(params)
    except pika.exceptions.AMQPError as e:
        return {
            "host": args.host,
            "connected": False,
            "consumers": 0,
            "stopped_by": "%s: %s" % (type(e).__name__, e),
        }
    channels = [connection.channel() for _ in range(args.channels)]
    queue = channels[0].queue_declare("", exclusive=True, auto_delete=True).method.queue
    count, stopped_by, open_after = 0, None, None
    try:
        while count < args.max:
            channels[count % len(channels)].basic_consume(
                queue, on_message_callback=lambda *a: None, auto_ack=True
            )
            count += 1
        if args.hold:
            connection.sleep(args.hold)  # keeps heartbeats going
    except (pika.exceptions.AMQPError, OSError) as e:
        stopped_by = "%s: %s" % (type(e).__name__, e or "connection lost")
        open_after = connection.is_open
    finally:
        if connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                connection.close()
    return {
        "host": args.host,
        "port": args.port,
        "connected": True,
        "consumers": count,
        "refused": stopped_by is not None,
        "stopped_by": stopped_by or "reached --max %d without being refused" % args.max,
        "connection_open_after_refusal": open_after,
        "seconds": round(time.monotonic() - started, 2),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host", help="broker address (IPv4 or IPv6)")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--user", default="rguser")
    parser.add_argument("--password", default="rgpass")
    parser.add_argument("--vhost", default="/")
    parser.add_argument("--channels", type=int, default=2, help="spread consumers over these")
    parser.add_argument("--max", type=int, default=1000, help="stop after this many consumers")
    parser.add_argument(
        "--heartbeat",
        type=int,
        default=2,
        help="seconds (short: a dropped "
        "consume stalls the connection until the heartbeat gives up)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="socket timeout, seconds")
    parser.add_argument(
        "--hold",
        type=float,
        default=0,
        help="when --max is reached, keep the connection open this many seconds",
    )
    parser.add_argument("--expect", type=int, help="exit 1 unless exactly this many consumers")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = run(args)
    if args.expect is not None:
        result["expected"] = args.expect
    if args.json:
        print(json.dumps(result, sort_keys=True))
    elif not result["connected"]:
        print("faulty client: could not connect to %s: %s" % (args.host, result["stopped_by"]))
    else:
        print(
            "faulty client: %s:%d: got %d consumers on one connection, then %s (%.2f s)%s"
            % (
                args.host,
                args.port,
                result["consumers"],
                "refused: " + result["stopped_by"] if result["refused"] else result["stopped_by"],
                result["seconds"],
                {True: "; the connection stays open", False: "; the connection is gone"}.get(
                    result.get("connection_open_after_refusal"), ""
                ),
            )
        )
    if not result["connected"]:
        return 2
    if args.expect is not None and result["consumers"] != args.expect:
        print(
            "faulty client: expected exactly %d consumers, got %d"
            % (args.expect, result["consumers"]),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
