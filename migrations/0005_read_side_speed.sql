-- The two read-side functions of 0004, rebuilt for speed (issue 5: under 300 ms over
-- 100k tickets). Same names, arguments, payloads and ordering; only how the payload is
-- built changes. What bench/read_side.py measured on a 100k-ticket table:
--
--   * Building the document with json_build_object/json_agg (plain text) and casting
--     the finished document to jsonb once is cheaper than building jsonb throughout:
--     every jsonb_build_object nests its arguments into a binary tree, and each level
--     that embeds another jsonb value walks and copies it again.
--   * An aggregate's own ORDER BY sorts the built features (megabytes of json values).
--     Sorting the narrow rows in the MATERIALIZED CTE instead and aggregating in scan
--     order gives the same order for a fraction of the cost: a CTE is read back in
--     the order it was written.
--
-- 0004 stays as it was: applied migrations are checksummed, and these replace its
-- definitions in place.

-- --------------------------------------------------------------------------- map

-- The map's summary counts open tickets without a point. With a large open backlog
-- the planner reads the whole table for that; these stay as small as the hole.
CREATE INDEX IF NOT EXISTS inc_open_unmapped_idx ON tickets.inc (cluster)
    WHERE normalized_status = 'open' AND geom IS NULL;
CREATE INDEX IF NOT EXISTS crq_open_unmapped_idx ON tickets.crq (cluster)
    WHERE normalized_status = 'open' AND geom IS NULL;

-- The routing map: INC ∪ CRQ tickets with a point that are open, or closed within the
-- last 24 h (so a dispatcher sees what was just done). Older closures are weeks of a
-- full-state table; putting them all on a map is neither readable nor fast (issue 5's
-- 300 ms target over 100k tickets). The summary counts every ticket, mapped or not,
-- by dataset and status, plus how many open tickets lack a point, so a map with holes
-- says so. sla_state is given for open INC only: CRQ has no agreed SLA yet.
CREATE OR REPLACE FUNCTION reporting.fn_tickets_for_map() RETURNS jsonb
LANGUAGE sql STABLE
-- As in 0004 (CREATE OR REPLACE resets them): JIT costs more than it saves here, and
-- 4 MB of work_mem would spill the sorts and aggregates to disk.
SET jit = off SET work_mem = '64MB'
AS $$
    WITH shown AS MATERIALIZED (
        SELECT 'inc' AS dataset, t.ticket_id, t.normalized_status, t.raw_status, t.cluster, t.owner,
               t.assigned_team, t.geo_source, t.created_at_service, t.first_seen_at, t.closed_at, t.geom,
               reporting.sla_state(coalesce(t.created_at_service, t.first_seen_at), now()) AS sla_state
        FROM tickets.inc t
        WHERE t.normalized_status = 'open' AND t.geom IS NOT NULL
        UNION ALL
        SELECT 'inc', t.ticket_id, t.normalized_status, t.raw_status, t.cluster, t.owner,
               t.assigned_team, t.geo_source, t.created_at_service, t.first_seen_at, t.closed_at, t.geom, NULL
        FROM tickets.inc t
        WHERE t.normalized_status = 'closed' AND t.closed_at >= now() - interval '24 hours'
          AND t.geom IS NOT NULL
        UNION ALL
        SELECT 'crq', t.ticket_id, t.normalized_status, t.raw_status, t.cluster, t.owner,
               t.assigned_team, t.geo_source, t.created_at_service, t.first_seen_at, t.closed_at, t.geom, NULL
        FROM tickets.crq t
        WHERE t.normalized_status = 'open' AND t.geom IS NOT NULL
        UNION ALL
        SELECT 'crq', t.ticket_id, t.normalized_status, t.raw_status, t.cluster, t.owner,
               t.assigned_team, t.geo_source, t.created_at_service, t.first_seen_at, t.closed_at, t.geom, NULL
        FROM tickets.crq t
        WHERE t.normalized_status = 'closed' AND t.closed_at >= now() - interval '24 hours'
          AND t.geom IS NOT NULL
        ORDER BY dataset, ticket_id
    ), counts AS (
        SELECT 'inc' AS dataset, coalesce(normalized_status, 'unknown') AS status, count(*) AS n
        FROM tickets.inc GROUP BY 2
        UNION ALL
        SELECT 'crq', coalesce(normalized_status, 'unknown'), count(*) FROM tickets.crq GROUP BY 2
    ), unmapped AS MATERIALIZED (
        -- MATERIALIZED: referenced once, but from a per-dataset subquery, which would
        -- otherwise run both scans once per dataset.
        SELECT 'inc' AS dataset, count(*) AS n FROM tickets.inc WHERE normalized_status = 'open' AND geom IS NULL
        UNION ALL
        SELECT 'crq', count(*) FROM tickets.crq WHERE normalized_status = 'open' AND geom IS NULL
    )
    SELECT json_build_object(
        'type', 'FeatureCollection',
        'generated_at', now(),
        'closed_since', now() - interval '24 hours',
        'features', coalesce((
            SELECT json_agg(json_build_object(
                       'type', 'Feature',
                       'id', s.ticket_id,
                       'geometry', ST_AsGeoJSON(s.geom, 6)::json,
                       'properties', json_build_object(
                           'ticket_id', s.ticket_id,
                           'dataset', s.dataset,
                           'normalized_status', s.normalized_status,
                           'raw_status', s.raw_status,
                           'cluster', s.cluster,
                           'owner', s.owner,
                           'assigned_team', s.assigned_team,
                           'sla_state', s.sla_state,
                           'geo_source', s.geo_source,
                           'created_at_service', s.created_at_service,
                           'first_seen_at', s.first_seen_at,
                           'closed_at', s.closed_at)))
            FROM shown s), '[]'::json),
        'summary', (
            SELECT jsonb_object_agg(d.dataset, jsonb_build_object(
                       'total', coalesce((SELECT sum(n) FROM counts c WHERE c.dataset = d.dataset), 0),
                       'by_status', coalesce((SELECT jsonb_object_agg(c.status, c.n ORDER BY c.status)
                                              FROM counts c WHERE c.dataset = d.dataset), '{}'::jsonb),
                       'on_map', (SELECT count(*) FROM shown s WHERE s.dataset = d.dataset),
                       'on_map_by_status', coalesce((
                           SELECT jsonb_object_agg(x.status, x.n ORDER BY x.status)
                           FROM (SELECT coalesce(s.normalized_status, 'unknown') AS status, count(*) AS n
                                 FROM shown s WHERE s.dataset = d.dataset GROUP BY 1) x), '{}'::jsonb),
                       'open_without_geometry', (SELECT u.n FROM unmapped u WHERE u.dataset = d.dataset))
                   ORDER BY d.dataset)
            FROM (VALUES ('inc'), ('crq')) d(dataset)),
        'freshness', reporting.fn_freshness())::jsonb
$$;


-- --------------------------------------------------------------------------- dashboard

-- The INC dashboard. Arguments (each NULL or '' = no filter, except the window):
--   p_cluster  exact cluster name; one no INC ticket has is an error (a typo must not
--              look like an empty cluster).
--   p_status   which tickets are in scope: 'open' | 'closed' | an SLA state ('ok',
--              'at_risk', 'breached' = open tickets in that state). Every figure in the
--              payload is over the tickets in scope.
--   p_window   '<n>h' | '<n>d' | '<n>w' (up to 366 days): closures in [p_to - window,
--              p_to). p_from/p_to override it: [p_from, p_to), p_to defaulting to now().
-- Open tickets are the current state (no window); closed ones are closed in the window.
CREATE OR REPLACE FUNCTION reporting.fn_inc_dashboard(
    p_cluster text DEFAULT NULL,
    p_status text DEFAULT NULL,
    p_window text DEFAULT '7d',
    p_from timestamptz DEFAULT NULL,
    p_to timestamptz DEFAULT NULL
) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET jit = off SET work_mem = '64MB'
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
            SELECT v.* FROM tickets.inc_open_sla v
            WHERE v_open
              AND (v_cluster IS NULL OR v.cluster = v_cluster)
              AND (v_sla IS NULL OR v.sla_state = v_sla)
            ORDER BY v.sla_clock_start, v.ticket_id
        ), c AS MATERIALIZED (
            SELECT k.* FROM tickets.inc_closures k
            WHERE v_closed
              AND k.closed_at >= v_from AND k.closed_at < v_to
              AND (v_cluster IS NULL OR k.cluster = v_cluster)
            ORDER BY k.closed_at DESC, k.ticket_id
        ), u AS (
            SELECT 'open' AS kind, o.owner, o.assigned_team, o.sla_state, NULL::int AS minutes,
                   NULL::text AS sla_status
            FROM o
            UNION ALL
            SELECT 'closed', c.owner, c.assigned_team, NULL, c.mttr_minutes, c.sla_status FROM c
        ), breakdown AS (
            -- One pass over u for both breakdowns; GROUPING tells the two sets apart
            -- (a NULL owner or team is a real group, not the other set's rows).
            SELECT CASE WHEN GROUPING(u.owner) = 0 THEN 'owner' ELSE 'assigned_team' END AS dim,
                   coalesce(u.owner, u.assigned_team) AS k,
                   count(*) FILTER (WHERE kind = 'open') AS open,
                   count(*) FILTER (WHERE sla_state = 'breached') AS breached,
                   count(*) FILTER (WHERE sla_state = 'at_risk') AS at_risk,
                   count(*) FILTER (WHERE kind = 'closed') AS closed,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY minutes) AS mttr_median,
                   100.0 * count(*) FILTER (WHERE sla_status = 'met')
                       / nullif(count(*) FILTER (WHERE sla_status IS NOT NULL), 0) AS compliance
            FROM u GROUP BY GROUPING SETS ((u.owner), (u.assigned_team))
        )
        SELECT json_build_object(
            'generated_at', now(),
            'filters', json_build_object('cluster', v_cluster, 'status', v_status),
            'window', json_build_object('from', v_from, 'to', v_to,
                                         'label', CASE WHEN p_from IS NULL THEN v_window END),
            'open', json_build_object('type', 'FeatureCollection', 'features', coalesce((
                SELECT json_agg(json_build_object(
                           'type', 'Feature',
                           'id', o.ticket_id,
                           'geometry', ST_AsGeoJSON(o.geom, 6)::json,
                           'properties', json_build_object(
                               'ticket_id', o.ticket_id,
                               'cluster', o.cluster,
                               'owner', o.owner,
                               'assigned_team', o.assigned_team,
                               'raw_status', o.raw_status,
                               'sla_clock_start', o.sla_clock_start,
                               'age_hours', o.age_hours,
                               'hours_to_breach', o.hours_to_breach,
                               'sla_state', o.sla_state,
                               'geo_source', o.geo_source)))
                FROM o WHERE o.geom IS NOT NULL), '[]'::json)),
            'closed', json_build_object('type', 'FeatureCollection', 'features', coalesce((
                SELECT json_agg(json_build_object(
                           'type', 'Feature',
                           'id', c.ticket_id,
                           'geometry', ST_AsGeoJSON(c.geom, 6)::json,
                           'properties', json_build_object(
                               'ticket_id', c.ticket_id,
                               'cluster', c.cluster,
                               'owner', c.owner,
                               'assigned_team', c.assigned_team,
                               'raw_status', c.raw_status,
                               'sla_clock_start', c.sla_clock_start,
                               'closed_at', c.closed_at,
                               'mttr_minutes', c.mttr_minutes,
                               'sla_status', c.sla_status,
                               'geo_source', c.geo_source)))
                FROM c WHERE c.geom IS NOT NULL), '[]'::json)),
            'metrics', (
                SELECT json_build_object(
                    'open', (SELECT count(*) FROM o),
                    'open_without_geometry', (SELECT count(*) FROM o WHERE o.geom IS NULL),
                    'ok', (SELECT count(*) FROM o WHERE o.sla_state = 'ok'),
                    'at_risk', (SELECT count(*) FROM o WHERE o.sla_state = 'at_risk'),
                    'breached', (SELECT count(*) FROM o WHERE o.sla_state = 'breached'),
                    'closed', count(*),
                    'closed_sla_met', count(*) FILTER (WHERE c.sla_status = 'met'),
                    'mttr_median_minutes',
                        round(percentile_cont(0.5) WITHIN GROUP (ORDER BY c.mttr_minutes)::numeric, 1),
                    'mttr_p90_minutes',
                        round(percentile_cont(0.9) WITHIN GROUP (ORDER BY c.mttr_minutes)::numeric, 1),
                    'sla_compliance_pct',
                        round(100.0 * count(*) FILTER (WHERE c.sla_status = 'met')
                              / nullif(count(*) FILTER (WHERE c.sla_status IS NOT NULL), 0), 1))
                FROM c),
            'by_owner', coalesce((
                SELECT json_agg(json_build_object(
                           'owner', b.k, 'open', b.open, 'breached', b.breached, 'at_risk', b.at_risk,
                           'closed', b.closed, 'mttr_median_minutes', round(b.mttr_median::numeric, 1),
                           'sla_compliance_pct', round(b.compliance, 1))
                       ORDER BY b.open DESC, b.closed DESC, b.k NULLS LAST)
                FROM breakdown b WHERE b.dim = 'owner'), '[]'::json),
            'by_team', coalesce((
                SELECT json_agg(json_build_object(
                           'assigned_team', b.k, 'open', b.open, 'breached', b.breached, 'at_risk', b.at_risk,
                           'closed', b.closed, 'mttr_median_minutes', round(b.mttr_median::numeric, 1),
                           'sla_compliance_pct', round(b.compliance, 1))
                       ORDER BY b.open DESC, b.closed DESC, b.k NULLS LAST)
                FROM breakdown b WHERE b.dim = 'assigned_team'), '[]'::json),
            'freshness', reporting.fn_freshness())::jsonb
    );
END
$$;

-- --------------------------------------------------------------------------- history hook

-- capture_history() runs inside every INC file's transaction. Its point-in-time counts
-- read every open ticket: with a backlog of tens of thousands that was a pass over the
-- whole table per file (~70 ms). This index holds only the open tickets' clock starts
-- (INCLUDE: an expression alone cannot serve an index-only scan).
CREATE INDEX IF NOT EXISTS inc_open_sla_clock_idx ON tickets.inc ((coalesce(created_at_service, first_seen_at)))
    INCLUDE (created_at_service, first_seen_at) WHERE normalized_status = 'open';

-- As in 0004, but for the snapshot's counts (and jit off, which CREATE OR REPLACE resets).
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

    -- The days whose counts this file can have changed: today, and the days of the
    -- touched rows' clock starts and closures (a late file can close yesterday).
    SELECT array_agg(DISTINCT d) INTO v_days
    FROM (
        SELECT reporting.eat_day(now()) AS d
        UNION ALL
        SELECT reporting.eat_day(x.ts)
        FROM tickets.inc t
        CROSS JOIN LATERAL (VALUES (coalesce(t.created_at_service, t.first_seen_at)),
                                   (CASE WHEN t.normalized_status = 'closed' THEN t.closed_at END)) x(ts)
        WHERE t.updated_at = now() AND x.ts IS NOT NULL
    ) days;
    PERFORM tickets.refresh_inc_days(v_days);

    -- Point-in-time figures for the current EAT day: reporting.sla_state's boundaries
    -- written as clock ranges (age >= 48 h is clock <= now() - 48 h), so the counts are
    -- an index-only scan of inc_open_sla_clock_idx instead of a pass over the table.
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
END
$$;
