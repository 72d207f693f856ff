"""Row-level security policies rewritten so that one query decides them for every identity of a role.

A policy such as `user_id = (SELECT auth.uid())` reads the subscriber's claims through a setting, which forces one
evaluation per identity. Here its text (`pg_get_expr(polqual, polrelid)`, deparsed with `search_path` pinned to
`pg_catalog, pg_temp`, so that every object outside pg_catalog is schema-qualified) is parsed with PostgreSQL's own
parser (pglast) and `auth.uid()`, `auth.role()`, `auth.jwt()` and `current_setting('request.jwt.claims', ...)`
become columns of an identities relation joined with the row images: `user_id = identity.uid`, which PostgreSQL can
hash-join instead of looping.

The rewrite is only sound when the rest of the expression means the same for every identity of a role, so anything
it cannot prove so is refused with `Unsupported` (the caller then evaluates that table and role per identity):
functions outside pg_catalog other than the three above, volatile functions, a claims setting named by anything
but a constant, and subqueries into tables whose own policies read claims (those are decided for the role alone).
The bodies of `auth.uid()` and friends are inlined the same way, so a database that brings its own definitions
(Supabase, PostgREST) gets exactly those semantics.

Pure: no database, no I/O. `fluxrt_trio.postgres.rls` fetches the catalog facts and runs the queries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from pglast import ast, enums, parse_sql
    from pglast.parser import ParseError
    from pglast.stream import RawStream

RESERVED = "__fluxrt_"
"""prefix of every name the generated query introduces; a table with such a column is evaluated per identity"""
IDENTITY = RESERVED + "identity"
"""alias of the identities relation in the generated query"""
SOURCE = RESERVED + "source"
"""alias of the raw identities (index and claims) inside the identities relation"""
AUTH_FUNCTIONS = ("uid", "role", "jwt")
CLAIMS = "claims"
CLAIMS_SETTING = "request.jwt.claims"
INDEX_KEY = RESERVED + "i"
CLAIMS_KEY = RESERVED + CLAIMS
"""the keys of one identity in the query's $1: its index and its claims"""

# What deciding a policy for every identity at once may depend on, beyond the claims: functions in pg_catalog are
# checked by name for volatility by the caller; objects outside it show up in pg_depend and are refused there.
_SAFE_DEPENDENCIES = frozenset(f"function auth.{name}/0" for name in AUTH_FUNCTIONS)


class Unsupported(Exception):
    """The rewrite cannot prove the expression means the same for every identity of a role; says why."""


@attrs.frozen
class Expression:
    """A rewritten expression."""

    sql: str
    uses: frozenset[str]
    """identity columns it reads: some of uid, role, jwt, claims"""
    functions: frozenset[str]
    """names of pg_catalog functions it calls, whose volatility the caller must check"""
    scalar: str | None = None
    """for an auth function whose body is one expression (`SELECT <expr>`, nothing else): that expression, the same
    value without the one-row subquery (which costs a subplan per identity); valid only when none of `functions`
    returns a set or aggregates, which the caller checks"""


@attrs.frozen
class Policy:
    """One SELECT (or ALL) policy of a table, as the catalog describes it."""

    name: str
    permissive: bool
    qual: str
    """pg_get_expr(polqual, polrelid) under search_path pg_catalog, pg_temp"""
    dependencies: tuple[str, ...] = ()
    """pg_depend objects outside the built-in catalog: `function nsp.name/nargs`, `operator ...`, `domain ...`"""
    relations: tuple[int, ...] = ()
    """oids of the other relations its subqueries read"""
    roles: frozenset[str] = frozenset()
    """which of the roles asked about it applies to (PUBLIC or membership)"""


@attrs.frozen
class Relation:
    oid: int
    kind: str
    """pg_class.relkind"""
    row_security: bool
    schema: str
    name: str
    columns: tuple[str, ...] = ()
    generated: Mapping[str, str] = attrs.field(factory=dict)
    """generated column -> its expression, recomputed before judging (trigger images hold them stale or NULL)"""
    generated_dependencies: tuple[str, ...] = ()
    policies: tuple[Policy, ...] = ()


@attrs.frozen
class AuthFunction:
    """One of auth.uid(), auth.role(), auth.jwt() as defined in the database."""

    name: str
    language: str
    volatility: str
    """pg_proc.provolatile: i, s or v"""
    body: str
    """prosrc; empty for a SQL-standard body"""
    returns: str
    """format_type of the result"""
    configured: bool = False
    """it carries SET options (search_path, ...), which change how its body reads"""
    definer: bool = False
    """SECURITY DEFINER: its body runs as its owner, so inlined it would answer differently"""


@attrs.frozen
class Catalog:
    """The catalog facts a plan needs; `volatile` tells which pg_catalog function names have a volatile overload
    (names absent from both `volatile` and `stable` are unknown and refused)."""

    relations: Mapping[int, Relation]
    auth: Mapping[str, AuthFunction]
    volatile: frozenset[str]
    stable: frozenset[str]
    row_shaping: frozenset[str] = frozenset()
    """pg_catalog function names with an overload that returns a set or is an aggregate or window function"""
    executable: Mapping[str, frozenset[str]] | None = None
    """per role, the auth functions it may call (USAGE on the schema and EXECUTE); None: not checked"""


@attrs.frozen
class SetPlan:
    """One query decides the role's policies for all its identities."""

    query: str
    uses: frozenset[str]
    claim_keys: frozenset[str] | None = None
    """the only claims the query reads (send just these); None: send them all"""


@attrs.frozen
class PerIdentity:
    """The role's policies are evaluated one identity at a time; `reason` is logged once."""

    reason: str


# ---- expressions -------------------------------------------------------------------------------------------------


def _load_pglast() -> None:
    """Bind pglast's names above on first use: importing it costs about 0.1 s, a fifth of fluxrt's start-up, and it
    is needed only once a table has subscribers."""
    if "ast" in globals():
        return
    import pglast.ast
    import pglast.enums
    import pglast.parser
    import pglast.stream

    globals().update(
        ast=pglast.ast,
        enums=pglast.enums,
        parse_sql=pglast.parse_sql,
        ParseError=pglast.parser.ParseError,
        RawStream=pglast.stream.RawStream,
    )


def rewrite_policy(qual: str) -> Expression:
    """Rewrite one policy expression; raises Unsupported."""
    _load_pglast()
    target = _parse_expression(qual)
    rewriter = _Rewriter(identity=IDENTITY, body=False)
    result = rewriter.transform(target)
    return Expression(_deparse(result), frozenset(rewriter.uses), frozenset(rewriter.functions))


def rewrite_auth_body(function: AuthFunction) -> Expression:
    """The body of auth.uid()/role()/jwt() as a scalar expression over the claims of `SOURCE`; raises
    Unsupported when it is not a plain SQL function of the claims."""
    _load_pglast()
    label = f"auth.{function.name}()"
    if function.language != "sql":
        raise Unsupported(f"{label} is written in {function.language}, not SQL")
    if function.volatility == "v":
        raise Unsupported(f"{label} is VOLATILE")
    if function.configured:
        raise Unsupported(f"{label} has SET options")
    if function.definer:
        raise Unsupported(f"{label} is SECURITY DEFINER")
    if not function.body.strip():
        raise Unsupported(f"{label} has a SQL-standard body")
    try:
        statements = parse_sql(function.body)
    except ParseError as exc:
        raise Unsupported(f"{label} cannot be parsed: {exc}") from None
    if len(statements) != 1 or not isinstance(statements[0].stmt, ast.SelectStmt):
        raise Unsupported(f"{label} is not a single SELECT")
    rewriter = _Rewriter(identity=SOURCE, body=True)
    select = rewriter.transform(statements[0].stmt)
    # A SQL function returns its first row, NULL when there is none; so does this scalar subquery.
    sql = f"(SELECT * FROM ({_deparse(select)}) AS {RESERVED}f LIMIT 1)::{function.returns}"
    expression = _scalar(select)
    scalar = f"({expression})::{function.returns}" if expression is not None else None
    return Expression(sql, frozenset(rewriter.uses), frozenset(rewriter.functions), scalar)


def _scalar(select: ast.Node) -> str | None:
    """The one value a body returns, as an expression: `SELECT <expr>`, or `SELECT <expr> FROM (SELECT <a> AS x,
    ...) c` with each `x` (or `c.x`) in <expr> replaced by <a>. None for anything else."""
    if not isinstance(select, ast.SelectStmt):
        return None
    targets = select.targetList or ()
    if _one_row(select, columns=1, with_from=False):
        return _deparse(targets[0].val)
    if not _one_row(select, columns=1, with_from=True):
        return None
    source = (select.fromClause or ())[0]
    inner = source.subquery if isinstance(source, ast.RangeSubselect) else None
    if inner is None or source.lateral or not isinstance(inner, ast.SelectStmt) or source.alias is None:
        return None
    inner_targets = inner.targetList or ()
    if not _one_row(inner, columns=len(inner_targets), with_from=False):
        return None
    names = _names(source.alias.colnames) or tuple(t.name for t in inner_targets)
    if len(names) != len(inner_targets) or None in names:
        return None
    if _has_subquery(targets[0].val):
        # A name inside a nested SELECT may be that SELECT's own column: substituting there could change its meaning.
        return None
    values = {name: _deparse(t.val) for name, t in zip(names, inner_targets, strict=True)}
    alias = source.alias.aliasname
    replaced = True

    def substitute(node: ast.Node) -> ast.Node:
        nonlocal replaced
        if isinstance(node, ast.ColumnRef):
            fields = _names(node.fields)
            name = fields[-1] if fields[:-1] in ((), (alias,)) and len(fields) == len(node.fields or ()) else None
            if name not in values:
                replaced = False
                return node
            return _parse_expression(values[name])
        for field in node:
            value = getattr(node, field)
            if isinstance(value, ast.Node | tuple):
                setattr(node, field, walk(value))
        return node

    def walk(value: Any) -> Any:
        if isinstance(value, ast.Node):
            return substitute(value)
        if isinstance(value, tuple):
            return tuple(walk(item) for item in value)
        return value

    try:
        expression = substitute(_parse_expression(_deparse(targets[0].val)))
    except Unsupported:  # `SELECT *` and the like: not one expression
        return None
    return _deparse(expression) if replaced else None


def _has_subquery(node: Any) -> bool:
    if isinstance(node, ast.SubLink | ast.SelectStmt | ast.RangeSubselect):
        return True
    if isinstance(node, tuple):
        return any(_has_subquery(item) for item in node)
    if isinstance(node, ast.Node):
        return any(_has_subquery(getattr(node, field)) for field in node)
    return False


def _one_row(select: ast.SelectStmt, *, columns: int, with_from: bool) -> bool:
    """Exactly one row of `columns` values whatever the expressions (set-returning and aggregate functions aside,
    which the caller rules out): `SELECT <exprs>`, with `with_from` over one FROM item, and nothing else."""
    return (
        columns >= 1
        and len(select.targetList or ()) == columns
        and (len(select.fromClause or ()) == 1 if with_from else not select.fromClause)
        and select.whereClause is None
        and not select.groupClause
        and select.havingClause is None
        and not select.windowClause
        and not select.sortClause
        and not select.distinctClause
        and select.limitCount is None
        and select.limitOffset is None
        and select.withClause is None
        and not select.valuesLists
        and select.op in (None, 0, enums.SetOperation.SETOP_NONE)
    )


def _parse_expression(text: str) -> ast.Node:
    try:
        statements = parse_sql(f"SELECT ({text})")
    except ParseError as exc:
        raise Unsupported(f"the expression cannot be parsed: {exc}") from None
    if len(statements) != 1:
        raise Unsupported("the expression is not a single expression")
    select = statements[0].stmt
    if not isinstance(select, ast.SelectStmt) or len(select.targetList or ()) != 1 or select.fromClause:
        raise Unsupported("the expression is not a single expression")
    value: ast.Node = (select.targetList or ())[0].val
    return value


def _deparse(node: ast.Node) -> str:
    return RawStream()(node)


def _constant_text(node: object) -> str | None:
    """The value of a string constant, seen through casts ('x'::text); None for anything else."""
    while isinstance(node, ast.TypeCast):
        node = node.arg
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.String):
        return node.val.sval
    return None


def _names(items: Sequence[ast.Node] | None) -> tuple[str, ...]:
    return tuple(item.sval for item in items or () if isinstance(item, ast.String) and item.sval is not None)


class _Rewriter:
    """Replaces identity reads with columns of `identity` and records what else the expression depends on."""

    def __init__(self, *, identity: str, body: bool) -> None:
        self.identity = identity
        self.body = body
        """rewriting the body of an auth function: no relations, no user types, no auth calls"""
        self.uses: set[str] = set()
        self.functions: set[str] = set()

    def column(self, name: str) -> ast.Node:
        self.uses.add(name)
        ref = ast.ColumnRef(fields=(ast.String(sval=self.identity), ast.String(sval=RESERVED + name)))
        if self.body:
            # The raw claims are jsonb; current_setting() read them as text.
            return ast.TypeCast(arg=ref, typeName=ast.TypeName(names=(ast.String(sval="text"),), typemod=-1))
        return ref

    def transform(self, node: ast.Node) -> ast.Node:
        if isinstance(node, ast.FuncCall):
            replaced = self.function(node)
            if replaced is not None:
                return replaced
        elif isinstance(node, ast.ColumnRef):
            if any(name.startswith(RESERVED) for name in _names(node.fields)):
                raise Unsupported(f"the expression names {RESERVED}..., which the rewrite reserves")
        elif isinstance(node, ast.RangeVar):
            if self.body:
                raise Unsupported(f"it reads the relation {node.relname}")
        elif isinstance(node, ast.A_Expr):
            schema = _names(node.name)[:-1]
            if schema and schema != ("pg_catalog",):
                raise Unsupported(f"operator {'.'.join(_names(node.name))} is not built in")
        elif isinstance(node, ast.TypeName):
            schema = _names(node.names)[:-1]
            if schema and schema != ("pg_catalog",) and self.body:
                raise Unsupported(f"type {'.'.join(_names(node.names))} is not built in")
        elif isinstance(node, ast.ParamRef):
            raise Unsupported("it has parameters")
        for field in node:
            value = getattr(node, field)
            if isinstance(value, ast.Node):
                setattr(node, field, self.transform(value))
            elif isinstance(value, tuple):
                setattr(node, field, self._sequence(value))
        if isinstance(node, ast.SubLink):
            return self.simplify(node)
        if self.body and isinstance(node, ast.TypeCast):
            return self.parsed_claims(node)
        return node

    def parsed_claims(self, cast: ast.TypeCast) -> ast.Node:
        """`claims::text::jsonb`, or `nullif(claims::text, '')::jsonb`, is the claims themselves: they are a JSON
        object (never empty text), already parsed. Parsing them again costs microseconds per identity."""
        if cast.typeName is None or _names(cast.typeName.names)[-1:] != ("jsonb",) or cast.typeName.arrayBounds:
            return cast
        inner = cast.arg
        if (
            isinstance(inner, ast.A_Expr)
            and inner.kind == enums.A_Expr_Kind.AEXPR_NULLIF
            and _constant_text(inner.rexpr) == ""
        ):
            inner = inner.lexpr
        if (
            isinstance(inner, ast.TypeCast)
            and inner.typeName is not None
            and _names(inner.typeName.names)[-1:] == ("text",)
            and isinstance(inner.arg, ast.ColumnRef)
            and _names(inner.arg.fields) == (self.identity, RESERVED + CLAIMS)
        ):
            return inner.arg
        return cast

    def _sequence(self, items: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            self.transform(item)
            if isinstance(item, ast.Node)
            else self._sequence(item)
            if isinstance(item, tuple)
            else item
            for item in items
        )

    def function(self, call: ast.FuncCall) -> ast.Node | None:
        name = _names(call.funcname)
        if call.agg_order or call.agg_filter or call.over or call.agg_star or call.agg_distinct:
            raise Unsupported(f"{'.'.join(name)} is used as an aggregate or window function")
        if len(name) == 2 and name[0] == "auth" and name[1] in AUTH_FUNCTIONS:
            if self.body:
                raise Unsupported(f"it calls auth.{name[1]}()")
            if call.args:
                raise Unsupported(f"auth.{name[1]} is called with arguments")
            return self.column(name[1])
        if len(name) == 2 and name[0] != "pg_catalog":
            raise Unsupported(f"it calls {'.'.join(name)}(), which the rewrite cannot prove safe")
        if name[-1] == "current_setting":
            setting = _constant_text(call.args[0]) if call.args else None
            if setting is None:
                raise Unsupported("current_setting() is called with a setting name that is not a constant")
            if setting.lower() == CLAIMS_SETTING:
                return self.column(CLAIMS)
        self.functions.add(name[-1])
        return None

    def simplify(self, link: ast.SubLink) -> ast.Node:
        """`(SELECT identity.col)` is `identity.col`: written that way for speed, but as a subquery referring to the
        outer query it could not be hashed."""
        select = link.subselect
        if link.subLinkType != enums.SubLinkType.EXPR_SUBLINK or not isinstance(select, ast.SelectStmt):
            return link
        plain = not any(
            getattr(select, field)
            for field in (
                "distinctClause",
                "intoClause",
                "fromClause",
                "whereClause",
                "groupClause",
                "havingClause",
                "windowClause",
                "valuesLists",
                "sortClause",
                "limitOffset",
                "limitCount",
                "lockingClause",
                "withClause",
                "larg",
                "rarg",
            )
        )
        targets = select.targetList or ()
        if plain and len(targets) == 1:
            value = targets[0].val
            if isinstance(value, ast.ColumnRef) and _names(value.fields)[:1] == (self.identity,):
                return value
        return link


# ---- plans ---------------------------------------------------------------------------------------------------------


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def claims_free(catalog: Catalog, oid: int, seen: frozenset[int] = frozenset()) -> str | None:
    """Why reading relation `oid` inside a policy could depend on the identity's claims; None when it cannot.

    Such a read is planned once for the whole role, so its own policies must not look at claims."""
    relation = catalog.relations.get(oid)
    if relation is None:
        return f"relation {oid} is not described"
    label = f"{relation.schema}.{relation.name}"
    if relation.kind not in ("r", "p"):
        return f"it reads {label}, which is not a table"
    if not relation.row_security or oid in seen:
        return None
    for policy in relation.policies:
        try:
            expression = _checked(catalog, policy)
        except Unsupported as exc:
            return f"it reads {label}, whose policy {policy.name} cannot be rewritten: {exc}"
        if expression.uses:
            return f"it reads {label}, whose policy {policy.name} depends on the claims"
        for other in policy.relations:
            reason = claims_free(catalog, other, seen | {oid})
            if reason is not None:
                return reason
    return None


def _checked(catalog: Catalog, policy: Policy) -> Expression:
    unsafe = [d for d in policy.dependencies if d not in _SAFE_DEPENDENCIES]
    if unsafe:
        raise Unsupported(f"it depends on {', '.join(sorted(unsafe))}")
    expression = rewrite_policy(policy.qual)
    _check_functions(catalog, expression.functions)
    return expression


def _check_functions(catalog: Catalog, names: Iterable[str]) -> None:
    for name in sorted(names):
        if name in catalog.volatile:
            raise Unsupported(f"{name}() is volatile")
        if name not in catalog.stable:
            raise Unsupported(f"{name}() is not a known built-in function")


def plan(catalog: Catalog, relid: int, role: str) -> SetPlan | PerIdentity:
    """How to decide `role`'s SELECT policies on `relid` for all its identities at once. `relid` must be in the
    catalog (raises KeyError otherwise): a table dropped since its changes were logged has no policies to plan, and
    `RowSecurity` answers for it without a plan."""
    relation = catalog.relations[relid]
    reserved = [c for c in relation.columns if c.startswith(RESERVED)]
    if reserved:
        return PerIdentity(f"column {reserved[0]} uses the prefix the rewrite reserves")
    if relation.generated_dependencies:
        return PerIdentity(f"a generated column depends on {', '.join(relation.generated_dependencies)}")
    policies = [p for p in relation.policies if role in p.roles]
    # Postgres ORs permissive policies in descending name order and ANDs restrictive ones in ascending order;
    # the order shows when a policy raises.
    permissive = sorted((p for p in policies if p.permissive), key=lambda p: p.name, reverse=True)
    restrictive = sorted((p for p in policies if not p.permissive), key=lambda p: p.name)
    parts: list[Expression] = []
    try:
        for policy in (*permissive, *restrictive):
            parts.append(_checked(catalog, policy))
            for other in policy.relations:
                reason = claims_free(catalog, other)
                if reason is not None:
                    raise Unsupported(reason)
        for expr in relation.generated.values():
            _check_functions(catalog, rewrite_policy(expr).functions)
    except Unsupported as exc:
        return PerIdentity(str(exc))
    uses = frozenset(u for part in parts for u in part.uses)
    identity_columns: dict[str, str] = {}
    for name in sorted(uses):
        if name == CLAIMS:
            identity_columns[name] = f"{SOURCE}.{CLAIMS_KEY}::text"
            continue
        function = catalog.auth.get(name)
        if function is None:
            return PerIdentity(f"auth.{name}() does not exist")
        if catalog.executable is not None and name not in catalog.executable.get(role, frozenset()):
            # Inlined, the body would run where PostgreSQL refuses the call: let the call fail as it would live.
            return PerIdentity(f"role {role} may not call auth.{name}()")
        try:
            body = rewrite_auth_body(function)
            _check_functions(catalog, body.functions)
        except Unsupported as exc:
            return PerIdentity(str(exc))
        inline = None if body.functions & catalog.row_shaping else body.scalar
        identity_columns[name] = inline if inline is not None else body.sql
    texts = [part.sql for part in parts]
    predicate = "(" + (" OR ".join(f"({t})" for t in texts[: len(permissive)]) or "false") + ")"
    predicate += "".join(f" AND ({t})" for t in texts[len(permissive) :])
    return SetPlan(query(relation, identity_columns, predicate), uses, claim_keys(identity_columns, predicate))


def query(relation: Relation, identity_columns: Mapping[str, str], predicate: str) -> str:
    """The query run as the role: $1 is a JSON array of the identities' claims (objects; an identity's index is its
    position), $2 the images as a JSON array (text); it returns the matching (identity index, image index) pairs as
    two arrays."""
    alias = _quote(relation.name)
    target = f"{_quote(relation.schema)}.{alias}"
    identity_list = "".join(f", {sql} AS {RESERVED}{name}" for name, sql in identity_columns.items())
    columns = ", ".join(
        f"({relation.generated[c]}) AS {_quote(c)}" if c in relation.generated else f"{alias}.{_quote(c)}"
        for c in relation.columns
    )
    # Each relation sits in its own scope, so that the policy's unqualified column names can only mean the table's
    # columns, and its references to the table by name (from inside subqueries) meet the images.
    return (
        f"WITH {RESERVED}identities AS MATERIALIZED ("
        f"SELECT {SOURCE}.{INDEX_KEY}{identity_list} "
        f"FROM (SELECT ({RESERVED}o - 1)::integer AS {INDEX_KEY}, {RESERVED}c AS {CLAIMS_KEY} "
        f"FROM pg_catalog.jsonb_array_elements($1::pg_catalog.jsonb) WITH ORDINALITY "
        f"AS {RESERVED}a({RESERVED}c, {RESERVED}o)) AS {SOURCE}), "
        f"{RESERVED}images AS MATERIALIZED ("
        f"SELECT {RESERVED}r.*, ({RESERVED}e.{RESERVED}ord - 1)::integer AS {RESERVED}n "
        f"FROM pg_catalog.jsonb_array_elements($2::pg_catalog.jsonb) WITH ORDINALITY "
        f"AS {RESERVED}e({RESERVED}img, {RESERVED}ord), "
        f"LATERAL (SELECT {columns} FROM pg_catalog.jsonb_populate_record(NULL::{target}, {RESERVED}e.{RESERVED}img) "
        f"AS {alias}) AS {RESERVED}r) "
        f"SELECT pg_catalog.array_agg({IDENTITY}.{INDEX_KEY}), pg_catalog.array_agg({alias}.{RESERVED}n) "
        f"FROM {RESERVED}identities AS {IDENTITY} JOIN {RESERVED}images AS {alias} ON {predicate}"
    )


def claim_keys(identity_columns: Mapping[str, str], predicate: str) -> frozenset[str] | None:
    """The top-level claims the query can read, when it reads them only by constant key (`->> 'team'`): the other
    claims may then be left out of what is sent, which is what parsing costs. None when it reads them any other
    way (the whole object, a path, as text)."""
    _load_pglast()
    keys: set[str] = set()
    for name, sql in identity_columns.items():
        if name == CLAIMS:
            return None
        # The jwt column is the claims object itself: its own keys are found where the predicate reads it.
        found = _key_reads(_parse_expression(sql), (SOURCE, CLAIMS_KEY), whole_ok=name == "jwt")
        if found is None:
            return None
        keys |= found
    if "jwt" in identity_columns:
        found = _key_reads(_parse_expression(predicate), (IDENTITY, RESERVED + "jwt"), whole_ok=False)
        if found is None:
            return None
        keys |= found
    return frozenset(keys)


def _key_reads(root: ast.Node, column: tuple[str, str], *, whole_ok: bool) -> set[str] | None:
    """Constant keys under which `column` is read in `root`, seen through `coalesce(x, '{}')` and casts to jsonb;
    None if it is read any other way. `whole_ok`: the whole expression may be the column itself."""
    keys: set[str] = set()

    def visit(node: ast.Node, ancestors: list[ast.Node]) -> bool:
        if isinstance(node, ast.ColumnRef) and _names(node.fields) == column:
            child: ast.Node = node
            for parent in reversed(ancestors):
                if (
                    isinstance(parent, ast.TypeCast)
                    and parent.typeName is not None
                    and _names(parent.typeName.names)[-1:] == ("jsonb",)
                ):
                    child = parent
                    continue
                if isinstance(parent, ast.CoalesceExpr) and parent.args and parent.args[0] is child:
                    child = parent
                    continue
                if isinstance(parent, ast.A_Expr):
                    key = _constant_text(parent.rexpr)
                    if (
                        key is not None
                        and parent.kind == enums.A_Expr_Kind.AEXPR_OP
                        and _names(parent.name) in (("->>",), ("->",))
                        and parent.lexpr is child
                    ):
                        keys.add(key)
                        return True
                return False
            return whole_ok
        for field in node:
            value = getattr(node, field)
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, ast.Node) and not visit(item, [*ancestors, node]):
                    return False
        return True

    return keys if visit(root, []) else None
