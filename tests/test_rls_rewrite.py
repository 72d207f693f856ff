"""The policy rewrite without a database: what becomes an identity column, what is refused, how plans combine."""

from __future__ import annotations

import attrs
import pytest

from fluxrt_trio.postgres.policies import (
    AuthFunction,
    Catalog,
    PerIdentity,
    Policy,
    Relation,
    SetPlan,
    Unsupported,
    plan,
    rewrite_auth_body,
    rewrite_policy,
)

UID = "__fluxrt_identity.__fluxrt_uid"
JWT = "__fluxrt_identity.__fluxrt_jwt"
CLAIMS = "__fluxrt_identity.__fluxrt_claims"

# The definitions of sql/0002_auth.sql and Supabase's, as prosrc holds them.
OURS_UID = """
            SELECT CASE WHEN s ~* '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$' THEN s::uuid END
              FROM (SELECT nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub' AS s) c
        """
SUPABASE_UID = """
  select
  coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
"""
OURS_JWT = "SELECT coalesce(nullif(current_setting('request.jwt.claims', true), '')::jsonb, '{}'::jsonb)"


@pytest.mark.parametrize(
    ("qual", "expected", "uses"),
    [
        ("(user_id = auth.uid())", f"user_id = {UID}", {"uid"}),
        # The fast idiom loses its subquery, so that the join can hash on it.
        ("(user_id = ( SELECT auth.uid() AS uid))", f"user_id = {UID}", {"uid"}),
        (
            "(team_id = ((( SELECT auth.jwt() AS jwt) ->> 'team'::text))::integer)",
            f"team_id = CAST({JWT} ->> CAST('team' AS text) AS integer)",
            {"jwt"},
        ),
        (
            "(owner = ((current_setting('request.jwt.claims'::text, true))::jsonb ->> 'sub'::text))",
            f"owner = CAST({CLAIMS} AS jsonb) ->> CAST('sub' AS text)",
            {"claims"},
        ),
        ("(owner = CURRENT_USER)", "owner = CURRENT_USER", set()),
        (
            "(current_setting('app.tenant'::text) = tenant)",
            "current_setting(CAST('app.tenant' AS text)) = tenant",
            set(),
        ),
        (
            "(EXISTS ( SELECT 1 FROM public.members m WHERE ((m.user_id = auth.uid()) AND (m.team = docs.team))))",
            f"EXISTS (SELECT 1 FROM public.members AS m WHERE m.user_id = {UID} AND m.team = docs.team)",
            {"uid"},
        ),
    ],
)
def test_identity_reads_become_columns(qual, expected, uses):
    rewritten = rewrite_policy(qual)
    assert rewritten.sql == expected
    assert rewritten.uses == uses


def test_builtin_function_names_are_reported_for_the_volatility_check():
    assert rewrite_policy("(length(title) > abs(n)) AND now() IS NOT NULL").functions == {"length", "abs", "now"}


@pytest.mark.parametrize(
    ("qual", "reason"),
    [
        ("(public.is_member(team))", "public.is_member"),
        ("(current_setting(name) = 'x'::text)", "not a constant"),
        ("(a OPERATOR(public.===) b)", "public.==="),
        ("(__fluxrt_identity = 1)", "reserves"),
        ("(auth.uid(1) = x)", "arguments"),
        ("(count(*) OVER () > 1)", "window"),
        ("(user_id = ", "cannot be parsed"),
    ],
)
def test_what_cannot_be_proved_safe_is_refused(qual, reason):
    with pytest.raises(Unsupported, match=reason):
        rewrite_policy(qual)


def auth(name: str, body: str, **overrides) -> AuthFunction:
    fields = {"language": "sql", "volatility": "s", "returns": {"uid": "uuid", "jwt": "jsonb"}.get(name, "text")}
    return AuthFunction(name=name, body=body, **{**fields, **overrides})


@pytest.mark.parametrize("body", [OURS_UID, SUPABASE_UID])
def test_auth_bodies_become_expressions_of_the_claims(body):
    rewritten = rewrite_auth_body(auth("uid", body))
    assert rewritten.uses == {"claims"}
    # Read as text and parsed back into jsonb, the claims are the claims (already parsed) themselves.
    assert "__fluxrt_source.__fluxrt_claims ->> 'sub'" in rewritten.sql
    assert "CAST(__fluxrt_source.__fluxrt_claims AS text)" not in rewritten.sql
    assert rewritten.sql.startswith("(SELECT * FROM (SELECT") and rewritten.sql.endswith("LIMIT 1)::uuid")
    assert "request.jwt.claims" not in rewritten.sql


def test_claims_read_as_text_otherwise_stay_text():
    rewritten = rewrite_auth_body(auth("role", "SELECT length(current_setting('request.jwt.claims', true))::text"))
    assert "length(CAST(__fluxrt_source.__fluxrt_claims AS text))" in rewritten.sql
    trimmed = rewrite_auth_body(
        auth("role", "SELECT btrim(current_setting('request.jwt.claims', true))::jsonb ->> 'x'")
    )
    assert "CAST(btrim(CAST(__fluxrt_source.__fluxrt_claims AS text)) AS jsonb)" in trimmed.sql


def test_a_body_that_is_one_expression_also_comes_without_the_one_row_subquery():
    rewritten = rewrite_auth_body(auth("jwt", OURS_JWT))
    assert rewritten.scalar == "(COALESCE(__fluxrt_source.__fluxrt_claims, CAST('{}' AS jsonb)))::jsonb"
    # A FROM of one one-row subquery is flattened into the expression, each use of its column replaced.
    assert rewrite_auth_body(auth("uid", OURS_UID)).scalar == (
        "(CASE WHEN __fluxrt_source.__fluxrt_claims ->> 'sub' ~* "
        "'^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$' "
        "THEN CAST(__fluxrt_source.__fluxrt_claims ->> 'sub' AS uuid) END)::uuid"
    )
    assert rewrite_auth_body(auth("role", "SELECT 2 * x FROM (SELECT 1 + 1, 3) AS c(x, y)")).scalar == (
        "(2 * (1 + 1))::text"
    )
    # Anything else keeps the subquery: a WHERE (no row: NULL), a LIMIT, a UNION, a FROM that is not one row...
    for body in (
        "SELECT 'x' WHERE false",
        "SELECT 'x' LIMIT 0",
        "SELECT 'a' UNION SELECT 'b'",
        "SELECT * FROM (SELECT 'x' AS s) c",
        "SELECT s FROM (SELECT 'x' AS s WHERE false) c",
        "SELECT s FROM (SELECT 'x' AS s) c, (SELECT 'y' AS t) d",
        "SELECT s || t FROM (SELECT 'x' AS s) c",
        # Inside the nested SELECT, x is q's own column: substituting the outer x there would change the answer.
        "SELECT (SELECT x FROM (SELECT 'inner' AS x) q) FROM (SELECT 'outer' AS x) c",
    ):
        assert rewrite_auth_body(auth("role", body)).scalar is None, body


@pytest.mark.parametrize(
    ("function", "reason"),
    [
        (auth("uid", "BEGIN RETURN NULL; END", language="plpgsql"), "plpgsql"),
        (auth("uid", OURS_UID, volatility="v"), "VOLATILE"),
        (auth("uid", OURS_UID, configured=True), "SET options"),
        (auth("uid", OURS_UID, definer=True), "SECURITY DEFINER"),
        (auth("uid", ""), "SQL-standard"),
        (auth("uid", "SELECT id FROM public.users WHERE name = current_user"), "reads the relation"),
        (auth("uid", "SELECT 1; SELECT 2"), "single SELECT"),
        (auth("uid", "SELECT public.lookup()"), "public.lookup"),
        (auth("uid", "SELECT auth.jwt() ->> 'sub'"), "auth.jwt"),
    ],
)
def test_auth_bodies_that_are_not_plain_functions_of_the_claims_are_refused(function, reason):
    with pytest.raises(Unsupported, match=reason):
        rewrite_auth_body(function)


# ---- plans ----------------------------------------------------------------------------------------------------------

DOCS, MEMBERS, TEAMS_VIEW = 1, 2, 3


def catalog(*policies: Policy, members: tuple[Policy, ...] = (), **relation) -> Catalog:
    docs = Relation(
        oid=DOCS,
        kind="r",
        row_security=True,
        schema="public",
        name="docs",
        columns=relation.pop("columns", ("id", "user_id", "team")),
        policies=policies,
        **relation,
    )
    return Catalog(
        relations={
            DOCS: docs,
            MEMBERS: Relation(MEMBERS, "r", True, "public", "members", ("user_id", "team"), policies=members),
            TEAMS_VIEW: Relation(TEAMS_VIEW, "v", False, "public", "teams_view"),
        },
        auth={"uid": auth("uid", OURS_UID), "jwt": auth("jwt", OURS_JWT)},
        volatile=frozenset({"random", "set_config"}),
        stable=frozenset({"length", "current_setting", "nullif", "now"}),
    )


def policy(name: str, qual: str, *, permissive: bool = True, roles=("authenticated",), **kwargs) -> Policy:
    return Policy(name=name, permissive=permissive, qual=qual, roles=frozenset(roles), **kwargs)


def test_permissive_policies_are_ored_in_descending_name_order_and_restrictive_ones_anded():
    result = plan(
        catalog(
            policy("a_own", "(user_id = auth.uid())"),
            policy("b_team", "(team = 1)"),
            policy("z_limit", "(id < 100)", permissive=False),
            policy("y_limit", "(id > 0)", permissive=False),
            policy("for_anon", "(true)", roles=("anon",)),
        ),
        DOCS,
        "authenticated",
    )
    assert isinstance(result, SetPlan)
    assert f"ON ((team = 1) OR (user_id = {UID})) AND (id > 0) AND (id < 100)" in result.query
    assert result.uses == {"uid"}
    assert "CASE WHEN __fluxrt_source.__fluxrt_claims ->> 'sub' ~* " in result.query  # auth.uid()'s own body


def test_the_one_expression_form_is_used_unless_a_function_in_it_returns_rows_or_aggregates():
    own = plan(catalog(policy("team", "(team = ((auth.jwt() ->> 'team'))::integer)")), DOCS, "authenticated")
    assert isinstance(own, SetPlan) and "LIMIT 1" not in own.query
    base = catalog(policy("long", "(length(auth.role()) > 3)"))
    with_role = attrs.evolve(base, auth={**base.auth, "role": auth("role", "SELECT length('x')::text")})
    assert "LIMIT 1" not in plan(with_role, DOCS, "authenticated").query
    # Were length() a set-returning or aggregate function, the one-row subquery would keep its meaning.
    shaping = attrs.evolve(with_role, row_shaping=frozenset({"length"}))
    assert "LIMIT 1)::text" in plan(shaping, DOCS, "authenticated").query


def test_no_permissive_policy_admits_nothing():
    result = plan(catalog(policy("only", "(id > 0)", permissive=False)), DOCS, "authenticated")
    assert isinstance(result, SetPlan) and "ON (false) AND (id > 0)" in result.query


def test_generated_columns_are_recomputed_in_the_query():
    result = plan(
        catalog(policy("p", "(shared)"), columns=("id", "owner", "shared"), generated={"shared": "(owner = 'x')"}),
        DOCS,
        "authenticated",
    )
    assert isinstance(result, SetPlan)
    assert '"docs"."owner", ((owner = \'x\')) AS "shared"' in result.query


MEMBER_SUBQUERY = "(EXISTS ( SELECT 1 FROM public.members m WHERE ((m.user_id = auth.uid()) AND (m.team = docs.team))))"


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ((), SetPlan),
        ((policy("open", "(true)"),), SetPlan),
        ((policy("own", "(user_id = auth.uid())"),), "public.members, whose policy own depends on the claims"),
        ((policy("odd", "(public.f())", dependencies=("function public.f/0",)),), "policy odd cannot be rewritten"),
    ],
)
def test_subqueries_into_tables_whose_policies_read_claims_go_per_identity(members, expected):
    result = plan(
        catalog(policy("member", MEMBER_SUBQUERY, relations=(MEMBERS,)), members=members), DOCS, "authenticated"
    )
    if expected is SetPlan:
        assert isinstance(result, SetPlan)
        assert f"m.user_id = {UID}" in result.query
    else:
        assert isinstance(result, PerIdentity) and expected in result.reason


@pytest.mark.parametrize(
    ("found", "reason"),
    [
        (policy("v", "(EXISTS ( SELECT 1 FROM public.teams_view))", relations=(TEAMS_VIEW,)), "not a table"),
        (policy("r", "(random() < (0.5)::double precision)"), "random() is volatile"),
        (policy("u", "(md5(title) = 'x'::text)"), "md5() is not a known built-in"),
        (policy("f", "(public.ok(id))", dependencies=("function public.ok/1",)), "function public.ok/1"),
        (policy("d", "(id = 1)", dependencies=("domain public.positive",)), "domain public.positive"),
        (policy("s", "(auth.role() = 'admin'::text)"), "auth.role() does not exist"),
    ],
)
def test_what_is_not_understood_goes_per_identity(found, reason):
    result = plan(catalog(found), DOCS, "authenticated")
    assert isinstance(result, PerIdentity)
    assert reason in result.reason


def test_a_column_with_the_reserved_prefix_goes_per_identity():
    result = plan(catalog(policy("p", "(true)"), columns=("id", "__fluxrt_n")), DOCS, "authenticated")
    assert isinstance(result, PerIdentity) and "__fluxrt_n" in result.reason


@pytest.mark.parametrize(
    ("qual", "keys"),
    [
        ("(team = ((auth.jwt() ->> 'team'))::integer)", {"team"}),
        ("(user_id = auth.uid())", {"sub"}),
        ("((auth.jwt() -> 'app_metadata') ->> 'org') = 'x' OR user_id = auth.uid()", {"app_metadata", "sub"}),
        # Read any other way, every claim is sent.
        ("((auth.jwt() #>> '{app_metadata,org}') = 'x')", None),
        ("(auth.jwt() IS NOT NULL)", None),
        ("(auth.jwt() ? 'admin')", None),
        ("(length(current_setting('request.jwt.claims', true)) > 2)", None),
    ],
)
def test_only_the_claims_a_plan_reads_by_constant_key_are_sent(qual, keys):
    chosen = plan(catalog(policy("p", qual)), DOCS, "authenticated")
    assert isinstance(chosen, SetPlan)
    assert chosen.claim_keys == (frozenset(keys) if keys is not None else None)


def test_a_role_that_may_not_call_an_auth_function_goes_per_identity():
    # Inlined, auth.uid()'s body would run where PostgreSQL refuses the call; per identity, the policy raises as live.
    allowed = attrs.evolve(catalog(policy("own", "(user_id = auth.uid())")), executable={"authenticated": frozenset()})
    result = plan(allowed, DOCS, "authenticated")
    assert isinstance(result, PerIdentity) and result.reason == "role authenticated may not call auth.uid()"
    granted = attrs.evolve(allowed, executable={"authenticated": frozenset({"uid"})})
    assert isinstance(plan(granted, DOCS, "authenticated"), SetPlan)
