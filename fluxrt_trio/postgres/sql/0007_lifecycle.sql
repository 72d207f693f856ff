-- The table lifecycle: a dropped or renamed enabled table is told to its subscribers through the change log (ops
-- DROP and RENAME, in commit order with the table's changes), and a dropped one leaves the registry, so that an oid
-- reused by a later table never looks enabled. TRUNCATE of one partition is captured (statement triggers are not
-- cloned to partitions). Event triggers report at once; they need a superuser, so this migration installs them only
-- when it runs as one (realtime.install_lifecycle() later, otherwise). Without them each node's pruning pass finds
-- drops and renames (realtime.sweep_lifecycle), and new partitions get their TRUNCATE trigger from enable_realtime.

ALTER TABLE realtime.changes DROP CONSTRAINT changes_op_check;
ALTER TABLE realtime.changes ADD CONSTRAINT changes_op_check
    CHECK (op IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'DISABLE', 'SEND', 'DROP', 'RENAME')) NOT VALID;

-- The name each table had when last seen: what its subscribers' channels say, and what a drop or rename reports
-- (the catalog row is gone or changed by then).
ALTER TABLE realtime.tables ADD COLUMN schema_name name, ADD COLUMN table_name name;
UPDATE realtime.tables t SET schema_name = n.nspname, table_name = c.relname
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = t.relid;
-- Left over from a table dropped before this migration: nothing can reach it any more, and its oid may come back.
DELETE FROM realtime.tables WHERE schema_name IS NULL;

-- register and unregister sweep first (realtime.sweep_lifecycle, below): when the event triggers are missing, a
-- rename or a drop not yet swept is logged before the entry takes the table's current name, and before the table
-- is disabled or a new one of the same name enabled. Else the old name's subscribers would never be told (the entry
-- would already carry the new name), or the late DROP would end the new table's subscriptions.
CREATE OR REPLACE FUNCTION realtime.register(rel oid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    args bytea;
BEGIN
    SELECT tgargs INTO args FROM pg_trigger WHERE tgrelid = rel AND tgname = 'fluxrt_capture';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'realtime.register: % has no capture trigger; call enable_realtime instead', rel::regclass;
    END IF;
    PERFORM realtime.sweep_lifecycle();
    INSERT INTO realtime.tables (relid, notify, schema_name, table_name)
    SELECT rel, position('notify'::bytea IN args) = 1, n.nspname, c.relname
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel
    ON CONFLICT (relid) DO UPDATE
        SET notify = EXCLUDED.notify, schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name;
END
$$;

CREATE OR REPLACE FUNCTION realtime.unregister(rel oid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    nsp name;
    relname name;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'fluxrt_capture') THEN
        RAISE EXCEPTION 'realtime.unregister: % still has its capture trigger; call disable_realtime instead', rel::regclass;
    END IF;
    PERFORM realtime.sweep_lifecycle();
    DELETE FROM realtime.tables WHERE relid = rel;
    IF FOUND THEN
        SELECT n.nspname, c.relname INTO nsp, relname
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
        -- In the change log, so that every node tells the table's subscribers in order with the changes.
        INSERT INTO realtime.changes (relid, schema_name, table_name, op) VALUES (rel, nsp, relname, 'DISABLE');
    END IF;
END
$$;

-- A TRUNCATE of a partition fires its own trigger, reported under the root with the partition named (new_record
-- {"partition": "schema.name"}): subscribers of the root lose that partition's rows only. Truncating the root (or
-- an intermediate partitioned table) also fires the trigger of every partition under it, right after its own; the
-- partition's report is then left out when the last change of this transaction to the table is a TRUNCATE of an
-- ancestor (or of the whole table), which already says it. A TRUNCATE trigger left on a partition detached since
-- (its root, now itself, or a table it was attached to later, carries no capture trigger) reports nothing.
CREATE OR REPLACE FUNCTION realtime.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- The table is the one the trigger fires on, never what its arguments say: anyone may attach this function to
    -- a table of their own, so names taken from arguments could forge changes to other tables. A partition
    -- reports as its root, the table that was enabled and that subscribers name.
    root oid := coalesce(pg_partition_root(TG_RELID), TG_RELID);
    nsp name := TG_TABLE_SCHEMA;
    rel name := TG_TABLE_NAME;
    last_op text;
    last_record jsonb;
BEGIN
    IF root <> TG_RELID THEN
        SELECT n.nspname, c.relname INTO nsp, rel FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = root;
    END IF;
    IF TG_LEVEL = 'STATEMENT'
       AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = root AND g.tgname = 'fluxrt_capture') THEN
        RETURN NULL;
    ELSIF TG_LEVEL = 'STATEMENT' AND root = TG_RELID THEN
        INSERT INTO realtime.changes (relid, schema_name, table_name, op) VALUES (root, nsp, rel, 'TRUNCATE');
    ELSIF TG_LEVEL = 'STATEMENT' THEN
        SELECT c.op, c.new_record INTO last_op, last_record FROM realtime.changes c
         WHERE c.xid = pg_current_xact_id() AND c.relid = root ORDER BY c.id DESC LIMIT 1;
        IF last_op = 'TRUNCATE' AND (last_record IS NULL OR (last_record ->> 'partition') IN (
            SELECT format('%I.%I', n.nspname, c.relname) FROM pg_partition_ancestors(TG_RELID) a
              JOIN pg_class c ON c.oid = a.relid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE a.relid <> TG_RELID)) THEN
            RETURN NULL;
        END IF;
        INSERT INTO realtime.changes (relid, schema_name, table_name, op, new_record)
        VALUES (root, nsp, rel, 'TRUNCATE',
                jsonb_build_object('partition', format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME)));
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

-- Runs as the caller (creating a trigger needs the TRIGGER privilege on the table), who may not read realtime.*:
-- the notify flag is copied from the root's capture trigger. A partition the caller may not put a trigger on is
-- skipped with a warning rather than failing the caller's DDL. Foreign partitions are left out: PostgreSQL allows
-- them no TRUNCATE trigger (truncating the whole table still reports them).
CREATE FUNCTION realtime.add_partition_triggers(rel oid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    part oid;
    flag text;
BEGIN
    SELECT CASE WHEN position('notify'::bytea IN g.tgargs) = 1 THEN 'notify' ELSE '' END INTO flag
      FROM pg_trigger g WHERE g.tgrelid = rel AND g.tgname = 'fluxrt_capture';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    FOR part IN
        SELECT p.relid FROM pg_partition_tree(rel) p JOIN pg_class c ON c.oid = p.relid
         WHERE p.relid <> rel AND c.relkind IN ('r', 'p')
           AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = p.relid AND g.tgname = 'fluxrt_capture_truncate')
    LOOP
        BEGIN
            EXECUTE format('CREATE TRIGGER fluxrt_capture_truncate AFTER TRUNCATE ON %s '
                           'FOR EACH STATEMENT EXECUTE FUNCTION realtime.capture(%L)', part::regclass, coalesce(flag, ''));
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE WARNING 'realtime: TRUNCATE of partition % is not captured: % may not create triggers on it',
                part::regclass, current_user
                USING HINT = format('As its owner: SELECT enable_realtime(%L)', rel::regclass::text);
        END;
    END LOOP;
END
$$;

-- The partitions' TRUNCATE triggers go with the table's own.
CREATE OR REPLACE FUNCTION realtime.drop_triggers(rel oid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    target oid;
    trigger_name name;
BEGIN
    FOR target, trigger_name IN
        SELECT g.tgrelid, g.tgname FROM pg_trigger g
         -- pg_partition_tree lists nothing for a table that is not partitioned.
         WHERE (g.tgrelid = rel OR g.tgrelid IN (SELECT p.relid FROM pg_partition_tree(rel) p))
           AND (g.tgname = 'fluxrt_capture_truncate' OR (g.tgname = 'fluxrt_capture' AND g.tgrelid = rel))
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, target::regclass);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION public.enable_realtime(tbl text, notify boolean DEFAULT false) RETURNS void
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
    PERFORM realtime.add_partition_triggers(rel);
END
$$;

-- Acts only on what the catalog shows, never on arguments (only_tables can only narrow it), so anyone may call it
-- (the event triggers do, as the user whose DDL fired them): registry entries whose table is gone become DROP rows,
-- those whose name changed RENAME rows (new_record {"schema","table"}: the new name). Returns the rows it logged.
-- An entry another transaction holds (a concurrent sweep, a DDL transaction that dropped or renamed the table, a
-- session that called this and stays open) is skipped, never waited for: a pruning pass or someone's DDL must not
-- hang on any user's open transaction, and the holder logs the event, or the next sweep does if it rolls back.
-- So several nodes sweeping at once log each event once.
CREATE FUNCTION realtime.sweep_lifecycle(only_tables oid[] DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    logged integer := 0;
BEGIN
    FOR r IN
        DELETE FROM realtime.tables t WHERE t.relid IN (
            SELECT g.relid FROM realtime.tables g
             WHERE (only_tables IS NULL OR g.relid = ANY (only_tables))
               AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = g.relid)
               FOR UPDATE SKIP LOCKED)
        RETURNING t.relid, t.schema_name, t.table_name
    LOOP
        INSERT INTO realtime.changes (relid, schema_name, table_name, op) VALUES (r.relid, r.schema_name, r.table_name, 'DROP');
        logged := logged + 1;
    END LOOP;
    -- FOR UPDATE re-checks the names against an entry another sweep updated meanwhile, so it is logged once.
    FOR r IN
        SELECT t.relid, t.schema_name, t.table_name, n.nspname AS new_schema, c.relname AS new_table
          FROM realtime.tables t JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE (only_tables IS NULL OR t.relid = ANY (only_tables))
           AND (t.schema_name, t.table_name) IS DISTINCT FROM (n.nspname, c.relname)
           FOR UPDATE OF t SKIP LOCKED
    LOOP
        UPDATE realtime.tables SET schema_name = r.new_schema, table_name = r.new_table WHERE relid = r.relid;
        INSERT INTO realtime.changes (relid, schema_name, table_name, op, new_record)
        VALUES (r.relid, r.schema_name, r.table_name, 'RENAME',
                jsonb_build_object('schema', r.new_schema, 'table', r.new_table));
        logged := logged + 1;
    END LOOP;
    RETURN logged;
END
$$;
GRANT EXECUTE ON FUNCTION realtime.sweep_lifecycle(oid[]) TO PUBLIC;

-- The event triggers run as the user whose DDL fired them. A failure here must not fail that user's DDL: it is a
-- warning, and the next pruning pass sweeps again. They sweep only the tables the command touched (a renamed
-- schema: every table in it), not the whole registry: they run on every CREATE and ALTER TABLE in the database.
CREATE FUNCTION realtime.on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    dropped oid[];
BEGIN
    dropped := ARRAY(SELECT d.objid FROM pg_event_trigger_dropped_objects() d WHERE d.object_type = 'table');
    IF dropped <> '{}' THEN
        PERFORM realtime.sweep_lifecycle(dropped);
    END IF;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'realtime: could not record the dropped table for its subscribers: %', SQLERRM
        USING HINT = 'fluxrt notices it at its next pruning pass';
END
$$;

CREATE FUNCTION realtime.on_ddl_end() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    touched oid[];
    schemas oid[];
    rel oid;
BEGIN
    SELECT coalesce(array_agg(d.objid) FILTER (WHERE d.classid = 'pg_class'::regclass), '{}'),
           coalesce(array_agg(d.objid) FILTER (WHERE d.classid = 'pg_namespace'::regclass), '{}')
      INTO touched, schemas FROM pg_event_trigger_ddl_commands() d;
    -- Only then: finding a schema's tables reads all of pg_class, which has no index on the schema alone.
    IF schemas <> '{}' THEN
        touched := touched || ARRAY(SELECT c.oid FROM pg_class c WHERE c.relnamespace = ANY (schemas) AND c.relkind IN ('r', 'p'));
    END IF;
    IF touched = '{}' THEN
        RETURN;
    END IF;
    PERFORM realtime.sweep_lifecycle(touched);
    -- A partition created or attached under an enabled table (one whose root carries the capture trigger: the
    -- user running the DDL may not read realtime.tables) gets its TRUNCATE trigger.
    FOR rel IN SELECT DISTINCT coalesce(pg_partition_root(t.objid), t.objid) FROM unnest(touched) t (objid) LOOP
        PERFORM realtime.add_partition_triggers(rel);
    END LOOP;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'realtime: could not record a renamed table or a new partition: %', SQLERRM
        USING HINT = 'renames are noticed at fluxrt''s next pruning pass; for partitions run enable_realtime again';
END
$$;

-- Needs a superuser (event triggers do). Safe to call again.
CREATE FUNCTION realtime.install_lifecycle() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'fluxrt_lifecycle_drop') THEN
        CREATE EVENT TRIGGER fluxrt_lifecycle_drop ON sql_drop EXECUTE FUNCTION realtime.on_sql_drop();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'fluxrt_lifecycle_ddl') THEN
        CREATE EVENT TRIGGER fluxrt_lifecycle_ddl ON ddl_command_end
            WHEN TAG IN ('ALTER TABLE', 'ALTER SCHEMA', 'CREATE TABLE')
            EXECUTE FUNCTION realtime.on_ddl_end();
    END IF;
END
$$;
REVOKE ALL ON FUNCTION realtime.install_lifecycle() FROM PUBLIC;

DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        PERFORM realtime.install_lifecycle();
    END IF;
END
$$;

-- Partitions that existed before this migration.
DO $$
DECLARE
    rel oid;
BEGIN
    FOR rel IN SELECT t.relid FROM realtime.tables t JOIN pg_class c ON c.oid = t.relid WHERE c.relkind = 'p' LOOP
        PERFORM realtime.add_partition_triggers(rel);
    END LOOP;
END
$$;

-- Enabled means registered and still carrying the capture trigger: a registry entry whose oid came back as another
-- table, or whose trigger was dropped by hand, is not.
CREATE OR REPLACE VIEW public.realtime_enabled_tables AS
SELECT n.nspname AS schema_name, c.relname AS table_name, t.enabled_at, t.notify
  FROM realtime.tables t
  JOIN pg_catalog.pg_class c ON c.oid = t.relid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g WHERE g.tgrelid = t.relid AND g.tgname = 'fluxrt_capture');
