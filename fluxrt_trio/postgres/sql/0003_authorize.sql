-- Row-level security for change delivery: which identities may see which row images, in one call.
--
-- identities: a JSON array of {"role": R, "claims": {...}}; images: a JSON array of row images (as text, so that
-- big integers and long numerics never pass through a float). Returns one row per identity, in order: the 0-based
-- indexes of the images it may see (NULL when it may not read the table at all), the columns it may read (an
-- allow-list: a key the table no longer has, after a rename or a drop, is never passed on), and the error its
-- policies raised, if any (for fluxrt's log; clients get a generic message).
--
-- What it takes to agree with a live SET ROLE + SELECT:
-- * each identity runs in its own subtransaction (a policy that raises costs only that identity), with role and
--   request.jwt.claims set locally and restored afterwards;
-- * permissive SELECT/ALL policies of the role (or PUBLIC) are OR'd in descending name order, as Postgres builds
--   them, restrictive ones AND'd; no permissive policy means no row;
-- * row_security_active() under the role decides the owner, FORCE and BYPASSRLS cases; the row gate is schema USAGE
--   plus has_any_column_privilege, readable columns come from has_column_privilege;
-- * partitions are judged on their root's policies; generated columns are recomputed;
-- * after the role switch only pg_catalog objects are named (plpgsql resolves a statement as the role of its
--   first run), and search_path is pinned.
-- Call it in a REPEATABLE READ READ ONLY transaction, so that every identity sees one snapshot, and never from a
-- superuser session: policy code can reset the role to the session user.
CREATE FUNCTION realtime.visible(rel oid, identities jsonb, images text)
RETURNS TABLE (n integer, visible integer[], readable text[], error text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    root oid := coalesce(pg_catalog.pg_partition_root(rel), rel);
    relname name;
    nspname name;
    nsp oid;
    target text;
    imgs jsonb := images::jsonb;
    n_images integer := pg_catalog.jsonb_array_length(images::jsonb);
    ident jsonb;
    role_name text;
    permissive text;
    restrictive text;
    predicate text;
    generated text;
    judged jsonb;
    saved_role text := pg_catalog.current_setting('role');
    saved_claims text := pg_catalog.current_setting('request.jwt.claims', true);
BEGIN
    SELECT c.relname, ns.nspname, ns.oid INTO relname, nspname, nsp
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace ns ON ns.oid = c.relnamespace WHERE c.oid = root;
    target := pg_catalog.format('%I.%I', nspname, relname);
    -- Generated columns are recomputed from their definitions: trigger images can hold them as NULL (virtual
    -- columns, PostgreSQL 18) or stale, and a policy may read them.
    SELECT pg_catalog.string_agg(pg_catalog.format('%L, %s', a.attname, pg_catalog.pg_get_expr(d.adbin, d.adrelid)), ', ')
      INTO generated
      FROM pg_catalog.pg_attribute a
      JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE a.attrelid = root AND a.attgenerated <> '' AND NOT a.attisdropped;
    FOR i IN 0 .. pg_catalog.jsonb_array_length(identities) - 1 LOOP
        ident := identities -> i;
        role_name := ident ->> 'role';
        n := i;
        visible := NULL;
        readable := NULL;
        error := NULL;
        BEGIN
            PERFORM pg_catalog.set_config('role', role_name, true);
            PERFORM pg_catalog.set_config('request.jwt.claims', (ident -> 'claims')::text, true);
            IF pg_catalog.has_schema_privilege(nsp, 'USAGE')
               AND pg_catalog.has_any_column_privilege(root, 'SELECT') THEN
                readable := ARRAY(
                    SELECT a.attname::text FROM pg_catalog.pg_attribute a
                     WHERE a.attrelid = root AND a.attnum > 0 AND NOT a.attisdropped
                       AND pg_catalog.has_column_privilege(root, a.attnum, 'SELECT')
                     ORDER BY a.attnum);
                IF NOT pg_catalog.row_security_active(root) THEN
                    -- No row-level security for this role (off, owner, BYPASSRLS): every image, no query needed.
                    visible := ARRAY(SELECT g FROM pg_catalog.generate_series(0, n_images - 1) AS g);
                ELSE
                    -- The SELECT policies that apply to this role (or PUBLIC), as Postgres picks them.
                    SELECT pg_catalog.string_agg('(' || pg_catalog.pg_get_expr(p.polqual, p.polrelid) || ')', ' OR '
                                                 ORDER BY p.polname DESC) FILTER (WHERE p.polpermissive),
                           pg_catalog.string_agg('(' || pg_catalog.pg_get_expr(p.polqual, p.polrelid) || ')', ' AND '
                                                 ORDER BY p.polname) FILTER (WHERE NOT p.polpermissive)
                      INTO permissive, restrictive
                      FROM pg_catalog.pg_policy p
                     WHERE p.polrelid = root
                       AND p.polcmd IN ('r', '*')
                       AND p.polqual IS NOT NULL
                       AND (p.polroles = '{0}'
                            OR EXISTS (SELECT 1 FROM pg_catalog.unnest(p.polroles) AS r(oid)
                                        WHERE r.oid <> 0 AND pg_catalog.pg_has_role(role_name, r.oid, 'USAGE')));
                    judged := imgs;
                    IF generated IS NOT NULL THEN
                        -- As the identity's role, which has USAGE on the table's schema.
                        EXECUTE pg_catalog.format(
                            'SELECT pg_catalog.jsonb_agg(e.img || pg_catalog.jsonb_build_object(%s) ORDER BY e.n) '
                            'FROM pg_catalog.jsonb_array_elements($1) WITH ORDINALITY AS e(img, n), '
                            'LATERAL pg_catalog.jsonb_populate_record(NULL::%s, e.img) AS %I',
                            generated, target, relname)
                          INTO judged USING imgs;
                    END IF;
                    predicate := '(' || coalesce(permissive, 'false') || ')' || coalesce(' AND ' || restrictive, '');
                    EXECUTE pg_catalog.format(
                        'SELECT coalesce(pg_catalog.array_agg((e.n - 1)::int ORDER BY e.n), ''{}'') '
                        'FROM pg_catalog.jsonb_array_elements($1) WITH ORDINALITY AS e(img, n), '
                        'LATERAL pg_catalog.jsonb_populate_record(NULL::%s, e.img) AS %I WHERE %s',
                        target, relname, predicate)
                      INTO visible USING judged;
                END IF;
            END IF;
            PERFORM pg_catalog.set_config('role', saved_role, true);
            PERFORM pg_catalog.set_config('request.jwt.claims', coalesce(saved_claims, ''), true);
        EXCEPTION WHEN OTHERS THEN
            -- The subtransaction's rollback has restored role and claims.
            visible := NULL;
            readable := NULL;
            error := SQLERRM;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;
