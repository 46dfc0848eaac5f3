-- Every function of the tickets and reporting schemas works under any search_path.
--
-- pg_restore runs its session with search_path = '' (so does any role or tool that
-- hardens its path), and 0002's tickets.feed_point called PostGIS unqualified: a
-- `pg_dump -Fc` of a migrated database failed to restore, at CREATE TABLE tickets.inc
-- and tickets.crq, whose STORED feed_geom column inlines feed_point. Functions run
-- with the caller's search_path unless they pin their own, and pg_catalog is always
-- searched, so a function is safe anywhere if every other name in it (functions,
-- types, casts like ::geography, tables, the SQL it EXECUTEs) is schema-qualified or
-- pinned. Each function of 0001-0005 falls in one of three groups:
--
-- 1. Left as they are: hot, and already using only pg_catalog built-ins and
--    schema-qualified names of ours. They run per row in the STORED generated columns
--    (eat_ts, eat_ts_lenient, minutes_or_null, bool_or_null, float_or_null,
--    clean_location), per row in the stale-write guard of every upsert (key_name), per
--    row in the read side's views and set-based statements (reporting.sla_state,
--    eat_day, eat_day_start), or are as plain and IMMUTABLE as those (key_time). A SET
--    clause would cost them: a LANGUAGE sql function with SET is never inlined (and
--    clean_location relies on inlining, 0003), and SET on any function adds a GUC save
--    and restore to every call.
--
-- 2. Hot and calling PostGIS: only tickets.feed_point (feed_geom of every ticket row
--    version). Redefined below with its PostGIS calls qualified, so it stays an
--    inlinable LANGUAGE sql function. The schema is PostGIS's own, looked up here: a
--    shared database may keep PostGIS elsewhere than public. (postgis cannot be moved
--    with ALTER EXTENSION ... SET SCHEMA, so the name stays right.)
--
-- 3. Everything else is called once per file, per gazetteer change, per dashboard
--    request or by an operator, so a pinned search_path costs nothing measurable, and
--    pinning covers what qualifying by hand would miss: PostGIS types, casts and
--    functions in their bodies and in the DDL and queries they EXECUTE
--    (add_geo_columns' geometry/geography columns, resolve_geo's ST_AsEWKB,
--    fn_tickets_for_map's and fn_inc_dashboard's ST_AsGeoJSON). Some of them would
--    work unpinned (ticket_tables, capture_history, dashboard_error, ...); they are
--    pinned all the same, as it is free for them and keeps the rule short: only hot
--    functions go unpinned. pg_temp comes last so that a session's temporary table
--    cannot stand in for one of ours.
--
-- tests/test_search_path.py fails on any function in these schemas (not part of an
-- extension) that is neither pinned nor on its allowlist of groups 1 and 2. A later
-- CREATE OR REPLACE FUNCTION drops a function's SET clauses: such a migration must
-- pin the function again (as 0005 did for jit).

DO $migration$
DECLARE
    postgis name;
    fn regprocedure;
BEGIN
    SELECT n.nspname INTO postgis
    FROM pg_catalog.pg_extension e
    JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'postgis';
    IF postgis IS NULL THEN
        RAISE EXCEPTION 'the postgis extension is not installed in this database';
    END IF;

    -- Group 2: 0002's definition, with the PostGIS calls qualified.
    EXECUTE format($def$
        CREATE OR REPLACE FUNCTION tickets.feed_point(raw jsonb) RETURNS %1$I.geometry
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
            SELECT CASE
                WHEN tickets.float_or_null(raw->>'latitude') BETWEEN -90 AND 90
                 AND tickets.float_or_null(raw->>'longitude') BETWEEN -180 AND 180
                 AND NOT (tickets.float_or_null(raw->>'latitude') = 0 AND tickets.float_or_null(raw->>'longitude') = 0)
                THEN %1$I.ST_SetSRID(%1$I.ST_MakePoint(tickets.float_or_null(raw->>'longitude'),
                                                       tickets.float_or_null(raw->>'latitude')), 4326)
            END
        $$
        $def$, postgis);

    -- Group 3.
    FOREACH fn IN ARRAY ARRAY[
        -- dataset tables: DDL with PostGIS types and casts, run through EXECUTE
        'tickets.create_dataset_table(text)',
        'tickets.create_dataset_table_base(text)',
        'tickets.create_dataset_table_geo(text)',
        'tickets.add_geo_columns(text)',
        'tickets.add_location_key(text)',
        'tickets.ticket_tables()',
        -- geometry resolution, per file and per gazetteer change
        'tickets.resolve_ticket_geo(regclass, text)',
        'tickets.resolve_geo(regclass, text, text, text)',
        'tickets.apply_gazetteer(text, text)',
        'tickets.geo_clusters_changed()',
        'tickets.geo_locations_changed()',
        'tickets.geo_wanted()',
        -- history: INC's post_apply hook, per file
        'tickets.capture_history()',
        'tickets.refresh_inc_days(date[])',
        'tickets.closure_events_append_only()',
        -- the dashboards' functions, per request
        'reporting.fn_freshness()',
        'reporting.fn_tickets_for_map()',
        'reporting.fn_inc_dashboard(text, text, text, timestamptz, timestamptz)',
        'reporting.dashboard_error(text, text)'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, tickets, reporting, pg_temp',
                       fn, postgis);
    END LOOP;
END
$migration$;
