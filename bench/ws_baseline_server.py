"""Minimal broadcast server on the ``websockets`` asyncio API, used as the fan-out baseline.

It speaks the subset of the fluxrt protocol the fan-out benchmark uses, so the same client
code drives both servers:

* ``{"type":"subscribe","channel":C}`` -> ``{"type":"ack","channel":C,"status":"subscribed"}``
* ``{"type":"broadcast","channel":C,"payload":P}`` -> every *other* subscriber of C receives
  ``{"type":"broadcast","channel":C,"payload":P}``; the sender gets nothing back.
* ``GET /health`` -> 200, so readiness is probed the same way as for fluxrt.

Per broadcast it does what fluxrt has to do and no more: parse the JSON, serialize the
outgoing frame once, and hand it to ``websockets.asyncio.server.broadcast()``.

With ``--tls-cert`` and ``--tls-key`` it serves TLS (``websockets.serve(ssl=...)``, asyncio's TLS transport), with
the settings fluxrt's native TLS uses (TLS 1.2 or later, ALPN http/1.1, no renegotiation).

Run: ``python bench/ws_baseline_server.py --port 18081 [--path /realtime] [--tls-cert PEM --tls-key PEM]``
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import ssl
from http import HTTPStatus

import orjson
from websockets.asyncio.server import Request, Response, ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed


def raise_nofile_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; thousands of sockets need it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class BaselineServer:
    """Channel registry plus the connection handler."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.channels: dict[str, set[ServerConnection]] = {}

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/health":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if request.path != self.path:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        joined: list[str] = []
        try:
            async for raw in ws:
                msg = orjson.loads(raw)
                kind = msg.get("type")
                channel = msg.get("channel")
                if kind == "broadcast":
                    subscribers = self.channels.get(channel)
                    if subscribers:
                        # Serialize once; text=True sends orjson's UTF-8 bytes as a text frame
                        # without a str round trip, as fluxrt does.
                        frame = orjson.dumps({"type": "broadcast", "channel": channel, "payload": msg.get("payload")})
                        broadcast((c for c in subscribers if c is not ws), frame, text=True)
                elif kind == "subscribe":
                    self.channels.setdefault(channel, set()).add(ws)
                    joined.append(channel)
                    ack = {"type": "ack", "channel": channel, "status": "subscribed"}
                    await ws.send(orjson.dumps(ack), text=True)
        except ConnectionClosed:
            # Bench clients drop TCP without a close handshake; not worth a traceback each.
            pass
        finally:
            for channel in joined:
                subscribers = self.channels.get(channel)
                if subscribers is not None:
                    subscribers.discard(ws)
                    if not subscribers:
                        del self.channels[channel]


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context as fluxrt_trio/tls.py's `load` makes it, so both servers negotiate the same with a client."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(cert_file, key_file)
    return context


async def run(host: str, port: int, path: str, ping_interval: float | None, tls: ssl.SSLContext | None) -> None:
    app = BaselineServer(path)
    stop = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
    # backlog matches the kernel's somaxconn default so a connect burst doesn't hit SYN retries
    # (asyncio's default is 100); it has no effect once connections are established.
    async with serve(
        app.handler,
        host,
        port,
        process_request=app.process_request,
        compression=None,
        ping_interval=ping_interval,
        backlog=4096,
        ssl=tls,
    ):
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/realtime")
    parser.add_argument(
        "--ping-interval",
        type=float,
        default=None,
        help="websockets keepalive ping interval in seconds (default: off; server pings would be "
        "counted as payload bytes by the benchmark client)",
    )
    parser.add_argument("--tls-cert", help="serve TLS with this PEM certificate (with --tls-key)")
    parser.add_argument("--tls-key", help="the PEM private key of --tls-cert")
    args = parser.parse_args()
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    tls = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    raise_nofile_limit()
    asyncio.run(run(args.host, args.port, args.path, args.ping_interval, tls))


if __name__ == "__main__":
    main()
