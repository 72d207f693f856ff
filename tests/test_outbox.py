"""The outbox on real sockets: partial writes, sendmsg batches, half-close, the backlog limit, and a connection
nursery that is gone.

Small SO_SNDBUF/SO_RCVBUF on a socketpair make the kernel take part of a frame, as a slow client's would.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
import trio.testing

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


async def receive_until_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    with trio.fail_after(5):
        while True:
            await trio.lowlevel.wait_readable(sock)
            chunk = sock.recv(65536)
            if not chunk:
                return bytes(data)
            data += chunk


def numbered(n: int) -> list[bytes]:
    return [b"%07d\n" % i for i in range(n)]


# ---- partial sends -----------------------------------------------------------------------------------------


async def test_the_rest_of_a_partly_sent_frame_goes_first_and_order_is_kept():
    with socket_pair() as (ours, peer):
        async with flushing() as (nursery, flusher):
            outbox = Outbox(ours, 100, nursery, flusher)
            frames = [BIG, b"second", b"third"]
            for frame in frames:
                assert outbox.send_nowait(frame)
            assert outbox.backlog == 3, "the kernel took part of BIG, so everything waits behind its tail"
            assert await receive(peer, sum(map(len, frames))) == b"".join(frames)
            await outbox.wait_drained()
            assert outbox.backlog == 0
            assert not outbox.broken


@pytest.mark.parametrize("buffer", [None, SMALL], ids=["fast-reader", "slow-reader"])
async def test_more_frames_than_sendmsg_takes_at_once_go_out_in_batches(buffer):
    # Linux refuses more than 1,024 buffers in one sendmsg (IOV_MAX) with EMSGSIZE: a single oversized call would
    # break the outbox and lose every frame. The fast reader takes the pending path (first frame sent at once, the
    # rest gathered in the tick); the slow reader's frames queue behind a partial write and go out from the writer.
    frames = numbered(3000)
    with socket_pair(buffer) as (ours, peer):
        async with flushing() as (nursery, flusher):
            outbox = Outbox(ours, 10_000, nursery, flusher)
            if buffer is not None:
                assert outbox.send_nowait(BIG)
                frames.insert(0, BIG)
            for frame in frames[1 if buffer is not None else 0 :]:
                assert outbox.send_nowait(frame)
            assert await receive(peer, sum(map(len, frames))) == b"".join(frames)
            await outbox.wait_drained()
            assert not outbox.broken


# ---- ticks --------------------------------------------------------------------------------------------------


async def test_the_first_frame_of_every_tick_goes_out_at_once_and_the_rest_at_the_ticks_end():
    # Ticks of one frame per outbox, as a paced broadcast makes them, then a tick of two frames: each tick's first
    # frame is in the kernel before send_nowait returns, including after ticks in which nothing was collected, and
    # the second frame of a tick waits for the tick to end.
    with socket_pair(None) as (ours, peer), socket_pair(None) as (ours_too, peer_too):
        async with flushing() as (nursery, flusher):
            pairs = [(Outbox(ours, 100, nursery, flusher), peer), (Outbox(ours_too, 100, nursery, flusher), peer_too)]
            for tick in range(3):
                for outbox, reader in pairs:
                    assert outbox.send_nowait(b"tick %d" % tick)
                    assert reader.recv(100) == b"tick %d" % tick
                await trio.testing.wait_all_tasks_blocked()
            outbox, reader = pairs[0]
            assert outbox.send_nowait(b"first")
            assert outbox.send_nowait(b"second")
            assert reader.recv(100) == b"first"
            with pytest.raises(BlockingIOError):
                reader.recv(100)
            assert await receive(reader, len(b"second")) == b"second"


# ---- half-close --------------------------------------------------------------------------------------------


async def test_close_delivers_everything_queued_then_the_peer_reads_eof():
    with socket_pair() as (ours, peer):
        async with flushing() as (nursery, flusher):
            outbox = Outbox(ours, 100, nursery, flusher)
            for frame in (BIG, b"one", b"two"):
                outbox.send_nowait(frame)
            outbox.close(b"CLOSE")
            assert outbox.send_nowait(b"after close"), "dropped, not refused: the connection is ending"
            assert await receive_until_eof(peer) == BIG + b"onetwoCLOSE"
            # A half-close: the peer can still send (its close frame) and we can still read it.
            peer.send(b"bye")
            await trio.lowlevel.wait_readable(ours)
            assert ours.recv(16) == b"bye"


async def test_discard_backlog_drops_queued_frames_but_finishes_the_partly_sent_one():
    with socket_pair() as (ours, peer):
        async with flushing() as (nursery, flusher):
            outbox = Outbox(ours, 100, nursery, flusher)
            for frame in (BIG, b"queued", b"queued too"):
                outbox.send_nowait(frame)
            outbox.close(b"CLOSE", discard_backlog=True)
            assert await receive_until_eof(peer) == BIG + b"CLOSE"


async def test_discard_backlog_drops_frames_gathered_in_this_tick():
    with socket_pair(None) as (ours, peer):
        async with flushing() as (nursery, flusher):
            outbox = Outbox(ours, 100, nursery, flusher)
            outbox.send_nowait(b"sent at once")
            outbox.send_nowait(b"gathered")
            outbox.close(b"CLOSE", discard_backlog=True)
            assert await receive_until_eof(peer) == b"sent at onceCLOSE"


# ---- the backlog limit -------------------------------------------------------------------------------------


async def test_past_the_limit_a_frame_is_refused_whole():
    with socket_pair() as (ours, peer):
        async with flushing() as (nursery, flusher):
            outbox = Outbox(ours, 3, nursery, flusher)
            accepted = [BIG, b"one", b"two"]
            for frame in accepted:
                assert outbox.send_nowait(frame)
            assert not outbox.send_nowait(b"refused")
            assert outbox.backlog == 3
            assert await receive(peer, sum(map(len, accepted))) == b"".join(accepted)
            await outbox.wait_drained()
            assert outbox.send_nowait(b"room again")
            assert await receive(peer, len(b"room again")) == b"room again"


# ---- wait_drained ------------------------------------------------------------------------------------------


async def test_wait_drained_returns_once_the_kernel_took_everything():
    with socket_pair() as (ours, peer):
        async with flushing() as (nursery, flusher):
            outbox = Outbox(ours, 100, nursery, flusher)
            with trio.fail_after(1):
                await outbox.wait_drained()
            outbox.send_nowait(BIG)
            drained = trio.Event()

            async def waiter() -> None:
                await outbox.wait_drained()
                drained.set()

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not drained.is_set(), "the kernel cannot hold BIG until the peer reads"
            await receive(peer, len(BIG))
            with trio.fail_after(5):
                await drained.wait()


async def test_wait_drained_returns_when_the_peer_goes_away():
    with socket_pair() as (ours, peer):
        async with flushing() as (nursery, flusher):
            outbox = Outbox(ours, 100, nursery, flusher)
            outbox.send_nowait(BIG)
            peer.shutdown(socket.SHUT_RDWR)
            with trio.fail_after(5):
                await outbox.wait_drained()
            assert outbox.broken
            assert outbox.backlog == 0


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
