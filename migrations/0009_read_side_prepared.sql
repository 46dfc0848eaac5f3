-- The read side finished (issue 13): summary.freshness, json documents, features
-- prepared when a ticket is written, and history whose cost per file follows the file.
--
-- 1. tickets.ticket_features: one row per INC and CRQ ticket holding what the two
--    reporting functions need of it, narrow columns plus its GeoJSON feature(s) as
--    text, already rendered. Statement-level triggers with transition tables keep it
--    in the same transaction as every write to tickets.inc / tickets.crq (the engine's
--    upsert, geocoding's UPDATEs, a reseed's DELETE, TRUNCATE), so it is never older
--    than the data: there is no refresh to forget and nothing to invalidate. What
--    depends on the time of the call (sla_state, age_hours, hours_to_breach) is left
--    out as holes, filled in at read time: a feature is stored as the text around its
--    holes (a text[] of parts).
-- 2. The two reporting functions return json (CONTRACT.md "Read side": the same
--    document), assembled from those parts. What bench/read_side.py measured at the
--    backlog profile (24.5k open of 100k): building 29k-35k features per call with
--    json_build_object cost ~200-400 ms, and casting the finished 13-14 MB document to
--    jsonb another ~200 ms (the jsonb floor). Concatenating prepared text and
--    validating it as json once costs a fraction of either.
--    The features are rendered as jsonb renders them (keys in jsonb's order, ": " and
--    ", "), so a document is byte for byte what 0005 returned once cast to text, in a
--    UTC session. Timestamps are rendered in UTC whatever the caller's TimeZone (the
--    functions pin it): a prepared feature cannot follow the reader's session.
-- 3. fn_tickets_for_map() carries freshness inside summary (summary.freshness), where
--    the dashboards' API reads it (the loader's map function put it there, LEGACY.md),
--    and keeps the top-level copy that issue 5's documents had, so nothing written
--    against those breaks. It is the same small object twice.
-- 4. History: capture_history() (INC's post_apply hook, per file) records the file's
--    closures and notes the days the file touched; the recount of those days and
--    today's point-in-time backlog are done once per pass by capture_history_pass(),
--    which drain.py calls at the end of every pass, with or without files. Called on
--    its own (outside a pass), capture_history() still does everything at once.

-- --------------------------------------------------------------------------- prepared features

-- Partitioned by shelf (open | closed | other), so that the open tickets, which every
-- call reads all of, sit together on a few pages instead of among weeks of closures:
-- at the backlog profile the open rows were spread over 12k pages of 120 MB, most of
-- them read from outside shared_buffers. A status change moves the row to its shelf.
CREATE TABLE IF NOT EXISTS tickets.ticket_features (
    dataset           text NOT NULL,
    ticket_id         text NOT NULL,
    shelf             text NOT NULL,  -- normalized_status when open or closed, else 'other'
    normalized_status text,
    closed_at         timestamptz,
    clock             timestamptz,  -- the SLA clock: created_at_service, else first_seen_at
    cluster           text,
    owner             text,
    assigned_team     text,
    mapped            boolean NOT NULL,
    mttr_minutes      integer,      -- as tickets.inc_closures
    sla_status        text,         -- as tickets.inc_closures (ours: met | breached)
    map_parts         text[],       -- the map feature around its sla_state hole (mapped tickets)
    open_parts        text[],       -- the dashboard's open feature around age_hours, sla_state,
                                    -- hours_to_breach (open INC tickets with a point)
    closed_feature    text,         -- the dashboard's closed feature (closed INC tickets with a point)
    ord               bigint,       -- (dataset, ticket_id)'s byte order as a number, for ids shaped
                                    -- like the feed's (3 capitals, 12 digits); else NULL
    PRIMARY KEY (dataset, ticket_id, shelf)
) PARTITION BY LIST (shelf);
CREATE TABLE IF NOT EXISTS tickets.ticket_features_open PARTITION OF tickets.ticket_features FOR VALUES IN ('open');
CREATE TABLE IF NOT EXISTS tickets.ticket_features_closed PARTITION OF tickets.ticket_features
    FOR VALUES IN ('closed');
CREATE TABLE IF NOT EXISTS tickets.ticket_features_other PARTITION OF tickets.ticket_features DEFAULT;
CREATE INDEX IF NOT EXISTS ticket_features_closed_at_idx ON tickets.ticket_features (closed_at);
-- The closures as a covering index, in closed_at order: the dashboard's week (its
-- closed layer and figures) and the map's last 24 h are index-only range scans whose
-- rows sit together in the leaves, where in the heap they are spread among every other
-- closure (at the backlog profile the week's 14.7k rows lay over most of the closed
-- shelf's pages: an 84 ms bitmap heap scan, 10 ms from here).
CREATE INDEX IF NOT EXISTS ticket_features_closed_window_idx ON tickets.ticket_features_closed (closed_at)
    INCLUDE (shelf, dataset, ticket_id, normalized_status, cluster, owner, assigned_team, mttr_minutes,
             sla_status, mapped, ord, closed_feature, map_parts);
-- Whether any ticket has no ord (the map's sort then compares the ids themselves).
CREATE INDEX IF NOT EXISTS ticket_features_unordered_idx ON tickets.ticket_features (dataset) WHERE ord IS NULL;

COMMENT ON TABLE tickets.ticket_features IS
    'INC and CRQ tickets as the reporting functions read them, GeoJSON prepared; kept by triggers (0009).';

-- A feature's jsonb text with the values of p_holes (keys set to the string '@@hole@@')
-- cut out: the parts around them, in the order the keys appear (jsonb's key order).
-- The pattern includes the key, so no value can imitate it: a quote inside a JSON
-- string is always escaped. chr(1) cannot appear raw in JSON text either.
CREATE OR REPLACE FUNCTION tickets.feature_parts(p_feature jsonb, p_holes text[]) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    t text := p_feature::text;
    k text;
BEGIN
    FOREACH k IN ARRAY p_holes LOOP
        t := replace(t, '"' || k || '": "@@hole@@"', '"' || k || '": ' || chr(1));
    END LOOP;
    RETURN string_to_array(t, chr(1));
END
$$;

-- One ticket as tickets.ticket_features holds it. The documents' shapes are 0005's
-- (docs/read_side.md); TimeZone is pinned so timestamps render the same for every writer.
CREATE OR REPLACE FUNCTION tickets.ticket_feature(
    p_dataset text, p_ticket_id text, p_status text, p_raw_status text, p_cluster text, p_owner text,
    p_team text, p_geo_source text, p_created timestamptz, p_first_seen timestamptz,
    p_closed_at timestamptz, p_geom geometry, p_mttr integer
) RETURNS tickets.ticket_features
LANGUAGE sql STABLE SET TimeZone = 'UTC' AS $$
    SELECT p_dataset, p_ticket_id,
           CASE WHEN p_status IN ('open', 'closed') THEN p_status ELSE 'other' END,
           p_status, p_closed_at, k.clock, p_cluster, p_owner, p_team,
           p_geom IS NOT NULL, k.minutes,
           CASE WHEN k.minutes < 48 * 60 THEN 'met' WHEN k.minutes >= 48 * 60 THEN 'breached' END,
           CASE WHEN p_geom IS NOT NULL THEN tickets.feature_parts(jsonb_build_object(
               'type', 'Feature',
               'id', p_ticket_id,
               'geometry', k.geometry,
               'properties', jsonb_build_object(
                   'ticket_id', p_ticket_id,
                   'dataset', p_dataset,
                   'normalized_status', p_status,
                   'raw_status', p_raw_status,
                   'cluster', p_cluster,
                   'owner', p_owner,
                   'assigned_team', p_team,
                   'sla_state', '@@hole@@',
                   'geo_source', p_geo_source,
                   'created_at_service', p_created,
                   'first_seen_at', p_first_seen,
                   'closed_at', p_closed_at)), ARRAY['sla_state']) END,
           CASE WHEN p_dataset = 'inc' AND p_status = 'open' AND p_geom IS NOT NULL
                THEN tickets.feature_parts(jsonb_build_object(
               'type', 'Feature',
               'id', p_ticket_id,
               'geometry', k.geometry,
               'properties', jsonb_build_object(
                   'ticket_id', p_ticket_id,
                   'cluster', p_cluster,
                   'owner', p_owner,
                   'assigned_team', p_team,
                   'raw_status', p_raw_status,
                   'sla_clock_start', k.clock,
                   'age_hours', '@@hole@@',
                   'hours_to_breach', '@@hole@@',
                   'sla_state', '@@hole@@',
                   'geo_source', p_geo_source)), ARRAY['age_hours', 'sla_state', 'hours_to_breach']) END,
           CASE WHEN p_dataset = 'inc' AND p_status = 'closed' AND p_closed_at IS NOT NULL AND p_geom IS NOT NULL
                THEN jsonb_build_object(
               'type', 'Feature',
               'id', p_ticket_id,
               'geometry', k.geometry,
               'properties', jsonb_build_object(
                   'ticket_id', p_ticket_id,
                   'cluster', p_cluster,
                   'owner', p_owner,
                   'assigned_team', p_team,
                   'raw_status', p_raw_status,
                   'sla_clock_start', k.clock,
                   'closed_at', p_closed_at,
                   'mttr_minutes', k.minutes,
                   'sla_status', CASE WHEN k.minutes < 48 * 60 THEN 'met'
                                      WHEN k.minutes >= 48 * 60 THEN 'breached' END,
                   'geo_source', p_geo_source))::text END,
           -- dataset (crq < inc), the capitals as base 26, the digits: for such ids the
           -- number sorts as the bytes of (dataset, ticket_id) do.
           CASE WHEN p_dataset IN ('crq', 'inc') AND p_ticket_id ~ '^[A-Z]{3}[0-9]{12}$' COLLATE "C"
                THEN (CASE p_dataset WHEN 'crq' THEN 0 ELSE 17576 END
                      + (ascii(substr(p_ticket_id, 1, 1)) - 65) * 676
                      + (ascii(substr(p_ticket_id, 2, 1)) - 65) * 26
                      + (ascii(substr(p_ticket_id, 3, 1)) - 65)) * 1000000000000::bigint
                     + substr(p_ticket_id, 4)::bigint END
    FROM (SELECT e.clock,
                 -- A closure time no integer of minutes can hold (year 9999, say) has no
                 -- duration here: a ticket write must not fail over a figure.
                 coalesce(p_mttr, CASE WHEN abs(e.minutes) <= 2147483647 THEN e.minutes::int END) AS minutes,
                 ST_AsGeoJSON(p_geom, 6)::jsonb AS geometry
          FROM (SELECT coalesce(p_created, p_first_seen) AS clock,
                       round(extract(epoch FROM p_closed_at - coalesce(p_created, p_first_seen)) / 60) AS minutes) e
         ) k
$$;

-- The trigger: one set-based statement per write statement, over its transition
-- tables, so the cost follows the rows written. TG_ARGV[0] is the dataset. It runs as
-- its owner: whoever may write a ticket table keeps its features current without a
-- grant on tickets.ticket_features (search_path pinned below, as 0006 requires).
CREATE OR REPLACE FUNCTION tickets.ticket_features_sync() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM tickets.ticket_features WHERE dataset = TG_ARGV[0];
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        DELETE FROM tickets.ticket_features f
        USING old_rows o WHERE f.dataset = TG_ARGV[0] AND f.ticket_id = o.ticket_id;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        -- Tickets whose row moves to another shelf (or whose ticket_id was changed by
        -- hand): their old rows go.
        DELETE FROM tickets.ticket_features f
        USING old_rows o
        WHERE f.dataset = TG_ARGV[0] AND f.ticket_id = o.ticket_id
          AND NOT EXISTS (SELECT 1 FROM new_rows n
                          WHERE n.ticket_id = o.ticket_id
                            AND f.shelf = CASE WHEN n.normalized_status IN ('open', 'closed')
                                               THEN n.normalized_status ELSE 'other' END);
    END IF;
    INSERT INTO tickets.ticket_features AS f
    SELECT x.*
    FROM new_rows n
    CROSS JOIN LATERAL tickets.ticket_feature(
        TG_ARGV[0], n.ticket_id, n.normalized_status, n.raw_status, n.cluster, n.owner, n.assigned_team,
        n.geo_source, n.created_at_service, n.first_seen_at, n.closed_at, n.geom, n.mttr_minutes) x
    ON CONFLICT (dataset, ticket_id, shelf) DO UPDATE
        SET normalized_status = EXCLUDED.normalized_status, closed_at = EXCLUDED.closed_at,
            clock = EXCLUDED.clock, cluster = EXCLUDED.cluster, owner = EXCLUDED.owner,
            assigned_team = EXCLUDED.assigned_team, mapped = EXCLUDED.mapped,
            mttr_minutes = EXCLUDED.mttr_minutes, sla_status = EXCLUDED.sla_status,
            map_parts = EXCLUDED.map_parts, open_parts = EXCLUDED.open_parts,
            closed_feature = EXCLUDED.closed_feature, ord = EXCLUDED.ord
        -- A write that changed nothing shown (a source_key bump) leaves no dead tuple.
        WHERE f IS DISTINCT FROM EXCLUDED;
    RETURN NULL;
END
$$;

DO $migration$
DECLARE
    ds text;
BEGIN
    FOREACH ds IN ARRAY ARRAY['inc', 'crq'] LOOP
        -- Transition tables need one trigger per event.
        EXECUTE format('DROP TRIGGER IF EXISTS %1$s_features_ins ON tickets.%1$I', ds);
        EXECUTE format('DROP TRIGGER IF EXISTS %1$s_features_upd ON tickets.%1$I', ds);
        EXECUTE format('DROP TRIGGER IF EXISTS %1$s_features_del ON tickets.%1$I', ds);
        EXECUTE format('DROP TRIGGER IF EXISTS %1$s_features_trunc ON tickets.%1$I', ds);
        EXECUTE format('CREATE TRIGGER %1$s_features_ins AFTER INSERT ON tickets.%1$I '
                       'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT '
                       'EXECUTE FUNCTION tickets.ticket_features_sync(%1$L)', ds);
        EXECUTE format('CREATE TRIGGER %1$s_features_upd AFTER UPDATE ON tickets.%1$I '
                       'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT '
                       'EXECUTE FUNCTION tickets.ticket_features_sync(%1$L)', ds);
        EXECUTE format('CREATE TRIGGER %1$s_features_del AFTER DELETE ON tickets.%1$I '
                       'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT '
                       'EXECUTE FUNCTION tickets.ticket_features_sync(%1$L)', ds);
        EXECUTE format('CREATE TRIGGER %1$s_features_trunc AFTER TRUNCATE ON tickets.%1$I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION tickets.ticket_features_sync(%1$L)', ds);
        EXECUTE format(
            'INSERT INTO tickets.ticket_features SELECT x.* FROM tickets.%1$I n '
            'CROSS JOIN LATERAL tickets.ticket_feature(%1$L, n.ticket_id, n.normalized_status, n.raw_status, '
            'n.cluster, n.owner, n.assigned_team, n.geo_source, n.created_at_service, n.first_seen_at, '
            'n.closed_at, n.geom, n.mttr_minutes) x ON CONFLICT DO NOTHING', ds);
    END LOOP;
END
$migration$;

-- --------------------------------------------------------------------------- freshness

-- It reads the ledger (tickets.ingest_files), which the dashboards' reader role cannot:
-- it runs as its owner, with its search_path pinned (0006) so that is safe.
ALTER FUNCTION reporting.fn_freshness() SECURITY DEFINER;

-- --------------------------------------------------------------------------- jsonb -> json

-- The return type changes, which CREATE OR REPLACE cannot do: the functions are dropped
-- and created again, and whatever EXECUTE grants they carried are put back after.
CREATE TEMP TABLE fleet_0009_acl ON COMMIT DROP AS
SELECT p.oid::regprocedure::text AS fn, a.grantee, a.privilege_type, a.is_grantable
FROM pg_catalog.pg_proc p
CROSS JOIN LATERAL aclexplode(p.proacl) a
WHERE p.oid IN ('reporting.fn_tickets_for_map()'::regprocedure,
                'reporting.fn_inc_dashboard(text, text, text, timestamptz, timestamptz)'::regprocedure);

DROP FUNCTION reporting.fn_tickets_for_map();
DROP FUNCTION reporting.fn_inc_dashboard(text, text, text, timestamptz, timestamptz);

-- The jsonb text of a ticket's time-dependent values, as 0005's documents had them.
-- Inlined (plain LANGUAGE sql, no SET), per feature of every call.
CREATE OR REPLACE FUNCTION reporting.json_state(p_state text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_state IS NULL THEN 'null' ELSE '"' || p_state || '"' END
$$;

-- The routing map (docs/read_side.md): INC ∪ CRQ tickets with a point that are open,
-- or closed within the last 24 h; summary per dataset (and summary.freshness);
-- sla_state for open INC only. Same features, order and figures as 0005.
CREATE FUNCTION reporting.fn_tickets_for_map() RETURNS json
LANGUAGE sql STABLE SECURITY DEFINER
SET jit = off SET work_mem = '64MB' SET TimeZone = 'UTC'
AS $$
    WITH sort_by AS MATERIALIZED (
        -- How to sort in the database collation's order cheaply. Where that order is
        -- byte order (C, POSIX, C.UTF-8: code points, which UTF-8 bytes sort by), and
        -- every ticket has an ord (the feed's ids), the sort is over one bigint; else over
        -- the bytes; elsewhere by the collation (strcoll() per comparison). Sorting the
        -- wide feature rows by text was a third of the call: every comparison reached
        -- into a row of its own.
        SELECT d.datlocprovider = 'c' AND d.datcollate IN ('C', 'POSIX', 'C.UTF-8', 'C.utf8') AS bytes,
               d.datlocprovider = 'c' AND d.datcollate IN ('C', 'POSIX', 'C.UTF-8', 'C.utf8')
                   AND NOT EXISTS (SELECT 1 FROM tickets.ticket_features u WHERE u.ord IS NULL) AS ord
        FROM pg_catalog.pg_database d WHERE d.datname = current_database()
    ), shown AS MATERIALIZED (
        -- ticket_features holds INC and CRQ only.
        SELECT x.* FROM (
            SELECT f.dataset, f.ticket_id, f.normalized_status, f.ord,
                   f.map_parts[1]
                       || CASE WHEN f.dataset = 'inc'
                               THEN reporting.json_state(reporting.sla_state(f.clock, now())) ELSE 'null' END
                       || f.map_parts[2] AS feature
            FROM tickets.ticket_features f
            WHERE f.shelf = 'open' AND f.mapped
            UNION ALL
            SELECT f.dataset, f.ticket_id, f.normalized_status, f.ord, f.map_parts[1] || 'null' || f.map_parts[2]
            FROM tickets.ticket_features f
            WHERE f.shelf = 'closed' AND f.closed_at >= now() - interval '24 hours' AND f.mapped
        ) x
        ORDER BY CASE WHEN (SELECT ord FROM sort_by) THEN x.ord END,
                 CASE WHEN (SELECT bytes FROM sort_by) THEN x.dataset COLLATE "C" END,
                 CASE WHEN (SELECT bytes FROM sort_by) THEN x.ticket_id COLLATE "C" END,
                 x.dataset, x.ticket_id
    ), features AS (
        -- The features and what the summary counts of them, in one pass.
        SELECT string_agg(s.feature, ', ') AS text,
               count(*) FILTER (WHERE s.dataset = 'inc' AND s.normalized_status = 'open') AS inc_open,
               count(*) FILTER (WHERE s.dataset = 'inc' AND s.normalized_status = 'closed') AS inc_closed,
               count(*) FILTER (WHERE s.dataset = 'crq' AND s.normalized_status = 'open') AS crq_open,
               count(*) FILTER (WHERE s.dataset = 'crq' AND s.normalized_status = 'closed') AS crq_closed
        FROM shown s
    ), counts AS MATERIALIZED (
        -- As 0005: index-only scans of the ticket tables (inc_status_idx and the partial
        -- indexes of open tickets without a point).
        SELECT 'inc' AS dataset, coalesce(normalized_status, 'unknown') AS status, count(*) AS n, 0 AS unmapped
        FROM tickets.inc GROUP BY 2
        UNION ALL
        SELECT 'crq', coalesce(normalized_status, 'unknown'), count(*), 0 FROM tickets.crq GROUP BY 2
        UNION ALL
        SELECT 'inc', NULL, 0, count(*) FROM tickets.inc WHERE normalized_status = 'open' AND geom IS NULL
        UNION ALL
        SELECT 'crq', NULL, 0, count(*) FROM tickets.crq WHERE normalized_status = 'open' AND geom IS NULL
    ), on_map AS (
        SELECT m.dataset, m.status, m.n
        FROM features f
        CROSS JOIN LATERAL (VALUES ('inc', 'open', f.inc_open), ('inc', 'closed', f.inc_closed),
                                   ('crq', 'open', f.crq_open), ('crq', 'closed', f.crq_closed)) m(dataset, status, n)
        WHERE m.n > 0
    ), summary AS (
        SELECT jsonb_object_agg(d.dataset, jsonb_build_object(
                   'total', coalesce((SELECT sum(n) FROM counts c WHERE c.dataset = d.dataset), 0),
                   'by_status', coalesce((SELECT jsonb_object_agg(c.status, c.n ORDER BY c.status)
                                          FROM counts c WHERE c.dataset = d.dataset AND c.status IS NOT NULL),
                                         '{}'::jsonb),
                   'on_map', coalesce((SELECT sum(m.n) FROM on_map m WHERE m.dataset = d.dataset), 0),
                   'on_map_by_status', coalesce((SELECT jsonb_object_agg(m.status, m.n ORDER BY m.status)
                                                 FROM on_map m WHERE m.dataset = d.dataset), '{}'::jsonb),
                   'open_without_geometry',
                       coalesce((SELECT sum(c.unmapped) FROM counts c WHERE c.dataset = d.dataset), 0))
               ORDER BY d.dataset) AS doc
        FROM (VALUES ('inc'), ('crq')) d(dataset)
    ), fresh AS MATERIALIZED (
        SELECT reporting.fn_freshness() AS doc
    )
    -- Written out in jsonb's key order (shorter keys first), as 0005's jsonb was; concat
    -- copies each part once (a chain of || copies the growing document at every step).
    SELECT concat('{"type": "FeatureCollection", "summary": ',
                  (summary.doc || jsonb_build_object('freshness', fresh.doc))::text,
                  ', "features": [', features.text,
                  '], "freshness": ', fresh.doc::text,
                  ', "closed_since": ', to_jsonb(now() - interval '24 hours')::text,
                  ', "generated_at": ', to_jsonb(now())::text, '}')::json
    FROM summary, fresh, features
$$;

COMMENT ON FUNCTION reporting.fn_tickets_for_map() IS
    'GeoJSON FeatureCollection of open and last-24h-closed INC and CRQ tickets with a point, with summary '
    '(and summary.freshness) and freshness. See docs/read_side.md.';

-- The INC dashboard (docs/read_side.md). Arguments, errors and payload as 0005; the
-- features come prepared from tickets.ticket_features, the figures from its narrow
-- columns.
CREATE FUNCTION reporting.fn_inc_dashboard(
    p_cluster text DEFAULT NULL,
    p_status text DEFAULT NULL,
    p_window text DEFAULT '7d',
    p_from timestamptz DEFAULT NULL,
    p_to timestamptz DEFAULT NULL
) RETURNS json
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET jit = off SET work_mem = '64MB' SET TimeZone = 'UTC'
AS $$
DECLARE
    v_cluster text := nullif(btrim(p_cluster), '');
    v_status  text := lower(nullif(btrim(p_status), ''));
    v_window  text := lower(nullif(btrim(p_window), ''));
    v_len     interval;
    v_from    timestamptz;
    v_to      timestamptz;
    v_open    boolean;
    v_closed  boolean;
    v_sla     text;
    m         text[];
BEGIN
    IF v_window IS NOT NULL THEN
        m := regexp_match(v_window, '^([0-9]{1,4})\s*([hdw])$');
        IF m IS NULL OR m[1]::int = 0 THEN
            PERFORM reporting.dashboard_error('p_window',
                format('%L is not a window: use <n>h, <n>d or <n>w with n >= 1, e.g. ''24h'', ''7d'', ''4w''',
                       p_window));
        END IF;
        v_len := CASE m[2] WHEN 'h' THEN make_interval(hours => m[1]::int)
                           WHEN 'd' THEN make_interval(days => m[1]::int)
                           ELSE make_interval(weeks => m[1]::int) END;
        IF v_len > interval '366 days' THEN
            PERFORM reporting.dashboard_error('p_window', format('%L is longer than 366 days', p_window));
        END IF;
    ELSIF p_from IS NULL THEN
        PERFORM reporting.dashboard_error('p_window', 'must be given unless p_from is');
    END IF;
    v_to := coalesce(p_to, now());
    v_from := coalesce(p_from, v_to - v_len);
    IF v_from >= v_to THEN
        PERFORM reporting.dashboard_error(CASE WHEN p_from IS NULL THEN 'p_to' ELSE 'p_from' END,
            format('the window [%s, %s) is empty: p_from must be before p_to (default now())', v_from, v_to));
    END IF;
    IF v_status IS NOT NULL AND v_status NOT IN ('open', 'closed', 'ok', 'at_risk', 'breached') THEN
        PERFORM reporting.dashboard_error('p_status',
            format('%L is not one of open, closed, ok, at_risk, breached', p_status));
    END IF;
    IF v_cluster IS NOT NULL AND NOT EXISTS (SELECT 1 FROM tickets.inc WHERE cluster = v_cluster) THEN
        PERFORM reporting.dashboard_error('p_cluster', format('no INC ticket has cluster %L', p_cluster));
    END IF;
    v_open := v_status IS DISTINCT FROM 'closed';
    v_closed := v_status IS NULL OR v_status = 'closed';
    v_sla := CASE WHEN v_status IN ('ok', 'at_risk', 'breached') THEN v_status END;

    RETURN (
        WITH o AS MATERIALIZED (
            SELECT f.ticket_id, f.owner, f.assigned_team, f.clock, f.mapped, f.open_parts,
                   reporting.sla_state(f.clock, now()) AS sla_state
            FROM tickets.ticket_features f
            WHERE v_open AND f.shelf = 'open' AND f.dataset = 'inc'
              AND (v_cluster IS NULL OR f.cluster = v_cluster)
              AND (v_sla IS NULL OR reporting.sla_state(f.clock, now()) = v_sla)
            ORDER BY f.clock, f.ticket_id
        ), c AS MATERIALIZED (
            SELECT f.ticket_id, f.owner, f.assigned_team, f.mttr_minutes, f.sla_status, f.closed_feature
            FROM tickets.ticket_features f
            WHERE v_closed AND f.shelf = 'closed' AND f.dataset = 'inc'
              AND f.closed_at >= v_from AND f.closed_at < v_to
              AND (v_cluster IS NULL OR f.cluster = v_cluster)
            ORDER BY f.closed_at DESC, f.ticket_id
        ), breakdown AS (
            -- Open and closed tickets grouped apart, then put together: the open side's
            -- counts hash, and only the closed side (its percentile) needs sorting.
            -- GROUPING tells the two sets apart (a NULL owner or team is a real group).
            SELECT x.dim, x.k, sum(x.open) AS open, sum(x.breached) AS breached, sum(x.at_risk) AS at_risk,
                   sum(x.closed) AS closed, max(x.mttr_median) AS mttr_median, max(x.compliance) AS compliance
            FROM (
                SELECT CASE WHEN GROUPING(o.owner) = 0 THEN 'owner' ELSE 'assigned_team' END AS dim,
                       coalesce(o.owner, o.assigned_team) AS k,
                       count(*) AS open,
                       count(*) FILTER (WHERE o.sla_state = 'breached') AS breached,
                       count(*) FILTER (WHERE o.sla_state = 'at_risk') AS at_risk,
                       0 AS closed, NULL::float8 AS mttr_median, NULL::numeric AS compliance
                FROM o GROUP BY GROUPING SETS ((o.owner), (o.assigned_team))
                UNION ALL
                SELECT CASE WHEN GROUPING(c.owner) = 0 THEN 'owner' ELSE 'assigned_team' END,
                       coalesce(c.owner, c.assigned_team),
                       0, 0, 0, count(*),
                       percentile_cont(0.5) WITHIN GROUP (ORDER BY c.mttr_minutes),
                       100.0 * count(*) FILTER (WHERE c.sla_status = 'met')
                           / nullif(count(*) FILTER (WHERE c.sla_status IS NOT NULL), 0)
                FROM c GROUP BY GROUPING SETS ((c.owner), (c.assigned_team))
            ) x
            GROUP BY x.dim, x.k
        ), open_counts AS (
            -- One pass over o for all its counts (0005 scanned it once per figure).
            SELECT count(*) AS open, count(*) FILTER (WHERE NOT o.mapped) AS unmapped,
                   count(*) FILTER (WHERE o.sla_state = 'ok') AS ok,
                   count(*) FILTER (WHERE o.sla_state = 'at_risk') AS at_risk,
                   count(*) FILTER (WHERE o.sla_state = 'breached') AS breached
            FROM o
        ), metrics AS (
            SELECT jsonb_build_object(
                'open', n.open,
                'open_without_geometry', n.unmapped,
                'ok', n.ok,
                'at_risk', n.at_risk,
                'breached', n.breached,
                'closed', k.closed,
                'closed_sla_met', k.met,
                'mttr_median_minutes', k.median,
                'mttr_p90_minutes', k.p90,
                'sla_compliance_pct', k.compliance) AS doc
            FROM open_counts n, (
                SELECT count(*) AS closed,
                       count(*) FILTER (WHERE c.sla_status = 'met') AS met,
                       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY c.mttr_minutes)::numeric, 1) AS median,
                       round(percentile_cont(0.9) WITHIN GROUP (ORDER BY c.mttr_minutes)::numeric, 1) AS p90,
                       round(100.0 * count(*) FILTER (WHERE c.sla_status = 'met')
                             / nullif(count(*) FILTER (WHERE c.sla_status IS NOT NULL), 0), 1) AS compliance
                FROM c) k
        )
        -- Written out in jsonb's key order (shorter keys first), as 0005's jsonb was; concat
        -- copies each part once (a chain of || copies the growing document at every step).
        SELECT concat(
            '{"open": {"type": "FeatureCollection", "features": [',
            (SELECT string_agg(concat(
                        o.open_parts[1],
                        coalesce(round(extract(epoch FROM now() - o.clock) / 3600, 2)::text, 'null'),
                        o.open_parts[2], reporting.json_state(o.sla_state), o.open_parts[3],
                        coalesce(round(48 - extract(epoch FROM now() - o.clock) / 3600, 2)::text, 'null'),
                        o.open_parts[4]), ', ')
             FROM o WHERE o.mapped),
            ']}, "closed": {"type": "FeatureCollection", "features": [',
            (SELECT string_agg(c.closed_feature, ', ') FROM c WHERE c.closed_feature IS NOT NULL),
            ']}, "window": ',
            jsonb_build_object('from', v_from, 'to', v_to, 'label', CASE WHEN p_from IS NULL THEN v_window END)::text,
            ', "by_team": ',
            coalesce((
                SELECT jsonb_agg(jsonb_build_object(
                           'assigned_team', b.k, 'open', b.open, 'breached', b.breached,
                           'at_risk', b.at_risk, 'closed', b.closed,
                           'mttr_median_minutes', round(b.mttr_median::numeric, 1),
                           'sla_compliance_pct', round(b.compliance, 1))
                       ORDER BY b.open DESC, b.closed DESC, b.k NULLS LAST)
                FROM breakdown b WHERE b.dim = 'assigned_team'), '[]'::jsonb)::text,
            ', "filters": ', jsonb_build_object('cluster', v_cluster, 'status', v_status)::text,
            ', "metrics": ', (SELECT doc FROM metrics)::text,
            ', "by_owner": ',
            coalesce((
                SELECT jsonb_agg(jsonb_build_object(
                           'owner', b.k, 'open', b.open, 'breached', b.breached, 'at_risk', b.at_risk,
                           'closed', b.closed, 'mttr_median_minutes', round(b.mttr_median::numeric, 1),
                           'sla_compliance_pct', round(b.compliance, 1))
                       ORDER BY b.open DESC, b.closed DESC, b.k NULLS LAST)
                FROM breakdown b WHERE b.dim = 'owner'), '[]'::jsonb)::text,
            ', "freshness": ', reporting.fn_freshness()::text,
            ', "generated_at": ', to_jsonb(now())::text, '}')::json
    );
END
$$;

COMMENT ON FUNCTION reporting.fn_inc_dashboard(text, text, text, timestamptz, timestamptz) IS
    'INC dashboard: open tickets (GeoJSON), closures in a window (GeoJSON), SLA/MTTR metrics, '
    'breakdowns by owner and team, freshness. See docs/read_side.md.';

DO $migration$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT DISTINCT fn FROM fleet_0009_acl LOOP
        -- An explicit ACL existed: start from none, as it did, not from the default.
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', r.fn);
    END LOOP;
    FOR r IN SELECT a.*, g.rolname FROM fleet_0009_acl a
             LEFT JOIN pg_catalog.pg_roles g ON g.oid = a.grantee LOOP
        EXECUTE format('GRANT %s ON FUNCTION %s TO %s%s', r.privilege_type, r.fn,
                       CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END,
                       CASE WHEN r.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$migration$;

-- --------------------------------------------------------------------------- history

-- Days a pass's files touched (clock starts and closures), recounted once at the end
-- of the pass by capture_history_pass(). Committed with each file: a pass that stops
-- after a file leaves its days here for the next pass's end.
CREATE TABLE IF NOT EXISTS tickets.inc_history_days (
    day date PRIMARY KEY
);

-- A session that is inside a drain pass says so (fleetticketsd/history.py); the
-- per-file hook then leaves the recounts to the pass's end.
CREATE OR REPLACE FUNCTION tickets.history_deferred() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('fleetticketsd.history_pass', true), '') = 'on'
$$;

-- Today's (EAT) point-in-time figures: counted by clock ranges over
-- inc_open_sla_clock_idx (0005), reporting.sla_state's boundaries as ranges.
CREATE OR REPLACE FUNCTION tickets.capture_inc_today() RETURNS void
LANGUAGE sql AS $$
    UPDATE tickets.inc_daily_snapshot s
    SET open_backlog = p.open_backlog, breached = p.breached, at_risk = p.at_risk,
        captured_at = now(), updated_at = now()
    FROM (
        SELECT count(*) AS open_backlog,
               count(*) FILTER (WHERE o.clock <= now() - interval '48 hours') AS breached,
               count(*) FILTER (WHERE o.clock <= now() - interval '36 hours'
                                  AND o.clock > now() - interval '48 hours') AS at_risk
        FROM (SELECT coalesce(t.created_at_service, t.first_seen_at) AS clock
              FROM tickets.inc t WHERE t.normalized_status = 'open') o
    ) p
    WHERE s.day = reporting.eat_day(now());
$$;

-- INC's post_apply hook, per file, inside the file's transaction (docs/read_side.md).
-- The file's rows are those with updated_at = now() (see 0004). Its closures are
-- recorded here, exactly as before; inside a drain pass, the days it touched are only
-- noted, and the pass's end recounts them and captures today once, so the hook's cost
-- follows the file, not the backlog. Outside a pass it finishes the job itself.
CREATE OR REPLACE FUNCTION tickets.capture_history() RETURNS void
LANGUAGE plpgsql
SET jit = off
AS $$
DECLARE
    v_days date[];
BEGIN
    INSERT INTO tickets.closure_events
        (ticket_id, closed_at, observed_at, source_key, sla_clock_start, mttr_minutes, sla_status,
         feed_sla_status, owner, assigned_team, cluster)
    SELECT ticket_id, closed_at, updated_at, source_key, sla_clock_start, mttr_minutes, sla_status,
           feed_sla_status, owner, assigned_team, cluster
    FROM tickets.inc_closures
    WHERE updated_at = now()
    ON CONFLICT ON CONSTRAINT closure_events_ticket_closed_key DO NOTHING;

    -- The days whose counts this file can have changed: the days of the touched rows'
    -- clock starts and closures (a late file can close yesterday), and today.
    SELECT array_agg(DISTINCT d) INTO v_days
    FROM (
        SELECT reporting.eat_day(x.ts) AS d
        FROM tickets.inc t
        CROSS JOIN LATERAL (VALUES (coalesce(t.created_at_service, t.first_seen_at)),
                                   (CASE WHEN t.normalized_status = 'closed' THEN t.closed_at END)) x(ts)
        WHERE t.updated_at = now() AND x.ts IS NOT NULL
    ) days;

    IF tickets.history_deferred() THEN
        INSERT INTO tickets.inc_history_days (day)
        SELECT DISTINCT d FROM unnest(v_days) d WHERE d IS NOT NULL
        ON CONFLICT DO NOTHING;
        RETURN;
    END IF;
    PERFORM tickets.refresh_inc_days(v_days || reporting.eat_day(now()));
    PERFORM tickets.capture_inc_today();
END
$$;

COMMENT ON FUNCTION tickets.capture_history() IS
    'INC post_apply hook: records the file''s closures; the daily snapshot follows at the pass''s end '
    '(capture_history_pass), or at once outside a pass.';

-- The end of every drain pass of INC (drain.py, through fleetticketsd/history.py), with
-- or without files: recount the days the pass's files touched, and write today's (EAT)
-- row with its point-in-time backlog, breached and at-risk. A day the daemon did not
-- run gets no row from here. It also ends the session's deferral.
CREATE OR REPLACE FUNCTION tickets.capture_history_pass() RETURNS void
LANGUAGE plpgsql
SET jit = off
AS $$
DECLARE
    v_days date[];
BEGIN
    WITH gone AS (DELETE FROM tickets.inc_history_days RETURNING day)
    SELECT array_agg(day) INTO v_days FROM gone;
    PERFORM tickets.refresh_inc_days(coalesce(v_days, '{}') || reporting.eat_day(now()));
    PERFORM tickets.capture_inc_today();
    PERFORM set_config('fleetticketsd.history_pass', '', false);
END
$$;

COMMENT ON FUNCTION tickets.capture_history_pass() IS
    'End of an INC drain pass: recounts the days its files touched and captures today''s snapshot row.';

-- --------------------------------------------------------------------------- pinning (0006)

SELECT tickets.pin_search_path(f::regprocedure) FROM unnest(ARRAY[
    'tickets.feature_parts(jsonb, text[])',
    'tickets.ticket_feature(text, text, text, text, text, text, text, text, timestamptz, timestamptz, '
        'timestamptz, geometry, integer)',
    'tickets.ticket_features_sync()',
    'reporting.fn_tickets_for_map()',
    'reporting.fn_inc_dashboard(text, text, text, timestamptz, timestamptz)',
    'tickets.history_deferred()',
    'tickets.capture_inc_today()',
    'tickets.capture_history()',
    'tickets.capture_history_pass()'
]) f;
