-- Where a ticket is: the columns routing and the map read. `feed_geom` is the
-- feed's own point, if it has one (computed once per row version, not on every
-- resolution); `geom` is the resolved point; `geog` (for metres and "nearest") and `latitude`/`longitude` follow it
-- automatically as generated columns, so nothing can update one and forget another.
-- Resolution order: feed coordinates → geocoded location → cluster centroid → none
-- (tickets.resolve_ticket_geo; the gazetteer migration extends it).

-- Validated rather than caught, like tickets.eat_ts: no subtransaction per row.
CREATE OR REPLACE FUNCTION tickets.float_or_null(v text) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN v ~ '^\s*[+-]?(\d{1,15}(\.\d*)?|\.\d+)\s*$' THEN btrim(v)::double precision END
$$;

-- Feed coordinates if both are present and plausible; NULL otherwise.
CREATE OR REPLACE FUNCTION tickets.feed_point(raw jsonb) RETURNS geometry
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN tickets.float_or_null(raw->>'latitude') BETWEEN -90 AND 90
         AND tickets.float_or_null(raw->>'longitude') BETWEEN -180 AND 180
         AND NOT (tickets.float_or_null(raw->>'latitude') = 0 AND tickets.float_or_null(raw->>'longitude') = 0)
        THEN ST_SetSRID(ST_MakePoint(tickets.float_or_null(raw->>'longitude'),
                                     tickets.float_or_null(raw->>'latitude')), 4326)
    END
$$;

CREATE OR REPLACE FUNCTION tickets.add_geo_columns(p_name text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    EXECUTE format($ddl$
        ALTER TABLE tickets.%1$I
            ADD COLUMN IF NOT EXISTS feed_geom geometry(Point, 4326)
                GENERATED ALWAYS AS (tickets.feed_point(raw)) STORED,
            ADD COLUMN IF NOT EXISTS geom geometry(Point, 4326),
            ADD COLUMN IF NOT EXISTS geo_source text
                CHECK (geo_source IN ('feed', 'location', 'cluster')),
            ADD COLUMN IF NOT EXISTS geog geography(Point, 4326)
                GENERATED ALWAYS AS (geom::geography) STORED,
            ADD COLUMN IF NOT EXISTS latitude double precision
                GENERATED ALWAYS AS (coalesce(tickets.float_or_null(raw->>'latitude'), ST_Y(geom))) STORED,
            ADD COLUMN IF NOT EXISTS longitude double precision
                GENERATED ALWAYS AS (coalesce(tickets.float_or_null(raw->>'longitude'), ST_X(geom))) STORED
        $ddl$, p_name);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %1$I ON tickets.%2$I USING gist (geog)',
                   p_name || '_geog_idx', p_name);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %1$I ON tickets.%2$I (source_key)',
                   p_name || '_source_key_idx', p_name);
END
$fn$;

SELECT tickets.add_geo_columns('inc');
SELECT tickets.add_geo_columns('crq');

-- New dataset tables get the geometry columns too.
ALTER FUNCTION tickets.create_dataset_table(text) RENAME TO create_dataset_table_base;
CREATE FUNCTION tickets.create_dataset_table(p_name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tickets.create_dataset_table_base(p_name);
    PERFORM tickets.add_geo_columns(p_name);
END
$$;

-- Called by the engine in each file's transaction, for the rows that file wrote.
-- This version knows only feed coordinates; the gazetteer migration replaces it
-- with the full resolution order. Only rows whose point changes are written.
CREATE OR REPLACE FUNCTION tickets.resolve_ticket_geo(p_table regclass, p_source_key text)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    EXECUTE format($sql$
        UPDATE %s AS t
        SET geom = t.feed_geom, geo_source = 'feed'
        WHERE t.source_key = $1
          AND t.feed_geom IS NOT NULL
          AND (t.geom IS NULL OR NOT ST_Equals(t.geom, t.feed_geom))
        $sql$, p_table) USING p_source_key;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
