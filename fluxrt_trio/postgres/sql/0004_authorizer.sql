-- The role that subscribe checks, the realtime.authorize hook and row-level security evaluation log in as. It must
-- never be a superuser, and must own nothing: policy code runs in its session and can reset the role to the session
-- user (RESET ROLE, or session_authorization after SET SESSION AUTHORIZATION), so whatever that user may do, a policy
-- author may do. fluxrt grants it membership in the roles its configuration names at start-up (never a superuser
-- role) and refuses to evaluate policies in a superuser session. Give it a password, or a pg_hba.conf entry, and
-- set database.authorizer_dsn (by default fluxrt logs in as this role with the main DSN's host and database).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'fluxrt_authorizer') THEN
        CREATE ROLE fluxrt_authorizer LOGIN NOINHERIT;
    ELSIF NOT (SELECT rolcanlogin AND NOT rolsuper FROM pg_catalog.pg_roles WHERE rolname = 'fluxrt_authorizer') THEN
        ALTER ROLE fluxrt_authorizer LOGIN NOSUPERUSER;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA realtime TO fluxrt_authorizer;
GRANT SELECT ON realtime.tables TO fluxrt_authorizer;
GRANT EXECUTE ON FUNCTION realtime.visible(oid, jsonb, text) TO fluxrt_authorizer;
