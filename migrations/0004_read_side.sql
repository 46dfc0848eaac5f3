-- The read side: what the FleetOps dashboards query directly (names and shapes are
-- fixed by issue 5; docs/read_side.md is the reference).
--
--   tickets.inc_open_sla          open INC tickets against the 48 h SLA, as of now()
--   reporting.fn_tickets_for_map  GeoJSON of open (and just-closed) INC ∪ CRQ tickets
--   reporting.fn_inc_dashboard    the INC dashboard: open, closed in a window, metrics
--   tickets.closure_events        append-only: one row per observed INC closure
--   tickets.inc_daily_snapshot    per EAT day: backlog, opened, closed, breached, at risk
--   tickets.capture_history()     INC's post_apply hook that writes the two tables above
--
-- Conventions used throughout:
--   * "open" means normalized_status = 'open' and "closed" normalized_status = 'closed'
--     (the feed's two values). Anything else is neither, and shows up only in counts
--     by status, so a new upstream status is visible rather than silently mis-bucketed.
--   * The SLA clock starts at created_at_service, else first_seen_at (FEED.md: the
--     service time is missing on ~30% of rows, mostly open ones).
--   * Days are EAT (UTC+3, no DST) calendar days, the fixed offset tickets.eat_ts uses.

CREATE SCHEMA IF NOT EXISTS reporting;

-- --------------------------------------------------------------------------- helpers

-- The SLA is 48 h; at_risk starts 12 h before that. Boundaries are inclusive at the
-- lower end (exactly 36 h is at_risk, exactly 48 h breached), compared as intervals
-- rather than rounded hours so a boundary cannot move with display rounding. No clock
-- at all (neither timestamp readable) has no state: NULL, not a guess.
CREATE OR REPLACE FUNCTION reporting.sla_state(p_clock timestamptz, p_at timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p_clock IS NULL OR p_at IS NULL THEN NULL
        WHEN p_at - p_clock >= interval '48 hours' THEN 'breached'
        WHEN p_at - p_clock >= interval '36 hours' THEN 'at_risk'
        ELSE 'ok'
    END
$$;

-- The EAT calendar day of an instant, and the instant an EAT day starts (21:00 UTC the
-- day before). Fixed +3 h like tickets.eat_ts, so both stay IMMUTABLE and indexable.
CREATE OR REPLACE FUNCTION reporting.eat_day(p_ts timestamptz) RETURNS date
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT ((p_ts AT TIME ZONE 'UTC') + interval '3 hours')::date
$$;

CREATE OR REPLACE FUNCTION reporting.eat_day_start(p_day date) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT (p_day::timestamp - interval '3 hours') AT TIME ZONE 'UTC'
$$;

-- The time in a change file's name (EAT, CONTRACT.md semantic 1) as an instant; NULL
-- for a key whose name carries no timestamp.
CREATE OR REPLACE FUNCTION reporting.key_time(p_key text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT tickets.eat_ts(regexp_replace(tickets.key_name(p_key),
                                         '^(\d{4}-\d{2}-\d{2})T(\d{2})-(\d{2})-(\d{2})\.csv$',
                                         '\1 \2:\3:\4'))
$$;

-- Per dataset, what the last drain and listing recorded (tickets.import_meta): the
-- watermark and its time, the newest source key and pending files as last seen, when
-- the source was last listed, and a blocked key. Dashboards cannot list S3; this is
-- how they tell "no new tickets" from "the feed is stuck". inc and crq always appear,
-- with nulls before their first drain.
CREATE OR REPLACE FUNCTION reporting.fn_freshness() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_object_agg(d.dataset, jsonb_build_object(
        'watermark_key', m.metadata->>'source_max_key',
        'watermark_at', reporting.key_time(m.metadata->>'source_max_key'),
        'last_applied_at', m.last_applied_at,
        'newest_key', m.metadata->>'newest_key',
        'newest_at', reporting.key_time(m.metadata->>'newest_key'),
        'source_checked_at', (m.metadata->>'source_checked_at')::timestamptz,
        'pending_files', (m.metadata->>'pending_files')::int,
        'pending_files_remaining', r.remaining,
        -- As fleettickets_source_lag_seconds: newest minus watermark, 0 when caught up.
        'lag_seconds', CASE WHEN r.remaining = 0 THEN 0
                            ELSE greatest(0, extract(epoch FROM
                                     reporting.key_time(m.metadata->>'newest_key')
                                     - reporting.key_time(m.metadata->>'source_max_key'))) END,
        'blocked_key', m.blocked_key,
        'blocked_reason', m.blocked_reason) ORDER BY d.dataset)
    FROM (SELECT dataset FROM tickets.import_meta UNION SELECT unnest(ARRAY['inc', 'crq'])) d
    LEFT JOIN tickets.import_meta m USING (dataset)
    -- pending_files is counted when the drain lists the source, before it applies
    -- anything; the ledger rows written since then are the files it has dealt with.
    CROSS JOIN LATERAL (
        SELECT greatest(0, (m.metadata->>'pending_files')::int - (
                   SELECT count(*) FROM tickets.ingest_files f
                   WHERE f.dataset = d.dataset
                     AND f.applied_at >= (m.metadata->>'source_checked_at')::timestamptz)) AS remaining
    ) r
$$;

-- --------------------------------------------------------------------------- indexes

-- Every read starts from the open tickets (a minority of a full-state table that keeps
-- weeks of closures): a partial index keeps that a small, cluster-ordered scan.
CREATE INDEX IF NOT EXISTS inc_open_cluster_idx ON tickets.inc (cluster) WHERE normalized_status = 'open';
CREATE INDEX IF NOT EXISTS crq_open_cluster_idx ON tickets.crq (cluster) WHERE normalized_status = 'open';
-- capture_history() finds the rows of the file being applied by updated_at = now().
CREATE INDEX IF NOT EXISTS inc_updated_at_idx ON tickets.inc (updated_at);
-- "Opened on day D" counts by SLA clock start. The INCLUDE columns let the planner use
-- an index-only scan (it cannot match an expression alone for that), which keeps the
-- per-file snapshot refresh off the heap.
CREATE INDEX IF NOT EXISTS inc_sla_clock_idx ON tickets.inc ((coalesce(created_at_service, first_seen_at)))
    INCLUDE (created_at_service, first_seen_at);

-- --------------------------------------------------------------------------- SLA view

-- age_hours and hours_to_breach are rounded for display only; sla_state is computed
-- from the exact interval (reporting.sla_state). All three use now(): within one
-- transaction they agree with each other and with the functions below.
CREATE OR REPLACE VIEW tickets.inc_open_sla AS
SELECT t.ticket_id,
       t.cluster,
       t.owner,
       t.assigned_team,
       c.clock AS sla_clock_start,
       round(extract(epoch FROM now() - c.clock) / 3600, 2) AS age_hours,
       round(48 - extract(epoch FROM now() - c.clock) / 3600, 2) AS hours_to_breach,
       reporting.sla_state(c.clock, now()) AS sla_state,
       t.geom,
       t.geog,
       t.latitude,
       t.longitude,
       t.geo_source,
       t.raw_status,
       t.region,
       t.location_name,
       t.created_at_service,
       t.first_seen_at,
       t.source_key
FROM tickets.inc t
CROSS JOIN LATERAL (SELECT coalesce(t.created_at_service, t.first_seen_at) AS clock) c
WHERE t.normalized_status = 'open';

COMMENT ON VIEW tickets.inc_open_sla IS
    'Open INC tickets against the 48 h SLA (clock: created_at_service, else first_seen_at), as of now().';

-- --------------------------------------------------------------------------- history

-- One row per observed closure. The key is (ticket_id, closed_at): re-applying a file,
-- a re-export of a key and a late file all observe the same closure again and insert
-- nothing; a ticket reopened and closed again gets a second row (a new closed_at).
-- mttr_minutes is the feed's mttr, else closed_at minus the SLA clock; sla_status is
-- ours against the 48 h contract ('met' | 'breached'), feed_sla_status the export's own
-- verdict, which uses a different target and is kept only for comparison.
CREATE TABLE IF NOT EXISTS tickets.closure_events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ticket_id       text NOT NULL,
    closed_at       timestamptz NOT NULL,
    observed_at     timestamptz NOT NULL DEFAULT now(),
    source_key      text NOT NULL,
    sla_clock_start timestamptz,
    mttr_minutes    integer,
    sla_status      text CHECK (sla_status IN ('met', 'breached')),
    feed_sla_status text,
    owner           text,
    assigned_team   text,
    cluster         text,
    CONSTRAINT closure_events_ticket_closed_key UNIQUE (ticket_id, closed_at)
);
CREATE INDEX IF NOT EXISTS closure_events_closed_at_idx ON tickets.closure_events (closed_at);

-- Append-only means append-only: history that can be edited is not history. TRUNCATE
-- stays possible as a deliberate operator action.
CREATE OR REPLACE FUNCTION tickets.closure_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'tickets.closure_events is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
DROP TRIGGER IF EXISTS closure_events_append_only ON tickets.closure_events;
CREATE TRIGGER closure_events_append_only BEFORE UPDATE OR DELETE ON tickets.closure_events
    FOR EACH ROW EXECUTE FUNCTION tickets.closure_events_append_only();

-- A closed INC ticket as a closure event; capture_history() and the backfill below both
-- read it. Resolution minutes are the feed's mttr when given (it counts from the
-- service's own creation time even when the export left created_at_service empty),
-- else closed_at minus the SLA clock. Met means under 48 h, as in sla_state.
CREATE OR REPLACE VIEW tickets.inc_closures AS
SELECT t.ticket_id,
       t.closed_at,
       t.updated_at,
       t.source_key,
       r.clock AS sla_clock_start,
       r.minutes AS mttr_minutes,
       CASE WHEN r.minutes < 48 * 60 THEN 'met' WHEN r.minutes >= 48 * 60 THEN 'breached' END AS sla_status,
       t.sla_status AS feed_sla_status,
       t.owner,
       t.assigned_team,
       t.cluster,
       t.geom,
       t.geo_source,
       t.raw_status
FROM tickets.inc t
CROSS JOIN LATERAL (
    SELECT coalesce(t.created_at_service, t.first_seen_at) AS clock,
           coalesce(t.mttr_minutes,
                    round(extract(epoch FROM t.closed_at
                                             - coalesce(t.created_at_service, t.first_seen_at)) / 60)::int
           ) AS minutes
) r
WHERE t.normalized_status = 'closed' AND t.closed_at IS NOT NULL;

-- One row per EAT day. opened/closed are counts recomputed from the tables whenever a
-- file touches that day (so late files correct them); open_backlog, breached and
-- at_risk are point-in-time and can only be observed while the day is current: they
-- hold the last capture of that day (captured_at), and stay NULL for a day on which no
-- INC file was applied.
CREATE TABLE IF NOT EXISTS tickets.inc_daily_snapshot (
    day          date PRIMARY KEY,
    open_backlog integer,
    opened       integer NOT NULL DEFAULT 0,
    closed       integer NOT NULL DEFAULT 0,
    breached     integer,
    at_risk      integer,
    captured_at  timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- opened = INC tickets whose SLA clock starts that day; closed = closure events that day.
CREATE OR REPLACE FUNCTION tickets.refresh_inc_days(p_days date[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO tickets.inc_daily_snapshot AS s (day, opened, closed)
    SELECT d.day,
           (SELECT count(*) FROM tickets.inc t
            WHERE coalesce(t.created_at_service, t.first_seen_at) >= reporting.eat_day_start(d.day)
              AND coalesce(t.created_at_service, t.first_seen_at) < reporting.eat_day_start(d.day + 1)),
           (SELECT count(*) FROM tickets.closure_events e
            WHERE e.closed_at >= reporting.eat_day_start(d.day)
              AND e.closed_at < reporting.eat_day_start(d.day + 1))
    FROM (SELECT DISTINCT unnest(p_days) AS day) d
    WHERE d.day IS NOT NULL
    ON CONFLICT (day) DO UPDATE
        SET opened = EXCLUDED.opened, closed = EXCLUDED.closed, updated_at = now()
        WHERE (s.opened, s.closed) IS DISTINCT FROM (EXCLUDED.opened, EXCLUDED.closed)
$$;

-- INC's post_apply hook: the engine calls it inside each file's transaction, after the
-- upsert (fleetticketsd/apply.py), so the history commits with the file or not at all.
--
-- Which rows did this file touch? The upsert stamps every row it inserts or changes
-- with updated_at = now() (insert: the column default; update: SET updated_at = now()),
-- and now() is the transaction's start time, constant for the whole file. So
-- updated_at = now() is exactly "written in this transaction" (inc_updated_at_idx makes
-- it an index scan). The alternative, source_key = the greatest key, is wrong for a late
-- file (its key is not the greatest) and for a re-export of the current key.
-- Rows the file left alone (identical content, or refused by the stale-write guard
-- because a newer file already wrote them) are not touched and need nothing: whatever
-- they say was captured when it was written. If several files ever share one
-- transaction (a dry run does), the touched set is their union, which is harmless:
-- every step below is idempotent.
CREATE OR REPLACE FUNCTION tickets.capture_history() RETURNS void
LANGUAGE plpgsql AS $$
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

    -- Point-in-time figures for the current EAT day.
    UPDATE tickets.inc_daily_snapshot s
    SET open_backlog = p.open_backlog, breached = p.breached, at_risk = p.at_risk,
        captured_at = now(), updated_at = now()
    FROM (
        SELECT count(*) AS open_backlog,
               count(*) FILTER (WHERE v.sla_state = 'breached') AS breached,
               count(*) FILTER (WHERE v.sla_state = 'at_risk') AS at_risk
        FROM tickets.inc_open_sla v
    ) p
    WHERE s.day = reporting.eat_day(now());
END
$$;

COMMENT ON FUNCTION tickets.capture_history() IS
    'INC post_apply hook: records closures and refreshes the daily snapshot for the rows of the current file.';

-- Start the history from what the table already holds, so enabling the hook on a
-- running system does not begin with an empty past. observed_at is when the row was
-- last written: the best record of when we first saw it closed.
INSERT INTO tickets.closure_events
    (ticket_id, closed_at, observed_at, source_key, sla_clock_start, mttr_minutes, sla_status,
     feed_sla_status, owner, assigned_team, cluster)
SELECT ticket_id, closed_at, updated_at, source_key, sla_clock_start, mttr_minutes, sla_status,
       feed_sla_status, owner, assigned_team, cluster
FROM tickets.inc_closures
ON CONFLICT ON CONSTRAINT closure_events_ticket_closed_key DO NOTHING;

SELECT tickets.refresh_inc_days(array_agg(DISTINCT reporting.eat_day(d)))
FROM (SELECT coalesce(created_at_service, first_seen_at) AS d FROM tickets.inc
      UNION SELECT closed_at FROM tickets.closure_events) x
WHERE d IS NOT NULL;

-- --------------------------------------------------------------------------- map

-- The routing map: INC ∪ CRQ tickets with a point that are open, or closed within the
-- last 24 h (so a dispatcher sees what was just done). Older closures are weeks of a
-- full-state table; putting them all on a map is neither readable nor fast (issue 5's
-- 300 ms target over 100k tickets). The summary counts every ticket, mapped or not,
-- by dataset and status, plus how many open tickets lack a point, so a map with holes
-- says so. sla_state is given for open INC only: CRQ has no agreed SLA yet.
CREATE OR REPLACE FUNCTION reporting.fn_tickets_for_map() RETURNS jsonb
LANGUAGE sql STABLE AS $$
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
    ), counts AS (
        SELECT 'inc' AS dataset, coalesce(normalized_status, 'unknown') AS status, count(*) AS n
        FROM tickets.inc GROUP BY 2
        UNION ALL
        SELECT 'crq', coalesce(normalized_status, 'unknown'), count(*) FROM tickets.crq GROUP BY 2
    ), unmapped AS (
        SELECT 'inc' AS dataset, count(*) AS n FROM tickets.inc WHERE normalized_status = 'open' AND geom IS NULL
        UNION ALL
        SELECT 'crq', count(*) FROM tickets.crq WHERE normalized_status = 'open' AND geom IS NULL
    )
    SELECT jsonb_build_object(
        'type', 'FeatureCollection',
        'generated_at', now(),
        'closed_since', now() - interval '24 hours',
        'features', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'type', 'Feature',
                       'id', s.ticket_id,
                       'geometry', ST_AsGeoJSON(s.geom, 6)::jsonb,
                       'properties', jsonb_build_object(
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
                           'closed_at', s.closed_at))
                   ORDER BY s.dataset, s.ticket_id)
            FROM shown s), '[]'::jsonb),
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
        'freshness', reporting.fn_freshness())
$$;

COMMENT ON FUNCTION reporting.fn_tickets_for_map() IS
    'GeoJSON FeatureCollection of open and last-24h-closed INC and CRQ tickets with a point, with summary and freshness.';

-- --------------------------------------------------------------------------- dashboard

CREATE OR REPLACE FUNCTION reporting.dashboard_error(p_argument text, p_message text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%: %', p_argument, p_message
        USING ERRCODE = 'invalid_parameter_value', HINT = 'see docs/read_side.md, fn_inc_dashboard';
END
$$;

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
LANGUAGE plpgsql STABLE AS $$
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
        ), c AS MATERIALIZED (
            SELECT k.* FROM tickets.inc_closures k
            WHERE v_closed
              AND k.closed_at >= v_from AND k.closed_at < v_to
              AND (v_cluster IS NULL OR k.cluster = v_cluster)
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
        SELECT jsonb_build_object(
            'generated_at', now(),
            'filters', jsonb_build_object('cluster', v_cluster, 'status', v_status),
            'window', jsonb_build_object('from', v_from, 'to', v_to,
                                         'label', CASE WHEN p_from IS NULL THEN v_window END),
            'open', jsonb_build_object('type', 'FeatureCollection', 'features', coalesce((
                SELECT jsonb_agg(jsonb_build_object(
                           'type', 'Feature',
                           'id', o.ticket_id,
                           'geometry', ST_AsGeoJSON(o.geom, 6)::jsonb,
                           'properties', jsonb_build_object(
                               'ticket_id', o.ticket_id,
                               'cluster', o.cluster,
                               'owner', o.owner,
                               'assigned_team', o.assigned_team,
                               'raw_status', o.raw_status,
                               'sla_clock_start', o.sla_clock_start,
                               'age_hours', o.age_hours,
                               'hours_to_breach', o.hours_to_breach,
                               'sla_state', o.sla_state,
                               'geo_source', o.geo_source))
                       ORDER BY o.sla_clock_start, o.ticket_id)
                FROM o WHERE o.geom IS NOT NULL), '[]'::jsonb)),
            'closed', jsonb_build_object('type', 'FeatureCollection', 'features', coalesce((
                SELECT jsonb_agg(jsonb_build_object(
                           'type', 'Feature',
                           'id', c.ticket_id,
                           'geometry', ST_AsGeoJSON(c.geom, 6)::jsonb,
                           'properties', jsonb_build_object(
                               'ticket_id', c.ticket_id,
                               'cluster', c.cluster,
                               'owner', c.owner,
                               'assigned_team', c.assigned_team,
                               'raw_status', c.raw_status,
                               'sla_clock_start', c.sla_clock_start,
                               'closed_at', c.closed_at,
                               'mttr_minutes', c.mttr_minutes,
                               'sla_status', c.sla_status,
                               'geo_source', c.geo_source))
                       ORDER BY c.closed_at DESC, c.ticket_id)
                FROM c WHERE c.geom IS NOT NULL), '[]'::jsonb)),
            'metrics', (
                SELECT jsonb_build_object(
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
                SELECT jsonb_agg(jsonb_build_object(
                           'owner', b.k, 'open', b.open, 'breached', b.breached, 'at_risk', b.at_risk,
                           'closed', b.closed, 'mttr_median_minutes', round(b.mttr_median::numeric, 1),
                           'sla_compliance_pct', round(b.compliance, 1))
                       ORDER BY b.open DESC, b.closed DESC, b.k NULLS LAST)
                FROM breakdown b WHERE b.dim = 'owner'), '[]'::jsonb),
            'by_team', coalesce((
                SELECT jsonb_agg(jsonb_build_object(
                           'assigned_team', b.k, 'open', b.open, 'breached', b.breached, 'at_risk', b.at_risk,
                           'closed', b.closed, 'mttr_median_minutes', round(b.mttr_median::numeric, 1),
                           'sla_compliance_pct', round(b.compliance, 1))
                       ORDER BY b.open DESC, b.closed DESC, b.k NULLS LAST)
                FROM breakdown b WHERE b.dim = 'assigned_team'), '[]'::jsonb),
            'freshness', reporting.fn_freshness())
    );
END
$$;

COMMENT ON FUNCTION reporting.fn_inc_dashboard(text, text, text, timestamptz, timestamptz) IS
    'INC dashboard: open tickets (GeoJSON), closures in a window (GeoJSON), SLA/MTTR metrics, '
    'breakdowns by owner and team, freshness. See docs/read_side.md.';

-- Both functions build tens of thousands of jsonb features over a 100k-ticket table:
-- JIT compilation costs more than it saves at that size (hundreds of ms), and the
-- default 4 MB work_mem spills their sorts and aggregates to disk.
ALTER FUNCTION reporting.fn_tickets_for_map() SET jit = off;
ALTER FUNCTION reporting.fn_tickets_for_map() SET work_mem = '64MB';
ALTER FUNCTION reporting.fn_inc_dashboard(text, text, text, timestamptz, timestamptz) SET jit = off;
ALTER FUNCTION reporting.fn_inc_dashboard(text, text, text, timestamptz, timestamptz) SET work_mem = '64MB';
ALTER FUNCTION tickets.capture_history() SET jit = off;
