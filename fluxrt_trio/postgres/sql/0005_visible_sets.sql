-- Row-level security decided per role instead of per identity: fluxrt rewrites a role's policies into one query
-- (fluxrt_trio/postgres/policies.py) in which auth.uid(), auth.role(), auth.jwt() and the claims setting are columns
-- of an identities relation joined with the row images, and this function runs it as that role.
--
-- roles: a JSON array of {"role": R, "query": Q, "identities": [{"i": index, "claims": {...}}, ...]}; images as in
-- realtime.visible. Returns one row per role, in order: the columns it may read (NULL: it may not read the table),
-- whether it sees every image (row security is not active for it: off, owner, BYPASSRLS), else the matching
-- (identity, image) pairs as two arrays, and the error the query raised. A role whose query raised has no pairs:
-- fluxrt then decides its identities one at a time with realtime.visible, which confines an error to the
-- identities it concerns.
--
-- As in realtime.visible: the role is set locally and restored, search_path is pinned (the rewritten policy names
-- everything outside pg_catalog with its schema), the row gate is schema USAGE plus has_any_column_privilege,
-- row_security_active() decides under the role, partitions are judged on their root. Run it in the same
-- REPEATABLE READ READ ONLY transaction, or as a statement of its own (fluxrt checks its cached plans against the
-- catalog in the same statement): it then makes that transaction read-only before any policy runs, and declines in
-- anything but REPEATABLE READ. Never from a superuser session.
CREATE FUNCTION realtime.visible_sets(rel oid, roles jsonb, images text)
RETURNS TABLE (r integer, readable text[], everything boolean, identity integer[], image integer[], error text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    root oid := coalesce(pg_catalog.pg_partition_root(rel), rel);
    nsp oid;
    imgs jsonb := images::jsonb;
    entry jsonb;
    saved_role text := pg_catalog.current_setting('role');
BEGIN
    -- Called alone, as one statement, it makes its own transaction read-only: nothing a policy runs may write.
    -- (Turning read-only on is allowed at any time; turning it off again, after this query began, is not.)
    PERFORM pg_catalog.set_config('transaction_read_only', 'on', true);
    -- fluxrt checks its plans against the catalog in the same statement: that holds only if the whole statement
    -- reads one snapshot. A session whose default isolation was changed (policy code can) gets no rows, and fluxrt
    -- then decides in a REPEATABLE READ transaction of its own.
    IF pg_catalog.current_setting('transaction_isolation') NOT IN ('repeatable read', 'serializable') THEN
        RETURN;
    END IF;
    SELECT c.relnamespace INTO nsp FROM pg_catalog.pg_class c WHERE c.oid = root;
    FOR i IN 0 .. pg_catalog.jsonb_array_length(roles) - 1 LOOP
        entry := roles -> i;
        r := i;
        readable := NULL;
        everything := false;
        identity := NULL;
        image := NULL;
        error := NULL;
        BEGIN
            PERFORM pg_catalog.set_config('role', entry ->> 'role', true);
            IF pg_catalog.has_schema_privilege(nsp, 'USAGE')
               AND pg_catalog.has_any_column_privilege(root, 'SELECT') THEN
                readable := ARRAY(
                    SELECT a.attname::text FROM pg_catalog.pg_attribute a
                     WHERE a.attrelid = root AND a.attnum > 0 AND NOT a.attisdropped
                       AND pg_catalog.has_column_privilege(root, a.attnum, 'SELECT')
                     ORDER BY a.attnum);
                IF NOT pg_catalog.row_security_active(root) THEN
                    everything := true;
                ELSE
                    EXECUTE entry ->> 'query' INTO identity, image USING entry -> 'identities', imgs;
                END IF;
            END IF;
            PERFORM pg_catalog.set_config('role', saved_role, true);
        EXCEPTION WHEN OTHERS THEN
            -- The subtransaction's rollback has restored the role.
            readable := NULL;
            everything := false;
            identity := NULL;
            image := NULL;
            error := SQLERRM;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;
-- It runs the query it is given: only the authorizer login may call it.
REVOKE EXECUTE ON FUNCTION realtime.visible_sets(oid, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION realtime.visible_sets(oid, jsonb, text) TO fluxrt_authorizer;
