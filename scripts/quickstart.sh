#!/usr/bin/env bash
# Quick start: build pgmux, start a throwaway PostgreSQL 15 server, and run pgbench
# through pgmux. Everything it creates is removed on exit.
#
# Environment:
#   PGMUX_BIN             use this pgmux binary and skip `cargo build --release`
#   QUICKSTART_PG_PORT    port of the throwaway PostgreSQL server (default 25432)
#   QUICKSTART_PGMUX_PORT port pgmux listens on (default 26432)
#   PG_BIN                PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_PORT=${QUICKSTART_PG_PORT:-25432}
MUX_PORT=${QUICKSTART_PGMUX_PORT:-26432}

say() { printf '==> %s\n' "$*"; }
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }

[ -x "$PG_BIN/postgres" ] || die "PostgreSQL 15 not found in $PG_BIN (on Debian: apt-get install postgresql-15)"
for tool in initdb pg_ctl psql pgbench; do
    [ -x "$PG_BIN/$tool" ] || die "$PG_BIN/$tool is missing"
done
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port_in_use "$PG_PORT" && die "port $PG_PORT is in use; set QUICKSTART_PG_PORT"
port_in_use "$MUX_PORT" && die "port $MUX_PORT is in use; set QUICKSTART_PGMUX_PORT"

if [ -n "${PGMUX_BIN:-}" ]; then
    say "using $PGMUX_BIN (PGMUX_BIN is set; not building)"
else
    say "building pgmux (cargo build --release)"
    (cd "$ROOT" && cargo build --release)
    PGMUX_BIN=$ROOT/target/release/pgmux
fi
[ -x "$PGMUX_BIN" ] || die "$PGMUX_BIN is not an executable"

# PostgreSQL refuses to run as root: as root, its programs run as `postgres`, from a
# directory that user owns.
TMP=$(mktemp -d /tmp/pgmux-quickstart.XXXXXX)
AS_ROOT=false
if [ "$(id -u)" -eq 0 ]; then
    AS_ROOT=true
    id postgres >/dev/null 2>&1 || { rm -rf "$TMP"; die "running as root needs a 'postgres' user"; }
    chown postgres: "$TMP"
fi
pg() {
    if $AS_ROOT; then
        (cd "$TMP" && runuser -u postgres -- "$@")
    else
        (cd "$TMP" && "$@")
    fi
}

DATA=$TMP/data
MUX_PID=
BENCH_PID=
PG_STARTED=false
cleanup() {
    local status=$?
    set +e
    if [ -n "$BENCH_PID" ] && kill -0 "$BENCH_PID" 2>/dev/null; then
        kill -TERM "$BENCH_PID" 2>/dev/null
        wait "$BENCH_PID" 2>/dev/null
    fi
    if [ -n "$MUX_PID" ] && kill -0 "$MUX_PID" 2>/dev/null; then
        kill -TERM "$MUX_PID" 2>/dev/null
        for _ in $(seq 30); do
            kill -0 "$MUX_PID" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$MUX_PID" 2>/dev/null
        wait "$MUX_PID" 2>/dev/null
    fi
    if $PG_STARTED; then
        pg "$PG_BIN/pg_ctl" stop -D "$DATA" -m immediate -t 30 >/dev/null 2>&1
    fi
    if [ "$status" -ne 0 ]; then
        for log in "$TMP/postgres.log" "$TMP/pgmux.log"; do
            if [ -s "$log" ]; then
                printf '\n--- last lines of %s ---\n' "${log##*/}" >&2
                tail -n 20 "$log" >&2
            fi
        done
    fi
    rm -rf "$TMP"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "creating a PostgreSQL 15 cluster in $DATA (port $PG_PORT)"
# Local socket: trust, so setup needs no password. TCP: SCRAM, as pgmux uses.
pg "$PG_BIN/initdb" -D "$DATA" -U postgres -N -E UTF8 --locale=C \
    --auth-local=trust --auth-host=scram-sha-256 >"$TMP/initdb.log" 2>&1 ||
    { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
cat >>"$DATA/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$TMP'
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
pg "$PG_BIN/pg_ctl" start -D "$DATA" -l "$TMP/postgres.log" -w -t 60 >/dev/null
PG_STARTED=true
ready=false
for _ in $(seq 30); do
    if pg "$PG_BIN/pg_isready" -q -h "$TMP" -p "$PG_PORT"; then ready=true; break; fi
    sleep 0.2
done
$ready || die "PostgreSQL did not become ready"

say "creating role app and database appdb"
pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$TMP" -p "$PG_PORT" -U postgres -d postgres \
    -c "CREATE ROLE app LOGIN PASSWORD 'app-secret'" \
    -c "CREATE DATABASE appdb OWNER app"

export PGPASSWORD=app-secret
say "initialising pgbench tables (pgbench -i -s 1, directly against PostgreSQL)"
"$PG_BIN/pgbench" -i -s 1 -q -h 127.0.0.1 -p "$PG_PORT" -U app appdb

cat >"$TMP/pgmux.toml" <<CONF
[pgmux]
listen = "127.0.0.1:$MUX_PORT"
default_pool_size = 10
auth_type = "scram-sha-256"

[users.app]
password = "app-secret"

[databases.appdb]
host = "127.0.0.1"
port = $PG_PORT
CONF
"$PGMUX_BIN" --check --config "$TMP/pgmux.toml" >/dev/null

say "starting pgmux on 127.0.0.1:$MUX_PORT (pool size 10)"
NO_COLOR=1 "$PGMUX_BIN" --config "$TMP/pgmux.toml" --log-level warn >"$TMP/pgmux.log" 2>&1 &
MUX_PID=$!
ready=false
for _ in $(seq 30); do
    kill -0 "$MUX_PID" 2>/dev/null || die "pgmux exited early"
    if "$PG_BIN/psql" -X -q -t -h 127.0.0.1 -p "$MUX_PORT" -U app -d appdb \
        -c 'SELECT 1' >/dev/null 2>&1; then
        ready=true
        break
    fi
    sleep 0.2
done
$ready || die "pgmux did not answer a query"

say "pgbench: 50 clients, select-only, 10 s, through pgmux (10 server connections)"
# In the background, so that a signal to this script interrupts `wait` and the trap
# cleans up at once instead of after the run.
"$PG_BIN/pgbench" -c 50 -j 2 -T 10 -S -h 127.0.0.1 -p "$MUX_PORT" -U app appdb &
BENCH_PID=$!
wait "$BENCH_PID"
BENCH_PID=

say "done; cleaning up"
