#!/usr/bin/env bash
# Micro-benchmark of protocol-level prepared statements through pgmux.
#
#   bench/prepared.sh
#
# Starts a throwaway PostgreSQL 15 (pgbench scale 10, fsync off) and pgmux (transaction
# mode, pool size 20, md5 auth), then runs select-only pgbench three times:
#   direct  -M prepared     PostgreSQL itself, the ceiling
#   pgmux   -M extended     unnamed statements: Parse, Bind, Execute every query
#   pgmux   -M prepared     named statements, mapped by pgmux to shared server ones
# and prints TPS, average latency and failures for each, and pgmux's prepared-statement
# counters after its prepared run. Removes everything it started when it exits.
#
# Environment:
#   PGMUX_BIN          pgmux binary (default target/release/pgmux; not built here:
#                      run `cargo build --release` first)
#   PG_BIN             PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#   BENCH_CLIENTS      pgbench clients (default 50)
#   BENCH_POOL_SIZE    pgmux servers (default 20)
#   BENCH_DURATION     seconds per run (default 10)
#   BENCH_SCALE        pgbench scale (default 10)
#   BENCH_PG_PORT, BENCH_PGMUX_PORT, BENCH_METRICS_PORT   (default 25442, 26442, 29940)
#   BENCH_OUT          also write the result table (markdown) to this file
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)

case ${1:-} in
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    "") ;;
    *)
        printf 'prepared.sh: unknown argument %s\n' "$1" >&2
        exit 2
        ;;
esac

say() { printf '==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'prepared.sh: %s\n' "$*" >&2; exit 1; }

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PGMUX_BIN=${PGMUX_BIN:-$ROOT/target/release/pgmux}
PG_PORT=${BENCH_PG_PORT:-25442}
MUX_PORT=${BENCH_PGMUX_PORT:-26442}
METRICS_PORT=${BENCH_METRICS_PORT:-29940}
CLIENTS=${BENCH_CLIENTS:-50}
POOL_SIZE=${BENCH_POOL_SIZE:-20}
DURATION=${BENCH_DURATION:-10}
SCALE=${BENCH_SCALE:-10}
THREADS=2
DB_USER=bench
DB_PASS=bench-secret
DB_NAME=bench

# ------------------------------------------------------------------ prerequisites
[ -x "$PG_BIN/postgres" ] || die "PostgreSQL 15 not found in $PG_BIN"
for tool in initdb pg_ctl pg_isready psql pgbench; do
    [ -x "$PG_BIN/$tool" ] || die "$PG_BIN/$tool is missing"
done
for tool in timeout runuser; do
    command -v "$tool" >/dev/null || die "$tool is required"
done
[ "$(id -u)" -eq 0 ] || die "run as root (the server runs as the postgres user)"
id postgres >/dev/null 2>&1 || die "a 'postgres' user is required"
[ -x "$PGMUX_BIN" ] || die "$PGMUX_BIN is not an executable (cargo build --release, or set PGMUX_BIN)"

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$PG_PORT" "$MUX_PORT" "$METRICS_PORT"; do
    [ "$p" != 5432 ] || die "port 5432 is not allowed"
    if port_in_use "$p"; then die "port $p is in use"; fi
done

NOFILE=$(ulimit -Hn)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
ulimit -n "$NOFILE"

# ------------------------------------------------------------------ state and cleanup
TMP=$(mktemp -d /tmp/pgmux-bench-prepared.XXXXXX)
chown postgres: "$TMP"
chmod 755 "$TMP"
DATA=$TMP/data
PG_STARTED=false
MUX_PID=

# stop_pid, pg and tail_logs come from bench/lib.sh.
. "$BENCH_DIR/lib.sh"

cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    stop_pid "$MUX_PID"
    if $PG_STARTED; then
        pg "$PG_BIN/pg_ctl" stop -D "$DATA" -m immediate -t 30 >/dev/null 2>&1
    fi
    if [ "$status" -ne 0 ]; then
        tail_logs "$TMP" postgres.log pgmux.log
    fi
    rm -rf "$TMP"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM


# ------------------------------------------------------------------ PostgreSQL
say "creating a PostgreSQL cluster in $DATA (port $PG_PORT)"
pg "$PG_BIN/initdb" -D "$DATA" -U postgres -N -E UTF8 --locale=C \
    --auth-local=trust --auth-host=md5 >"$TMP/initdb.log" 2>&1 ||
    { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
cat >>"$DATA/postgresql.conf" <<CONF

# bench/prepared.sh
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$TMP'
max_connections = $((CLIENTS + POOL_SIZE + 20))
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = md5
log_min_messages = warning
CONF
pg "$PG_BIN/pg_ctl" start -D "$DATA" -l "$TMP/postgres.log" -w -t 60 >/dev/null
PG_STARTED=true
pg "$PG_BIN/pg_isready" -q -h "$TMP" -p "$PG_PORT" -t 30 || die "PostgreSQL is not ready"
pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$TMP" -p "$PG_PORT" -U postgres -d postgres \
    -c "CREATE ROLE $DB_USER LOGIN PASSWORD '$DB_PASS'" \
    -c "CREATE DATABASE $DB_NAME OWNER $DB_USER"

export PGPASSWORD=$DB_PASS
say "pgbench -i -s $SCALE"
"$PG_BIN/pgbench" -i -s "$SCALE" -q -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" "$DB_NAME" \
    >"$TMP/pgbench-init.log" 2>&1 || { cat "$TMP/pgbench-init.log" >&2; die "pgbench -i failed"; }
pg "$PG_BIN/psql" -X -q -h "$TMP" -p "$PG_PORT" -U postgres -d "$DB_NAME" -c "VACUUM ANALYZE"

# ------------------------------------------------------------------ pgmux
cat >"$TMP/pgmux.toml" <<CONF
[pgmux]
listen = "127.0.0.1:$MUX_PORT"
metrics_listen = "127.0.0.1:$METRICS_PORT"
pool_mode = "transaction"
default_pool_size = $POOL_SIZE
max_client_conn = $((CLIENTS * 2 + 100))
query_wait_timeout = "120s"
auth_type = "md5"
shutdown_timeout = "2s"

[users.$DB_USER]
password = "$DB_PASS"

[databases.$DB_NAME]
host = "127.0.0.1"
port = $PG_PORT
CONF
"$PGMUX_BIN" --check --config "$TMP/pgmux.toml" >/dev/null
(
    NO_COLOR=1 exec "$PGMUX_BIN" --config "$TMP/pgmux.toml" --log-level warn
) >>"$TMP/pgmux.log" 2>&1 &
MUX_PID=$!
for i in $(seq 100); do
    kill -0 "$MUX_PID" 2>/dev/null || die "pgmux exited early"
    if "$PG_BIN/psql" -X -q -t -h 127.0.0.1 -p "$MUX_PORT" -U "$DB_USER" -d "$DB_NAME" \
        -c 'SELECT 1' >/dev/null 2>&1; then
        break
    fi
    [ "$i" -lt 100 ] || die "pgmux did not answer on port $MUX_PORT"
    sleep 0.2
done
say "pgmux $("$PGMUX_BIN" --version 2>/dev/null || true) on port $MUX_PORT, $POOL_SIZE servers"

# ------------------------------------------------------------------ runs
ROWS=()
run() { # run LABEL PORT MODE
    local label=$1 port=$2 mode=$3 log=$TMP/pgbench-$1-$3.log rc=0
    say "$label -M $mode: pgbench -S -c $CLIENTS -j $THREADS -T $DURATION"
    pg "$PG_BIN/psql" -X -q -h "$TMP" -p "$PG_PORT" -U postgres -d "$DB_NAME" -c CHECKPOINT
    timeout -k 10 $((DURATION + 60)) "$PG_BIN/pgbench" -h 127.0.0.1 -p "$port" -U "$DB_USER" \
        -S -n -M "$mode" -c "$CLIENTS" -j "$THREADS" -T "$DURATION" "$DB_NAME" \
        >"$log" 2>&1 || rc=$?
    local tps lat failed
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$log" | head -n 1)
    lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$log" | head -n 1)
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$log" | head -n 1)
    if [ "$rc" -ne 0 ] || [ -z "$tps" ]; then
        say "pgbench exited with $rc; last lines:"
        tail -n 5 "$log"
    fi
    ROWS+=("| $label | $mode | ${tps:-n/a} | ${lat:-n/a} | ${failed:-n/a} | $rc |")
}
run direct "$PG_PORT" prepared
run pgmux "$MUX_PORT" extended
run pgmux "$MUX_PORT" prepared

COUNTERS=$( (exec 3<>"/dev/tcp/127.0.0.1/$METRICS_PORT" &&
    printf 'GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3 && cat <&3) 2>/dev/null |
    grep -E '^pgmux_prepared_[a-z_]+(_total)?\{' | sed 's/{[^}]*}//' || true)

{
    printf '\nselect-only, %s clients, %s pgmux servers, %s s per run, scale %s\n\n' \
        "$CLIENTS" "$POOL_SIZE" "$DURATION" "$SCALE"
    printf '| target | -M | tps | latency avg (ms) | failed | exit |\n'
    printf '| --- | --- | ---: | ---: | ---: | ---: |\n'
    printf '%s\n' "${ROWS[@]}"
    printf '\npgmux prepared-statement counters after both pgmux runs:\n\n'
    printf '%s\n' "${COUNTERS:-(metrics endpoint did not answer)}"
} | tee "${BENCH_OUT:-/dev/null}"
