"""Raw WebSocket client pieces shared by the benchmark load generators (fanout_clients.py, changes_clients.py).

A full WebSocket library per connection would make the load generator the bottleneck, so the clients drive
non-blocking sockets on one epoll and speak just enough RFC 6455 by hand: the upgrade, masked client frames and
parsing of the server's frames.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import socket
import ssl
import struct
from typing import Any

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# SO_TIMESTAMPNS is 35 on Linux; older Pythons don't export the constant.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("@qq")
ANC_BUFSIZE = socket.CMSG_SPACE(TIMESPEC.size)
# Encrypted bytes read from the kernel at a time by a TlsStream.
TLS_RAW_READ = 65536


class BenchError(Exception):
    """The run cannot produce a trustworthy number."""


def masked_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """Build one final client frame; RFC 6455 requires client-to-server frames to be masked."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    if n == 0:
        return header + mask
    key = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return header + mask + body


def parse_frame(buf: bytearray, strict: bool = True) -> tuple[int, bytes, int] | None:
    """Parse the first complete server frame in ``buf``.

    Returns ``(opcode, payload, frame_length)`` or None if more bytes are needed. ``strict`` rejects masked and
    fragmented server frames (neither is expected for small messages).
    """
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    if strict:
        if b1 & 0x80:
            raise BenchError("server frame is masked")
        if not b0 & 0x80:
            raise BenchError("fragmented server frame (not expected for small messages)")
    n = b1 & 0x7F
    offset = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = int.from_bytes(buf[2:4], "big")
        offset = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = int.from_bytes(buf[2:10], "big")
        offset = 10
    end = offset + n
    if len(buf) < end:
        return None
    return b0 & 0x0F, bytes(buf[offset:end]), end


def kernel_stamp(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The SO_TIMESTAMPNS receive time (ns, CLOCK_REALTIME) in recvmsg's ancillary data; 0 if there is none."""
    stamp = 0
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            sec, nsec = TIMESPEC.unpack_from(data)
            stamp = sec * 1_000_000_000 + nsec
    return stamp


def open_socket(host: str, port: int, rcvbuf: int | None = None) -> socket.socket:
    """A non-blocking TCP socket (no Nagle, kernel receive timestamps on) with its connect under way.

    ``rcvbuf`` sets SO_RCVBUF before the connect, so the window offered in the handshake is already that small.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    err = sock.connect_ex((host, port))
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        raise BenchError(f"connect failed: {os.strerror(err)}")
    return sock


def send_small(sock: socket.socket, data: bytes) -> None:
    """Send a control message (upgrade, subscribe, pong) in one call.

    They are tiny and the socket buffer is idle at that point, so a short write would mean something is badly wrong.
    """
    sent = sock.send(data)
    if sent != len(data):
        raise BenchError(f"short write of {sent}/{len(data)} bytes on a control message")


def start_handshake(sock: socket.socket, host: str, port: int, target: str) -> bytes:
    """Once the connect completed, send the upgrade request for ``target``; returns the Sec-WebSocket-Accept due."""
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise BenchError(f"connect to {host}:{port} failed: {os.strerror(err)}")
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {target} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()
    send_small(sock, request)
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def finish_handshake(buf: bytearray, accept: bytes, max_head: int | None = None) -> bool:
    """Consume the 101 response from ``buf``; False if it is not complete yet.

    With ``max_head``, an incomplete response longer than that is an error rather than more to wait for.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if max_head is not None and len(buf) > max_head:
            raise BenchError("oversized handshake response")
        return False
    head = bytes(buf[:end]).decode("latin-1")
    del buf[: end + 4]
    lines = head.split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or status[1] != "101":
        raise BenchError(f"upgrade refused: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("sec-websocket-accept", "").encode() != accept:
        raise BenchError("bad Sec-WebSocket-Accept in upgrade response")
    return True


class TlsStream:
    """TLS over a connected non-blocking socket, for a load generator that drives thousands of them on one epoll.

    It offers the calls the load generators make on a plain socket (`recv`, `recv_into`, `recvmsg_into`, `send`,
    `getsockopt`, `fileno`, `close`), with the same non-blocking behaviour: BlockingIOError when no plaintext can be
    had without waiting. OpenSSL works on memory buffers (ssl.SSLObject over two MemoryBIOs) and the encrypted bytes
    go through the socket, so `recvmsg_into` can still hand back the kernel's receive timestamp (SO_TIMESTAMPNS):
    that of the last read of encrypted bytes, the one that completed the plaintext returned.

    A read stops when the caller's buffer is full, so plaintext may be left decrypted here with nothing left in the
    kernel to make epoll report the socket again: `has_more` says so, and the caller must read again.
    """

    __slots__ = ("_anc", "_incoming", "_outgoing", "_raw", "_ssl", "sock")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, host: str) -> None:
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_hostname=host)
        self._raw = bytearray(TLS_RAW_READ)
        self._anc: list[tuple[int, int, bytes]] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def getsockopt(self, level: int, option: int) -> int:
        return self.sock.getsockopt(level, option)

    def close(self) -> None:
        self.sock.close()

    def handshake(self) -> bool:
        """Advance the TLS handshake with what has arrived; True once it is complete.

        Raises BenchError when it fails (the server's certificate does not verify, an alert) or the server closes.
        """
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                if self._pull(0) is None:
                    return False
                continue
            except ssl.SSLError as exc:
                raise BenchError(f"TLS handshake failed: {exc}") from None
            self._flush()
            return True

    def cipher(self) -> str:
        """The negotiated protocol and cipher suite, such as "TLSv1.3 TLS_AES_256_GCM_SHA384"."""
        name, version, _bits = self._ssl.cipher() or ("?", "?", 0)
        return f"{version} {name}"

    @property
    def has_more(self) -> bool:
        """Whether bytes already read from the kernel may hold plaintext not yet returned."""
        return bool(self._ssl.pending() or self._incoming.pending)

    def _pull(self, ancbufsize: int) -> int | None:
        """Move what the kernel has into OpenSSL (and keep its receive timestamp): how many bytes (0 at the end of
        the stream), None if it has nothing now."""
        try:
            n, anc, _flags, _addr = self.sock.recvmsg_into([self._raw], ancbufsize)
        except BlockingIOError:
            return None
        if not n:
            self._incoming.write_eof()
            return 0
        self._incoming.write(memoryview(self._raw)[:n])
        if anc:
            self._anc = anc
        return n

    def _flush(self) -> None:
        """Send what OpenSSL wrote; the load generators' writes are small, so the kernel takes them at once (a short
        write would block until it took the rest)."""
        if self._outgoing.pending:
            data = self._outgoing.read()
            sent = self.sock.send(data)
            if sent < len(data):
                self.sock.setblocking(True)
                try:
                    self.sock.sendall(memoryview(data)[sent:])
                finally:
                    self.sock.setblocking(False)

    def recvmsg_into(self, buffers: list[Any], ancbufsize: int = 0, _flags: int = 0) -> tuple[int, list, int, None]:
        """Decrypt into ``buffers[0]`` (only one buffer is supported) until it is full or nothing more has arrived;
        returns (bytes, the ancillary data of the last read from the kernel, 0, None); 0 bytes at the end of the
        stream. Raises BlockingIOError when there is no plaintext."""
        view = memoryview(buffers[0])
        want = len(view)
        got = 0
        ended = False
        incoming, tls = self._incoming, self._ssl
        # Once the kernel gave less than asked it has nothing more for now, and epoll reports what comes later: not
        # asking again saves a call that would fail. Nor is OpenSSL asked to read from nothing (its "want read" is
        # an exception, and this is the load generator's hot path).
        drained = False
        while got < want:
            if incoming.pending or tls.pending() or incoming.eof:
                try:
                    n = tls.read(want - got, view[got:])
                except ssl.SSLWantReadError:
                    pass  # part of a record: pull more below
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    ended = True
                    break
                else:
                    if not n:
                        ended = True
                        break
                    got += n
                    continue
            if drained:
                break
            pulled = self._pull(ancbufsize)
            if pulled is None:
                break
            drained = pulled < TLS_RAW_READ
        if not got and not ended:
            raise BlockingIOError
        return got, self._anc, 0, None

    def recv_into(self, buffer: Any) -> int:
        return self.recvmsg_into([buffer])[0]

    def recv(self, size: int, flags: int = 0) -> bytes:
        """Every byte of plaintext there is (``size`` is ignored, so that none stays behind unseen by epoll), or with
        MSG_PEEK one byte if any has arrived, encrypted or not."""
        if flags & socket.MSG_PEEK:
            return b"?" if self.has_more else self.sock.recv(1, socket.MSG_PEEK)
        chunks = []
        while True:
            buf = bytearray(TLS_RAW_READ)
            try:
                n = self.recv_into(buf)
            except BlockingIOError:
                if chunks:
                    break
                raise
            if not n:
                break
            chunks.append(bytes(buf[:n]))
        return b"".join(chunks)

    def send(self, data: bytes | memoryview) -> int:
        """Encrypt and send all of ``data`` (see `_flush`)."""
        self._ssl.write(data)
        self._flush()
        return len(data)

    def setblocking(self, flag: bool) -> None:
        """Sends always complete (see `_flush`), so a caller switching to a blocking send needs no change."""

    def sendall(self, data: bytes | memoryview) -> None:
        self.send(data)
