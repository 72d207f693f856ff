-- Change capture: the change log, the registry of enabled tables, the capture trigger function,
-- enable_realtime / disable_realtime and the realtime_enabled_tables view.

CREATE SCHEMA IF NOT EXISTS realtime;
-- Trigger creators must be able to name realtime.capture; the tables themselves stay private.
GRANT USAGE ON SCHEMA realtime TO PUBLIC;

-- CACHE 1: a cached sequence hands out ids out of commit order across sessions, which breaks per-row order.
CREATE TABLE realtime.changes (
    id bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    relid oid NOT NULL,
    schema_name name NOT NULL,
    table_name name NOT NULL,
    op text NOT NULL CHECK (op IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'DISABLE')),
    old_record jsonb,
    new_record jsonb
);
CREATE INDEX changes_xid_idx ON realtime.changes (xid);
-- It holds every column of every captured row: only fluxrt's own role reads it.
REVOKE ALL ON realtime.changes FROM PUBLIC;

CREATE TABLE realtime.tables (
    relid oid PRIMARY KEY,
    enabled_at timestamptz NOT NULL DEFAULT now(),
    notify boolean NOT NULL DEFAULT false
);
REVOKE ALL ON realtime.tables FROM PUBLIC;

-- Snapshots taken over time; pruning deletes below the horizon of the one taken a retention period ago.
-- Every node adds one now and then (several may at the same instant, hence no key on taken_at).
CREATE TABLE realtime.horizons (
    taken_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    snap pg_snapshot NOT NULL
);
CREATE INDEX horizons_taken_at_idx ON realtime.horizons (taken_at);
CREATE TABLE realtime.pruned (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    horizon xid8 NOT NULL
);
REVOKE ALL ON realtime.horizons, realtime.pruned FROM PUBLIC;

-- Runs as its owner (fluxrt's role) so that writers need no privilege on realtime.*. TG_ARGV[0]: 'notify' or ''.
CREATE FUNCTION realtime.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- The table is the one the trigger fires on, never what its arguments say: anyone may attach this function to
    -- a table of their own, so names taken from arguments could forge changes to other tables. A partition
    -- reports as its root, the table that was enabled and that subscribers name.
    root oid := coalesce(pg_partition_root(TG_RELID), TG_RELID);
    nsp name := TG_TABLE_SCHEMA;
    rel name := TG_TABLE_NAME;
BEGIN
    IF root <> TG_RELID THEN
        SELECT n.nspname, c.relname INTO nsp, rel FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = root;
    END IF;
    IF TG_LEVEL = 'STATEMENT' THEN
        INSERT INTO realtime.changes (relid, schema_name, table_name, op) VALUES (root, nsp, rel, 'TRUNCATE');
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO realtime.changes (relid, schema_name, table_name, op, new_record)
        VALUES (root, nsp, rel, 'INSERT', to_jsonb(NEW));
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO realtime.changes (relid, schema_name, table_name, op, old_record, new_record)
        VALUES (root, nsp, rel, 'UPDATE', to_jsonb(OLD), to_jsonb(NEW));
    ELSE
        INSERT INTO realtime.changes (relid, schema_name, table_name, op, old_record)
        VALUES (root, nsp, rel, 'DELETE', to_jsonb(OLD));
    END IF;
    IF TG_ARGV[0] = 'notify' THEN
        PERFORM pg_notify('fluxrt_changes', '');
    END IF;
    RETURN NULL;
END
$$;

-- Registry changes go through these definer functions. Each acts only on what the caller demonstrably controls:
-- register copies the state of the capture trigger (which only someone allowed to create triggers on the table
-- could have made, notify flag included), unregister acts only once that trigger is gone.
CREATE FUNCTION realtime.register(rel oid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    args bytea;
BEGIN
    SELECT tgargs INTO args FROM pg_trigger WHERE tgrelid = rel AND tgname = 'fluxrt_capture';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'realtime.register: % has no capture trigger; call enable_realtime instead', rel::regclass;
    END IF;
    INSERT INTO realtime.tables (relid, notify) VALUES (rel, position('notify'::bytea IN args) = 1)
    ON CONFLICT (relid) DO UPDATE SET notify = EXCLUDED.notify;
END
$$;

CREATE FUNCTION realtime.unregister(rel oid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    nsp name;
    relname name;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'fluxrt_capture') THEN
        RAISE EXCEPTION 'realtime.unregister: % still has its capture trigger; call disable_realtime instead', rel::regclass;
    END IF;
    DELETE FROM realtime.tables WHERE relid = rel;
    IF FOUND THEN
        SELECT n.nspname, c.relname INTO nsp, relname
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
        -- In the change log, so that every node tells the table's subscribers in order with the changes.
        INSERT INTO realtime.changes (relid, schema_name, table_name, op) VALUES (rel, nsp, relname, 'DISABLE');
    END IF;
END
$$;
GRANT EXECUTE ON FUNCTION realtime.register(oid), realtime.unregister(oid) TO PUBLIC;

-- Not pinned to a search_path: 'users' must resolve through the caller's.
CREATE FUNCTION realtime.resolve(tbl text, caller text) RETURNS oid
LANGUAGE plpgsql AS $$
DECLARE
    rel oid;
    kind "char";
    nsp name;
BEGIN
    rel := pg_catalog.to_regclass(tbl);
    IF rel IS NULL THEN
        RAISE EXCEPTION '%: table "%" does not exist', caller, tbl
            USING ERRCODE = 'undefined_table',
                  HINT = 'Name it as it is in the catalog, e.g. ''users'' (found through search_path) or ''app.orders''.';
    END IF;
    SELECT c.relkind, n.nspname INTO kind, nsp
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
    IF nsp IN ('pg_catalog', 'information_schema', 'realtime') OR nsp LIKE 'pg\_toast%' OR nsp LIKE 'pg\_temp%' THEN
        RAISE EXCEPTION '%: % is in the system schema %, which cannot be captured', caller, tbl, nsp
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '%: % is a %, not a table; only tables can stream changes', caller, tbl,
            CASE kind WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' WHEN 'f' THEN 'foreign table'
                      WHEN 'S' THEN 'sequence' WHEN 'i' THEN 'index' ELSE 'relation of kind ' || kind::text END
            USING ERRCODE = 'wrong_object_type';
    END IF;
    RETURN rel;
END
$$;

-- Runs as the caller (dropping a trigger needs ownership of the table).
CREATE FUNCTION realtime.drop_triggers(rel oid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    trigger_name name;
BEGIN
    FOR trigger_name IN
        SELECT tgname FROM pg_trigger WHERE tgrelid = rel AND tgname IN ('fluxrt_capture', 'fluxrt_capture_truncate')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, rel::regclass);
    END LOOP;
END
$$;

-- Callable unqualified: public is on every default search_path. Runs as the caller, who must be allowed to create
-- triggers on the table (its owner, or a holder of the TRIGGER privilege).
CREATE FUNCTION public.enable_realtime(tbl text, notify boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    rel oid := realtime.resolve(tbl, 'enable_realtime');
    target text := rel::regclass::text;
    flag text := CASE WHEN notify THEN 'notify' ELSE '' END;
BEGIN
    PERFORM realtime.drop_triggers(rel);
    EXECUTE format('CREATE TRIGGER fluxrt_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION realtime.capture(%L)', target, flag);
    EXECUTE format('CREATE TRIGGER fluxrt_capture_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION realtime.capture(%L)', target, flag);
    PERFORM realtime.register(rel);
END
$$;

CREATE FUNCTION public.disable_realtime(tbl text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    rel oid := realtime.resolve(tbl, 'disable_realtime');
BEGIN
    PERFORM realtime.drop_triggers(rel);
    PERFORM realtime.unregister(rel);
END
$$;

CREATE VIEW public.realtime_enabled_tables AS
SELECT n.nspname AS schema_name, c.relname AS table_name, t.enabled_at, t.notify
  FROM realtime.tables t
  JOIN pg_catalog.pg_class c ON c.oid = t.relid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace;
GRANT SELECT ON public.realtime_enabled_tables TO PUBLIC;
