-- Monthly partitions of audit.events and audit.tool_usage (apply after
-- schema.sql; idempotent). Months are UTC months. A partition of table T for
-- month YYYY-MM is named T_YYYY_MM; rows no partition covers go to T_default,
-- so an insert never fails, and maintenance moves them out later.
--
-- Public functions (schema audit):
--   month_partition_name(parent, month)        -> text
--   create_month_partition(parent, month)      -> boolean (true if created)
--   ensure_partitions(parent, months_ahead=3)  -> integer (created)
--   move_default_rows(parent)                  -> bigint  (rows moved)
--   drop_old_partitions(parent, retention)     -> integer (dropped)
--   expired_partitions(parent, retention)      -> (partition, month) past retention
--   retention_start(retention)                 -> timestamptz (older rows expire)
--   partition_maintenance(months_ahead=3, events_retention='180 days',
--                         tool_usage_retention='90 days') -> jsonb
--     (what it did, per table, with the partitions' names; also recorded in
--      audit.maintenance_log)
-- Run weekly, e.g. SELECT cron.schedule('partition-maintenance', '0 3 * * 0',
-- 'SELECT audit.partition_maintenance()').

CREATE OR REPLACE FUNCTION audit.month_partition_name(p_parent regclass, p_month date) RETURNS text
LANGUAGE sql STABLE STRICT AS $fn$
    SELECT c.relname || '_' || to_char(date_trunc('month', p_month::timestamp), 'YYYY_MM')
      FROM pg_class c WHERE c.oid = p_parent
$fn$;

-- The qualified name of a partitioned table's DEFAULT partition, or NULL.
CREATE OR REPLACE FUNCTION audit._default_partition(p_parent regclass) RETURNS text
LANGUAGE sql STABLE STRICT AS $fn$
    SELECT format('%I.%I', n.nspname, c.relname)
      FROM pg_partitioned_table p
      JOIN pg_class c ON c.oid = p.partdefid
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE p.partrelid = p_parent
$fn$;

-- The partition key column of a table partitioned by range on one column.
CREATE OR REPLACE FUNCTION audit._partition_key(p_parent regclass) RETURNS name
LANGUAGE plpgsql STABLE STRICT AS $fn$
DECLARE
    v_key name;
BEGIN
    SELECT a.attname INTO v_key
      FROM pg_partitioned_table p
      JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
     WHERE p.partrelid = p_parent AND p.partstrat = 'r' AND p.partnatts = 1;
    IF v_key IS NULL THEN
        RAISE EXCEPTION '% is not partitioned by range on one column', p_parent
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN v_key;
END
$fn$;

-- Create the partition of p_parent holding the UTC month of p_month, unless
-- it exists. Rows of that month waiting in the DEFAULT partition are moved
-- into it (PostgreSQL refuses to create it while they are there).
CREATE OR REPLACE FUNCTION audit.create_month_partition(p_parent regclass, p_month date) RETURNS boolean
LANGUAGE plpgsql STRICT AS $fn$
DECLARE
    v_schema  name;
    v_table   name;
    v_key     name := audit._partition_key(p_parent);
    v_lo      date := date_trunc('month', p_month::timestamp)::date;
    v_hi      date := (date_trunc('month', p_month::timestamp) + interval '1 month')::date;
    v_lo_ts   timestamptz := v_lo::timestamp AT TIME ZONE 'UTC';
    v_hi_ts   timestamptz := v_hi::timestamp AT TIME ZONE 'UTC';
    v_name    text := audit.month_partition_name(p_parent, p_month);
    v_default text;
    v_cols    text;
    v_waiting boolean := false;
BEGIN
    SELECT n.nspname, c.relname INTO v_schema, v_table
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_parent;
    IF to_regclass(format('%I.%I', v_schema, v_name)) IS NOT NULL THEN
        RETURN false;
    END IF;
    -- Serialise partition changes between sessions, then look again.
    PERFORM pg_advisory_xact_lock(hashtext('govdb:audit.partitions'));
    IF to_regclass(format('%I.%I', v_schema, v_name)) IS NOT NULL THEN
        RETURN false;
    END IF;

    v_default := audit._default_partition(p_parent);
    IF v_default IS NOT NULL THEN
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE %I >= $1 AND %I < $2)', v_default, v_key, v_key)
           INTO v_waiting USING v_lo_ts, v_hi_ts;
    END IF;

    IF v_waiting THEN
        SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO v_cols
          FROM pg_attribute WHERE attrelid = p_parent AND attnum > 0 AND NOT attisdropped;
        EXECUTE format('CREATE TEMP TABLE govdb_moving (LIKE %s) ON COMMIT DROP', p_parent);
        EXECUTE format('WITH moved AS (DELETE FROM %s WHERE %I >= $1 AND %I < $2 RETURNING %s) '
                       'INSERT INTO pg_temp.govdb_moving (%s) SELECT %s FROM moved',
                       v_default, v_key, v_key, v_cols, v_cols, v_cols)
           USING v_lo_ts, v_hi_ts;
    END IF;

    EXECUTE format('CREATE TABLE %I.%I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)',
                   v_schema, v_name, p_parent,
                   to_char(v_lo, 'YYYY-MM-DD') || ' 00:00:00+00',
                   to_char(v_hi, 'YYYY-MM-DD') || ' 00:00:00+00');

    IF v_waiting THEN
        EXECUTE format('INSERT INTO %I.%I (%s) SELECT %s FROM pg_temp.govdb_moving',
                       v_schema, v_name, v_cols, v_cols);
        DROP TABLE pg_temp.govdb_moving;
    END IF;
    RETURN true;
END
$fn$;

-- Make sure partitions exist for the current UTC month and p_months_ahead
-- months after it; return how many were created.
CREATE OR REPLACE FUNCTION audit.ensure_partitions(p_parent regclass, p_months_ahead integer DEFAULT 3)
RETURNS integer
LANGUAGE plpgsql STRICT AS $fn$
DECLARE
    v_this    date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
    v_created integer := 0;
BEGIN
    IF p_months_ahead < 0 THEN
        RAISE EXCEPTION 'months ahead must be 0 or more, got %', p_months_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 0 .. p_months_ahead LOOP
        IF audit.create_month_partition(p_parent, (v_this + make_interval(months => i))::date) THEN
            v_created := v_created + 1;
        END IF;
    END LOOP;
    RETURN v_created;
END
$fn$;

-- Move every row of the DEFAULT partition into a month partition (created
-- as needed), so rows far in the past or future do not stay there. Rows
-- before year 1 (not representable as a month partition name) stay.
-- Return how many rows moved.
CREATE OR REPLACE FUNCTION audit.move_default_rows(p_parent regclass) RETURNS bigint
LANGUAGE plpgsql STRICT AS $fn$
DECLARE
    v_key     name := audit._partition_key(p_parent);
    v_default text;
    v_before  bigint;
    v_after   bigint;
    v_month   date;
BEGIN
    v_default := audit._default_partition(p_parent);
    IF v_default IS NULL THEN
        RETURN 0;
    END IF;
    EXECUTE format('SELECT count(*) FROM %s', v_default) INTO v_before;
    IF v_before = 0 THEN
        RETURN 0;
    END IF;
    FOR v_month IN EXECUTE format(
        'SELECT DISTINCT date_trunc(''month'', %I AT TIME ZONE ''UTC'')::date FROM %s '
        'WHERE %I >= ''0001-01-01 00:00:00+00''::timestamptz ORDER BY 1', v_key, v_default, v_key)
    LOOP
        PERFORM audit.create_month_partition(p_parent, v_month);
    END LOOP;
    EXECUTE format('SELECT count(*) FROM %s', v_default) INTO v_after;
    RETURN v_before - v_after;
END
$fn$;

-- The first instant retention keeps: the start of the UTC month holding
-- now() - p_retention. Whole months expire, so a partition is dropped only
-- when every row in it is older than the retention.
CREATE OR REPLACE FUNCTION audit.retention_start(p_retention interval) RETURNS timestamptz
LANGUAGE sql STABLE STRICT AS $fn$
    SELECT date_trunc('month', (now() - p_retention) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
$fn$;

-- The month partitions of p_parent that end before retention_start(p_retention),
-- oldest first.
CREATE OR REPLACE FUNCTION audit.expired_partitions(p_parent regclass, p_retention interval)
RETURNS TABLE (partition_name text, month date)
LANGUAGE sql STABLE STRICT AS $fn$
    SELECT format('%I.%I', n.nspname, c.relname), make_date(m[1]::integer, m[2]::integer, 1)
      FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_class p ON p.oid = i.inhparent
      CROSS JOIN LATERAL regexp_match(c.relname, '^' || p.relname || '_([0-9]{4,})_([0-9]{2})$') AS m
     WHERE i.inhparent = p_parent AND m IS NOT NULL
       AND make_date(m[1]::integer, m[2]::integer, 1)
           < (audit.retention_start(p_retention) AT TIME ZONE 'UTC')::date
     ORDER BY 2
$fn$;

-- Drop the month partitions of p_parent past retention (expired_partitions),
-- delete rows older than retention_start still in the DEFAULT partition, and
-- for audit.events the dedup hashes of such rows. Return how many partitions
-- were dropped.
CREATE OR REPLACE FUNCTION audit.drop_old_partitions(p_parent regclass, p_retention interval) RETURNS integer
LANGUAGE plpgsql STRICT AS $fn$
DECLARE
    v_key     name := audit._partition_key(p_parent);
    v_keep_ts timestamptz;
    v_default text;
    v_dropped integer := 0;
    r         record;
BEGIN
    IF p_retention < interval '0' THEN
        RAISE EXCEPTION 'retention must not be negative, got %', p_retention
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_keep_ts := audit.retention_start(p_retention);
    PERFORM pg_advisory_xact_lock(hashtext('govdb:audit.partitions'));
    FOR r IN SELECT * FROM audit.expired_partitions(p_parent, p_retention) LOOP
        EXECUTE format('DROP TABLE %s', r.partition_name);
        v_dropped := v_dropped + 1;
    END LOOP;

    v_default := audit._default_partition(p_parent);
    IF v_default IS NOT NULL THEN
        EXECUTE format('DELETE FROM %s WHERE %I < $1', v_default, v_key) USING v_keep_ts;
    END IF;
    IF p_parent = 'audit.events'::regclass THEN
        DELETE FROM audit.event_hashes WHERE ts < v_keep_ts;
    END IF;
    RETURN v_dropped;
END
$fn$;

-- The names of p_parent's partitions (month ones and the DEFAULT).
CREATE OR REPLACE FUNCTION audit._partition_names(p_parent regclass) RETURNS text[]
LANGUAGE sql STABLE STRICT AS $fn$
    SELECT coalesce(array_agg(c.relname::text ORDER BY c.relname), '{}')
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = p_parent
$fn$;

-- Weekly upkeep of both audit tables: drop partitions past retention (and
-- delete expired rows waiting in the DEFAULT partitions), move the other
-- rows out of the DEFAULT partitions into month partitions, create this
-- month's and the next months' partitions. Expired rows go first, so no
-- partition is made for rows only to drop it. Record the run in
-- audit.maintenance_log and return what was done, per table:
--   dropped, dropped_partitions [{name, month, rows}], expired_default_rows,
--   moved_from_default, moved_into {partition: rows}, created,
--   created_partitions [names],
--   default_rows_left (rows before year 1, which no month partition takes),
--   retention, keep_from;
-- and months_ahead, duration_ms, by (the session's application_name).
CREATE OR REPLACE FUNCTION audit.partition_maintenance(
    p_months_ahead integer DEFAULT 3,
    p_events_retention interval DEFAULT '180 days',
    p_tool_usage_retention interval DEFAULT '90 days'
) RETURNS jsonb
LANGUAGE plpgsql AS $fn$
DECLARE
    v_started timestamptz := clock_timestamp();
    v_result  jsonb := '{}';
    v_table   regclass;
    v_keep    interval;
    v_key     name;
    v_default text;
    v_before  text[];
    v_after   text[];
    v_gone    jsonb;
    v_into    jsonb;
    v_rows    bigint;
    v_expired bigint;
    v_left    bigint;
    v_moved   bigint;
    v_dropped integer;
    r         record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('govdb:audit.partitions'));
    FOR v_table, v_keep IN
        VALUES ('audit.events'::regclass, coalesce(p_events_retention, interval '180 days')),
               ('audit.tool_usage'::regclass, coalesce(p_tool_usage_retention, interval '90 days'))
    LOOP
        v_key := audit._partition_key(v_table);
        v_default := audit._default_partition(v_table);
        v_gone := '[]';
        FOR r IN SELECT * FROM audit.expired_partitions(v_table, v_keep) LOOP
            EXECUTE format('SELECT count(*) FROM %s', r.partition_name) INTO v_rows;
            v_gone := v_gone || jsonb_build_object('name', r.partition_name, 'month', to_char(r.month, 'YYYY-MM'),
                                                   'rows', v_rows);
        END LOOP;
        v_expired := 0;
        IF v_default IS NOT NULL THEN
            EXECUTE format('SELECT count(*) FROM %s WHERE %I < $1', v_default, v_key)
               INTO v_expired USING audit.retention_start(v_keep);
        END IF;
        v_dropped := audit.drop_old_partitions(v_table, v_keep);
        v_before := audit._partition_names(v_table);
        v_into := '{}';
        IF v_default IS NOT NULL THEN
            EXECUTE format('SELECT coalesce(jsonb_object_agg(audit.month_partition_name($1, m), n), ''{}'')'
                           ' FROM (SELECT date_trunc(''month'', %I AT TIME ZONE ''UTC'')::date AS m, count(*) AS n'
                           ' FROM %s WHERE %I >= ''0001-01-01 00:00:00+00''::timestamptz GROUP BY 1) AS s',
                           v_key, v_default, v_key)
               INTO v_into USING v_table;
        END IF;
        v_moved := audit.move_default_rows(v_table);
        PERFORM audit.ensure_partitions(v_table, coalesce(p_months_ahead, 3));
        v_after := audit._partition_names(v_table);
        v_left := 0;
        IF v_default IS NOT NULL THEN
            EXECUTE format('SELECT count(*) FROM %s', v_default) INTO v_left;
        END IF;
        v_result := v_result || jsonb_build_object(
            (SELECT relname FROM pg_class WHERE oid = v_table),
            jsonb_build_object(
                'dropped', v_dropped, 'dropped_partitions', v_gone, 'expired_default_rows', v_expired,
                'moved_from_default', v_moved, 'moved_into', v_into,
                'created', (SELECT count(*) FROM unnest(v_after) AS a(n) WHERE n <> ALL (v_before)),
                'created_partitions', (SELECT coalesce(jsonb_agg(n ORDER BY n), '[]')
                                         FROM unnest(v_after) AS a(n) WHERE n <> ALL (v_before)),
                'default_rows_left', v_left,
                'retention', v_keep::text,
                'keep_from', audit.retention_start(v_keep)));
    END LOOP;
    v_result := v_result || jsonb_build_object(
        'months_ahead', coalesce(p_months_ahead, 3),
        'by', coalesce(nullif(current_setting('application_name', true), ''), current_user),
        'duration_ms', round(extract(epoch FROM clock_timestamp() - v_started) * 1000, 1));
    INSERT INTO audit.maintenance_log (details) VALUES (v_result);
    RETURN v_result;
END
$fn$;
