-- The tickets schema: the two ticket tables, the ingest ledger and the per-dataset
-- watermark. Everything the engine writes lives here.

CREATE EXTENSION IF NOT EXISTS postgis;
CREATE SCHEMA IF NOT EXISTS tickets;

-- Feed timestamps are Africa/Nairobi wall-clock time without an offset, but ISO 8601
-- with a 'T' and/or an offset also occurs. This must be IMMUTABLE to back STORED
-- generated columns, so it cannot consult the session TimeZone: EAT is fixed at
-- UTC+3 (Kenya has no daylight saving). Anything it cannot read becomes NULL, never
-- an error, so one odd value cannot fail a whole file. It validates instead of
-- catching the cast's error: an EXCEPTION block costs a subtransaction per call.
-- This is the lenient, slow path; tickets.eat_ts below handles the common shape.
CREATE OR REPLACE FUNCTION tickets.eat_ts_lenient(v text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    m   text[];
    y   int;  mo int;  d int;  h int;  mi int;
    sec numeric;
    off interval;
BEGIN
    m := regexp_match(v,
        '^\s*(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2}(?:\.\d{1,6})?))?)?\s*(Z|[+-]\d{2}(?::?\d{2})?)?\s*$');
    IF m IS NULL THEN
        RETURN NULL;
    END IF;
    y := m[1]::int; mo := m[2]::int; d := m[3]::int;
    h := coalesce(m[4], '0')::int; mi := coalesce(m[5], '0')::int;
    sec := coalesce(m[6], '0')::numeric;
    IF y < 1 OR mo NOT BETWEEN 1 AND 12 OR d < 1 OR h > 23 OR mi > 59 OR sec >= 60
       OR d > extract(day FROM make_date(y, mo, 1) + interval '1 month - 1 day') THEN
        RETURN NULL;
    END IF;
    IF m[7] IS NULL THEN
        off := interval '3 hours';
    ELSIF m[7] = 'Z' THEN
        off := interval '0';
    ELSE
        IF substr(m[7], 2, 2)::int > 14 OR coalesce(nullif(right(replace(m[7], ':', ''), 2), ''), '0')::int > 59 THEN
            RETURN NULL;
        END IF;
        off := make_interval(hours => substr(m[7], 2, 2)::int,
                             mins => CASE WHEN length(replace(m[7], ':', '')) = 5
                                          THEN right(replace(m[7], ':', ''), 2)::int ELSE 0 END);
        IF left(m[7], 1) = '-' THEN
            off := -off;
        END IF;
    END IF;
    RETURN (make_timestamp(y, mo, d, h, mi, sec::double precision) - off) AT TIME ZONE 'UTC';
END
$$;

-- Seven of these run per ingested row, so the common shape (`YYYY-MM-DD HH:MM:SS`,
-- or with a `T`) is checked and converted in one PL/pgSQL RETURN expression (~4 µs a
-- call); everything else falls through to eat_ts_lenient (~45 µs). Not LANGUAGE sql:
-- PostgreSQL would inline it and re-evaluate the caller's `raw->>'…'` at each of the
-- dozen references to v (measured: 2–3× slower). The ::timestamp cast is only
-- reached for the validated ISO shape, which no DateStyle setting reads differently.
CREATE OR REPLACE FUNCTION tickets.eat_ts(v text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN CASE
        WHEN v IS NULL OR v = '' THEN NULL
        WHEN translate(v, '0123456789T', '0000000000 ') = '0000-00-00 00:00:00'
         AND substr(v, 1, 4)::int >= 1
         AND substr(v, 6, 2)::int BETWEEN 1 AND 12
         AND substr(v, 9, 2)::int BETWEEN 1 AND CASE
                WHEN substr(v, 6, 2)::int IN (4, 6, 9, 11) THEN 30
                WHEN substr(v, 6, 2)::int <> 2 THEN 31
                WHEN substr(v, 1, 4)::int % 4 = 0
                 AND (substr(v, 1, 4)::int % 100 <> 0 OR substr(v, 1, 4)::int % 400 = 0) THEN 29
                ELSE 28 END
         AND substr(v, 12, 2)::int < 24 AND substr(v, 15, 2)::int < 60 AND substr(v, 18, 2)::int < 60
        THEN (v::timestamp - interval '3 hours') AT TIME ZONE 'UTC'
        ELSE tickets.eat_ts_lenient(v)
    END;
END
$$;

-- The order of change files is the timestamp in their names, not the full key: two
-- keys of one dataset under different prefixes (a bucket cutover) still compare right.
CREATE OR REPLACE FUNCTION tickets.key_name(k text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT regexp_replace(k, '^.*/', '')
$$;

-- mttr is decimal minutes; the typed column is whole minutes. Validated, not caught,
-- for the same reason as eat_ts.
CREATE OR REPLACE FUNCTION tickets.minutes_or_null(v text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN v ~ '^\s*[+-]?(\d{1,9}(\.\d*)?|\.\d+)\s*$'
                THEN round(btrim(v)::numeric)::integer END
$$;

CREATE OR REPLACE FUNCTION tickets.bool_or_null(v text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE lower(btrim(v)) WHEN 'true' THEN true WHEN 'false' THEN false END
$$;

-- One table per dataset, all of one shape. A new dataset needs only
-- `SELECT tickets.create_dataset_table('name')` and a [datasets.name] section.
CREATE OR REPLACE FUNCTION tickets.create_dataset_table(p_name text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    IF p_name !~ '^[a-z_][a-z0-9_]*$' THEN
        RAISE EXCEPTION 'dataset table name % is not a plain lower-case identifier', p_name;
    END IF;
    EXECUTE format($ddl$
        CREATE TABLE IF NOT EXISTS tickets.%1$I (
            ticket_id          text PRIMARY KEY,
            raw                jsonb NOT NULL,
            source_key         text NOT NULL,
            ingested_at        timestamptz NOT NULL DEFAULT now(),
            updated_at         timestamptz NOT NULL DEFAULT now(),
            -- Indexed text is capped: a btree entry over ~2.7 kB fails the whole file,
            -- and a status or cluster that long is garbage, not a value (raw keeps it).
            normalized_status  text GENERATED ALWAYS AS (left(lower(nullif(raw->>'normalized_status', '')), 64)) STORED,
            raw_status         text GENERATED ALWAYS AS (nullif(raw->>'raw_status', '')) STORED,
            bucket             text GENERATED ALWAYS AS (nullif(raw->>'bucket', '')) STORED,
            is_actionable      boolean GENERATED ALWAYS AS (tickets.bool_or_null(raw->>'is_actionable')) STORED,
            cluster            text GENERATED ALWAYS AS (left(nullif(raw->>'cluster', ''), 200)) STORED,
            region             text GENERATED ALWAYS AS (nullif(raw->>'region', '')) STORED,
            location_name      text GENERATED ALWAYS AS (nullif(raw->>'location_name', '')) STORED,
            assigned_team      text GENERATED ALWAYS AS (nullif(raw->>'assigned_team', '')) STORED,
            owner              text GENERATED ALWAYS AS (nullif(raw->>'owner', '')) STORED,
            sla_status         text GENERATED ALWAYS AS (nullif(raw->>'sla_status', '')) STORED,
            mttr_minutes       integer GENERATED ALWAYS AS (tickets.minutes_or_null(raw->>'mttr')) STORED,
            created_at_service timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'created_at_service')) STORED,
            scheduled_at       timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'scheduled_at')) STORED,
            closed_at          timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'closed_at')) STORED,
            first_seen_at      timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'first_seen_at')) STORED,
            last_seen_at       timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'last_seen_at')) STORED,
            source_created_at  timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'created_at')) STORED,
            source_updated_at  timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'updated_at')) STORED
        )$ddl$, p_name);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %1$I ON tickets.%2$I (normalized_status)',
                   p_name || '_status_idx', p_name);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %1$I ON tickets.%2$I (cluster, normalized_status)',
                   p_name || '_cluster_idx', p_name);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %1$I ON tickets.%2$I (created_at_service)',
                   p_name || '_created_idx', p_name);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %1$I ON tickets.%2$I (closed_at) WHERE closed_at IS NOT NULL',
                   p_name || '_closed_idx', p_name);
END
$fn$;

SELECT tickets.create_dataset_table('inc');
SELECT tickets.create_dataset_table('crq');

-- One row per dataset. metadata->>'source_max_key' is the watermark (fixed by the
-- contract); the blocked_* columns hold a halted dataset's state.
CREATE TABLE IF NOT EXISTS tickets.import_meta (
    dataset         text PRIMARY KEY,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
    blocked_key     text,
    blocked_etag    text,
    blocked_reason  text,
    blocked_at      timestamptz,
    last_applied_at timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The ledger: (dataset, key, etag) identifies one version of one file. A re-export of
-- a key gets a new ETag and so a new row.
CREATE TABLE IF NOT EXISTS tickets.ingest_files (
    dataset        text NOT NULL,
    key            text NOT NULL,
    etag           text NOT NULL,
    status         text NOT NULL CHECK (status IN ('applied', 'skipped', 'quarantined')),
    size_bytes     bigint,
    rows_read      integer NOT NULL DEFAULT 0,
    rows_inserted  integer NOT NULL DEFAULT 0,
    rows_updated   integer NOT NULL DEFAULT 0,
    rows_unchanged integer NOT NULL DEFAULT 0,
    rows_rejected  integer NOT NULL DEFAULT 0,
    late           boolean NOT NULL DEFAULT false,
    error          text,
    applied_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dataset, key, etag)
);
CREATE INDEX IF NOT EXISTS ingest_files_applied_idx ON tickets.ingest_files (dataset, applied_at);

CREATE TABLE IF NOT EXISTS tickets.ingest_rejects (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dataset     text NOT NULL,
    key         text NOT NULL,
    etag        text,
    line        integer NOT NULL,
    reason      text NOT NULL,
    raw_line    text NOT NULL,
    rejected_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ingest_rejects_key_idx ON tickets.ingest_rejects (dataset, key);
