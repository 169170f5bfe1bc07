-- Bookkeeping of the SQLite -> PostgreSQL backfill (schema migrate).
-- Idempotent: applying it again changes nothing. The backfill applies it
-- after schema.sql and partitions.sql; by hand:
--   psql -v ON_ERROR_STOP=1 -1 -f migrate.sql
--
-- `source` is the fingerprint of a legacy governance.db (see
-- govdb/migrate/source.py): it survives copies, moves and growth of the
-- file. Keys are stored as JSON arrays (text, not jsonb: a key may hold NUL
-- escapes); text that is not UTF-8 appears as {"hex": ...}. No raw API key
-- is ever stored here: quarantined rows and repairs hold its sha256 hash.

CREATE SCHEMA IF NOT EXISTS migrate;

-- One row per source file and legacy table: where the backfill is and what
-- it did. Written in the same transaction as each batch's rows, so after a
-- crash it says exactly which rows are in.
CREATE TABLE IF NOT EXISTS migrate.checkpoints (
    source           text NOT NULL,
    source_table     text NOT NULL,
    source_path      text NOT NULL,
    last_key         text,               -- resume after this key (NULL: from the start)
    rows_read        bigint NOT NULL DEFAULT 0,
    rows_migrated    bigint NOT NULL DEFAULT 0,
    rows_quarantined bigint NOT NULL DEFAULT 0,
    rows_repaired    bigint NOT NULL DEFAULT 0,
    rows_inserted    bigint NOT NULL DEFAULT 0,
    rows_updated     bigint NOT NULL DEFAULT 0,
    done             boolean NOT NULL DEFAULT false,
    started_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, source_table)
);

-- Rows that could not be migrated, with the reason and the raw row (JSON
-- text of every column; BLOBs and text that is not UTF-8 as hex).
CREATE TABLE IF NOT EXISTS migrate.quarantine (
    source         text NOT NULL,
    source_table   text NOT NULL,
    key            text NOT NULL,
    key_md5        text GENERATED ALWAYS AS (md5(key)) STORED,
    kind           text NOT NULL,       -- short code: orphan, bad-timestamp, bad-value, ...
    reason         text NOT NULL,
    raw_row        text NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, source_table, key_md5)
);

-- Every value a repair changed: the original as text (original_encoding:
-- text = as is; json = a JSON string literal, for text holding NUL; hex =
-- the exact bytes, for text that is not UTF-8 or a BLOB; null = was NULL).
CREATE TABLE IF NOT EXISTS migrate.repairs (
    source            text NOT NULL,
    source_table      text NOT NULL,
    key               text NOT NULL,
    key_md5           text GENERATED ALWAYS AS (md5(key)) STORED,
    column_name       text NOT NULL,
    kind              text NOT NULL,
    problem           text NOT NULL,
    original          text,
    original_encoding text NOT NULL CHECK (original_encoding IN ('text', 'json', 'hex', 'null')),
    repaired_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, source_table, key_md5, column_name)
);

-- Secondary (non-unique) indexes a bulk load dropped, to be built again from
-- their definition (pg_get_indexdef). Recorded in the transaction that drops
-- them and deleted in the one that builds them, so a run that is killed in
-- between leaves them here and the next run of the backfill builds them first.
CREATE TABLE IF NOT EXISTS migrate.deferred_indexes (
    index_name  text PRIMARY KEY,       -- schema-qualified, quoted
    table_name  text NOT NULL,          -- the table it indexes (schema-qualified)
    definition  text NOT NULL,
    deferred_at timestamptz NOT NULL DEFAULT now()
);
