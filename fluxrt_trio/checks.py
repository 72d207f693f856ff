"""The checks a connection's requests need beyond their own format: may this identity subscribe to a channel, or
broadcast or track presence on it. Each answer is None (allowed; a TableGrant for a table) or the Error to send,
echoing the request's ref; a renewal check that cannot reach the database answers Unavailable instead, so that the
subscription is kept."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from .postgres.authorize import ChannelAuthorizer, Refused
from .postgres.bridge import AuthorizerPool, DatabaseUnavailable
from .postgres.subscribe import TableAccess, TableAccessQueries, UnknownRole
from .protocol.channels import ChannelKind
from .protocol.filters import EVENTS, FilterError, parse_filter
from .protocol.identity import Identity
from .protocol.messages import Error, ErrorCode
from .protocol.session import CheckAction, CheckSubscribe, TableGrant, Unavailable

NO_DATABASE = "no database is configured (set database.dsn or database.embedded in fluxrt.yaml, or FLUXRT_DATABASE_DSN)"


class ChannelChecks:
    """Table subscribes are checked against the catalog; presence and broadcast channels against the optional
    `realtime.authorize` hook. Without a database (`pool` None) table channels are refused and the others open."""

    def __init__(
        self,
        pool: AuthorizerPool | None,
        allowed_roles: Iterable[str],
        *,
        database_ok: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.allowed_roles = frozenset(allowed_roles)
        self._hook = ChannelAuthorizer(pool) if pool is not None else None
        self._tables = TableAccessQueries(pool) if pool is not None else None
        self._database_ok = database_ok

    async def database_back(self) -> None:
        """Return once the database is reachable (the changefeed reads); at once when nothing reports on it."""
        if self._database_ok is not None:
            await self._database_ok()

    async def subscribe(self, identity: Identity, check: CheckSubscribe) -> Error | Unavailable | TableGrant | None:
        """The checks of docs/protocol.md "Subscribe checks, in order" after the format; an allowed table subscribe
        answers the TableGrant its subscription keeps (which table the check saw, and when). A renewal check
        (`check.renewal`) that cannot reach the database answers Unavailable: the subscription it concerns is kept
        and checked again once the database is back (`Session.rechecks`)."""
        channel = check.channel
        if channel.kind is not ChannelKind.TABLE:
            return await self._hook_allows(identity, channel.name, "subscribe", check.ref)
        assert channel.schema is not None and channel.table is not None
        if self._tables is None:
            return _refusal(check, ErrorCode.SUBSCRIPTION_FAILED, f"cannot subscribe to {channel.name}: {NO_DATABASE}")
        role = identity.role
        if role not in self.allowed_roles:
            return _refusal(
                check,
                ErrorCode.FORBIDDEN,
                f"role {role!r} may not be assumed by fluxrt; allowed: {', '.join(sorted(self.allowed_roles))} "
                "(add it to auth.roles)",
            )
        if is_system_schema(channel.schema):
            # Decided before the catalog is asked: the answer neither says which system tables exist nor suggests
            # granting a role SELECT on them.
            return _refusal(
                check,
                ErrorCode.SUBSCRIPTION_FAILED,
                f"cannot subscribe to {channel.name}: {channel.schema} is a system schema, whose tables are never "
                "captured; subscribe to a table of your own",
            )
        try:
            access = await self._tables.table_access(channel.schema, channel.table, role)
        except DatabaseUnavailable as exc:
            if check.renewal:
                return Unavailable(str(exc))
            return _refusal(check, ErrorCode.SUBSCRIPTION_FAILED, f"database unavailable, try again later ({exc})")
        except UnknownRole:
            return _refusal(check, ErrorCode.FORBIDDEN, f"role {role!r} does not exist in the database")
        refusal = judge_table_subscribe(check, role, access)
        if refusal is not None:
            return refusal
        assert access is not None
        return TableGrant(access.relid, access.snapshot)

    async def action(self, identity: Identity, check: CheckAction) -> Error | None:
        """Whether the hook lets the identity broadcast or track presence on the channel."""
        return await self._hook_allows(identity, check.channel.name, check.action, check.ref)

    async def _hook_allows(self, identity: Identity, channel: str, action: str, ref: str | None) -> Error | None:
        if self._hook is None:
            return None
        try:
            # The hook runs as the connection's role: a token must not pick one fluxrt was not told it may assume.
            if identity.role not in self.allowed_roles and await self._hook.hook_exists():
                return Error(
                    ErrorCode.FORBIDDEN,
                    f"role {identity.role!r} may not be assumed by fluxrt; allowed: "
                    f"{', '.join(sorted(self.allowed_roles))} (add it to auth.roles)",
                    channel=channel,
                    ref=ref,
                )
            await self._hook.check(identity, channel, action)
        except Refused as exc:
            return Error(ErrorCode.FORBIDDEN, str(exc), channel=channel, ref=ref)
        except DatabaseUnavailable as exc:
            code = ErrorCode.SUBSCRIPTION_FAILED if action == "subscribe" else ErrorCode.FORBIDDEN
            return Error(code, f"database unavailable to authorize {channel} ({exc})", channel=channel, ref=ref)
        return None


def judge_table_subscribe(check: CheckSubscribe, role: str, access: TableAccess | None) -> Error | None:
    """The refusal of a table subscribe, given what the catalog says about the table (None: no such table)."""
    channel, request = check.channel, check.request
    qualified = f"{channel.schema}.{channel.table}"
    if access is None:
        return _refusal(check, ErrorCode.SUBSCRIPTION_FAILED, f"table {qualified} does not exist")
    # Before the privilege check: a GRANT on a partition would not help, its channel never carries anything
    # (partition_of is None for a role that may read neither it nor its root: that one is FORBIDDEN).
    if access.partition_of is not None:
        return _refusal(
            check,
            ErrorCode.SUBSCRIPTION_FAILED,
            f"{qualified} is a partition of {access.partition_of}: its changes are published on "
            f"table:{access.partition_of}; subscribe there (a filter on the partition key selects this partition's "
            "rows)",
        )
    if not access.readable:
        return _refusal(
            check, ErrorCode.FORBIDDEN, f"role {role} may not read {qualified}: GRANT SELECT ON {qualified} TO {role}"
        )
    if not access.enabled:
        return _refusal(
            check,
            ErrorCode.SUBSCRIPTION_FAILED,
            f"realtime is not enabled for {qualified}: run SELECT enable_realtime('{qualified}')",
        )
    if request.event not in EVENTS:
        return _refusal(
            check,
            ErrorCode.SUBSCRIPTION_FAILED,
            f"invalid event {request.event[:64]!r}: expected one of {', '.join(EVENTS)}",
        )
    if request.filter is not None:
        try:
            condition = parse_filter(request.filter)
        except FilterError as exc:
            return _refusal(check, ErrorCode.SUBSCRIPTION_FAILED, str(exc))
        if condition.column not in access.columns:
            return _refusal(
                check, ErrorCode.SUBSCRIPTION_FAILED, f"invalid filter: {qualified} has no column {condition.column!r}"
            )
        if condition.column not in access.readable_columns:
            return _refusal(
                check,
                ErrorCode.SUBSCRIPTION_FAILED,
                f"invalid filter: role {role} may not read column {condition.column!r} of {qualified}",
            )
    return None


def is_system_schema(schema: str) -> bool:
    """Whether `schema` is one whose tables `enable_realtime` refuses (migration 0001): PostgreSQL's own and
    fluxrt's."""
    return schema in ("pg_catalog", "information_schema", "realtime") or schema.startswith(("pg_toast", "pg_temp"))


def _refusal(check: CheckSubscribe, code: ErrorCode, message: str) -> Error:
    return Error(code, message, channel=check.channel.name, ref=check.ref)
