"""Native TLS: the server's certificate context, and TLS over an accepted non-blocking socket.

`TlsSocket` gives a connection the same non-blocking interface as the plain socket it wraps (`recv`, `send`,
`sendmsg`, `shutdown`, `fileno`; BlockingIOError when the kernel cannot take or give anything now), so the reader and
the outbox (outbox.py) run unchanged over TLS: a frame is still encoded once for all its recipients and only
encrypted per connection, at the moment it is handed to the kernel. OpenSSL works on memory buffers (ssl.SSLObject
over two MemoryBIOs); the encrypted bytes go through the raw socket.

Encrypted bytes the kernel does not take at once stay in the TlsSocket, and the caller is told that the last byte
of what it passed was not sent: it keeps that byte and passes it first again, as it would after any partial send,
once the socket is writable. The TlsSocket then sends the encrypted rest and skips the byte, which it had already
encrypted. `sendmsg` encrypts `_PIECE` bytes at a time and stops at the first piece the kernel does not take whole,
so the rest of a batch stays in the outbox. So the outbox's backlog, writer, slow-consumer bound and half-close see
exactly what a plain socket shows them, and no encrypted byte is ever waiting without the outbox knowing.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
from collections.abc import Iterable
from pathlib import Path

import attrs
import trio

_RECORD = 16 * 1024 + 512
"""one TLS record, as read from the kernel at a time"""
_PIECE = 64 * 1024
"""plaintext encrypted at a time by `sendmsg`: at most this much waits encrypted where the outbox cannot see it
(a slow consumer's close drops only the frames still in the outbox)"""
_ALPN = ["http/1.1"]
_HANDSHAKE_RECORD = 0x16


class TlsRefused(Exception):
    """The client's TLS handshake failed; the message says why for the log (the client is told nothing more)."""


@attrs.frozen
class Certificate:
    """The loaded server certificate, for the log and the expiry gauge."""

    subject: str
    not_before: datetime.datetime
    not_after: datetime.datetime

    def problem(self, now: datetime.datetime) -> str | None:
        """Why clients refuse this certificate at `now` (expired or not yet valid), or None."""
        if now >= self.not_after:
            return f"it expired at {self.not_after.isoformat()}: renew it and reload (SIGHUP)"
        if now < self.not_before:
            return f"it is valid only from {self.not_before.isoformat()}: check this host's clock"
        return None


@attrs.frozen
class TlsSettings:
    """What `server.tls_*` configured, loaded: one context for every connection accepted until the next reload."""

    context: ssl.SSLContext
    certificate: Certificate
    client_ca: bool
    """whether /metrics and /api need a client certificate signed by server.tls_client_ca_file"""


def load(cert_file: str, key_file: str, client_ca_file: str | None = None) -> TlsSettings:
    """Read the certificate chain, its key and the optional client CA into a server context.

    Raises ValueError with a message naming the file and the fix when one cannot be read or used.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(_ALPN)
    # Renegotiation would let a client make the server redo the expensive half of a handshake at will.
    context.options |= ssl.OP_NO_RENEGOTIATION
    cert_pem = _read("server.tls_cert_file", cert_file)
    if b"ENCRYPTED" in _read("server.tls_key_file", key_file):
        # Unattended, OpenSSL would prompt for the password on the terminal: refuse with the fix instead.
        raise ValueError(
            f"server.tls_key_file: {key_file!r} is encrypted with a password; fluxrt starts unattended, so store the "
            "key without one (openssl pkey -in key.pem -out plain.pem) and protect the file by its permissions"
        )
    try:
        context.load_cert_chain(cert_file, key_file, password=b"")
    except ssl.SSLError as exc:
        raise ValueError(
            f"server.tls_cert_file / server.tls_key_file: cannot use {cert_file!r} with {key_file!r} ({exc.reason}): "
            "give a PEM certificate (its chain may follow it in the same file) and the PEM private key that matches it"
        ) from None
    if client_ca_file is not None:
        _read("server.tls_client_ca_file", client_ca_file)
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except ssl.SSLError as exc:
            raise ValueError(
                f"server.tls_client_ca_file: cannot use {client_ca_file!r} ({exc.reason}): give PEM CA certificates"
            ) from None
        # Asked of every client, required only by /metrics and /api (a WebSocket client needs none).
        context.verify_mode = ssl.CERT_OPTIONAL
    return TlsSettings(context, _certificate(cert_pem), client_ca_file is not None)


def _read(key: str, path: str) -> bytes:
    """The file's bytes; ValueError naming the setting when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{key}: cannot read {path!r}: {exc.strerror}") from None


def _certificate(cert_pem: bytes) -> Certificate:
    """The first certificate of the chain: the one served."""
    from cryptography import x509

    first = x509.load_pem_x509_certificate(cert_pem)
    return Certificate(first.subject.rfc4514_string(), first.not_valid_before_utc, first.not_valid_after_utc)


class TlsSocket:
    """Server-side TLS over an accepted non-blocking socket, with that socket's non-blocking interface.

    `handshake` must complete before anything else is called. Errors of the TLS layer (a bad record, an alert from
    the peer) are ssl.SSLError, which is an OSError, as a broken socket's errors are.
    """

    __slots__ = ("_incoming", "_out", "_outgoing", "_owed", "_sock", "_ssl", "_unread")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._out: memoryview | None = None
        """encrypted bytes the kernel has not taken yet"""
        self._owed = 0
        """bytes at the start of the next send that were encrypted already (see the module's docstring)"""
        self._unread = b""
        """plaintext decrypted at `shutdown` and not yet given to `recv`"""

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def admin_allowed(self) -> bool:
        """Whether this client may use /metrics and /api: no client CA is configured, or it presented a certificate
        that the client CA verified (one that does not verify fails the handshake)."""
        return self._ssl.context.verify_mode == ssl.CERT_NONE or self._ssl.getpeercert(binary_form=True) is not None

    async def handshake(self) -> None:
        """Complete the TLS handshake, waiting for the socket as needed (the caller bounds the time).

        Raises TlsRefused when the client's handshake fails or it closes during it; a client that speaks plain HTTP
        to this port is answered 400 in plain HTTP first, naming the fix.
        """
        first = True
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                # The alert, for the client's sake; the reason logged is the handshake's, not the socket's.
                with contextlib.suppress(TlsRefused):
                    await self._push_all()
                raise TlsRefused(f"TLS handshake failed: {exc.reason or exc}") from None
            else:
                await self._push_all()
                return
            await self._push_all()
            data = await self._read_raw()
            if first and data[:1].isalpha():
                self._plain_http_refused()
                raise TlsRefused("plain HTTP sent to the TLS port")
            first = False
            self._incoming.write(data)

    async def _read_raw(self) -> bytes:
        while True:
            try:
                data = self._sock.recv(_RECORD)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise TlsRefused(f"the connection failed during the TLS handshake: {exc.strerror}") from None
            else:
                if not data:
                    raise TlsRefused("the client closed the connection during the TLS handshake")
                return data
            await trio.lowlevel.wait_readable(self._sock)

    async def _push_all(self) -> None:
        """Send every encrypted byte there is, waiting for the socket (only the handshake waits like this).

        Raises TlsRefused when the socket is broken (a client gone before the server's flight went out).
        """
        try:
            while not self._push():
                await trio.lowlevel.wait_writable(self._sock)
        except OSError as exc:
            raise TlsRefused(f"the connection failed during the TLS handshake: {exc.strerror}") from None

    def _plain_http_refused(self) -> None:
        body = b'{"error":"tls_required","message":"this port serves TLS: connect with wss:// or https://"}'
        head = (
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode()
        try:
            self._sock.send(head + body)
        except OSError:
            return

    def _push(self) -> bool:
        """Hand the kernel what it takes of the encrypted bytes without waiting; True once none are left.

        Raises OSError when the socket is broken.
        """
        if self._outgoing.pending:
            fresh = self._outgoing.read()
            self._out = memoryview(bytes(self._out) + fresh) if self._out is not None else memoryview(fresh)
        out = self._out
        if out is None:
            return True
        try:
            sent = self._sock.send(out)
        except BlockingIOError:
            return False
        if sent < len(out):
            self._out = out[sent:]
            return False
        self._out = None
        return True

    # ---- the socket interface --------------------------------------------------------------------------------

    def recv(self, size: int) -> bytes:
        """At most `size` bytes of plaintext; b"" once the client has closed TLS or the connection.

        Raises BlockingIOError when no whole record has arrived yet.
        """
        if self._unread:
            data, self._unread = self._unread[:size], self._unread[size:]
            return data
        while True:
            try:
                data = self._ssl.read(size)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            else:
                if self._outgoing.pending:
                    # A key update or a ticket written in answer to what was read: it goes out before the next
                    # frame (`send` pushes first), or now if the kernel takes it.
                    self._push()
                return data
            raw = self._sock.recv(_RECORD)
            if not raw:
                self._incoming.write_eof()
            else:
                self._incoming.write(raw)

    def recv_into(self, buffer: bytearray) -> int:
        data = self.recv(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def send(self, data: bytes | memoryview) -> int:
        """`sendmsg` of one buffer."""
        if self._owed or self._out is not None or self._outgoing.pending or len(data) > _PIECE:
            return self.sendmsg((data,))
        # Nothing waits and it is one piece: the paced fan-out's call, once per recipient, without sendmsg's
        # piecing and its two `_push` calls (bench/RESULTS.md, "TLS fan-out").
        self._ssl.write(data)
        out = self._outgoing.read()
        try:
            sent = self._sock.send(out)
        except BlockingIOError:
            sent = 0
        if sent == len(out):
            return len(data)
        self._out = memoryview(out)[sent:]
        self._owed = 1
        return len(data) - 1

    def sendmsg(self, buffers: Iterable[bytes | memoryview]) -> int:
        """Encrypt and send `buffers` as one stream of bytes, `_PIECE` bytes at a time until the kernel refuses
        some; returns how many of them count as sent (what was not encrypted stays with the caller).

        Raises BlockingIOError when encrypted bytes from before still wait for the kernel (nothing of `buffers` is
        taken then), OSError when the socket is broken.
        """
        if not self._push():
            raise BlockingIOError
        skip, self._owed = self._owed, 0
        sent = 0
        parts: list[bytes | memoryview] = []
        size = 0
        for buffer in buffers:
            if skip:
                # The owed byte went out encrypted with the call before.
                sent, buffer, skip = skip, memoryview(buffer)[skip:], 0
            while size + len(buffer) >= _PIECE:
                view, cut = memoryview(buffer), _PIECE - size
                parts.append(view[:cut])
                buffer = view[cut:]
                sent += _PIECE
                if not self._seal(parts):
                    self._owed = 1
                    return sent - 1
                parts, size = [], 0
            if buffer:
                parts.append(buffer)
                size += len(buffer)
        if parts:
            sent += size
            if not self._seal(parts):
                self._owed = 1
                return sent - 1
        return sent

    def _seal(self, parts: list[bytes | memoryview]) -> bool:
        """Encrypt `parts` as one piece and hand the kernel what it takes; True when it took everything."""
        self._ssl.write(parts[0] if len(parts) == 1 else b"".join(parts))
        return self._push()

    def shutdown(self, how: int) -> None:
        """Send TLS's close_notify, then half-close the socket; `recv` still returns what the client sends, as after
        a plain half-close."""
        # unwrap goes on to read the client's close_notify, and a record of data already there fails the connection
        # for good (OpenSSL: application data after close notify), losing it and all that follows: what has arrived
        # is decrypted first and kept for `recv`.
        self._unread = self._decrypt_arrived()
        # With memory buffers unwrap always stops to wait for the peer's close_notify; ours is written by then.
        with contextlib.suppress(ssl.SSLError):
            self._ssl.unwrap()
        self._push()
        self._sock.shutdown(how)

    def _decrypt_arrived(self) -> bytes:
        """The plaintext of every whole record already read from the kernel (a bad record is left for `recv`)."""
        parts = [self._unread]
        with contextlib.suppress(ssl.SSLError):
            while data := self._ssl.read(_RECORD):
                parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        self._sock.close()


Transport = socket.socket | TlsSocket
"""what a connection reads and writes: the accepted socket, or TLS over it"""
