-- Partitions are never channels of their own. A partitioned table's changes are published on its root's channel
-- (realtime.capture reports a partition's rows as its root), so a partition enabled on its own, or an enabled table
-- attached as a partition later, had its subscribers acked and then sent nothing: its rows went to a root nobody
-- could subscribe to. Now enable_realtime refuses a partition and names its root, the sweep ends the subscriptions
-- of an enabled table that has become a partition (a DISABLE row naming the root, so that every node tells them in
-- commit order) and takes it out of the registry, and the capture trigger such a table keeps reports nothing while
-- it is a partition of a root that is not enabled (enabling the root replaces it; a DETACH makes it capture the
-- table as itself again, unregistered, until enable_realtime or disable_realtime is run for it).

-- The name a subscriber's channel would give a table: schema.table, unquoted.
CREATE FUNCTION realtime.channel_name(rel oid) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel
$$;

-- The SQL literal naming a table as to_regclass reads it, whatever the caller's search_path ('"My App"."Ev''ents"'),
-- for the SQL an error message tells the user to run.
CREATE FUNCTION realtime.table_literal(rel oid) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT quote_literal(format('%I.%I', n.nspname, c.relname))
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel
$$;

-- As in 0007, but a partition's rows are reported only when its root carries the capture trigger: the trigger on a
-- partition that is not a clone of its root's is left from before the table was attached (or from an enable of the
-- partition alone, before this migration), and its rows would go to a channel nobody is subscribed to.
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
    ancestors oid[];
BEGIN
    IF root <> TG_RELID THEN
        SELECT n.nspname, c.relname INTO nsp, rel FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = root;
    END IF;
    IF (TG_LEVEL = 'STATEMENT' OR root <> TG_RELID)
       AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = root AND g.tgname = 'fluxrt_capture') THEN
        -- A table still registered that became a partition since the last sweep (no event triggers): this change is
        -- withheld, so its subscribers are told now, in commit order, else a DETACH before the next sweep would
        -- leave them subscribed without ever learning what they missed. A partition of an enabled root never comes
        -- here; a failure (a serialization error under REPEATABLE READ) must not fail the write: the next sweep does it.
        ancestors := ARRAY(SELECT a.relid FROM pg_partition_ancestors(TG_RELID) a);
        IF root <> TG_RELID AND EXISTS (SELECT 1 FROM realtime.tables t WHERE t.relid = ANY (ancestors)) THEN
            BEGIN
                PERFORM realtime.sweep_lifecycle(ancestors);
            EXCEPTION WHEN OTHERS THEN
                NULL;
            END;
        END IF;
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

-- As in 0007, and also the capture trigger a partition kept from before it was attached (not a clone of its root's):
-- enabling the root would otherwise fail, PostgreSQL refusing to clone a trigger onto a table that has one of
-- that name.
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
           AND (g.tgname = 'fluxrt_capture_truncate'
                OR (g.tgname = 'fluxrt_capture' AND (g.tgrelid = rel OR g.tgparentid = 0)))
    LOOP
        BEGIN
            EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, target::regclass);
        EXCEPTION WHEN insufficient_privilege THEN
            IF trigger_name <> 'fluxrt_capture' OR target = rel THEN
                RAISE;
            END IF;
            -- Else PostgreSQL's "must be owner of relation" names no way forward for the root's owner.
            RAISE EXCEPTION 'realtime: partition % keeps the capture trigger it had before it was attached, and only '
                            'its owner may drop it: as % (or a superuser) run SELECT disable_realtime(%), then try again',
                realtime.channel_name(target),
                (SELECT pg_get_userbyid(c.relowner) FROM pg_class c WHERE c.oid = target),
                realtime.table_literal(target)
                USING ERRCODE = 'insufficient_privilege';
        END;
    END LOOP;
END
$$;

-- As in 0007, refusing a partition before touching any trigger (dropping the clone of an enabled root's trigger
-- would fail with PostgreSQL's "trigger on table ... requires it", which names no way forward).
CREATE OR REPLACE FUNCTION public.enable_realtime(tbl text, notify boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    rel oid := realtime.resolve(tbl, 'enable_realtime');
    target text := rel::regclass::text;
    flag text := CASE WHEN notify THEN 'notify' ELSE '' END;
    root text;
BEGIN
    IF (SELECT c.relispartition FROM pg_catalog.pg_class c WHERE c.oid = rel) THEN
        root := realtime.channel_name(pg_catalog.pg_partition_root(rel));
        RAISE EXCEPTION 'enable_realtime: % is a partition of %; enable the partitioned table instead: '
                        'SELECT enable_realtime(%)',
            tbl, root, realtime.table_literal(pg_catalog.pg_partition_root(rel))
            USING ERRCODE = 'wrong_object_type',
                  HINT = format('Its changes are published on table:%s; a filter on the partition key selects this '
                                'partition''s rows.', root);
    END IF;
    PERFORM realtime.drop_triggers(rel);
    EXECUTE format('CREATE TRIGGER fluxrt_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION realtime.capture(%L)', target, flag);
    EXECUTE format('CREATE TRIGGER fluxrt_capture_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION realtime.capture(%L)', target, flag);
    PERFORM realtime.register(rel);
    PERFORM realtime.add_partition_triggers(rel);
END
$$;

-- As in 0007, with one pass more, before the renames: an enabled table that is now a partition (attached since,
-- or enabled on its own before 0008) leaves the registry and becomes a DISABLE row under the name its subscribers
-- know, new_record {"partition_of": "schema.table"} (its root). only_tables narrows it to entries in those tables'
-- partition trees: ALTER TABLE root ATTACH PARTITION t reports the root, not t.
CREATE OR REPLACE FUNCTION realtime.sweep_lifecycle(only_tables oid[] DEFAULT NULL) RETURNS integer
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
    FOR r IN
        DELETE FROM realtime.tables t WHERE t.relid IN (
            SELECT g.relid FROM realtime.tables g JOIN pg_class c ON c.oid = g.relid
             WHERE c.relispartition
               AND (only_tables IS NULL
                    OR EXISTS (SELECT 1 FROM pg_partition_ancestors(g.relid) a WHERE a.relid = ANY (only_tables)))
               FOR UPDATE OF g SKIP LOCKED)
        RETURNING t.relid, t.schema_name, t.table_name
    LOOP
        INSERT INTO realtime.changes (relid, schema_name, table_name, op, new_record)
        VALUES (r.relid, r.schema_name, r.table_name, 'DISABLE',
                jsonb_build_object('partition_of', realtime.channel_name(pg_partition_root(r.relid))));
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

-- As in 0001, refusing a partition that shares its root's capture (its trigger is a clone): dropping the clone
-- fails with PostgreSQL's "trigger on table ... requires it", whose hint (drop the root's trigger by hand) would
-- leave the root registered without its trigger.
CREATE OR REPLACE FUNCTION public.disable_realtime(tbl text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    rel oid := realtime.resolve(tbl, 'disable_realtime');
    enabled oid;
BEGIN
    -- The ancestor whose own capture trigger the partition's is cloned from (none for a table not partitioned).
    SELECT g.tgrelid INTO enabled FROM pg_catalog.pg_trigger g
     WHERE g.tgname = 'fluxrt_capture' AND g.tgparentid = 0 AND g.tgrelid <> rel
       AND g.tgrelid IN (SELECT a.relid FROM pg_catalog.pg_partition_ancestors(rel) a);
    IF FOUND THEN
        RAISE EXCEPTION 'disable_realtime: % is a partition of %, for which realtime is enabled; a partition''s '
                        'changes cannot be stopped apart from the rest: SELECT disable_realtime(%)',
            tbl, realtime.channel_name(enabled), realtime.table_literal(enabled)
            USING ERRCODE = 'wrong_object_type';
    END IF;
    PERFORM realtime.drop_triggers(rel);
    PERFORM realtime.unregister(rel);
END
$$;

-- Partitions enabled on their own before this migration.
SELECT realtime.sweep_lifecycle();

-- Enabled means registered, still carrying the capture trigger, and not a partition.
CREATE OR REPLACE VIEW public.realtime_enabled_tables AS
SELECT n.nspname AS schema_name, c.relname AS table_name, t.enabled_at, t.notify
  FROM realtime.tables t
  JOIN pg_catalog.pg_class c ON c.oid = t.relid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g WHERE g.tgrelid = t.relid AND g.tgname = 'fluxrt_capture')
   AND NOT c.relispartition;
