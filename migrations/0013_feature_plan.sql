-- The prepared features' writer (0009) in PL/pgSQL: the same expressions, planned once a
-- session instead of once a statement (issue 16).
--
-- ticket_feature() is a SQL function with a SET clause (TimeZone), which the planner
-- never inlines, and a SQL function that is not inlined is planned again for every
-- statement that calls it. The features trigger calls it once per write statement,
-- over the few rows a delta writes, so that planning was most of its cost: 2.0 ms for
-- a statement of 8 rows, of which the rows took 0.8. PL/pgSQL keeps the plan of its
-- SELECT for the session's life: 1.05 ms. The output is the same, byte for byte
-- (tests/test_read_side_prepared.py compares the documents with 0005's definitions).

CREATE OR REPLACE FUNCTION tickets.ticket_feature(
    p_dataset text, p_ticket_id text, p_status text, p_raw_status text, p_cluster text, p_owner text,
    p_team text, p_geo_source text, p_created timestamptz, p_first_seen timestamptz,
    p_closed_at timestamptz, p_geom geometry, p_mttr integer
) RETURNS tickets.ticket_features
LANGUAGE plpgsql STABLE SET TimeZone = 'UTC' AS $$
DECLARE
    r tickets.ticket_features;
BEGIN
    SELECT q.* INTO r FROM (
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
    ) q;
    RETURN r;
END
$$;

-- CREATE OR REPLACE dropped the pinned search_path (0006): pin it again.
SELECT tickets.pin_search_path('tickets.ticket_feature(text, text, text, text, text, text, text, text, '
                               'timestamptz, timestamptz, timestamptz, geometry, integer)'::regprocedure);
