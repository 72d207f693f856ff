"""The outgoing side of connections: frames queued without blocking, written in as few system calls as possible.

The first frame queued for a connection in a scheduling tick goes to the kernel at once with a non-blocking
`send()`; frames that follow it within the same tick are collected, and the `Flusher` hands them to the kernel in
one scatter-gather `sendmsg()` as soon as the queueing task yields. A lone message is never delayed, and a burst of
messages to thousands of connections costs two system calls per connection, not one per message. Only what the kernel
does not take waits in the backlog, which a writer task (started when the backlog appears, gone when it is drained)
flushes when the socket becomes writable. Pending and backlog frames together are bounded by `limit`; past that the
connection is a slow consumer and the caller closes it. Nobody ever waits for a slow socket but its own writer.

Frames are queued from whichever task publishes (the hub, table lanes, the Flusher), so nothing the outbox does may
raise into them: a writer that cannot start or cannot finish means the connection is ending, and the outbox turns
broken and drops what it holds instead.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import socket

import trio

from .tls import Transport

# Linux accepts at most 1024 buffers per sendmsg (IOV_MAX).
_IOV_MAX = 1024


class Flusher:
    """Ends each tick in which frames were queued, once the queueing task yields: writes the frames collected during
    the tick, for every outbox. One per server.

    An outbox tells its first frame of a tick by the tick's number, not by being on a list: a broadcast to thousands
    of connections that get one frame each leaves the Flusher nothing to do per connection.
    """

    def __init__(self) -> None:
        self._dirty: list[Outbox] = []
        self._lot = trio.lowlevel.ParkingLot()
        self.tick = 0
        """the current tick's number; it changes when the tick ends"""
        self.awake = False
        """whether this tick will be ended (`wake` was called since the last end)"""

    def wake(self) -> None:
        """Have this tick ended once the queueing task yields."""
        if not self.awake:
            self.awake = True
            self._lot.unpark()

    def mark(self, outbox: Outbox) -> None:
        """Have `outbox`'s collected frames written when this tick ends."""
        self.wake()
        self._dirty.append(outbox)

    def flush(self) -> None:
        """End the tick: write everything collected (also used at shutdown and by tests)."""
        self.tick += 1
        self.awake = False
        dirty, self._dirty = self._dirty, []
        for outbox in dirty:
            outbox._flush()

    async def run(self) -> None:
        while True:
            if not self.awake:
                await self._lot.park()
            # Let the tasks that are queueing right now finish their turn, so their frames go out together.
            await trio.lowlevel.cancel_shielded_checkpoint()
            self.flush()


class Outbox:
    """Frames to one socket, in order. The writer task, while there is a backlog, runs in `nursery` (the
    connection's); once that nursery refuses the writer or cancels it, the outbox is broken and drops its frames."""

    __slots__ = (
        "_backlog",
        "_closing",
        "_drained",
        "_flusher",
        "_nursery",
        "_pending",
        "_sock",
        "_tick",
        "broken",
        "limit",
    )

    def __init__(self, sock: Transport, limit: int, nursery: trio.Nursery, flusher: Flusher) -> None:
        self._sock = sock
        self._nursery = nursery
        self._flusher = flusher
        self._pending: list[bytes] | None = None
        self._tick = -1
        """the Flusher's tick in which a frame last went to the kernel directly"""
        self._backlog: collections.deque[memoryview | bytes] | None = None
        """made when the kernel first refuses a frame, dropped once drained: an empty deque is 760 bytes, and most
        connections never have a backlog"""
        self._closing = False
        self._drained: trio.Event | None = None
        self.limit = limit
        self.broken = False

    def send_nowait(self, frame: bytes) -> bool:
        """Queue one whole frame without blocking: the first of a tick goes to the kernel now, later ones when the
        current task yields.

        Returns False when `limit` frames already wait for the socket (a slow consumer); the frame is not queued.
        After `close` or on a broken socket the frame is dropped and True returned: the connection is ending.
        """
        if self._closing or self.broken:
            return True
        if not self._backlog:
            pending = self._pending
            if pending is not None and len(pending) >= _IOV_MAX:
                # A full batch: hand it to the kernel now rather than hold more. Only what the kernel refuses
                # counts against the limit, so a burst to a fast reader is never mistaken for a slow consumer.
                if not self._flush():
                    return True
                pending = self._pending
            if not self._backlog:
                if pending is not None:
                    pending.append(frame)
                    return True
                flusher = self._flusher
                if self._tick == flusher.tick:
                    # The second frame of this tick: collected with those that follow, they go out together.
                    self._pending = [frame]
                    flusher.mark(self)
                    return True
                # The first frame of this tick goes to the kernel at once: a lone message is never delayed. This
                # is the paced fan-out's path, once per recipient, hence inline and the method call saved.
                self._tick = flusher.tick
                if not flusher.awake:
                    flusher.wake()
                try:
                    sent = self._sock.send(frame)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._break()
                    return True
                if sent < len(frame):
                    self._backlog = collections.deque([memoryview(frame)[sent:] if sent else frame])
                    self._start_writer()
                return True
        backlog = self._backlog
        assert backlog is not None
        if len(backlog) >= self.limit:
            return False
        backlog.append(frame)
        return True

    def _flush(self) -> bool:
        """Hand the frames gathered this tick to the kernel; False when the outbox is broken."""
        frames, self._pending = self._pending, None
        self._send(frames or [])
        return not self.broken

    def _send(self, frames: list[bytes]) -> None:
        """Hand `frames` to the kernel in one non-blocking call; what it refuses waits for the writer."""
        if not frames or self.broken:
            self._drained_now()
            return
        if self._backlog:
            # The writer is already waiting for the socket: keep the order behind it.
            self._backlog.extend(frames)
            return
        chunk = frames[:_IOV_MAX]
        try:
            sent = self._sock.sendmsg(chunk) if len(chunk) > 1 else self._sock.send(chunk[0])
        except BlockingIOError:
            sent = 0
        except OSError:
            self._break()
            return
        remaining = _unsent(chunk, sent) + frames[_IOV_MAX:]
        if remaining:
            self._backlog = collections.deque(remaining)
            self._start_writer()
        else:
            self._drained_now()

    def close(self, frame: bytes, *, discard_backlog: bool = False) -> None:
        """Queue the close frame as the last frame; nothing is sent after it.

        With `discard_backlog`, queued frames that have not started to go out are dropped first (a slow consumer
        would otherwise hold the close behind everything it failed to read). A partly sent frame is always finished.
        """
        if self._closing:
            return
        backlog = self._backlog
        if discard_backlog:
            self._pending = None
            if backlog:
                head = backlog[0]
                partial = isinstance(head, memoryview)
                backlog.clear()
                if partial:
                    backlog.append(head)
        if frame:
            self.send_nowait(frame)
        self._closing = True
        self._drained_now()

    @property
    def backlog(self) -> int:
        return len(self._backlog or ()) + len(self._pending or ())

    async def wait_drained(self) -> None:
        """Return once everything queued has gone to the kernel (or the socket broke)."""
        while (self._backlog or self._pending) and not self.broken:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    def _start_writer(self) -> None:
        """Start the task that writes the backlog; the only place a task is started, so the only place a closed
        nursery is seen."""
        try:
            self._nursery.start_soon(self._write)
        except RuntimeError:
            # The connection's nursery has closed: the connection is ending and nobody will write again. Raising
            # here would hit the publisher (and skip the recipients after this one) or, in the Flusher, the server.
            self._break()

    def _break(self) -> None:
        """Give up on the socket: drop every queued frame and wake `wait_drained`."""
        self.broken = True
        self._backlog = None
        self._pending = None
        self._drained_now()

    async def _write(self) -> None:
        backlog, sock = self._backlog, self._sock
        assert backlog is not None
        try:
            while backlog and not self.broken:
                await trio.lowlevel.wait_writable(sock)
                chunk = list(itertools.islice(backlog, _IOV_MAX))
                try:
                    sent = sock.sendmsg(chunk)
                except BlockingIOError:
                    continue
                except OSError:
                    self._break()
                    break
                for _ in range(len(chunk) - len(remaining := _unsent(chunk, sent))):
                    backlog.popleft()
                if remaining:
                    backlog[0] = remaining[0]
        finally:
            if backlog:
                # Only cancellation of the connection's nursery leaves frames here; no writer will come back
                # for them, and the next frame must not go out directly after half of one.
                self._break()
            else:
                if self._backlog is backlog:
                    self._backlog = None
                self._drained_now()

    def _drained_now(self) -> None:
        """Wake `wait_drained` and half-close after the close frame, once nothing is waiting any more."""
        if self._backlog and not self.broken:
            return
        if self._pending and not self.broken:
            return
        if self._drained is not None:
            self._drained.set()
            self._drained = None
        if self._closing and not self.broken:
            self._shutdown()

    def _shutdown(self) -> None:
        # Half-close after the close frame: the peer reads everything we sent, then sees EOF. A full close with
        # unread input would send RST, and the peer could lose the close frame.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        # Nothing more can be written after the half-close.
        self.broken = True


def _unsent(frames: list[bytes] | list[memoryview | bytes], sent: int) -> list[memoryview | bytes]:
    """The frames, or the tail of a frame, that `sent` bytes did not cover."""
    for i, frame in enumerate(frames):
        if sent < len(frame):
            rest: list[memoryview | bytes] = list(frames[i + 1 :])
            rest.insert(0, memoryview(frame)[sent:] if sent else frame)
            return rest
        sent -= len(frame)
    return []
