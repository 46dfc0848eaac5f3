-- The gazetteer: geocoded cluster centroids and ticket locations, the curated aliases
-- that turn network codes into places, the per-UTC-day request budget, and the full
-- ticket resolution order (feed coordinates → location → cluster centroid → none).
--
-- The database, not the worker, decides where a ticket is: resolution is set-based SQL
-- run when a file is upserted (tickets.resolve_ticket_geo) and, through triggers,
-- whenever a gazetteer row lands or is corrected — by the worker, by
-- `fleetticketsd gazetteer set`, or by an operator's plain UPDATE. So a curated fix
-- reaches every ticket at once, without a re-ingest.

-- Network codes in `cluster` that no geocoder knows. Curated data, not code: an
-- operator adds a row, and the next refill asks for the real place.
CREATE TABLE IF NOT EXISTS tickets.geo_cluster_aliases (
    cluster    text PRIMARY KEY,
    place      text NOT NULL CHECK (btrim(place) <> ''),
    note       text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO tickets.geo_cluster_aliases (cluster, place, note) VALUES
    ('QOA', 'Quarry Road', 'network code used in the feed'),
    ('PTMP', 'Pipeline', 'network code used in the feed')
ON CONFLICT (cluster) DO NOTHING;

-- Statuses shared by both gazetteer tables:
--   ok                 geom is the answer (or a person's, when verified)
--   no_match           the provider knows no such place; asked again after retry_at
--   rejected_distance  an answer too far from its cluster centroid (wrong city); geom
--                      keeps it for review, tickets do not use it
--   error              transient failure (5xx, timeout) kept after retries; retry_at
CREATE TABLE IF NOT EXISTS tickets.geo_clusters (
    cluster      text PRIMARY KEY,
    query        text,
    geom         geometry(Point, 4326),
    status       text NOT NULL CHECK (status IN ('ok', 'no_match', 'error')),
    provider     text,
    display_name text,
    verified     boolean NOT NULL DEFAULT false,
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    geocoded_at  timestamptz,
    retry_at     timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (status <> 'ok' OR geom IS NOT NULL)
);

-- `location` is tickets.clean_location(location_name, cluster): the place without
-- network codes. Many raw names share one (NW_KILIMANI_Jogoo Rd FDT1 and
-- SDUS KILIMANI_Jogoo Rd FDT21 are both "Jogoo Rd" in Kilimani), which is what
-- keeps the request budget small. `query` is what was sent, with context added.
CREATE TABLE IF NOT EXISTS tickets.geo_locations (
    cluster      text NOT NULL,
    location     text NOT NULL,
    query        text,
    geom         geometry(Point, 4326),
    distance_km  double precision,
    status       text NOT NULL CHECK (status IN ('ok', 'no_match', 'rejected_distance', 'error')),
    provider     text,
    display_name text,
    verified     boolean NOT NULL DEFAULT false,
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    geocoded_at  timestamptz,
    retry_at     timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cluster, location),
    CHECK (status <> 'ok' OR geom IS NOT NULL)
);

-- Requests sent per provider and UTC day. Counted here rather than in memory so a
-- restart (or a second replica) cannot spend the day's quota twice. `exhausted` is
-- set when the provider itself says the day is over (429 "Rate Limited Day", 402).
CREATE TABLE IF NOT EXISTS tickets.geo_budget (
    provider  text NOT NULL,
    day       date NOT NULL,
    requests  integer NOT NULL DEFAULT 0,
    exhausted boolean NOT NULL DEFAULT false,
    PRIMARY KEY (provider, day)
);

-- The place in a location name, without the network codes around it:
--   'NW_ADR_MNT_PTMP_Links Rd FDT12, near "Total" petrol station\nGate B' → 'Links Rd'
--   'SDUS KISUMU_CBD_Kamakis – Eastern Bypass FDT12'                     → 'Kamakis – Eastern Bypass'
-- Everything from the FDT<n> code on is a cabinet number and the staff's notes; without
-- one, notes start at a line break or a parenthesis. The cluster name in capitals (its
-- spaces as underscores) is a code too. Idempotent: cleaning a clean name changes
-- nothing, so operators may pass either form to `gazetteer set`. IMMUTABLE and plain
-- SQL so the planner inlines it into the set-based resolution.
CREATE OR REPLACE FUNCTION tickets.clean_location(p_location text, p_cluster text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT nullif(
        btrim(
            regexp_replace(
                regexp_replace(
                    replace(
                        replace(
                            regexp_replace(
                                regexp_replace(
                                    regexp_replace(
                                        regexp_replace(p_location, '(^|[\s_,])FDT\s*\d+.*$', ''),
                                        '[\r\n].*$', ''),
                                    '\([^)]*\)?', '', 'g'),
                                '^(\s*(NW_|ADR_MNT_|SDUS[\s_]+))+', ''),
                            upper(regexp_replace(coalesce(p_cluster, ''), '\s+', '_', 'g')) || '_', ' '),
                        CASE WHEN coalesce(p_cluster, '') ~ '\S' THEN upper(p_cluster) ELSE E'\x01' END, ' '),
                    '["_]+', ' ', 'g'),
                '\s+', ' ', 'g'),
            ' ,;:–-'),
        '')
$$;

-- The cleaned place, stored with each ticket: resolution joins on it for every row a
-- file writes, and a gazetteer correction finds its tickets by it (indexed). Computing
-- it once per row version, in the upsert, instead of on every resolution keeps both
-- cheap. From raw because generated columns cannot read other generated columns;
-- capped like `cluster` (0001) because it is indexed.
CREATE OR REPLACE FUNCTION tickets.add_location_key(p_name text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    EXECUTE format($ddl$
        ALTER TABLE tickets.%1$I ADD COLUMN IF NOT EXISTS location_key text
            GENERATED ALWAYS AS (left(tickets.clean_location(nullif(raw->>'location_name', ''),
                                                             left(nullif(raw->>'cluster', ''), 200)), 200)) STORED
        $ddl$, p_name);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %1$I ON tickets.%2$I (cluster, location_key)',
                   p_name || '_location_key_idx', p_name);
END
$fn$;

SELECT tickets.add_location_key('inc');
SELECT tickets.add_location_key('crq');

-- New dataset tables get it too (0002 made create_dataset_table add the geometry).
ALTER FUNCTION tickets.create_dataset_table(text) RENAME TO create_dataset_table_geo;
CREATE FUNCTION tickets.create_dataset_table(p_name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tickets.create_dataset_table_geo(p_name);
    PERFORM tickets.add_location_key(p_name);
END
$$;

-- Every table a dataset writes tickets to: those with the geometry columns.
CREATE OR REPLACE FUNCTION tickets.ticket_tables() RETURNS SETOF regclass
LANGUAGE sql STABLE AS $$
    SELECT c.oid::regclass
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'geo_source' AND NOT a.attisdropped
    WHERE n.nspname = 'tickets' AND c.relkind IN ('r', 'p')
    ORDER BY c.relname
$$;

-- Re-resolve the tickets of one table that match the given filters (NULL = any):
-- the rows one file wrote (p_source_key), a cluster, or one cleaned location in a
-- cluster. Only rows whose point or source changes are written.
CREATE OR REPLACE FUNCTION tickets.resolve_geo(
    p_table regclass, p_source_key text, p_cluster text, p_location text
) RETURNS integer
LANGUAGE plpgsql AS $fn$
DECLARE
    n integer;
    filter text := 'true';
BEGIN
    IF p_source_key IS NOT NULL THEN
        filter := filter || ' AND t.source_key = $1';
    END IF;
    IF p_cluster IS NOT NULL THEN
        filter := filter || ' AND t.cluster = $2';
    END IF;
    IF p_location IS NOT NULL THEN
        filter := filter || ' AND t.location_key = $3';
    END IF;
    EXECUTE format($sql$
        WITH want AS (
            SELECT t.ticket_id,
                   coalesce(fp.g, gl.geom, gc.geom) AS geom,
                   CASE WHEN fp.g IS NOT NULL THEN 'feed'
                        WHEN gl.geom IS NOT NULL THEN 'location'
                        WHEN gc.geom IS NOT NULL THEN 'cluster' END AS src
            FROM %1$s AS t
            CROSS JOIN LATERAL (SELECT t.feed_geom AS g) AS fp
            LEFT JOIN tickets.geo_locations gl
                   ON fp.g IS NULL AND gl.status = 'ok'
                  AND gl.cluster = t.cluster
                  AND gl.location = t.location_key
            LEFT JOIN tickets.geo_clusters gc
                   ON gc.status = 'ok' AND gc.cluster = t.cluster
            WHERE %2$s
        )
        UPDATE %1$s AS t
        SET geom = want.geom, geo_source = want.src
        FROM want
        WHERE t.ticket_id = want.ticket_id
          AND (t.geo_source IS DISTINCT FROM want.src
               OR ST_AsEWKB(t.geom) IS DISTINCT FROM ST_AsEWKB(want.geom))
        $sql$, p_table, filter) USING p_source_key, p_cluster, p_location;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$fn$;

-- The engine's hook, called in each file's transaction for the rows that file wrote
-- (replaces the feed-only version of the geometry migration; same signature).
CREATE OR REPLACE FUNCTION tickets.resolve_ticket_geo(p_table regclass, p_source_key text)
RETURNS integer
LANGUAGE sql AS $$
    SELECT tickets.resolve_geo(p_table, p_source_key, NULL, NULL)
$$;

-- Re-resolve every ticket, in every ticket table, that a gazetteer row can affect:
-- a cluster centroid (p_location NULL) reaches all of the cluster's tickets, since it
-- is also the fallback of their locations; a location only its own tickets.
CREATE OR REPLACE FUNCTION tickets.apply_gazetteer(p_cluster text, p_location text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    tbl regclass;
    n integer := 0;
BEGIN
    FOR tbl IN SELECT * FROM tickets.ticket_tables() LOOP
        n := n + tickets.resolve_geo(tbl, NULL, p_cluster, p_location);
    END LOOP;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION tickets.geo_clusters_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM tickets.apply_gazetteer(OLD.cluster);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND (TG_OP = 'INSERT' OR NEW.cluster <> OLD.cluster) THEN
        PERFORM tickets.apply_gazetteer(NEW.cluster);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION tickets.geo_locations_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM tickets.apply_gazetteer(OLD.cluster, OLD.location);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND (NEW.cluster, NEW.location) <> (OLD.cluster, OLD.location)) THEN
        PERFORM tickets.apply_gazetteer(NEW.cluster, NEW.location);
    END IF;
    RETURN NULL;
END
$$;

-- Only changes that can move a ticket fire: bookkeeping (attempts, retry_at) does not.
DROP TRIGGER IF EXISTS geo_clusters_resolve_ins ON tickets.geo_clusters;
CREATE TRIGGER geo_clusters_resolve_ins AFTER INSERT OR DELETE ON tickets.geo_clusters
    FOR EACH ROW EXECUTE FUNCTION tickets.geo_clusters_changed();
DROP TRIGGER IF EXISTS geo_clusters_resolve_upd ON tickets.geo_clusters;
CREATE TRIGGER geo_clusters_resolve_upd AFTER UPDATE ON tickets.geo_clusters
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.cluster IS DISTINCT FROM NEW.cluster
          OR ST_AsEWKB(OLD.geom) IS DISTINCT FROM ST_AsEWKB(NEW.geom))
    EXECUTE FUNCTION tickets.geo_clusters_changed();

DROP TRIGGER IF EXISTS geo_locations_resolve_ins ON tickets.geo_locations;
CREATE TRIGGER geo_locations_resolve_ins AFTER INSERT OR DELETE ON tickets.geo_locations
    FOR EACH ROW EXECUTE FUNCTION tickets.geo_locations_changed();
DROP TRIGGER IF EXISTS geo_locations_resolve_upd ON tickets.geo_locations;
CREATE TRIGGER geo_locations_resolve_upd AFTER UPDATE ON tickets.geo_locations
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR (OLD.cluster, OLD.location) IS DISTINCT FROM (NEW.cluster, NEW.location)
          OR ST_AsEWKB(OLD.geom) IS DISTINCT FROM ST_AsEWKB(NEW.geom))
    EXECUTE FUNCTION tickets.geo_locations_changed();

-- What the geocoder should know about: the distinct (cluster, region, cleaned
-- location) of actionable, not-closed tickets without feed coordinates, across every
-- ticket table. Closed tickets are not routed, and the budget is small.
CREATE OR REPLACE FUNCTION tickets.geo_wanted() RETURNS TABLE (cluster text, region text, location text)
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    tbl regclass;
BEGIN
    FOR tbl IN SELECT * FROM tickets.ticket_tables() LOOP
        RETURN QUERY EXECUTE format($sql$
            SELECT DISTINCT t.cluster, t.region, t.location_key
            FROM %s AS t
            WHERE t.is_actionable
              AND t.cluster IS NOT NULL
              AND coalesce(t.normalized_status, '') <> 'closed'
              AND t.closed_at IS NULL
              AND t.feed_geom IS NULL
            $sql$, tbl);
    END LOOP;
END
$fn$;

-- Backfill: tickets already ingested follow the (empty or seeded) gazetteer.
SELECT tickets.resolve_geo(tbl, NULL, NULL, NULL) FROM tickets.ticket_tables() AS tbl;
