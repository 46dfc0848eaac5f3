-- Geocoding that corrects itself (issue 13): the wrong-city guard is a judgement of a
-- stored answer against its cluster's centroid, and is made again whenever the centroid
-- changes, so an operator's corrected centroid (`gazetteer set CLUSTER LAT LON`) moves
-- the cluster's tickets where they belong without asking the provider again.
--
-- 'unguarded': an answer for a location whose cluster has no centroid (the provider
-- knows no such cluster, or it was removed), so nothing could check it against the
-- 25 km guard. Its tickets use it (without it they would have no point at all), but
-- it is no longer indistinguishable from a checked answer: counted
-- (fleettickets_geocode_unguarded_locations), shown by `status` and the status page,
-- and judged as soon as the cluster has a centroid.

-- The statuses of 0003 plus 'unguarded', which has a point like 'ok'. The constraints
-- are found by what they check, not by the names PostgreSQL gave them in 0003.
DO $migration$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT conname FROM pg_catalog.pg_constraint
        WHERE conrelid = 'tickets.geo_locations'::regclass AND contype = 'c'
          AND pg_catalog.pg_get_constraintdef(oid) LIKE '%status%'
    LOOP
        EXECUTE format('ALTER TABLE tickets.geo_locations DROP CONSTRAINT %I', c.conname);
    END LOOP;
END
$migration$;
ALTER TABLE tickets.geo_locations
    ADD CONSTRAINT geo_locations_status_check
        CHECK (status IN ('ok', 'unguarded', 'no_match', 'rejected_distance', 'error')),
    ADD CONSTRAINT geo_locations_point_check
        CHECK (status NOT IN ('ok', 'unguarded') OR geom IS NOT NULL);

-- The judgement, set-based, for one cluster (p_cluster) or all. For every answer that
-- is not a person's (verified rows always win and are never second-guessed) and has a
-- point:
--   the cluster has a centroid   → 'ok' within p_max_km of it, else 'rejected_distance'
--                                  (point kept for review; tickets use the centroid);
--                                  distance_km is the distance to it
--   no centroid                  → 'ok' becomes 'unguarded' (distance_km NULL); a
--                                  rejected answer stays rejected: without a reference
--                                  it cannot be cleared
-- An answer newly rejected waits until p_retry_at to be asked again (NULL: not asked
-- again until a person acts); an accepted one needs no retry. Only rows whose status
-- or distance changes are written, so a judgement that finds nothing new writes
-- nothing; each status change fires 0003's trigger, which moves that location's
-- tickets. Returns the rows changed, with their status before and after.
CREATE OR REPLACE FUNCTION tickets.judge_locations(
    p_max_km double precision, p_cluster text DEFAULT NULL, p_retry_at timestamptz DEFAULT NULL
) RETURNS TABLE (cluster text, location text, was text, status text, distance_km double precision)
LANGUAGE sql AS $$
    WITH j AS (
        SELECT l.cluster, l.location, l.status AS was,
               CASE WHEN c.geom IS NULL
                        THEN CASE WHEN l.status = 'rejected_distance' THEN l.status ELSE 'unguarded' END
                    WHEN ST_DWithin(l.geom::geography, c.geom::geography, p_max_km * 1000.0) THEN 'ok'
                    ELSE 'rejected_distance' END AS status,
               CASE WHEN c.geom IS NULL
                        THEN CASE WHEN l.status = 'rejected_distance' THEN l.distance_km END
                    ELSE ST_Distance(l.geom::geography, c.geom::geography) / 1000.0 END AS km
        FROM tickets.geo_locations AS l
        LEFT JOIN tickets.geo_clusters AS c ON c.cluster = l.cluster AND c.status = 'ok'
        WHERE NOT l.verified
          AND l.geom IS NOT NULL
          AND l.status IN ('ok', 'unguarded', 'rejected_distance')
          AND (p_cluster IS NULL OR l.cluster = p_cluster)
    )
    UPDATE tickets.geo_locations AS l
    SET status = j.status,
        distance_km = j.km,
        retry_at = CASE WHEN j.status <> 'rejected_distance' THEN NULL
                        WHEN j.was = 'rejected_distance' THEN l.retry_at
                        ELSE p_retry_at END,
        updated_at = now()
    FROM j
    WHERE l.cluster = j.cluster AND l.location = j.location
      AND (l.status IS DISTINCT FROM j.status OR l.distance_km IS DISTINCT FROM j.km)
    RETURNING l.cluster, l.location, j.was, l.status, l.distance_km
$$;

-- 0003's resolution, with 'unguarded' answers placing tickets like 'ok' ones.
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
                   ON fp.g IS NULL AND gl.status IN ('ok', 'unguarded')
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

-- CREATE OR REPLACE dropped resolve_geo's pinned search_path (0006); pin it again, and
-- the new function too (0006, group 3: called per gazetteer change, never per row).
DO $migration$
DECLARE
    postgis name;
    fn regprocedure;
BEGIN
    SELECT n.nspname INTO postgis
    FROM pg_catalog.pg_extension e
    JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'postgis';
    FOREACH fn IN ARRAY ARRAY[
        'tickets.resolve_geo(regclass, text, text, text)',
        'tickets.judge_locations(double precision, text, timestamptz)'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, tickets, reporting, pg_temp',
                       fn, postgis);
    END LOOP;
END
$migration$;

-- Answers stored before this migration without a centroid to check them were taken as
-- 'ok': mark them for what they are. (Those whose cluster has a centroid by now are
-- judged with the configured max_distance_km by the worker's next refill.)
UPDATE tickets.geo_locations AS l
SET status = 'unguarded', distance_km = NULL, updated_at = now()
WHERE NOT l.verified AND l.status = 'ok'
  AND NOT EXISTS (SELECT 1 FROM tickets.geo_clusters AS c WHERE c.cluster = l.cluster AND c.status = 'ok');

-- No 429 whatever starts first: the provider's next send time, shared by every process
-- on this database (the daemon, a second replica, a `fleetticketsd geocode` run beside
-- it). A process takes the provider's turn with an advisory lock, waits until
-- next_send_at (the database's clock, the same for all), sends, and when the answer is
-- in sets next_send_at to 1/rate_per_second (or a provider's Retry-After) from then.
CREATE TABLE IF NOT EXISTS tickets.geo_pacer (
    provider     text PRIMARY KEY,
    next_send_at timestamptz NOT NULL
);
