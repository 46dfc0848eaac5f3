-- The database of the loader fleetticketsd replaces, rebuilt from ../shared/LEGACY.md
-- for the adoption tests. Each "-- migration: NAME" section is one of the loader's
-- migration files; tests/legacy/loader.py runs them in order and records each name in
-- the loader's own ledger, as its run_migrations.py did. Where LEGACY.md is silent
-- (column names beyond those it lists, bodies of functions), this is a plausible
-- reconstruction, and the adoption must not depend on more than LEGACY.md promises.

-- migration: 01_tickets_schema.sql
CREATE EXTENSION IF NOT EXISTS postgis;
CREATE SCHEMA IF NOT EXISTS tickets;
CREATE SCHEMA IF NOT EXISTS reporting;

CREATE TABLE tickets.inc (
    ticket_id   text PRIMARY KEY,
    raw         jsonb NOT NULL,
    geom        geometry(Point, 4326),
    geo_source  text,
    ingested_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE tickets.crq (LIKE tickets.inc INCLUDING ALL);

CREATE TABLE tickets.geo_clusters (
    cluster    text PRIMARY KEY,
    geom       geometry(Point, 4326),
    verified   boolean NOT NULL DEFAULT false,
    provider   text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE tickets.geo_locations (
    id           serial PRIMARY KEY,
    cluster      text NOT NULL,
    location     text NOT NULL,
    geom         geometry(Point, 4326),
    display_name text,
    verified     boolean NOT NULL DEFAULT false,
    provider     text,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (cluster, location)
);

-- The loader's own cleaning of a location name (network codes stripped).
CREATE FUNCTION tickets.location_key(p_name text, p_cluster text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT nullif(btrim(regexp_replace(regexp_replace(regexp_replace(
        coalesce(p_name, ''), '(^|[\s_,])FDT\s*\d+.*$', ''),
        '^(\s*(NW_|ADR_MNT_|SDUS[\s_]+))+', ''),
        '^' || upper(replace(coalesce(p_cluster, ''), ' ', '_')) || '_', '')), '')
$$;

CREATE FUNCTION tickets.resolve_geom() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    g geometry;
BEGIN
    SELECT l.geom INTO g FROM tickets.geo_locations l
    WHERE l.cluster = NEW.raw->>'cluster'
      AND l.location = tickets.location_key(NEW.raw->>'location_name', NEW.raw->>'cluster')
      AND l.geom IS NOT NULL;
    IF g IS NOT NULL THEN
        NEW.geom := g; NEW.geo_source := 'location';
        RETURN NEW;
    END IF;
    SELECT c.geom INTO g FROM tickets.geo_clusters c WHERE c.cluster = NEW.raw->>'cluster';
    NEW.geom := g;
    NEW.geo_source := CASE WHEN g IS NOT NULL THEN 'cluster' END;
    RETURN NEW;
END
$$;
CREATE TRIGGER inc_resolve_geom BEFORE INSERT OR UPDATE OF raw ON tickets.inc
    FOR EACH ROW EXECUTE FUNCTION tickets.resolve_geom();
CREATE TRIGGER crq_resolve_geom BEFORE INSERT OR UPDATE OF raw ON tickets.crq
    FOR EACH ROW EXECUTE FUNCTION tickets.resolve_geom();

CREATE FUNCTION reporting.fn_tickets_for_map() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('type', 'FeatureCollection', 'features', '[]'::jsonb)
$$;

-- migration: 02_import_meta.sql
CREATE TABLE tickets.import_meta (
    dataset    text PRIMARY KEY,
    metadata   jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION reporting.fn_tickets_for_map() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'type', 'FeatureCollection',
        'features', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                'type', 'Feature', 'id', t.ticket_id,
                'geometry', ST_AsGeoJSON(t.geom)::jsonb,
                'properties', jsonb_build_object('ticket_id', t.ticket_id, 'cluster', t.raw->>'cluster')))
            FROM tickets.inc t WHERE t.raw->>'normalized_status' = 'open' AND t.geom IS NOT NULL),
            '[]'::jsonb),
        'summary', jsonb_build_object(
            'freshness', (SELECT jsonb_object_agg(dataset, metadata) FROM tickets.import_meta)))
$$;

-- migration: 03_inc_columns.sql
CREATE FUNCTION tickets.eat_ts(v text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN v ~ '^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}$'
                THEN (replace(v, 'T', ' ')::timestamp - interval '3 hours') AT TIME ZONE 'UTC' END
$$;

ALTER TABLE tickets.inc
    ADD COLUMN normalized_status text GENERATED ALWAYS AS (lower(raw->>'normalized_status')) STORED,
    ADD COLUMN raw_status text GENERATED ALWAYS AS (raw->>'raw_status') STORED,
    ADD COLUMN bucket text GENERATED ALWAYS AS (raw->>'bucket') STORED,
    ADD COLUMN is_actionable boolean GENERATED ALWAYS AS ((raw->>'is_actionable') = 'true') STORED,
    ADD COLUMN is_alarm boolean GENERATED ALWAYS AS ((raw->>'is_alarm') = 'true') STORED,
    ADD COLUMN is_auto_created boolean GENERATED ALWAYS AS ((raw->>'is_auto_created') = 'true') STORED,
    ADD COLUMN is_auto_closed boolean GENERATED ALWAYS AS ((raw->>'is_auto_closed') = 'true') STORED,
    ADD COLUMN service_type text GENERATED ALWAYS AS (raw->>'service_type') STORED,
    ADD COLUMN cluster text GENERATED ALWAYS AS (raw->>'cluster') STORED,
    ADD COLUMN region text GENERATED ALWAYS AS (raw->>'region') STORED,
    ADD COLUMN location_name text GENERATED ALWAYS AS (raw->>'location_name') STORED,
    ADD COLUMN assigned_team text GENERATED ALWAYS AS (nullif(raw->>'assigned_team', '')) STORED,
    ADD COLUMN owner text GENERATED ALWAYS AS (nullif(raw->>'owner', '')) STORED,
    ADD COLUMN sla_status text GENERATED ALWAYS AS (nullif(raw->>'sla_status', '')) STORED,
    ADD COLUMN mttr numeric GENERATED ALWAYS AS (nullif(raw->>'mttr', '')::numeric) STORED,
    ADD COLUMN created_at_service timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'created_at_service')) STORED,
    ADD COLUMN scheduled_at timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'scheduled_at')) STORED,
    ADD COLUMN closed_at timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'closed_at')) STORED,
    ADD COLUMN first_seen_at timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'first_seen_at')) STORED,
    ADD COLUMN last_seen_at timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'last_seen_at')) STORED,
    ADD COLUMN source_created_at timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'created_at')) STORED,
    ADD COLUMN source_updated_at timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'updated_at')) STORED;
CREATE INDEX inc_status_idx ON tickets.inc (normalized_status);
CREATE INDEX inc_cluster_idx ON tickets.inc (cluster);

-- migration: 04_inc_latlng.sql
ALTER TABLE tickets.inc
    ADD COLUMN latitude double precision
        GENERATED ALWAYS AS (coalesce(nullif(raw->>'latitude', '')::double precision, ST_Y(geom))) STORED,
    ADD COLUMN longitude double precision
        GENERATED ALWAYS AS (coalesce(nullif(raw->>'longitude', '')::double precision, ST_X(geom))) STORED;

-- migration: 05_inc_geography.sql
ALTER TABLE tickets.inc ADD COLUMN geog geography(Point, 4326) GENERATED ALWAYS AS (geom::geography) STORED;
CREATE INDEX inc_geog_idx ON tickets.inc USING gist (geog);

-- migration: 06_inc_mttr_minutes.sql
ALTER TABLE tickets.inc DROP COLUMN mttr;
ALTER TABLE tickets.inc ADD COLUMN mttr integer
    GENERATED ALWAYS AS (round(nullif(raw->>'mttr', '')::numeric)::integer) STORED;
ALTER TABLE tickets.inc DROP COLUMN is_alarm, DROP COLUMN is_auto_created, DROP COLUMN is_auto_closed;

-- migration: 07_inc_drop_service_type.sql
ALTER TABLE tickets.inc DROP COLUMN service_type;

-- migration: 08_inc_open_sla_view.sql
CREATE VIEW tickets.inc_open_sla AS
SELECT t.ticket_id, t.cluster, t.owner, t.assigned_team,
       coalesce(t.created_at_service, t.first_seen_at) AS sla_clock_start,
       round(extract(epoch FROM now() - coalesce(t.created_at_service, t.first_seen_at)) / 3600, 2) AS age_hours,
       CASE WHEN now() - coalesce(t.created_at_service, t.first_seen_at) >= interval '48 hours' THEN 'breached'
            WHEN now() - coalesce(t.created_at_service, t.first_seen_at) >= interval '36 hours' THEN 'at_risk'
            ELSE 'ok' END AS sla_state,
       t.geom, t.latitude, t.longitude
FROM tickets.inc t
WHERE t.normalized_status = 'open';

-- migration: 09_inc_dashboard_fn.sql
CREATE FUNCTION reporting.fn_inc_dashboard(
    p_cluster text DEFAULT NULL,
    p_status text DEFAULT NULL,
    p_window text DEFAULT '7d',
    p_from timestamptz DEFAULT NULL,
    p_to timestamptz DEFAULT NULL
) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'open', (SELECT count(*) FROM tickets.inc_open_sla v WHERE p_cluster IS NULL OR v.cluster = p_cluster))
$$;

-- migration: 10_inc_history_capture.sql
CREATE TABLE tickets.closure_events (
    id          bigserial PRIMARY KEY,
    ticket_id   text NOT NULL,
    closed_at   timestamptz NOT NULL,
    observed_at timestamptz NOT NULL DEFAULT now(),
    cluster     text,
    owner       text,
    mttr        integer,
    sla_status  text,
    UNIQUE (ticket_id, closed_at)
);
CREATE TABLE tickets.inc_daily_snapshot (
    day          date PRIMARY KEY,
    open_backlog integer NOT NULL,
    opened       integer NOT NULL,
    closed       integer NOT NULL,
    breached     integer NOT NULL,
    captured_at  timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION tickets.capture_history() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    today date := ((now() AT TIME ZONE 'UTC') + interval '3 hours')::date;
BEGIN
    INSERT INTO tickets.closure_events (ticket_id, closed_at, cluster, owner, mttr, sla_status)
    SELECT ticket_id, closed_at, cluster, owner, mttr, sla_status
    FROM tickets.inc WHERE normalized_status = 'closed' AND closed_at IS NOT NULL
    ON CONFLICT (ticket_id, closed_at) DO NOTHING;
    INSERT INTO tickets.inc_daily_snapshot AS s (day, open_backlog, opened, closed, breached)
    SELECT today,
           (SELECT count(*) FROM tickets.inc_open_sla),
           (SELECT count(*) FROM tickets.inc
            WHERE ((coalesce(created_at_service, first_seen_at) AT TIME ZONE 'UTC') + interval '3 hours')::date = today),
           (SELECT count(*) FROM tickets.closure_events
            WHERE ((closed_at AT TIME ZONE 'UTC') + interval '3 hours')::date = today),
           (SELECT count(*) FROM tickets.inc_open_sla WHERE sla_state = 'breached')
    ON CONFLICT (day) DO UPDATE SET open_backlog = EXCLUDED.open_backlog, opened = EXCLUDED.opened,
        closed = EXCLUDED.closed, breached = EXCLUDED.breached, captured_at = now();
END
$$;

-- migration: 12_inc_dashboard_by_owner.sql
CREATE OR REPLACE FUNCTION reporting.fn_inc_dashboard(
    p_cluster text DEFAULT NULL,
    p_status text DEFAULT NULL,
    p_window text DEFAULT '7d',
    p_from timestamptz DEFAULT NULL,
    p_to timestamptz DEFAULT NULL
) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'open', (SELECT count(*) FROM tickets.inc_open_sla v WHERE p_cluster IS NULL OR v.cluster = p_cluster),
        'by_owner', (SELECT jsonb_object_agg(coalesce(owner, '?'), n)
                     FROM (SELECT owner, count(*) AS n FROM tickets.inc_open_sla GROUP BY owner) o))
$$;

-- migration: 13_crq_columns.sql
ALTER TABLE tickets.crq
    ADD COLUMN normalized_status text GENERATED ALWAYS AS (lower(raw->>'normalized_status')) STORED,
    ADD COLUMN raw_status text GENERATED ALWAYS AS (raw->>'raw_status') STORED,
    ADD COLUMN cluster text GENERATED ALWAYS AS (raw->>'cluster') STORED,
    ADD COLUMN region text GENERATED ALWAYS AS (raw->>'region') STORED,
    ADD COLUMN location_name text GENERATED ALWAYS AS (raw->>'location_name') STORED,
    ADD COLUMN owner text GENERATED ALWAYS AS (nullif(raw->>'owner', '')) STORED,
    ADD COLUMN closed_at timestamptz GENERATED ALWAYS AS (tickets.eat_ts(raw->>'closed_at')) STORED,
    ADD COLUMN latitude double precision
        GENERATED ALWAYS AS (coalesce(nullif(raw->>'latitude', '')::double precision, ST_Y(geom))) STORED,
    ADD COLUMN longitude double precision
        GENERATED ALWAYS AS (coalesce(nullif(raw->>'longitude', '')::double precision, ST_X(geom))) STORED,
    ADD COLUMN geog geography(Point, 4326) GENERATED ALWAYS AS (geom::geography) STORED;
CREATE INDEX crq_status_idx ON tickets.crq (normalized_status);
