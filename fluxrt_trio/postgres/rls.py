"""Deciding which identities see which row images of a table: per role in one query where the policies can be
rewritten (policies.py), one identity at a time (realtime.visible) where they cannot.

Runs on the asyncio side, inside the caller's REPEATABLE READ READ ONLY transaction. Plans are cached per table and
role, and dropped when a cheap catalog fingerprint, read once per call of `refresh`, changes (policies, row security
switches, columns, the auth functions, role memberships, schemas), or when a planned query fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
import attrs
import orjson

from .bridge import describe, is_connection_error
from .policies import AuthFunction, Catalog, PerIdentity, Policy, Relation, SetPlan, plan

log = logging.getLogger("fluxrt.rls")

Row = tuple[int, list[int] | None, list[str] | None, str | None]
"""(identity index, visible image indexes or None, readable columns or None, error), as realtime.visible returns"""
_CachedClaims = tuple[dict[str, Any], frozenset[str] | None, bytes]
"""an identity's claims, the keys they were cut down to, and the JSON sent for them"""
CLAIMS_TURN = 1000
"""RowSecurity's cache of claims turns every this many calls, or sooner once it has this many entries more than
twice those it kept at the turn before; at a turn, the claims not asked for since the turn before are let go. So it
holds about the identities being decided, not every identity since the start (they were kept until 100,000 had
piled up, most of them of closed connections, 4 KiB each)"""

# xmin changes whenever a catalog row is rewritten (in-place updates by VACUUM and ANALYZE leave it alone). Two parts:
# what every plan depends on, and the columns of the table being decided ($1), so that tables decided in turn do not
# invalidate each other's plans. The same statement pins search_path for the rest of its transaction.
_FINGERPRINT_PARTS = """
SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true) IS NULL AS pinned,
       (SELECT md5(coalesce(string_agg(x, ',' ORDER BY x), '')) FROM (
            SELECT 'p' || oid || '.' || xmin FROM pg_catalog.pg_policy
            UNION ALL SELECT 'c' || oid || '.' || xmin FROM pg_catalog.pg_class WHERE relrowsecurity
            UNION ALL SELECT 'f' || p.oid || '.' || p.xmin FROM pg_catalog.pg_proc p
                       WHERE p.proname IN ('uid', 'role', 'jwt')
                         AND p.pronamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = 'auth')
            UNION ALL SELECT 'm' || roleid || '.' || member || '.' || xmin FROM pg_catalog.pg_auth_members
            UNION ALL SELECT 'n' || oid || '.' || xmin FROM pg_catalog.pg_namespace
        ) f(x)) AS global,
       (SELECT md5(coalesce(string_agg(x, ',' ORDER BY x), '')) FROM (
            SELECT 'c' || oid || '.' || xmin FROM pg_catalog.pg_class WHERE oid = $1::oid
            UNION ALL SELECT 'a' || attnum || '.' || xmin FROM pg_catalog.pg_attribute
                       WHERE attrelid = $1::oid AND attnum > 0
            UNION ALL SELECT 'd' || oid || '.' || xmin FROM pg_catalog.pg_attrdef WHERE adrelid = $1::oid
        ) f(x)) AS local
"""
_FINGERPRINT = f"SELECT global, local FROM ({_FINGERPRINT_PARTS}) f"

# Objects of the built-in catalog (oid below FirstNormalObjectId) are judged by name in policies.py; anything else a
# policy depends on is named here so that the plan can refuse it.
_DEPENDENCIES = """
ARRAY(SELECT CASE d.refclassid
               WHEN 'pg_proc'::regclass THEN (SELECT 'function ' || n.nspname || '.' || p.proname || '/' || p.pronargs
                                               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                                              WHERE p.oid = d.refobjid)
               WHEN 'pg_operator'::regclass THEN 'operator ' || d.refobjid::regoperator::text
               ELSE 'domain ' || d.refobjid::regtype::text END
        FROM pg_depend d
       WHERE d.classid = {cls}::regclass AND d.objid = {obj} AND d.refobjid >= 16384
         AND (d.refclassid IN ('pg_proc'::regclass, 'pg_operator'::regclass)
              OR (d.refclassid = 'pg_type'::regclass
                  AND (SELECT typtype FROM pg_type WHERE oid = d.refobjid) = 'd')))
"""

_DESCRIBE = f"""
SELECT c.oid, c.relkind::text, c.relrowsecurity, n.nspname::text, c.relname::text,
       ARRAY(SELECT a.attname::text FROM pg_attribute a
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum) AS columns,
       ARRAY(SELECT ARRAY[a.attname::text, pg_get_expr(ad.adbin, ad.adrelid)]
               FROM pg_attribute a JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
              WHERE a.attrelid = c.oid AND a.attgenerated <> '' AND NOT a.attisdropped) AS generated,
       ARRAY(SELECT unnest({_DEPENDENCIES.format(cls="'pg_attrdef'", obj="ad.oid")})
               FROM pg_attrdef ad WHERE ad.adrelid = c.oid) AS generated_dependencies,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                  'name', p.polname, 'permissive', p.polpermissive, 'qual', pg_get_expr(p.polqual, p.polrelid),
                  'roles', ARRAY(SELECT r FROM unnest($2::text[]) r
                                  WHERE CASE WHEN NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN false
                                             ELSE p.polroles = '{{0}}'
                                                  OR EXISTS (SELECT 1 FROM unnest(p.polroles) AS o(oid)
                                                              WHERE o.oid <> 0 AND pg_has_role(r, o.oid, 'USAGE'))
                                        END),
                  'dependencies', {_DEPENDENCIES.format(cls="'pg_policy'", obj="p.oid")},
                  'relations', ARRAY(SELECT DISTINCT d.refobjid FROM pg_depend d
                                      WHERE d.classid = 'pg_policy'::regclass AND d.objid = p.oid
                                        AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> p.polrelid))),
                  '[]')
          FROM pg_policy p
         WHERE p.polrelid = c.oid AND p.polcmd IN ('r', '*') AND p.polqual IS NOT NULL) AS policies
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = ANY($1::oid[])
"""

_AUTH = """
SELECT p.proname::text, l.lanname::text, p.provolatile::text, coalesce(p.prosrc, ''),
       format_type(p.prorettype, NULL), p.proconfig IS NOT NULL, p.prosecdef
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
 WHERE n.nspname = 'auth' AND p.proname IN ('uid', 'role', 'jwt') AND p.pronargs = 0
"""

_EXECUTABLE = """
SELECT r, ARRAY(SELECT p.proname::text FROM pg_catalog.pg_proc p
                 WHERE p.pronamespace = n.oid AND p.proname IN ('uid', 'role', 'jwt') AND p.pronargs = 0
                   AND pg_catalog.has_schema_privilege(r, n.oid, 'USAGE')
                   AND pg_catalog.has_function_privilege(r, p.oid, 'EXECUTE'))
  FROM unnest($1::text[]) r, pg_catalog.pg_namespace n
 WHERE n.nspname = 'auth' AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r)
"""

_BUILTINS = """
SELECT proname::text, bool_or(provolatile = 'v'), bool_or(proretset OR prokind IN ('a', 'w')) FROM pg_proc
 WHERE pronamespace = 'pg_catalog'::regnamespace GROUP BY proname
"""

_EXISTS = "SELECT EXISTS (SELECT FROM pg_catalog.pg_class WHERE oid = $1::oid)"
_VISIBLE = "SELECT n, visible, readable, error FROM realtime.visible($1::oid, $2::jsonb, $3)"
_VISIBLE_SETS = (
    "SELECT r, readable, everything, identity, image, error FROM realtime.visible_sets($1::oid, $2::jsonb, $3)"
)
# The steady state in one round trip: the fingerprint, and the decision only if the plans still match it ($4, $5).
_CHECKED_VISIBLE_SETS = f"""
SELECT f.global, f.local, v.r, v.readable, v.everything, v.identity, v.image, v.error
  FROM ({_FINGERPRINT_PARTS}) f
  LEFT JOIN LATERAL realtime.visible_sets(
      $1::oid, CASE WHEN f.global = $4 AND f.local = $5 THEN $2::jsonb ELSE '[]'::jsonb END, $3) v ON true
"""


@attrs.frozen(slots=True)
class RowSecurityStatistics:
    set_based: int = 0
    """role evaluations decided by one query"""
    per_identity: int = 0
    """identities decided one at a time"""
    one_statement: int = 0
    """windows decided by the one statement that checks the fingerprint, with every plan cached"""


class RowSecurity:
    """Plans and runs the visibility decisions. `set_based=False` decides everything per identity (benchmarks and
    the agreement test compare both)."""

    def __init__(self, *, set_based: bool = True) -> None:
        self.set_based = set_based
        self._fingerprint: str | None = None
        """of what every plan depends on"""
        self._local: dict[int, str] = {}
        """per table, the fingerprint of its own columns"""
        self._relations: dict[int, Relation] = {}
        self._roles: dict[int, set[str]] = {}
        """roles each described relation's policies were asked about"""
        self._auth: dict[str, AuthFunction] = {}
        self._volatile: frozenset[str] = frozenset()
        self._stable: frozenset[str] = frozenset()
        self._row_shaping: frozenset[str] = frozenset()
        self._executable: dict[str, frozenset[str]] = {}
        """per role, the auth functions it may call"""
        self._plans: dict[tuple[int, str], SetPlan | PerIdentity] = {}
        self._told: set[tuple[int, str, str]] = set()
        self._claims_cache: dict[int, _CachedClaims] = {}
        """each identity's part of the claims sent, by id() of its claims (the entry holds them, so the id stays
        theirs); entries asked for since the last turn"""
        self._claims_before: dict[int, _CachedClaims] = {}
        """entries of the turn before, taken back when asked for again; the rest go at the next turn"""
        self._claims_calls = 0
        self._statistics = RowSecurityStatistics()

    def statistics(self) -> RowSecurityStatistics:
        """How decisions were made so far (benchmarks and tests read it)."""
        return self._statistics

    def _count(self, **more: int) -> None:
        now = self._statistics
        self._statistics = attrs.evolve(now, **{name: getattr(now, name) + n for name, n in more.items()})

    async def _refresh(self, conn: asyncpg.Connection, relid: int) -> None:
        """Forget the plans the catalog no longer supports: all of them when a policy, a role membership or an auth
        function changed, the table's when its columns did."""
        fingerprint, local = (await conn.fetch(_FINGERPRINT, relid))[0]  # a SELECT without FROM: one row
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            self._local.clear()
            self._executable.clear()
            self._relations.clear()
            self._roles.clear()
            self._plans.clear()
            self._auth = {
                name: AuthFunction(name, language, volatility, body, returns, configured, definer)
                for name, language, volatility, body, returns, configured, definer in await conn.fetch(_AUTH)
            }
        if self._local.get(relid) != local:
            self._local[relid] = local
            self._relations.pop(relid, None)
            self._roles.pop(relid, None)
            self._plans = {key: value for key, value in self._plans.items() if key[0] != relid}
        if not self._stable and not self._volatile:
            rows = await conn.fetch(_BUILTINS)
            self._volatile = frozenset(name for name, volatile, _ in rows if volatile)
            self._stable = frozenset(name for name, volatile, _ in rows if not volatile)
            self._row_shaping = frozenset(name for name, _, shaping in rows if shaping)

    async def decide(
        self,
        conn: asyncpg.Connection,
        relid: int,
        identities: Sequence[tuple[str, dict[str, Any]]],
        images: str,
        n_images: int,
    ) -> list[Row] | None:
        """Which of `n_images` images (a JSON array, as text) each identity (role, claims) sees: rows for the
        identities that see at least one image, or whose policy raised (the error is in their row), and for at least
        one identity of each role that may read the table (with its readable columns); the others see nothing.
        None when the table no longer exists (dropped since the images were logged: its policies went with it, so
        nobody may see them). Errors of the whole table (a lost connection, a broken policy function) raise.

        With every role's plan cached, one statement checks the catalog fingerprint and decides; otherwise (the
        first time, after a catalog change, or for roles decided one identity at a time) a REPEATABLE READ READ ONLY
        transaction does, so that every identity is decided under one snapshot."""
        by_role: dict[str, list[int]] = {}
        for n, (role, _claims) in enumerate(identities):
            by_role.setdefault(role, []).append(n)
        plans = self._cached(relid, by_role)
        if plans is not None:
            payload = self._payload(plans, identities, by_role)
            results = await conn.fetch(
                _CHECKED_VISIBLE_SETS, relid, payload, images, self._fingerprint, self._local.get(relid)
            )
            if results and (results[0][0], results[0][1]) == (self._fingerprint, self._local.get(relid)):
                # No role rows (r is NULL) when visible_sets declined: then the transaction below decides.
                decisions = [tuple(r)[2:] for r in results if r[2] is not None]
                rows, decided = self._set_rows(relid, plans, by_role, decisions, n_images)
                if len(decided) == len(by_role):
                    self._count(one_statement=1)
                    return rows
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            if self.set_based:
                await self._refresh(conn, relid)
            return await self._decide(conn, relid, identities, images, n_images, by_role)

    def _cached(self, relid: int, by_role: dict[str, list[int]]) -> dict[str, SetPlan] | None:
        """The plans for every role, when all are cached and set-based."""
        if not self.set_based or self._fingerprint is None or relid not in self._local:
            return None
        plans = {}
        for role in by_role:
            chosen = self._plans.get((relid, role))
            if not isinstance(chosen, SetPlan):
                return None
            plans[role] = chosen
        return plans

    def _payload(
        self, plans: dict[str, SetPlan], identities: Sequence[tuple[str, dict[str, Any]]], by_role: dict[str, list[int]]
    ) -> str:
        return orjson.dumps(
            [
                {
                    "role": role,
                    "query": plan.query,
                    "identities": self._claims_json([identities[n][1] for n in by_role[role]], plan.claim_keys),
                }
                for role, plan in plans.items()
            ]
        ).decode()

    async def _decide(
        self,
        conn: asyncpg.Connection,
        relid: int,
        identities: Sequence[tuple[str, dict[str, Any]]],
        images: str,
        n_images: int,
        by_role: dict[str, list[int]],
    ) -> list[Row] | None:
        plans: dict[str, SetPlan] = {}
        if self.set_based:
            await self._describe(conn, relid, list(by_role))
            if relid not in self._relations:
                return None
            for role in by_role:
                chosen = self._plan(relid, role)
                if isinstance(chosen, SetPlan):
                    plans[role] = chosen
        rows: list[Row] = []
        decided: set[str] = set()
        if plans:
            results = await conn.fetch(_VISIBLE_SETS, relid, self._payload(plans, identities, by_role), images)
            rows, decided = self._set_rows(relid, plans, by_role, [tuple(r) for r in results], n_images)
        rest = [n for role, members in by_role.items() if role not in decided for n in members]
        if rest:
            if not self.set_based and not await conn.fetchval(_EXISTS, relid):
                return None
            self._count(per_identity=len(rest))
            subset = orjson.dumps([{"role": identities[n][0], "claims": identities[n][1]} for n in rest]).decode()
            for k, visible, readable, error in await conn.fetch(_VISIBLE, relid, subset, images):
                rows.append((rest[k], visible, readable, error))
        return rows

    def _set_rows(
        self,
        relid: int,
        plans: dict[str, SetPlan],
        by_role: dict[str, list[int]],
        results: list[tuple[Any, ...]],
        n_images: int,
    ) -> tuple[list[Row], set[str]]:
        """Rows from realtime.visible_sets, and the roles it decided (a role whose query raised is left out)."""
        roles = list(plans)
        rows: list[Row] = []
        decided: set[str] = set()
        for r, readable, everything, identity, image, error in results:
            role = roles[r]
            if error is not None:
                # The policy raised (for some identity, or a change of the catalog made the query stale):
                # those identities are decided one at a time, which confines the error to whom it concerns.
                log.info(
                    "a set-based policy query failed; deciding its identities one at a time",
                    extra={"ctx_relid": relid, "ctx_role": role, "ctx_error": error},
                )
                self._plans.pop((relid, role), None)
                self._fingerprint = None
                continue
            decided.add(role)
            members = by_role[role]
            self._count(set_based=1)
            if readable is None:
                continue
            if everything:
                rows.extend((n, list(range(n_images)), readable, None) for n in members)
                continue
            seen: dict[int, list[int]] = {}
            for i, n in zip(identity or (), image or (), strict=True):
                seen.setdefault(members[i], []).append(n)
            # The role's readable columns travel with its first identity even when it sees nothing: delivery
            # needs them to end filters on columns the role may no longer read.
            seen.setdefault(members[0], [])
            rows.extend((n, sorted(visible), readable, None) for n, visible in seen.items())
        return rows, decided

    def _claims_json(self, claims: list[dict[str, Any]], keys: frozenset[str] | None) -> orjson.Fragment:
        """The identities' claims as one JSON array, each object cut down to `keys` when the query reads no more:
        PostgreSQL parses every byte sent, which is most of what deciding costs. Each identity's part is made once
        and kept while the identity is asked about (see CLAIMS_TURN)."""
        cache, before = self._claims_cache, self._claims_before
        parts = []
        for c in claims:
            hit = cache.get(id(c))
            if hit is None or hit[0] is not c or hit[1] != keys:
                hit = before.get(id(c))
                if hit is None or hit[0] is not c or hit[1] != keys:
                    text = orjson.dumps(c if keys is None else {k: c[k] for k in keys if k in c})
                    # A copy of the right size: orjson's own result keeps a buffer of 4 KiB or more.
                    hit = (c, keys, bytes(memoryview(text)))
                cache[id(c)] = hit
            parts.append(hit[2])
        self._claims_calls += 1
        if self._claims_calls >= CLAIMS_TURN or len(cache) > 2 * len(before) + CLAIMS_TURN:
            self._claims_calls = 0
            self._claims_before, self._claims_cache = cache, {}
        return orjson.Fragment(b"[" + b",".join(parts) + b"]")

    async def _describe(self, conn: asyncpg.Connection, relid: int, roles: list[str]) -> None:
        known = self._roles.get(relid)
        if known is not None and known.issuperset(roles):
            return
        wanted = sorted(set(roles) | (known or set()))
        unknown = [r for r in wanted if r not in self._executable]
        if unknown:
            found = {r: frozenset(names) for r, names in await conn.fetch(_EXECUTABLE, unknown)}
            self._executable.update({r: found.get(r, frozenset()) for r in unknown})
        todo = [relid]
        while todo:
            rows = await conn.fetch(_DESCRIBE, todo, wanted)
            todo = []
            for row in rows:
                relation = _relation(row)
                self._relations[relation.oid] = relation
                self._roles[relation.oid] = set(wanted)
                for policy in relation.policies:
                    todo.extend(o for o in policy.relations if o not in self._relations and o not in todo)
        self._plans = {key: value for key, value in self._plans.items() if key[0] != relid}

    def _plan(self, relid: int, role: str) -> SetPlan | PerIdentity:
        chosen = self._plans.get((relid, role))
        if chosen is None:
            catalog = Catalog(
                self._relations, self._auth, self._volatile, self._stable, self._row_shaping, self._executable
            )
            chosen = self._plans[(relid, role)] = plan(catalog, relid, role)
            if isinstance(chosen, PerIdentity) and (relid, role, chosen.reason) not in self._told:
                self._told.add((relid, role, chosen.reason))
                relation = self._relations[relid]
                log.info(
                    "row-level security for this table and role is decided one identity at a time",
                    extra={
                        "ctx_table": f"{relation.schema}.{relation.name}",
                        "ctx_role": role,
                        "ctx_reason": chosen.reason,
                    },
                )
        return chosen


def _relation(row: asyncpg.Record) -> Relation:
    policies = tuple(
        Policy(
            name=p["name"],
            permissive=p["permissive"],
            qual=p["qual"],
            dependencies=tuple(d for d in p["dependencies"] if d is not None),
            relations=tuple(int(o) for o in p["relations"]),
            roles=frozenset(p["roles"]),
        )
        for p in orjson.loads(row["policies"])
    )
    return Relation(
        oid=row["oid"],
        kind=row["relkind"],
        row_security=row["relrowsecurity"],
        schema=row["nspname"],
        name=row["relname"],
        columns=tuple(row["columns"]),
        generated={name: expr for name, expr in row["generated"]},
        generated_dependencies=tuple(d for d in row["generated_dependencies"] if d is not None),
        policies=policies,
    )


@attrs.frozen(slots=True)
class TableQuestion:
    """Which of a table's row images (a JSON array as text, `n_images` long) each identity (role, claims) sees."""

    channel: str
    relid: int
    identities: list[tuple[str, dict[str, Any]]]
    images: str
    n_images: int


async def decide_tables(
    conn: asyncpg.Connection, row_security: RowSecurity, questions: Sequence[TableQuestion]
) -> list[tuple[str, list[Row] | str | None]]:
    """Each table decided on its own, so that one table's failure (a policy function broken) costs only that table:
    its entry is then the error's description instead of rows, or None for a table dropped meanwhile (see
    `RowSecurity.decide`). A lost connection raises."""
    results: list[tuple[str, list[Row] | str | None]] = []
    for question in questions:
        try:
            rows = await row_security.decide(
                conn, question.relid, question.identities, question.images, question.n_images
            )
        except asyncpg.PostgresError as exc:
            if is_connection_error(exc):
                raise
            results.append((question.channel, describe(exc)))
        else:
            results.append((question.channel, None if rows is None else [(r[0], r[1], r[2], r[3]) for r in rows]))
    return results
