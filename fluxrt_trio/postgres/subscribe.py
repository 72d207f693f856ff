"""What the database says about a `table:` subscribe: the table, whether the role may read it and which columns,
and whether realtime is enabled for it. checks.py turns the answer into the client's error."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import attrs

from .bridge import AuthorizerPool
from .shared import SharedQueries

_ACCESS = """
SELECT c.oid AS relid, pg_catalog.pg_current_snapshot()::text AS snapshot,
       pg_catalog.has_schema_privilege($3, n.oid, 'USAGE')
         AND pg_catalog.has_any_column_privilege($3, c.oid, 'SELECT') AS readable,
       -- Registered and still carrying its capture trigger (as the realtime_enabled_tables view says).
       EXISTS (SELECT 1 FROM realtime.tables t WHERE t.relid = c.oid)
         AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g WHERE g.tgrelid = c.oid AND g.tgname = 'fluxrt_capture')
         AS enabled,
       -- A partition's changes are published on its root's channel (migration 0008), never its own. Named only to
       -- a role that may read the partition or the root (checks.py tells it before the privilege check).
       CASE WHEN c.relispartition THEN (
           SELECT rn.nspname || '.' || rc.relname
             FROM pg_catalog.pg_class rc JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace
            WHERE rc.oid = pg_catalog.pg_partition_root(c.oid)
              AND (pg_catalog.has_schema_privilege($3, n.oid, 'USAGE')
                     AND pg_catalog.has_any_column_privilege($3, c.oid, 'SELECT')
                   OR pg_catalog.has_schema_privilege($3, rn.oid, 'USAGE')
                     AND pg_catalog.has_any_column_privilege($3, rc.oid, 'SELECT'))) END AS partition_of,
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns,
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                AND pg_catalog.has_column_privilege($3, c.oid, a.attnum, 'SELECT')) AS readable_columns
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
"""


class UnknownRole(Exception):
    """The role does not exist in the database."""


@attrs.frozen(slots=True)
class TableAccess:
    """One role's access to one table."""

    relid: int
    snapshot: str
    """the snapshot the catalog was read in (`pg_snapshot` text); one object for every check that shared the query,
    since each table subscription keeps it (its list of transactions in progress can be long)"""
    readable: bool
    """USAGE on the schema and SELECT on some column"""
    enabled: bool
    """realtime is enabled for the table"""
    columns: frozenset[str]
    readable_columns: frozenset[str]
    partition_of: str | None = None
    """for a partition, its root (schema.table), whose channel carries its changes; None also when the role may
    read neither"""


class TableAccessQueries:
    """Asks the catalog about table subscribes. Identical checks (same schema, table and role: all the answer
    depends on) that wait at the same time share one query (shared.py): in a connect storm thousands of clients ask
    the same question at once. Each answer still comes from a query begun after its check arrived."""

    def __init__(self, pool: AuthorizerPool) -> None:
        self._pool = pool
        self.shared: SharedQueries[tuple[str, str, str], TableAccess | None] = SharedQueries()

    async def table_access(self, schema: str, table: str, role: str) -> TableAccess | None:
        """`role`'s access to `schema.table`; None when there is no such table (or it is a view or a system table).

        Raises UnknownRole, and DatabaseUnavailable when the database cannot be asked.
        """

        async def query(sent: Callable[[], None]) -> TableAccess | None:
            async def ask(conn: asyncpg.Connection) -> asyncpg.Record | None:
                sent()
                return await conn.fetchrow(_ACCESS, schema, table, role)

            try:
                row = await self._pool.run(ask)
            except asyncpg.UndefinedObjectError:
                raise UnknownRole(role) from None
            if row is None:
                return None
            return TableAccess(
                row["relid"],
                row["snapshot"],
                row["readable"],
                row["enabled"],
                frozenset(row["columns"]),
                frozenset(row["readable_columns"]),
                row["partition_of"],
            )

        return await self.shared.run((schema, table, role), query)
