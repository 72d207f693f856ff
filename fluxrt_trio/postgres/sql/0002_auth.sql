-- auth.uid(), auth.role() and auth.jwt(), read from the request.jwt.claims setting that fluxrt sets for each
-- identity. Installed only where the database has none (Supabase and PostgREST databases bring their own).
-- Once set in a session the setting reads back as '' rather than NULL, hence nullif.
CREATE SCHEMA IF NOT EXISTS auth;
GRANT USAGE ON SCHEMA auth TO PUBLIC;

DO $$
BEGIN
    IF to_regprocedure('auth.jwt()') IS NULL THEN
        CREATE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $f$
            SELECT coalesce(nullif(current_setting('request.jwt.claims', true), '')::jsonb, '{}'::jsonb)
        $f$;
    END IF;
    IF to_regprocedure('auth.uid()') IS NULL THEN
        -- The token's sub as a uuid, NULL when it is not one (use auth.jwt() ->> 'sub' for other ids).
        CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $f$
            SELECT CASE WHEN s ~* '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$' THEN s::uuid END
              FROM (SELECT nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub' AS s) c
        $f$;
    END IF;
    IF to_regprocedure('auth.role()') IS NULL THEN
        CREATE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $f$
            SELECT nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role'
        $f$;
    END IF;
END
$$;
