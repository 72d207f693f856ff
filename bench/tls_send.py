"""Micro-measurement: what one `tls.TlsSocket.send` of a small frame costs, beside a plain `socket.send` of it and
beside OpenSSL's share alone (`SSLObject.write` + `MemoryBIO.read`, no socket).

The TlsSocket sends over one end of a socketpair (send buffers of 4 MiB, the other end drained every 64 sends, so the
kernel always takes everything: the path of a paced fan-out's send to a reader that keeps up) after a TLS 1.3
handshake done in memory with a client trusting a throwaway CA (tests/support/tls.py). Prints, per variant, the
minimum and the median over the runs of the time per send; the minimum is the least disturbed by other load.
TlsSocket.send less the other two is the Python wrapper around them (bench/RESULTS.md, "TLS fan-out (issue 18)").

    .venv/bin/python bench/tls_send.py [--sends 200000] [--runs 8] [--frame-bytes 193]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import REPO_ROOT

DRAIN_EVERY = 64
BUFFER = 1 << 22


def tls_pair(directory: Path) -> tuple[Any, socket.socket]:
    """A TlsSocket over one end of a socketpair, its handshake done in memory, and the other (raw) end."""
    from fluxrt_trio import tls
    from tests.support.tls import make_ca

    ca = make_ca(directory, "fluxrt bench CA")
    settings = tls.load(str(ca.server_cert), str(ca.server_key))
    server_end, client_end = socket.socketpair()
    for end in (server_end, client_end):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    server_end.setblocking(False)
    server = tls.TlsSocket(server_end, settings.context)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ca.client_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    # The handshake goes through memory: each side's flight is written straight into the other's incoming buffer.
    while True:
        for side in (client, server._ssl):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        if outgoing.pending:
            server._incoming.write(outgoing.read())
        elif server._outgoing.pending:
            incoming.write(server._outgoing.read())
        else:
            break
    return server, client_end


def per_send(send: Callable[[bytes], object], drain: socket.socket | None, frame: bytes, sends: int) -> float:
    """Microseconds per call of `send(frame)`, reading `drain` empty every DRAIN_EVERY calls."""
    t0 = time.perf_counter()
    for i in range(sends):
        send(frame)
        if drain is not None and i % DRAIN_EVERY == DRAIN_EVERY - 1:
            drain.recv(BUFFER)
    return (time.perf_counter() - t0) / sends * 1e6


def sealer(server: Any) -> Callable[[bytes], None]:
    """OpenSSL's part of a send alone: encrypt into the memory buffer and take the record out of it."""
    write, read = server._ssl.write, server._outgoing.read

    def seal(data: bytes) -> None:
        write(data)
        read()

    return seal


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sends", type=int, default=200_000, help="sends per run (default 200000)")
    parser.add_argument("--runs", type=int, default=8, help="runs per variant (default 8)")
    parser.add_argument("--frame-bytes", type=int, default=193, help="frame size (default 193, the fan-out bench's)")
    args = parser.parse_args()
    # This tree's fluxrt_trio and tests, also when run from a worktree (the venv's editable install points elsewhere).
    sys.path.insert(0, str(REPO_ROOT))
    import fluxrt_trio

    print(f"fluxrt_trio from {Path(fluxrt_trio.__file__).parent}")
    frame = b"x" * args.frame_bytes
    times: dict[str, list[float]] = {
        "socket.send (plain)": [],
        "SSLObject.write + MemoryBIO.read": [],
        "TlsSocket.send": [],
    }
    with tempfile.TemporaryDirectory(prefix="fluxrt-tls-send-") as tmp:
        for run in range(args.runs):
            plain, plain_peer = socket.socketpair()
            plain.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
            times["socket.send (plain)"].append(per_send(plain.send, plain_peer, frame, args.sends))
            plain.close()
            plain_peer.close()
            server, peer = tls_pair(Path(tmp) / str(run))
            times["SSLObject.write + MemoryBIO.read"].append(per_send(sealer(server), None, frame, args.sends))
            server, peer = tls_pair(Path(tmp) / f"{run}b")
            times["TlsSocket.send"].append(per_send(server.send, peer, frame, args.sends))
    print(f"one send of {args.frame_bytes} bytes, {args.runs} runs of {args.sends}:")
    for name, values in times.items():
        print(f"  {name:<34} min {min(values):6.3f} us, median {statistics.median(values):6.3f} us")
    wrapper = (
        min(times["TlsSocket.send"])
        - min(times["socket.send (plain)"])
        - min(times["SSLObject.write + MemoryBIO.read"])
    )
    print(f"  TlsSocket.send less the other two (minimums): {wrapper:.3f} us of Python around them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
