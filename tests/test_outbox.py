"""The outbox on real sockets when the connection's nursery is gone.

Small SO_SNDBUF/SO_RCVBUF on a socketpair make the kernel take part of a frame, as a slow client's would.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from fluxrt_trio.outbox import Flusher, Outbox

SMALL = 4096
# Far more than the small buffers hold, so the kernel takes only part of it.
BIG = b"B" * 100_000


@contextlib.contextmanager
def socket_pair(buffer: int | None = SMALL) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(ours, peer), non-blocking; with `buffer`, both kernel buffers are that small."""
    ours, peer = socket.socketpair()
    try:
        for sock in (ours, peer):
            sock.setblocking(False)
            if buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        yield ours, peer
    finally:
        for sock in (ours, peer):
            trio.lowlevel.notify_closing(sock)
            sock.close()


@contextlib.asynccontextmanager
async def flushing() -> AsyncIterator[tuple[trio.Nursery, Flusher]]:
    """A nursery for writers, and a running Flusher; both stop when the block ends."""
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        yield nursery, flusher
        nursery.cancel_scope.cancel()


async def receive(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes from `sock`."""
    data = bytearray()
    with trio.fail_after(5):
        while len(data) < size:
            await trio.lowlevel.wait_readable(sock)
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise AssertionError(f"EOF after {len(data)} of {size} bytes")
            data += chunk
    return bytes(data)


# ---- the connection's nursery is gone ----------------------------------------------------------------------


async def test_an_outbox_whose_nursery_has_exited_breaks_instead_of_raising():
    async with trio.open_nursery() as exited:
        pass
    with socket_pair() as (ours, _):
        outbox = Outbox(ours, 100, exited, Flusher())
        # The kernel takes part of BIG; the rest needs a writer, which the exited nursery cannot start.
        assert outbox.send_nowait(BIG)
        assert outbox.broken
        assert outbox.backlog == 0
        assert outbox.send_nowait(b"later")
        outbox.close(b"CLOSE")
        with trio.fail_after(1):
            await outbox.wait_drained()


async def test_the_flusher_keeps_flushing_other_outboxes_after_one_whose_nursery_has_exited():
    async with trio.open_nursery() as exited:
        pass
    with socket_pair() as (doomed_sock, _), socket_pair(None) as (ours, peer):
        async with flushing() as (nursery, flusher):
            doomed = Outbox(doomed_sock, 100, exited, flusher)
            healthy = Outbox(ours, 100, nursery, flusher)
            # In one tick, so that the Flusher meets the doomed outbox first, with BIG gathered for it.
            doomed.send_nowait(b"first")
            healthy.send_nowait(b"1")
            doomed.send_nowait(BIG)
            healthy.send_nowait(b"2")
            assert await receive(peer, 2) == b"12"
            assert doomed.broken
            healthy.send_nowait(b"3")
            healthy.send_nowait(b"4")
            assert await receive(peer, 2) == b"34", "the Flusher is still running"


async def test_a_cancelled_writer_breaks_the_outbox_and_nothing_follows_half_a_frame():
    with socket_pair() as (ours, peer):
        async with trio.open_nursery() as connection:
            outbox = Outbox(ours, 100, connection, Flusher())
            outbox.send_nowait(BIG)
            connection.cancel_scope.cancel()
        assert outbox.broken
        assert outbox.send_nowait(b"after")
        # Only what the kernel took of BIG before the cancellation ever reaches the peer.
        received = peer.recv(len(BIG))
        assert 0 < len(received) < len(BIG)
        assert set(received) == {ord("B")}
        with pytest.raises(BlockingIOError):
            peer.recv(1)
