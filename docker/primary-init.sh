#!/bin/bash
# Runs once, when the primary's data volume is first initialised: the postgres image
# executes files in /docker-entrypoint-initdb.d/ against a temporary server, before it
# starts the real one. compose.yaml mounts this file there.
#
# Creates:
#   - the replication role the replica's pg_basebackup and walreceiver log in as, and a
#     pg_hba.conf line that lets it connect for replication from the compose network;
#   - the application role and database that pgmux serves (docker/pgmux.toml: user
#     `app`, database `appdb`). The role's password must equal the one in pgmux.toml,
#     because pgmux logs in to PostgreSQL with the client's user name and password.
#
# To run it again, remove the primary's volume: docker compose -f docker/compose.yaml down -v
#
# The image executes this file if it is executable and sources it otherwise (for
# example when a checkout lost the executable bit). The body runs in a subshell so that,
# when sourced, its `set` options and variables do not leak into the image's entrypoint.

pgmux_primary_init() (
set -euo pipefail

app_user=${APP_USER:-app}
app_password=${APP_PASSWORD:?APP_PASSWORD must be set}
app_db=${APP_DB:-appdb}
repl_user=${REPLICATION_USER:-replicator}
repl_password=${REPLICATION_PASSWORD:?REPLICATION_PASSWORD must be set}

# psql substitutes :"name" (quoted identifier) and :'name' (quoted literal) in the script it
# reads, so names and passwords need no escaping here. CREATE DATABASE cannot run in a
# transaction block; psql runs each statement on its own (no --single-transaction).
psql --no-psqlrc -v ON_ERROR_STOP=1 \
    --username "$POSTGRES_USER" --dbname postgres \
    --set=app_user="$app_user" --set=app_password="$app_password" \
    --set=app_db="$app_db" \
    --set=repl_user="$repl_user" --set=repl_password="$repl_password" <<'SQL'
CREATE ROLE :"repl_user" WITH LOGIN REPLICATION PASSWORD :'repl_password';
CREATE ROLE :"app_user" WITH LOGIN PASSWORD :'app_password';
CREATE DATABASE :"app_db" OWNER :"app_user";
SQL

# The image's pg_hba.conf admits password logins to every database from any address, but
# `all` does not match replication connections, which need their own line. The temporary
# server ignores the change; the real server, started next, reads it.
printf 'host replication %s all scram-sha-256\n' "$repl_user" >> "$PGDATA/pg_hba.conf"

echo "primary-init: created roles $repl_user and $app_user, database $app_db"
)

pgmux_primary_init
