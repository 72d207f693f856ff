-- realtime.send(channel, payload): a broadcast from SQL, delivered if and only if the calling transaction commits.
-- It is a row of the change log (op SEND), so it reaches every node the way table changes do, in commit order, and
-- survives whatever a node's reading of the log survives. fluxrt_trio/tables.py hands it to the broadcast hub.

-- Existing rows all satisfy the narrower check: NOT VALID spares a scan of the whole log.
ALTER TABLE realtime.changes DROP CONSTRAINT changes_op_check;
ALTER TABLE realtime.changes ADD CONSTRAINT changes_op_check
    CHECK (op IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'DISABLE', 'SEND')) NOT VALID;

-- What realtime.send checks against; each fluxrt node writes its configuration here when it starts.
CREATE TABLE realtime.settings (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    max_message_size integer NOT NULL DEFAULT 65536
);
INSERT INTO realtime.settings DEFAULT VALUES;
REVOKE ALL ON realtime.settings FROM PUBLIC;

-- SECURITY DEFINER: callers need no privilege on realtime.changes; EXECUTE is the permission, and nobody but the
-- owner has it until granted (GRANT EXECUTE ON FUNCTION realtime.send(text, jsonb) TO app).
CREATE FUNCTION realtime.send(channel text, payload jsonb) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cap integer;
    size integer;
BEGIN
    -- The same rule as fluxrt_trio/protocol/channels.py: a topic of 1-255 characters, none of them whitespace
    -- (as Python's str.isspace) or a control character.
    IF channel IS NULL OR channel !~ ('^broadcast:[^\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029'
                                      '\u202f\u205f\u3000]{1,255}$') THEN
        RAISE EXCEPTION 'realtime.send: invalid channel %: expected broadcast:{topic} where topic is 1-255 '
                        'characters without whitespace or control characters', coalesce(quote_literal(left(channel, 300)), 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example: SELECT realtime.send(''broadcast:orders'', ''{"id": 1}'')';
    END IF;
    IF payload IS NULL THEN
        RAISE EXCEPTION 'realtime.send: payload is NULL; send a JSON value (''null''::jsonb for a JSON null)'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT s.max_message_size INTO cap FROM realtime.settings s;
    size := octet_length(payload::text);
    IF size > cap THEN
        RAISE EXCEPTION 'realtime.send: the payload is % bytes, over realtime.max_message_size (% bytes)', size, cap
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'Send less (an id the client fetches by), or raise realtime.max_message_size in fluxrt''s configuration.';
    END IF;
    INSERT INTO realtime.changes (relid, schema_name, table_name, op, new_record)
    VALUES (0, 'realtime', 'send', 'SEND', jsonb_build_object('channel', channel, 'payload', payload));
END
$$;
REVOKE EXECUTE ON FUNCTION realtime.send(text, jsonb) FROM PUBLIC;
