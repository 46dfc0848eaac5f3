-- Taking over the legacy loader's database (`fleetticketsd migrate --adopt`,
-- fleetticketsd/adopt.py, LEGACY.md). Present in every database so that the code can
-- ask "was this one adopted?" without guessing; empty unless it was.

-- Later migrations pin the search_path of the functions they (re)define the way 0006
-- pinned the earlier ones (a CREATE OR REPLACE drops a function's SET clauses): with
-- this, in one line, and PostGIS's schema looked up rather than assumed.
CREATE OR REPLACE FUNCTION tickets.pin_search_path(p_function regprocedure) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    EXECUTE pg_catalog.format(
        'ALTER FUNCTION %s SET search_path = pg_catalog, %I, tickets, reporting, pg_temp',
        p_function,
        (SELECT n.nspname FROM pg_catalog.pg_extension e
         JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'postgis'));
END
$$;
SELECT tickets.pin_search_path('tickets.pin_search_path(regprocedure)');

-- One row, written in the adoption's own transaction: when, from which of the loader's
-- migrations, the watermarks kept, the report printed, and the SQL that moves the
-- loader's objects back out of tickets_legacy (docs/operations.md, rolling back).
CREATE TABLE IF NOT EXISTS tickets.adoption (
    id                integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    adopted_at        timestamptz NOT NULL DEFAULT now(),
    legacy_migrations text[] NOT NULL,
    watermarks        jsonb NOT NULL,
    report            jsonb NOT NULL,
    rollback_sql      text NOT NULL
);

-- Writes to the tables the loader used to write, by anything that is not
-- fleetticketsd (its connections say application_name 'fleetticketsd'). Two writers
-- without a shared lock is the one way to defeat the stale-write guard, and the usual
-- one is the loader's scheduled tasks left running after the cutover: the daemon
-- warns at start and `status` shows it while rows are here. An operator who knows the
-- writer deletes its rows. Statement-level triggers (attached by the adoption, on
-- import_meta and the ticket tables) keep the cost to one call per statement.
CREATE TABLE IF NOT EXISTS tickets.foreign_writes (
    relation         text NOT NULL,
    application_name text NOT NULL,
    role             text NOT NULL,
    first_at         timestamptz NOT NULL DEFAULT now(),
    last_at          timestamptz NOT NULL DEFAULT now(),
    statements       bigint NOT NULL DEFAULT 1,
    PRIMARY KEY (relation, application_name, role)
);

CREATE OR REPLACE FUNCTION tickets.note_foreign_write() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF current_setting('application_name') LIKE 'fleetticketsd%' THEN
        RETURN NULL;
    END IF;
    INSERT INTO tickets.foreign_writes AS w (relation, application_name, role)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, current_setting('application_name'), session_user)
    ON CONFLICT (relation, application_name, role)
        DO UPDATE SET last_at = now(), statements = w.statements + 1;
    RETURN NULL;
END
$$;
SELECT tickets.pin_search_path('tickets.note_foreign_write()');
