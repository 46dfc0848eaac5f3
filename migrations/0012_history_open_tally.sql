-- INC's history at a pass's end without counting what the table holds (issue 16).
--
-- capture_history_pass() (0009) ends every INC pass. Two of its counts grew with the
-- table, measured at 300k rows (194k open, ~14k clock starts a day):
--   capture_inc_today(): today's open_backlog, breached and at_risk counted every open
--     ticket (an index-only scan of inc_open_sla_clock_idx): 35-45 ms a pass, with or
--     without files;
--   refresh_inc_days(): opened/closed of each day the pass's files touched counted
--     that day's clock starts and closures: ~3-4 ms a day at that density.
-- Since this migration both read counters instead, kept by statement-level triggers in
-- the same transaction as every write (the technique of tickets.ticket_features, 0009),
-- so in every snapshot they hold exactly what the counts would:
--   tickets.inc_open_tally  the number of open INC tickets;
--   tickets.inc_day_tally   per EAT day, INC tickets whose SLA clock starts that day
--                           (opened) and closure events that day (closed).
-- What depends on the time of the capture is still read at the capture, from the
-- clocks: breached is the open tickets minus those whose clock is within the last 48 h
-- and those without a clock; at_risk is the clocks 36-48 h old. Those are range scans
-- of inc_open_sla_clock_idx bounded by two days of arrivals, not by the backlog. The
-- figures are 0009's exactly: no throttle, nothing stale, the same days recounted.
--
-- Why counters that do not classify by time (no tally of breached/at_risk advanced at
-- each capture): a writer's classification and a capture's advance of the instant race
-- under READ COMMITTED; a plain count is commutative (n = n + delta), so concurrent
-- writers only queue on a row and each adds its own change. Why not "skip the recount
-- when nothing changed": every pass that applies a file changes tickets, so it would
-- not help the pass that matters (one small delta).
-- A statement that moves no count (geocoding's UPDATEs, identical rows) writes no
-- counter row, so it never queues on one.

-- --------------------------------------------------------------------------- the counters

-- Written by the triggers below (SECURITY DEFINER: whoever may write tickets.inc or
-- closure_events keeps them current) and read by the capture; readers need neither
-- (0011's grant_roles gives the runtime role its data rights and the reader nothing).
CREATE TABLE IF NOT EXISTS tickets.inc_open_tally (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    open_count bigint NOT NULL
);
COMMENT ON TABLE tickets.inc_open_tally IS
    'count(*) of tickets.inc WHERE normalized_status = ''open'', kept by triggers (0012).';

CREATE TABLE IF NOT EXISTS tickets.inc_day_tally (
    day    date PRIMARY KEY,
    opened bigint NOT NULL DEFAULT 0,  -- tickets.inc rows whose SLA clock starts on day (EAT)
    closed bigint NOT NULL DEFAULT 0   -- tickets.closure_events rows closed on day (EAT)
);
COMMENT ON TABLE tickets.inc_day_tally IS
    'Per EAT day: INC clock starts (opened) and closure events (closed), kept by triggers (0012); '
    'read by refresh_inc_days().';

-- Add per-day changes (p_days[i] gets p_deltas[i], repeats summed) to inc_day_tally's
-- closed (p_closed) or opened column, in day order, so that concurrent writers lock rows
-- in one order. Days are eat_day() of finite instants: refresh_inc_days() counted
-- [eat_day_start(d), eat_day_start(d + 1)), which no infinite instant is in.
CREATE OR REPLACE FUNCTION tickets.inc_day_tally_add(p_days date[], p_deltas bigint[], p_closed boolean)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO tickets.inc_day_tally AS t (day, opened, closed)
    SELECT x.day, CASE WHEN p_closed THEN 0 ELSE sum(x.n) END, CASE WHEN p_closed THEN sum(x.n) ELSE 0 END
    FROM unnest(p_days, p_deltas) x(day, n)
    WHERE x.day IS NOT NULL AND isfinite(x.day)
    GROUP BY x.day
    HAVING sum(x.n) <> 0
    ORDER BY x.day
    ON CONFLICT (day) DO UPDATE SET opened = t.opened + EXCLUDED.opened, closed = t.closed + EXCLUDED.closed
$$;

-- tickets.inc: one statement's change to the open count and to each day's clock starts,
-- from its transition tables (grouped by day there: a baseline's statement holds
-- hundreds of thousands of rows, over a few weeks of days).
CREATE OR REPLACE FUNCTION tickets.inc_tally_sync() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_open bigint := 0;
    v_n bigint;
    v_days date[] := '{}';
    v_deltas bigint[] := '{}';
    d_days date[];
    d_deltas bigint[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE tickets.inc_open_tally SET open_count = 0 WHERE open_count <> 0;
        UPDATE tickets.inc_day_tally SET opened = 0 WHERE opened <> 0;
        RETURN NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT count(*) INTO v_n FROM new_rows n WHERE n.normalized_status = 'open';
        SELECT array_agg(g.day), array_agg(g.n) INTO d_days, d_deltas
        FROM (SELECT reporting.eat_day(coalesce(n.created_at_service, n.first_seen_at)) AS day, count(*) AS n
              FROM new_rows n GROUP BY 1) g;
        v_open := v_open + v_n;
        v_days := v_days || coalesce(d_days, '{}');
        v_deltas := v_deltas || coalesce(d_deltas, '{}');
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT count(*) INTO v_n FROM old_rows o WHERE o.normalized_status = 'open';
        SELECT array_agg(g.day), array_agg(-g.n) INTO d_days, d_deltas
        FROM (SELECT reporting.eat_day(coalesce(o.created_at_service, o.first_seen_at)) AS day, count(*) AS n
              FROM old_rows o GROUP BY 1) g;
        v_open := v_open - v_n;
        v_days := v_days || coalesce(d_days, '{}');
        v_deltas := v_deltas || coalesce(d_deltas, '{}');
    END IF;
    PERFORM tickets.inc_day_tally_add(v_days, v_deltas, false);
    IF v_open <> 0 THEN
        -- No row (deleted by hand): nothing to keep, and capture_inc_today() counts.
        UPDATE tickets.inc_open_tally SET open_count = open_count + v_open;
    END IF;
    RETURN NULL;
END
$$;

-- tickets.closure_events: append-only (0004 refuses UPDATE and DELETE), but counted
-- both ways all the same, should that trigger ever be set aside by hand.
CREATE OR REPLACE FUNCTION tickets.closure_tally_sync() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_days date[] := '{}';
    v_deltas bigint[] := '{}';
    d_days date[];
    d_deltas bigint[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE tickets.inc_day_tally SET closed = 0 WHERE closed <> 0;
        RETURN NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT array_agg(g.day), array_agg(g.n) INTO d_days, d_deltas
        FROM (SELECT reporting.eat_day(n.closed_at) AS day, count(*) AS n FROM new_rows n GROUP BY 1) g;
        v_days := v_days || coalesce(d_days, '{}');
        v_deltas := v_deltas || coalesce(d_deltas, '{}');
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT array_agg(g.day), array_agg(-g.n) INTO d_days, d_deltas
        FROM (SELECT reporting.eat_day(o.closed_at) AS day, count(*) AS n FROM old_rows o GROUP BY 1) g;
        v_days := v_days || coalesce(d_days, '{}');
        v_deltas := v_deltas || coalesce(d_deltas, '{}');
    END IF;
    PERFORM tickets.inc_day_tally_add(v_days, v_deltas, true);
    RETURN NULL;
END
$$;

-- CREATE TRIGGER takes SHARE ROW EXCLUSIVE on the table, which keeps writers out until
-- this migration commits: the counts below and the triggers start together.
-- Transition tables need one trigger per event.
DO $migration$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT * FROM (VALUES ('inc', 'inc_tally', 'tickets.inc_tally_sync()'),
                                   ('closure_events', 'closure_tally', 'tickets.closure_tally_sync()')) v(rel, name, fn)
    LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %1$s_ins ON tickets.%2$I', t.name, t.rel);
        EXECUTE format('DROP TRIGGER IF EXISTS %1$s_upd ON tickets.%2$I', t.name, t.rel);
        EXECUTE format('DROP TRIGGER IF EXISTS %1$s_del ON tickets.%2$I', t.name, t.rel);
        EXECUTE format('DROP TRIGGER IF EXISTS %1$s_trunc ON tickets.%2$I', t.name, t.rel);
        EXECUTE format('CREATE TRIGGER %1$s_ins AFTER INSERT ON tickets.%2$I '
                       'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %3$s',
                       t.name, t.rel, t.fn);
        EXECUTE format('CREATE TRIGGER %1$s_upd AFTER UPDATE ON tickets.%2$I '
                       'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT '
                       'EXECUTE FUNCTION %3$s', t.name, t.rel, t.fn);
        EXECUTE format('CREATE TRIGGER %1$s_del AFTER DELETE ON tickets.%2$I '
                       'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION %3$s',
                       t.name, t.rel, t.fn);
        EXECUTE format('CREATE TRIGGER %1$s_trunc AFTER TRUNCATE ON tickets.%2$I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION %3$s', t.name, t.rel, t.fn);
    END LOOP;
END
$migration$;

INSERT INTO tickets.inc_open_tally (id, open_count)
SELECT true, count(*) FROM tickets.inc WHERE normalized_status = 'open'
ON CONFLICT (id) DO UPDATE SET open_count = EXCLUDED.open_count;

DELETE FROM tickets.inc_day_tally;
INSERT INTO tickets.inc_day_tally (day, opened, closed)
SELECT day, sum(opened), sum(closed)
FROM (SELECT reporting.eat_day(coalesce(created_at_service, first_seen_at)) AS day, 1 AS opened, 0 AS closed
      FROM tickets.inc
      UNION ALL
      SELECT reporting.eat_day(closed_at), 0, 1 FROM tickets.closure_events) x
WHERE day IS NOT NULL AND isfinite(day)
GROUP BY day;

-- --------------------------------------------------------------------------- the capture

-- As 0004's: the days given, opened and closed as they are now, from the counters.
CREATE OR REPLACE FUNCTION tickets.refresh_inc_days(p_days date[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO tickets.inc_daily_snapshot AS s (day, opened, closed)
    SELECT d.day, coalesce(t.opened, 0), coalesce(t.closed, 0)
    FROM (SELECT DISTINCT unnest(p_days) AS day) d
    LEFT JOIN tickets.inc_day_tally t ON t.day = d.day
    WHERE d.day IS NOT NULL
    ON CONFLICT (day) DO UPDATE
        SET opened = EXCLUDED.opened, closed = EXCLUDED.closed, updated_at = now()
        WHERE (s.opened, s.closed) IS DISTINCT FROM (EXCLUDED.opened, EXCLUDED.closed)
$$;

-- Today's (EAT) point-in-time figures, equal to 0009's: one statement, so the counter
-- and the range scans read one snapshot. breached = open - (clock > now() - 48 h) -
-- (clock IS NULL), as reporting.sla_state gives a ticket without a clock no state;
-- at_risk is 0009's range as it was.
CREATE OR REPLACE FUNCTION tickets.capture_inc_today() RETURNS void
LANGUAGE sql AS $$
    UPDATE tickets.inc_daily_snapshot s
    SET open_backlog = p.open_backlog, breached = p.breached, at_risk = p.at_risk,
        captured_at = now(), updated_at = now()
    FROM (
        SELECT a.open_count AS open_backlog,
               a.open_count
                 - (SELECT count(*) FROM tickets.inc t
                    WHERE t.normalized_status = 'open'
                      AND coalesce(t.created_at_service, t.first_seen_at) > now() - interval '48 hours')
                 - (SELECT count(*) FROM tickets.inc t
                    WHERE t.normalized_status = 'open'
                      AND coalesce(t.created_at_service, t.first_seen_at) IS NULL) AS breached,
               (SELECT count(*) FROM tickets.inc t
                WHERE t.normalized_status = 'open'
                  AND coalesce(t.created_at_service, t.first_seen_at) <= now() - interval '36 hours'
                  AND coalesce(t.created_at_service, t.first_seen_at) > now() - interval '48 hours') AS at_risk
        -- Without the counter's row (deleted by hand), the count it stands for: slower,
        -- never wrong. COALESCE runs the subquery only then.
        FROM (SELECT coalesce((SELECT c.open_count FROM tickets.inc_open_tally c),
                              (SELECT count(*) FROM tickets.inc t WHERE t.normalized_status = 'open'))
                     AS open_count) a
    ) p
    WHERE s.day = reporting.eat_day(now());
$$;

COMMENT ON FUNCTION tickets.capture_inc_today() IS
    'Today''s (EAT) open_backlog, breached, at_risk: the open counter (inc_open_tally) and '
    'range scans of the last 48 h of clocks (0012).';
COMMENT ON FUNCTION tickets.refresh_inc_days(date[]) IS
    'opened/closed of the given EAT days into inc_daily_snapshot, from inc_day_tally (0012).';

-- --------------------------------------------------------------------------- pinning (0006)

SELECT tickets.pin_search_path(f::regprocedure) FROM unnest(ARRAY[
    'tickets.inc_day_tally_add(date[], bigint[], boolean)',
    'tickets.inc_tally_sync()',
    'tickets.closure_tally_sync()',
    'tickets.refresh_inc_days(date[])',
    'tickets.capture_inc_today()'
]) f;
