#!/bin/bash
# Entrypoint of the `replica` service: a streaming hot standby of `primary`.
#
# On first start the data directory is empty: the script waits for the primary, clones it
# with pg_basebackup (WAL streamed during the copy, --write-recovery-conf to write
# standby.signal and primary_conninfo), then starts postgres. On later starts the data
# directory is already a standby and postgres starts directly. Any arguments are passed
# on to postgres (compose.yaml passes `-c name=value` settings).
#
# Runs as the `postgres` user (compose.yaml sets `user: postgres`).
#
# Environment:
#   PRIMARY_HOST, PRIMARY_PORT   where the primary is (default primary, 5432)
#   REPLICATION_USER             role with the REPLICATION attribute (default replicator)
#   REPLICATION_PASSWORD         its password (required for the first start)
#   REPLICA_NAME                 application_name the primary sees in pg_stat_replication
#                                (default replica)
#   PGDATA                       data directory (default set by the postgres image)
set -euo pipefail

PGDATA=${PGDATA:-/var/lib/postgresql/data}
primary_host=${PRIMARY_HOST:-primary}
primary_port=${PRIMARY_PORT:-5432}
repl_user=${REPLICATION_USER:-replicator}
replica_name=${REPLICA_NAME:-replica}

# bash as PID 1 would ignore `docker stop` while it waits for the primary.
trap 'echo "replica: stopped before postgres started" >&2; exit 143' TERM INT

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD must be set for the first start}"
    if [ -d "$PGDATA" ] && [ -n "$(ls -A "$PGDATA")" ]; then
        echo "replica: $PGDATA is not empty but holds no PG_VERSION; refusing to touch it." >&2
        echo "replica: remove the replica volume to clone the primary again." >&2
        exit 1
    fi
    echo "replica: waiting for $primary_host:$primary_port"
    until pg_isready --quiet --host="$primary_host" --port="$primary_port"; do
        sleep 1
    done
    echo "replica: cloning $primary_host:$primary_port into $PGDATA"
    # pg_basebackup removes what it wrote if it fails, so a retry starts clean.
    PGPASSWORD=$REPLICATION_PASSWORD pg_basebackup \
        --dbname="application_name=$replica_name" \
        --host="$primary_host" --port="$primary_port" --username="$repl_user" \
        --pgdata="$PGDATA" \
        --wal-method=stream --checkpoint=fast --write-recovery-conf --no-password
    # postgres refuses a data directory that group or others can write to. The volume
    # inherits the image's permissive mode (the image allows arbitrary --user values).
    chmod 0700 "$PGDATA"
    echo "replica: clone complete; starting as a hot standby"
fi

trap - TERM INT
exec postgres "$@"
