-- The role that subscribe checks and row-level security evaluation run under when fluxrt logs in as a superuser:
-- policy code can reset the role to the session user, which must therefore never be a superuser. fluxrt grants it
-- membership in the roles its configuration names (auth.anon_role, auth.default_role, auth.roles) at start-up.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'fluxrt_authorizer') THEN
        CREATE ROLE fluxrt_authorizer NOLOGIN NOINHERIT;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA realtime TO fluxrt_authorizer;
GRANT SELECT ON realtime.tables TO fluxrt_authorizer;
GRANT EXECUTE ON FUNCTION realtime.visible(oid, jsonb, text) TO fluxrt_authorizer;
