-- Least privilege (CONTRACT.md "TLS, secrets, roles"): the daemon's runtime role and the
-- dashboards' reader role. The roles themselves are cluster-wide and created by
-- `migrate` (fleetticketsd/roles.py), which may not be allowed to: then it prints the
-- statements for an administrator. This file only defines how their grants are made.
--
-- Why one function, run by `migrate` after every run (a no-op one included), rather
-- than GRANTs in each migration: grants that each migration must remember are grants
-- some migration forgets (several engineers write migrations at once), and a
-- CREATE OR REPLACE FUNCTION silently drops SECURITY DEFINER. Read from the catalog,
-- every table, sequence and function in the project's schemas gets the runtime rights
-- the moment it exists, whichever migration made it; the reader gets exactly its
-- listed objects and nothing else, revoked and granted anew in the same transaction,
-- so a right given by hand or by an older version does not linger.
CREATE OR REPLACE FUNCTION tickets.grant_roles(p_dataset_tables regclass[] DEFAULT '{}')
RETURNS SETOF text
LANGUAGE plpgsql
AS $$
DECLARE
    runtime CONSTANT text := 'fleetticketsd_runtime';
    reader CONSTANT text := 'fleetticketsd_reader';
    -- The project's schemas: all the runtime role may touch (plus configured tables).
    project CONSTANT text[] := ARRAY['tickets', 'reporting'];
    -- The runtime role reads these and never writes them: schema changes and the
    -- adoption's record belong to `migrate`.
    runtime_read_only CONSTANT text[] := ARRAY['schema_migrations', 'adoption'];
    -- The dashboards' objects; nothing else (not the ledger, not the rejects).
    reader_relations CONSTANT text[] := ARRAY['inc', 'crq', 'inc_open_sla', 'closure_events',
                                              'inc_daily_snapshot', 'import_meta'];
    r record;
    s text;
BEGIN
    FOREACH s IN ARRAY project LOOP
        CONTINUE WHEN to_regnamespace(s) IS NULL;
        EXECUTE format('REVOKE ALL ON SCHEMA %I FROM %I, %I', s, runtime, reader);
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I, %I', s, runtime, reader);
        EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM %I, %I', s, runtime, reader);
        EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM %I, %I', s, runtime, reader);
        -- Tables the migrating role creates later (a dataset table made with
        -- tickets.create_dataset_table) are the runtime's at once, before the next migrate.
        EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT, INSERT, UPDATE, DELETE '
                       'ON TABLES TO %I', s, runtime);
        EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT USAGE, SELECT ON SEQUENCES TO %I',
                       s, runtime);
    END LOOP;

    -- Runtime: data rights on every table (DELETE: `drain --reseed` clears a dataset's
    -- ledger, rejects and rows), SELECT on views; never TRUNCATE, REFERENCES, TRIGGER.
    FOR r IN
        SELECT c.oid::regclass AS rel, c.relkind, c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY (project) AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
    LOOP
        IF r.relkind = 'S' THEN
            EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO %I', r.rel, runtime);
        ELSIF r.relkind IN ('v', 'm') OR r.relname = ANY (runtime_read_only) THEN
            EXECUTE format('GRANT SELECT ON %s TO %I', r.rel, runtime);
        ELSE
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO %I', r.rel, runtime);
        END IF;
        RETURN NEXT format('runtime: %s', r.rel);
    END LOOP;

    -- Dataset tables of the configuration, wherever they live.
    FOR r IN SELECT DISTINCT t AS rel, c.relnamespace::regnamespace AS nsp
             FROM unnest(p_dataset_tables) t JOIN pg_class c ON c.oid = t
    LOOP
        EXECUTE format('GRANT USAGE ON SCHEMA %s TO %I', r.nsp, runtime);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO %I', r.rel, runtime);
        RETURN NEXT format('runtime: %s (configured dataset)', r.rel);
    END LOOP;

    FOREACH s IN ARRAY reader_relations LOOP
        CONTINUE WHEN to_regclass('tickets.' || s) IS NULL;
        EXECUTE format('GRANT SELECT ON tickets.%I TO %I', s, reader);
        RETURN NEXT format('reader: tickets.%I', s);
    END LOOP;

    -- Functions. The reporting functions that read what the reader may not (the
    -- ledger: fn_freshness counts tickets.ingest_files) run with their owner's rights,
    -- with a fixed search_path so that the caller cannot slip objects of its own in.
    -- "Reads" is decided from the function's text naming a relation of schema tickets
    -- outside the reader's list: a false positive only makes a read-only function
    -- run as its owner, a false negative fails the reader's test.
    FOR r IN
        SELECT p.oid::regprocedure AS fn, n.nspname, p.prosecdef, p.proname,
               pg_has_role(current_user, p.proowner, 'USAGE') AS mine,
               EXISTS (SELECT 1 FROM pg_class c
                       WHERE c.relnamespace = 'tickets'::regnamespace
                         AND c.relkind IN ('r', 'p', 'v', 'm')
                         AND NOT c.relname = ANY (reader_relations)
                         AND p.prosrc ~ ('\m' || c.relname || '\M')) AS reads_more,
               EXISTS (SELECT 1 FROM unnest(p.proconfig) cfg WHERE cfg LIKE 'search\_path=%') AS pinned
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = ANY (project) AND p.prokind IN ('f', 'p')
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
    LOOP
        IF r.fn = 'tickets.grant_roles(regclass[])'::regprocedure THEN
            CONTINUE;  -- migrate's, only
        END IF;
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', r.fn, runtime);
        IF r.nspname = 'reporting' THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', r.fn, reader);
            IF r.mine AND r.reads_more THEN
                IF NOT r.pinned THEN
                    PERFORM tickets.pin_search_path(r.fn);
                END IF;
                IF NOT r.prosecdef THEN
                    EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', r.fn);
                END IF;
                RETURN NEXT format('reader: %s (security definer)', r.fn);
            ELSE
                RETURN NEXT format('reader: %s', r.fn);
            END IF;
        END IF;
    END LOOP;
END
$$;
SELECT tickets.pin_search_path('tickets.grant_roles(regclass[])');
REVOKE EXECUTE ON FUNCTION tickets.grant_roles(regclass[]) FROM PUBLIC;
