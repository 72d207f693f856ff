"""The door to Redis: redis-py's asyncio client behind the trio-asyncio bridge.

Three connections. Batches go out on one of their own (the link), several at a time: Redis runs a connection's
commands in the order they came and answers in that order, so batches sent back to back are taken in `seq` order
without waiting for each other's answer. The bus is read on the pub/sub connection. Both are served by asyncio tasks
that live as long as the connection (`serve`, one crossing of the bridge for all of it): a crossing costs more than
the round trip to a local Redis, so the hot path makes none. The bus reader hands each message to the hub as it
reads it, in the same step, and a batch is written to the link's transport by the hub's own call when nothing waits
before it: trio-asyncio runs one asyncio callback per Trio scheduling round, so every hand-over between tasks adds a
round of the whole node to a message's way. Everything else (a node's state written whole or
read, a channel's history read, the goodbye) is one crossing per unit of work on a pooled client.

Keys, all under `cluster.prefix` (P):

- `P:bus`: the pub/sub channel every node publishes its batches to and reads everyone's from.
- `P:nodes`: the set of node ids that have written state (pruned of those whose `P:node:` key expired).
- `P:node:<id>`: "<incarnation> <seq>", the last batch whose state changes are written; it expires after
  `cluster.node_timeout` unless the node refreshes it (it does at least every fifth of it: with every batch that
  changes its state, with the first batch a fifth after the last refresh, and with a heartbeat when idle).
- `P:presence:<id>`: a hash of the node's presence metas (`wire.member_field` -> state JSON), same expiry.
- `P:users:<id>`: a hash of the node's connections per user (`sub` -> count), same expiry.
- `P:history:<channel>`: a stream of the channel's last broadcasts (about `realtime.history_size`, field `o`: the
  operation as published, without its id), expiring `realtime.history_ttl` after its last one; only while history
  is on.
- `P:sent:<n>`: a bitmap of the `realtime.send` change ids from n * 2^20 on that a node has published, expiring
  `database.retention` after the last one.

A batch, the state it changes and the expiry refresh go in one MULTI/EXEC, so a node that reads another's state
gets it exactly as of some batch: the later ones it receives on the bus (see view.ClusterView). Several batches in
flight keep that: each is its own transaction, and they run in order on the link. With history on, a
batch that carries broadcasts is published by a script (PUBLISH_BROADCASTS) in that same transaction: it adds each
broadcast to its channel's stream and writes the stream ids into the batch (`x`, see wire.py), so that every node
delivers each broadcast with the same id, its position for clients that resume.

Every node reads each `realtime.send` from the change log and offers it in a batch; the script publishes the first
offer and marks the later ones wire.DUPLICATE (a bit per change id in `P:sent:<id / 2^20>`, kept for
`database.retention` after the last bit set), so a send is delivered once everywhere, in the stream's order like any
broadcast, by whichever node reads it first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import attrs
import orjson
import redis.asyncio as aioredis
import trio
import trio_asyncio
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, AbstractConnection
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from . import address, wire
from .view import Snapshot

T = TypeVar("T")


PUBLISH_BROADCASTS = """
-- KEYS: the history streams, then the bitmaps of realtime.send change ids published. ARGV: the bus, the batch up to
-- the end of its operations, the end that carries the ids, the streams' MAXLEN and expiry (ms), the bitmaps'
-- expiry (ms), then for each broadcast of the batch in order: the index in KEYS of its stream (0: not kept), of its
-- bitmap (0: not a realtime.send), its bit there, and the operation (empty when not kept).
local ids = {}
for i = 7, #ARGV, 4 do
  local id = ''
  local seen = 0
  local bitmap = tonumber(ARGV[i + 1])
  if bitmap > 0 then
    -- Every node reads each send from the change log and offers it; the first one here publishes it.
    seen = redis.call('SETBIT', KEYS[bitmap], ARGV[i + 2], 1)
    redis.call('PEXPIRE', KEYS[bitmap], ARGV[6])
  end
  if seen == 1 then
    id = '-'
  else
    local stream = tonumber(ARGV[i])
    if stream > 0 then
      -- pcall: a key of another type under this name costs that message its id, not the whole batch.
      local added = redis.pcall('XADD', KEYS[stream], 'MAXLEN', '~', ARGV[4], '*', 'o', ARGV[i + 3])
      if type(added) == 'string' then
        redis.call('PEXPIRE', KEYS[stream], ARGV[5])
        id = added
      end
    end
  end
  ids[#ids + 1] = id
end
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ARGV[3] .. '["' .. table.concat(ids, '","') .. '"]}')
return ids
"""
"""the last step of a batch with broadcasts to keep or `realtime.send`s; returns an id per broadcast in order: its
stream id, '' for one not kept, wire.DUPLICATE for a send another node published"""

SENDS_PER_BITMAP = 1 << 20
"""change ids per bitmap key of published `realtime.send`s (128 KiB each)"""


@attrs.frozen(slots=True)
class Published:
    """How one broadcast of a batch is published."""

    history: str | None = None
    """the channel whose history stream keeps it (with history on), or None"""
    logged: int | None = None
    """its change id when it is a `realtime.send` read from the change log: published once whichever nodes offer
    it"""


class EngineUnreachable(Exception):
    """Redis cannot be reached, timed out, or broke the connection; the message says which."""


@attrs.frozen(slots=True)
class Writes:
    """The state changes that go with one batch."""

    members: dict[bytes, bytes | None]
    """presence field -> state JSON, or None to delete it"""
    users: dict[str, int]
    """sub -> connections on this node (0 deletes it)"""

    @classmethod
    def of(cls, ops: list[wire.Op]) -> Writes:
        members: dict[bytes, bytes | None] = {}
        users: dict[str, int] = {}
        for op in ops:
            match op:
                case wire.Track(room=room, key=key, ref=ref, state=state):
                    members[wire.member_field(room, key, ref)] = orjson.dumps(state)
                case wire.Untrack(room=room, key=key, ref=ref):
                    members[wire.member_field(room, key, ref)] = None
                case wire.UserCount(sub=sub, count=count):
                    users[sub] = count
        return cls(members, users)


class RedisEngine:
    """One node's connection to Redis (a client and a pub/sub subscription to the bus). Every method is a Trio
    coroutine to be called inside `opened()`, and raises EngineUnreachable for any failure of Redis or of the way
    to it, or when it takes longer than `call_timeout`."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        node: str,
        node_timeout: float,
        history_size: int = 0,
        history_ttl: float = 300.0,
        log_retention: float = 600.0,
    ) -> None:
        self._address = address.parse(url)
        self.log_retention = log_retention
        """how long after a `realtime.send` was published another node may still offer it (database.retention)"""
        self.prefix = prefix
        self.node = node
        self.node_timeout = node_timeout
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.call_timeout = max(0.5, min(5.0, node_timeout / 3))
        self.bus = f"{prefix}:bus".encode()
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._link_client: aioredis.Redis | None = None
        self._link: AbstractConnection | None = None
        self._script: str | None = None
        """PUBLISH_BROADCASTS's SHA1 once loaded"""
        self._loop: Any = None
        self._tls = url.startswith("rediss")
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        # What one connection's tasks and the hub hand each other; new for every connection, so that nothing of a
        # broken one is taken for the next one's.
        self._outgoing: collections.deque[list[bytes]] = collections.deque()
        """packed batches not yet written to the link"""
        self._expected: collections.deque[int] = collections.deque()
        """replies due for each batch written, in order (its MULTI, one per command, its EXEC)"""
        self._replies: collections.deque[list[Any]] = collections.deque()
        """the EXEC answers that came, in order"""
        self._send_wake = asyncio.Event()
        self._replied = trio.Event()

    # ---- keys ----------------------------------------------------------------------------------------------

    def _node_key(self, node: str) -> str:
        return f"{self.prefix}:node:{node}"

    def _presence_key(self, node: str) -> str:
        return f"{self.prefix}:presence:{node}"

    def _users_key(self, node: str) -> str:
        return f"{self.prefix}:users:{node}"

    @property
    def _nodes_key(self) -> str:
        return f"{self.prefix}:nodes"

    def _sent_key(self, change_id: int) -> str:
        return f"{self.prefix}:sent:{change_id // SENDS_PER_BITMAP}"

    def _history_key(self, channel: str) -> str:
        return f"{self.prefix}:history:{channel}"

    # ---- the bridge ----------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """The asyncio loop that redis-py runs on; the connection is closed when leaving. While it is open, any
        Trio task may call the engine (the shutdown's goodbye comes from outside the hub's tasks)."""
        async with trio_asyncio.open_loop() as loop:
            self._loop = loop
            try:
                yield
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await self.close()
                self._loop = None

    async def _cross(self, work: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        if self._loop is None:
            raise EngineUnreachable("the engine is not running")
        try:
            with trio.fail_after(timeout if timeout is not None else self.call_timeout):
                return await trio_asyncio.aio_as_trio(work, loop=self._loop)()  # type: ignore[no-any-return]
        except trio.TooSlowError:
            raise EngineUnreachable("Redis did not answer in time") from None
        except (TimeoutError, RedisError, OSError) as exc:
            raise EngineUnreachable(describe(exc, tls=self._tls)) from None

    # ---- connecting ----------------------------------------------------------------------------------------

    async def connect(self) -> None:
        """A new client, subscribed to the bus (what was open before is closed first)."""
        await self.close()
        options: dict[str, Any] = {
            "socket_timeout": self.call_timeout,
            "socket_connect_timeout": self.call_timeout,
            "health_check_interval": 0,
        }
        target = self._address
        if isinstance(target, address.SentinelAddress):
            # Read as redis-py reads the same options in a rediss:// URL (a "false" must not be a true string).
            extra: dict[str, Any] = {
                name: URL_QUERY_ARGUMENT_PARSERS.get(name, str)(value) for name, value in target.options
            }
            sentinel = Sentinel(
                list(target.sentinels),
                sentinel_kwargs={**options, **extra, "ssl": target.tls},
                **options,
                **extra,
            )

            def make(**overrides: Any) -> aioredis.Redis:
                return sentinel.master_for(  # type: ignore[no-any-return]
                    target.primary,
                    db=target.db,
                    password=target.password,
                    username=target.username,
                    ssl=target.tls,
                    **overrides,
                )
        else:
            url = target

            def make(**overrides: Any) -> aioredis.Redis:
                return aioredis.Redis.from_url(url, **{**options, **overrides})

        client = make()
        self._client = client
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._pubsub = pubsub
        # The link's reads wait as long as Redis takes, without a socket timeout: a timeout per read or write is an
        # asyncio task and a timer each, costly on this bridge; the hub's deadline on every batch stands for it.
        link_client = make(socket_timeout=None)
        self._link_client = link_client
        self._reset_buffers()

        async def subscribe() -> None:
            await pubsub.subscribe(self.bus)
            self._link = await link_client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            self._script = await link_client.script_load(PUBLISH_BROADCASTS)

        await self._cross(subscribe)

    async def close(self) -> None:
        client, pubsub, link_client = self._client, self._pubsub, self._link_client
        self._client = self._pubsub = self._link_client = self._link = None
        if client is None:
            return

        async def close() -> None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            for each in (client, link_client):
                if each is not None:
                    with contextlib.suppress(Exception):
                        await each.aclose()

        with contextlib.suppress(EngineUnreachable):
            await self._cross(close, timeout=1)

    def _connected(self) -> tuple[aioredis.Redis, Any]:
        if self._client is None:
            raise EngineUnreachable("not connected")
        return self._client, self._pubsub

    # ---- the bus -------------------------------------------------------------------------------------------

    async def serve(self, heard: Callable[[bytes], None]) -> None:
        """Write the batches handed to `submit`, read Redis's answers to them and read the bus, giving `heard`
        each bus message in order as soon as it is read, until cancelled; raises EngineUnreachable when any of it
        fails (and whatever `heard` raises). One crossing of the bridge for the whole connection."""
        link, pubsub = self._link, self._pubsub
        if link is None or pubsub is None:
            raise EngineUnreachable("not connected")
        outgoing, expected, replies, send_wake = self._outgoing, self._expected, self._replies, self._send_wake

        async def write() -> None:
            while True:
                while not outgoing:
                    send_wake.clear()
                    await send_wake.wait()
                # Whatever was handed over meanwhile goes in one write.
                data: list[bytes] = []
                while outgoing:
                    data += outgoing.popleft()
                if not link.is_connected:
                    # redis-py would open a new connection, whose answers nobody expects.
                    raise ConnectionError("the connection to Redis closed")
                await link.send_packed_command(data, check_health=False)

        async def answers() -> None:
            while True:
                answer = await link.read_response(timeout=math.inf)
                expected[0] -= 1
                if expected[0] == 0:
                    # The EXEC's: the others are MULTI's OK and QUEUED (an error among them was raised above).
                    expected.popleft()
                    replies.append(answer)
                    self._replied.set()

        async def listen() -> None:
            # Straight from the connection: PubSub's own reads would retry, reconnect and subscribe again quietly,
            # and this node must know when it may have missed messages (it then reconnects and reads every state).
            connection = pubsub.connection
            while True:
                response = await connection.read_response(timeout=math.inf, push_request=True)
                if isinstance(response, list) and len(response) == 3 and response[0] == b"message":
                    heard(response[2])

        async def all_of_it() -> None:
            tasks = [asyncio.ensure_future(work()) for work in (write, answers, listen)]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        await self._cross(all_of_it, timeout=math.inf)

    def submit(
        self,
        head: bytes,
        ops: list[bytes],
        published: list[Published | None],
        position: str,
        writes: Writes,
        *,
        refresh: bool = True,
    ) -> None:
        """Hand one batch to `serve` for Redis, at once, behind the batches handed before it: write `writes`,
        mark the node's state as of `position` ("<incarnation> <seq>") and publish `head` + `ops` (joined by
        commas) + wire.BATCH_END, all in one transaction, which also refreshes the expiry of the node's keys when
        `refresh` or when `writes` change something. `published[i]` says how `ops[i]` is published when it is a
        broadcast (None for the other operations). `confirmed` gives Redis's answer."""
        link = self._link
        if link is None:
            raise EngineUnreachable("not connected")
        commands = self.batch_commands(head, ops, published, position, writes, refresh=refresh)
        packed = link.pack_commands(commands)
        self._expected.append(len(commands))
        # When nothing waits to be written, the batch goes to the connection's asyncio transport here, as redis-py's
        # own write would: waking the writer task costs it a round of the node (a quarter of the CPU a broadcast
        # costs on its way to Redis, measured). The transport keeps what the socket does not take at once, and
        # what follows waits in `_outgoing` for the writer, which waits for the transport to drain: order holds.
        writer = getattr(link, "_writer", None)
        if not self._outgoing and isinstance(writer, asyncio.StreamWriter) and _idle(writer.transport):
            writer.writelines(packed)
            return
        self._outgoing.append(packed)
        self._send_wake.set()

    async def confirmed(self) -> list[str | None]:
        """Redis's answer to the oldest batch submitted and not yet confirmed, once it comes: for each of its
        broadcasts in order when the script published it, the stream id (None when not kept) or wire.DUPLICATE;
        else an empty list. Raises EngineUnreachable when Redis refused part of the transaction. No deadline of its
        own: the caller's."""
        while not self._replies:
            self._replied = trio.Event()
            await self._replied.wait()
        results = self._replies.popleft()
        if not isinstance(results, list):
            raise EngineUnreachable(f"Redis did not run a batch: {str(results)[:200]}")
        for result in results:
            if isinstance(result, Exception):
                raise EngineUnreachable(describe(result, tls=self._tls))
        last = results[-1]
        if not isinstance(last, list):
            return []
        return [stream_id.decode() if stream_id else None for stream_id in last]

    def batch_commands(
        self,
        head: bytes,
        ops: list[bytes],
        published: list[Published | None],
        position: str,
        writes: Writes,
        *,
        refresh: bool = True,
    ) -> list[tuple[Any, ...]]:
        """The commands of one batch's transaction (see `submit`), MULTI and EXEC included."""
        streams = sorted({p.history for p in published if p is not None and p.history is not None})
        bitmaps = sorted({self._sent_key(p.logged) for p in published if p is not None and p.logged is not None})
        body = head + b",".join(ops)
        ttl = int(self.node_timeout * 1000)
        presence, users, node = self._presence_key(self.node), self._users_key(self.node), self._node_key(self.node)
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        stored = [x for field, value in writes.members.items() if value is not None for x in (field, value)]
        removed = [field for field, value in writes.members.items() if value is None]
        if stored:
            commands.append(("HSET", presence, *stored))
        if removed:
            commands.append(("HDEL", presence, *removed))
        counted = [x for sub, n in writes.users.items() if n > 0 for x in (sub, n)]
        gone = [sub for sub, n in writes.users.items() if n <= 0]
        if counted:
            commands.append(("HSET", users, *counted))
        if gone:
            commands.append(("HDEL", users, *gone))
        if refresh or stored or removed or counted or gone:
            commands += [
                ("SET", node, position, "PX", ttl),
                ("PEXPIRE", presence, ttl),
                ("PEXPIRE", users, ttl),
                ("SADD", self._nodes_key, self.node),
            ]
        else:
            # Only the position moves (a batch of broadcasts): the three keys keep the expiry of the last refresh,
            # and so still expire together. Half the commands of a batch, which is most batches under load.
            commands.append(("SET", node, position, "KEEPTTL"))
        if (streams or bitmaps) and self._script is not None:
            index = {key: n for n, key in enumerate([*map(self._history_key, streams), *bitmaps], 1)}
            script: list[Any] = [
                self.bus,
                body,
                wire.IDS_START,
                self.history_size,
                int(self.history_ttl * 1000),
                int(self.log_retention * 1000),
            ]
            for op, how in zip(ops, published, strict=True):
                if how is None:
                    continue
                stream = index[self._history_key(how.history)] if how.history is not None else 0
                if how.logged is None:
                    script += [stream, 0, 0, op if stream else b""]
                else:
                    bit = how.logged % SENDS_PER_BITMAP
                    script += [stream, index[self._sent_key(how.logged)], bit, op if stream else b""]
            commands.append(("EVALSHA", self._script, len(index), *index, *script))
        else:
            commands.append(("PUBLISH", self.bus, body + wire.BATCH_END))
        commands.append(("EXEC",))
        return commands

    async def read_history(self, channel: str, since: str, count: int) -> tuple[int, list[tuple[str, bytes]]]:
        """Redis's time (ms) and the first `count` entries of `channel`'s history stream from stream id `since`
        on, itself included: (id, operation) each."""
        client, _ = self._connected()
        key = self._history_key(channel)

        async def read() -> list[Any]:
            pipe = client.pipeline(transaction=True)
            pipe.time()
            pipe.xrange(key, min=since, count=count)
            return await pipe.execute()

        (seconds, microseconds), entries = await self._cross(read)
        return seconds * 1000 + microseconds // 1000, [
            (stream_id.decode(), fields.get(b"o", b"")) for stream_id, fields in entries
        ]

    async def rewrite(self, snapshot: Snapshot, data: bytes) -> None:
        """Replace the node's whole state in Redis by `snapshot` and publish `data` (an Announce), in one
        transaction: after an outage, or at start."""
        client, _ = self._connected()
        ttl = int(self.node_timeout * 1000)
        presence, users, node = self._presence_key(self.node), self._users_key(self.node), self._node_key(self.node)
        members = {
            wire.member_field(room, key, ref): orjson.dumps(state)
            for room, keys in snapshot.members.items()
            for key, refs in keys.items()
            for ref, state in refs.items()
        }

        async def transaction() -> None:
            pipe = client.pipeline(transaction=True)
            pipe.delete(presence, users)
            if members:
                pipe.hset(presence, mapping=members)  # type: ignore[arg-type]
            if snapshot.users:
                pipe.hset(users, mapping=snapshot.users)  # type: ignore[arg-type]
            pipe.set(node, f"{snapshot.incarnation} {snapshot.seq}", px=ttl)
            pipe.pexpire(presence, ttl)
            pipe.pexpire(users, ttl)
            pipe.sadd(self._nodes_key, self.node)
            pipe.publish(self.bus, data)
            await pipe.execute()

        await self._cross(transaction)

    async def leave(self, data: bytes) -> None:
        """Publish `data` (a Goodbye) and remove the node's state: a clean shutdown."""
        client, _ = self._connected()

        async def transaction() -> None:
            pipe = client.pipeline(transaction=True)
            pipe.delete(self._presence_key(self.node), self._users_key(self.node), self._node_key(self.node))
            pipe.srem(self._nodes_key, self.node)
            pipe.publish(self.bus, data)
            await pipe.execute()

        await self._cross(transaction)

    # ---- other nodes' state --------------------------------------------------------------------------------

    async def nodes(self) -> list[str]:
        """The nodes with state in Redis; those whose state expired are removed from the set on the way."""
        client, _ = self._connected()
        nodes_key = self._nodes_key

        async def alive() -> list[str]:
            members = sorted(m.decode() if isinstance(m, bytes) else m for m in await client.smembers(nodes_key))
            if not members:
                return []
            exists = await client.mget([self._node_key(m) for m in members])
            dead = [m for m, value in zip(members, exists, strict=True) if value is None]
            if dead:
                await client.srem(nodes_key, *dead)
            return [m for m, value in zip(members, exists, strict=True) if value is not None]

        return await self._cross(alive)

    async def read_state(self, node: str) -> Snapshot | None:
        """`node`'s state as of its last written batch; None when it has none (it left or expired). Fields that do
        not parse are skipped (written by something else than fluxrt)."""
        client, _ = self._connected()

        async def read() -> list[Any]:
            pipe = client.pipeline(transaction=True)
            pipe.get(self._node_key(node))
            pipe.hgetall(self._presence_key(node))
            pipe.hgetall(self._users_key(node))
            return await pipe.execute()

        position, presence, users = await self._cross(read)
        return parse_state(position, presence, users)


def _idle(transport: asyncio.WriteTransport) -> bool:
    """Whether `transport` is open and holds nothing unwritten."""
    return not transport.is_closing() and transport.get_write_buffer_size() == 0


def parse_state(position: bytes | None, presence: dict[bytes, bytes], users: dict[bytes, bytes]) -> Snapshot | None:
    """A node's state from its three keys; None without a position (the node left or expired)."""
    if position is None:
        return None
    incarnation, _, seq = position.decode(errors="replace").partition(" ")
    if not (seq.isascii() and seq.isdigit()):
        return None
    members: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for field, value in presence.items():
        try:
            room, key, ref = wire.parse_member_field(field)
            state = orjson.loads(value)
        except (wire.WireError, orjson.JSONDecodeError):
            continue
        if isinstance(state, dict):
            members.setdefault(room, {}).setdefault(key, {})[ref] = state
    counts: dict[str, int] = {}
    for sub, count in users.items():
        if count.isdigit():
            counts[sub.decode(errors="replace")] = int(count)
    return Snapshot(incarnation, int(seq), members, counts)


def describe(exc: BaseException, *, tls: bool | None = None) -> str:
    """One line for a log or a health check: the exception's class and message, no traceback; for the failures an
    operator can fix from the configuration, what to change."""
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or "certificate verify failed"
            return (
                f"Redis's TLS certificate could not be verified ({reason}): name the CA that signed it with "
                "?ssl_ca_certs=/path/ca.pem in cluster.redis_url"
            )
    text = str(exc).strip() or "no detail"
    line = f"{type(exc).__name__}: {text}"[:300]
    if tls is False and any(isinstance(cause, ConnectionResetError) for cause in _chain(exc)):
        line += " (is it a TLS port? then use rediss:// in cluster.redis_url)"
    return line


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen
