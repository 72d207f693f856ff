"""The outgoing side of one connection: non-blocking sends of whole frames, with a bounded backlog.

A frame is handed to the kernel with a plain non-blocking `send()`. Only what the kernel does not take waits in the
backlog, which a writer task (started when the backlog appears, gone when it is drained) flushes with one
scatter-gather `sendmsg()` per wake-up. The backlog holds at most `limit` frames; past that the connection is a slow
consumer and the caller closes it. Nobody ever waits for a slow socket but its own writer.
"""

from __future__ import annotations

import collections
import itertools
import socket
from collections.abc import Callable

import trio

# Linux accepts at most 1024 buffers per sendmsg (IOV_MAX).
_IOV_MAX = 1024


class Outbox:
    """Frames to one socket, in order. `spawn` starts the writer task in the connection's nursery."""

    __slots__ = ("_backlog", "_closing", "_drained", "_sock", "_spawn", "broken", "limit", "sent_frames")

    def __init__(self, sock: socket.socket, limit: int, spawn: Callable[[Callable[[], object]], None]) -> None:
        self._sock = sock
        self._spawn = spawn
        self._backlog: collections.deque[memoryview | bytes] = collections.deque()
        self._closing = False
        self._drained: trio.Event | None = None
        self.limit = limit
        self.broken = False
        self.sent_frames = 0

    def send_nowait(self, frame: bytes) -> bool:
        """Queue one whole frame without blocking.

        Returns False when the backlog already holds `limit` frames (a slow consumer); the frame is not queued.
        After `close` or on a broken socket the frame is dropped and True returned: the connection is ending.
        """
        if self._closing or self.broken:
            return True
        backlog = self._backlog
        if backlog:
            if len(backlog) >= self.limit:
                return False
            backlog.append(frame)
            self.sent_frames += 1
            return True
        try:
            sent = self._sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.broken = True
            return True
        self.sent_frames += 1
        if sent < len(frame):
            backlog.append(memoryview(frame)[sent:])
            self._spawn(self._write)
        return True

    def close(self, frame: bytes, *, discard_backlog: bool = False) -> None:
        """Queue the close frame as the last frame; nothing is sent after it.

        With `discard_backlog`, queued frames that have not started to go out are dropped first (a slow consumer
        would otherwise hold the close behind everything it failed to read). A partly sent frame is always finished.
        """
        if self._closing:
            return
        backlog = self._backlog
        if discard_backlog and backlog:
            head = backlog[0]
            partial = isinstance(head, memoryview)
            backlog.clear()
            if partial:
                backlog.append(head)
        self.send_nowait(frame)
        self._closing = True
        if not backlog:
            self._shutdown()

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    async def wait_drained(self) -> None:
        """Return once everything queued has gone to the kernel (or the socket broke)."""
        while self._backlog and not self.broken:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    async def _write(self) -> None:
        backlog, sock = self._backlog, self._sock
        try:
            while backlog and not self.broken:
                await trio.lowlevel.wait_writable(sock)
                chunk = list(itertools.islice(backlog, _IOV_MAX))
                try:
                    sent = sock.sendmsg(chunk)
                except BlockingIOError:
                    continue
                except OSError:
                    self.broken = True
                    break
                while sent:
                    head = backlog[0]
                    if sent >= len(head):
                        sent -= len(head)
                        backlog.popleft()
                    else:
                        backlog[0] = memoryview(head)[sent:]
                        sent = 0
        finally:
            if self._drained is not None:
                self._drained.set()
                self._drained = None
        if self._closing and not backlog:
            self._shutdown()

    def _shutdown(self) -> None:
        # Half-close after the close frame: the peer reads everything we sent, then sees EOF. A full close with
        # unread input would send RST, and the peer could lose the close frame.
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.broken = True
