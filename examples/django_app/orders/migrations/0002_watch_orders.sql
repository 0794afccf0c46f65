CREATE SCHEMA IF NOT EXISTS pgcast;
CREATE OR REPLACE FUNCTION pgcast.table_change_row() RETURNS trigger
LANGUAGE plpgsql AS $fn$
-- TG_ARGV: channel, key columns (JSON array or 'null'), columns (JSON array or 'null')
DECLARE
    key_cols text[];
    cols text[];
    new_row jsonb;
    old_row jsonb;
    r jsonb;
    k jsonb;
    changed jsonb;
    head jsonb;
    payload text;
BEGIN
    IF TG_ARGV[1] <> 'null' THEN
        key_cols := ARRAY(SELECT jsonb_array_elements_text(TG_ARGV[1]::jsonb));
    END IF;
    IF TG_ARGV[2] <> 'null' THEN
        cols := ARRAY(SELECT jsonb_array_elements_text(TG_ARGV[2]::jsonb));
    END IF;
    IF TG_OP <> 'DELETE' THEN new_row := to_jsonb(NEW); END IF;
    IF TG_OP <> 'INSERT' THEN old_row := to_jsonb(OLD); END IF;
    r := coalesce(new_row, old_row);
    IF key_cols IS NOT NULL THEN
        SELECT jsonb_object_agg(c, r -> c) INTO k FROM unnest(key_cols) AS c;
    END IF;
    head := jsonb_build_object(
        'op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
        'key', k, 'txid', pg_current_xact_id()::text::bigint);
    IF cols IS NOT NULL THEN
        SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}') INTO r
        FROM jsonb_each(r) AS e WHERE e.key = ANY (cols);
    END IF;
    IF TG_OP = 'UPDATE' THEN
        SELECT coalesce(jsonb_object_agg(o.key, o.value), '{}') INTO changed
        FROM jsonb_each(old_row) AS o
        WHERE (new_row -> o.key) IS DISTINCT FROM o.value
          AND (cols IS NULL OR o.key = ANY (cols));
        payload := (head || jsonb_build_object('row', r, 'old', changed))::text;
    ELSE
        payload := (head || jsonb_build_object('row', r))::text;
    END IF;
    -- NOTIFY refuses 8000 bytes or more, which would fail the user's
    -- transaction: fall back to the key, then to nothing but the table.
    IF octet_length(payload) >= 8000 THEN
        payload := (head || '{"truncated": true}')::text;
        IF octet_length(payload) >= 8000 THEN
            payload := (head || '{"key": null, "truncated": true}')::text;
        END IF;
    END IF;
    PERFORM pg_notify(TG_ARGV[0], payload);
    RETURN NULL;
END
$fn$;
CREATE OR REPLACE FUNCTION pgcast.table_change_statement() RETURNS trigger
LANGUAGE plpgsql AS $fn$
-- TG_ARGV: channel, key columns (JSON array or 'null'), max parts.
-- The transition tables are pgcast_new (INSERT, UPDATE) and pgcast_old
-- (UPDATE, DELETE); statements naming them run only on the matching TG_OP.
DECLARE
    max_parts int := TG_ARGV[2]::int;
    key_cols text[];
    key_expr text;
    source text;
    head text;
    n bigint;
    parts text[];
    too_big boolean;
    i int;
BEGIN
    head := left(jsonb_build_object(
        'op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
        'txid', pg_current_xact_id()::text::bigint)::text, -1);
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify(TG_ARGV[0], head || ', "keys": null, "count": null}');
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        SELECT count(*) INTO n FROM pgcast_old;
    ELSE
        SELECT count(*) INTO n FROM pgcast_new;
    END IF;
    IF n = 0 THEN
        RETURN NULL;
    END IF;
    IF TG_ARGV[1] = 'null' THEN
        PERFORM pg_notify(TG_ARGV[0], head || ', "keys": null, "count": ' || n || '}');
        RETURN NULL;
    END IF;
    key_cols := ARRAY(SELECT jsonb_array_elements_text(TG_ARGV[1]::jsonb));
    SELECT 'jsonb_build_object(' || string_agg(format('%L, t.%I', c, c), ', ') || ')::text'
        INTO key_expr FROM unnest(key_cols) AS c;
    source := CASE TG_OP
        WHEN 'INSERT' THEN format('SELECT %s AS k FROM pgcast_new t', key_expr)
        WHEN 'DELETE' THEN format('SELECT %s AS k FROM pgcast_old t', key_expr)
        ELSE format('SELECT %s AS k FROM pgcast_new t UNION SELECT %s FROM pgcast_old t',
                    key_expr, key_expr)
    END;
    -- Keys are cut into parts of about 6000 bytes by their running length; a
    -- part can overrun by one key, which the final check catches.
    EXECUTE format($q$
        WITH keys AS (SELECT DISTINCT k FROM (%s) AS s),
        pos AS (SELECT k, sum(octet_length(k) + 1) OVER (ORDER BY k) AS p FROM keys)
        SELECT array_agg(part ORDER BY g)
        FROM (SELECT (p - 1) / 6000 AS g, string_agg(k, ', ' ORDER BY k) AS part
              FROM pos GROUP BY 1) AS chunks
    $q$, source) INTO parts;
    SELECT bool_or(octet_length(part) > 7000) INTO too_big FROM unnest(parts) AS part;
    IF too_big OR cardinality(parts) > max_parts THEN
        PERFORM pg_notify(TG_ARGV[0],
            head || ', "keys": null, "count": ' || n || ', "truncated": true}');
        RETURN NULL;
    END IF;
    FOR i IN 1 .. cardinality(parts) LOOP
        PERFORM pg_notify(TG_ARGV[0],
            head || ', "count": ' || n || ', "keys": [' || parts[i] || '], "part": ' || i
            || ', "parts": ' || cardinality(parts) || '}');
    END LOOP;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION pgcast."table_change_row"() IS 'pgcast table change feed, version 1';
COMMENT ON FUNCTION pgcast."table_change_statement"() IS 'pgcast table change feed, version 1';
DROP TRIGGER IF EXISTS "pgcast_orders_changed_insert" ON "public"."orders_order";
DROP TRIGGER IF EXISTS "pgcast_orders_changed_update" ON "public"."orders_order";
DROP TRIGGER IF EXISTS "pgcast_orders_changed_delete" ON "public"."orders_order";
DROP TRIGGER IF EXISTS "pgcast_orders_changed_truncate" ON "public"."orders_order";
CREATE TRIGGER "pgcast_orders_changed_insert" AFTER INSERT ON "public"."orders_order"  FOR EACH ROW EXECUTE FUNCTION pgcast."table_change_row"('orders_changed', '["id"]', 'null');
CREATE TRIGGER "pgcast_orders_changed_update" AFTER UPDATE ON "public"."orders_order"  FOR EACH ROW EXECUTE FUNCTION pgcast."table_change_row"('orders_changed', '["id"]', 'null');
CREATE TRIGGER "pgcast_orders_changed_delete" AFTER DELETE ON "public"."orders_order"  FOR EACH ROW EXECUTE FUNCTION pgcast."table_change_row"('orders_changed', '["id"]', 'null');
