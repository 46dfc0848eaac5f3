#!/bin/sh
# First start of the PostGIS container only (docker-entrypoint-initdb.d): the login
# role the daemon connects as. It holds nothing but membership in
# fleetticketsd_runtime, whose rights `fleetticketsd migrate` keeps current; the
# owner (POSTGRES_USER) is for `migrate` alone. The NOLOGIN roles are made here too so
# that the membership can be granted before the first migrate, which then finds them.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v daemon_password="$FLEETTICKETSD_DB_PASSWORD" <<'SQL'
CREATE ROLE fleetticketsd_runtime NOLOGIN;
CREATE ROLE fleetticketsd_reader NOLOGIN;
CREATE ROLE fleetticketsd_daemon LOGIN PASSWORD :'daemon_password' IN ROLE fleetticketsd_runtime;
SQL
