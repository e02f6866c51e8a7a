#!/usr/bin/env bash
# Benchmark pgmux against direct PostgreSQL and PgBouncer with pgbench.
#
#   bench/run.sh [--quick|--full]      (default --quick)
#
# Starts a throwaway PostgreSQL 15 (pgbench scale 10, fsync off), pgmux and PgBouncer
# (both in transaction mode, pool size 20, md5 auth), measures memory per idle client,
# then runs pgbench against direct / pgmux / PgBouncer in turn for each
# (workload, query mode, clients) cell, BENCH_ROUNDS times per cell, recording the CPU
# per transaction of the pooler, PostgreSQL and pgbench and of the machine as a whole.
# Results: bench/results/. See bench/README.md.
#
# Environment:
#   PGMUX_BIN            pgmux binary to use; unset: `cargo build --release` and use
#                        target/release/pgmux
#   PGBOUNCER_BIN        pgbouncer binary (default: `pgbouncer` on PATH or
#                        /usr/sbin/pgbouncer; installed with apt-get when missing)
#   PG_BIN               PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#   BENCH_PG_PORT, BENCH_PGMUX_PORT, BENCH_PGBOUNCER_PORT, BENCH_METRICS_PORT
#                        ports (defaults 25432, 26432, 27432, 29930)
#   BENCH_TARGETS        subset of "direct pgmux pgbouncer" (default: all three)
#   BENCH_DURATION       seconds per pgbench run (default 5 quick, 60 full)
#   BENCH_ROUNDS         rounds of all targets per cell (default 3 quick, 1 full); the
#                        report shows the median over the rounds and their range
#   BENCH_CLIENTS        client counts for every workload (default: per mode)
#   BENCH_IDLE_CLIENTS   idle clients for the memory test (default 10000; 0 skips it)
#   BENCH_GRACE          seconds past the duration before `timeout` kills pgbench
#   BENCH_RESULTS        output directory (default bench/results)
#   BENCH_PGBOUNCER_PREPARED=run   run -M prepared cells on a PgBouncer older than 1.21
#                        anyway (recording its failures) instead of marking them n/a
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)

MODE=quick
for arg in "$@"; do
    case $arg in
        --quick) MODE=quick ;;
        --full) MODE=full ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            printf 'run.sh: unknown argument %s (use --quick or --full)\n' "$arg" >&2
            exit 2
            ;;
    esac
done

say() { printf '==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_PORT=${BENCH_PG_PORT:-25432}
MUX_PORT=${BENCH_PGMUX_PORT:-26432}
BOUNCER_PORT=${BENCH_PGBOUNCER_PORT:-27432}
METRICS_PORT=${BENCH_METRICS_PORT:-29930}
TARGETS=${BENCH_TARGETS:-direct pgmux pgbouncer}
RESULTS=${BENCH_RESULTS:-$BENCH_DIR/results}
DB_USER=bench
DB_PASS=bench-secret
DB_NAME=bench
SCALE=10
POOL_SIZE=20
THREADS=2
IDLE_CLIENTS=${BENCH_IDLE_CLIENTS:-10000}

# The benchmark matrix. Each line: workload protocols client-counts.
if [ "$MODE" = quick ]; then
    DURATION=${BENCH_DURATION:-5}
    ROUNDS=${BENCH_ROUNDS:-3}
    GRACE=${BENCH_GRACE:-15}
    MATRIX=(
        "select simple,extended,prepared ${BENCH_CLIENTS:-20 500}"
        "tpcb simple ${BENCH_CLIENTS:-20 500}"
    )
else
    DURATION=${BENCH_DURATION:-60}
    ROUNDS=${BENCH_ROUNDS:-1}
    GRACE=${BENCH_GRACE:-60}
    MATRIX=(
        "select simple,extended,prepared ${BENCH_CLIENTS:-20 100 500 1000}"
        "tpcb simple,extended,prepared ${BENCH_CLIENTS:-20 100 500 1000}"
    )
fi

read -r -a TARGET_LIST <<<"$TARGETS"
[ "${#TARGET_LIST[@]}" -gt 0 ] || die "BENCH_TARGETS is empty"
for t in "${TARGET_LIST[@]}"; do
    case $t in direct | pgmux | pgbouncer) ;; *) die "unknown target '$t' in BENCH_TARGETS" ;; esac
done
case $ROUNDS in *[!0-9]*) die "BENCH_ROUNDS must be a positive number, not '$ROUNDS'" ;; esac
ROUNDS=$((10#$ROUNDS))
[ "$ROUNDS" -gt 0 ] || die "BENCH_ROUNDS must be at least 1"
want() { case " ${TARGET_LIST[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# ------------------------------------------------------------------ prerequisites
[ -x "$PG_BIN/postgres" ] || die "PostgreSQL 15 not found in $PG_BIN"
for tool in initdb pg_ctl pg_isready psql pgbench; do
    [ -x "$PG_BIN/$tool" ] || die "$PG_BIN/$tool is missing"
done
for tool in python3 timeout getconf setpriv md5sum; do
    command -v "$tool" >/dev/null || die "$tool is required"
done
[ "$(id -u)" -eq 0 ] || die "run as root (the servers run as the postgres user)"
id postgres >/dev/null 2>&1 || die "a 'postgres' user is required"

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$PG_PORT" "$MUX_PORT" "$BOUNCER_PORT" "$METRICS_PORT"; do
    [ "$p" != 5432 ] || die "port 5432 is not allowed"
    if port_in_use "$p"; then die "port $p is in use"; fi
done

if want pgmux; then
    if [ -n "${PGMUX_BIN:-}" ]; then
        say "using pgmux binary $PGMUX_BIN (PGMUX_BIN is set; not building)"
    else
        say "building pgmux (cargo build --release)"
        (cd "$ROOT" && cargo build --release)
        PGMUX_BIN=$ROOT/target/release/pgmux
    fi
    [ -x "$PGMUX_BIN" ] || die "$PGMUX_BIN is not an executable"
fi
PGMUX_BIN=${PGMUX_BIN:-}

PGBOUNCER_BIN=${PGBOUNCER_BIN:-}
if want pgbouncer; then
    if [ -z "$PGBOUNCER_BIN" ]; then
        PGBOUNCER_BIN=$(command -v pgbouncer || true)
        [ -n "$PGBOUNCER_BIN" ] || [ ! -x /usr/sbin/pgbouncer ] || PGBOUNCER_BIN=/usr/sbin/pgbouncer
    fi
    if [ -z "$PGBOUNCER_BIN" ]; then
        say "installing pgbouncer with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get install -y -q pgbouncer >/tmp/pgmux-bench-apt.log 2>&1; then
            apt-get update -q >>/tmp/pgmux-bench-apt.log 2>&1
            apt-get install -y -q pgbouncer >>/tmp/pgmux-bench-apt.log 2>&1 ||
                { tail -n 20 /tmp/pgmux-bench-apt.log >&2; die "apt-get install pgbouncer failed"; }
        fi
        rm -f /tmp/pgmux-bench-apt.log
        # The package starts its own service on port 6432; this benchmark does not
        # use it, so stop it again (harmless if it is not running).
        if command -v service >/dev/null && [ -x /etc/init.d/pgbouncer ]; then
            service pgbouncer stop >/dev/null 2>&1 || true
        fi
        PGBOUNCER_BIN=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
    fi
    [ -x "$PGBOUNCER_BIN" ] || die "$PGBOUNCER_BIN is not an executable"
fi

# Open files: 10,000 idle clients need that many descriptors in the pooler and in the
# client tool, and 1000 pgbench clients as many in pgbench. Raise the soft limit to the
# hard limit; children (the poolers, via ulimit in their subshells) inherit it.
NOFILE=$(ulimit -Hn)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
ulimit -n "$NOFILE"
if [ "$IDLE_CLIENTS" -gt 0 ] && [ "$NOFILE" -lt $((IDLE_CLIENTS + 200)) ]; then
    say "open-file limit $NOFILE is too low for $IDLE_CLIENTS idle clients; using $((NOFILE - 200))"
    IDLE_CLIENTS=$((NOFILE - 200))
fi
CLK_TCK=$(getconf CLK_TCK)

# ------------------------------------------------------------------ state and cleanup
TMP=$(mktemp -d /tmp/pgmux-bench.XXXXXX)
chown postgres: "$TMP"
chmod 755 "$TMP"
DATA=$TMP/data
PG_STARTED=false
MUX_PID=
BOUNCER_PID=
CHILD_PID=

# stop_pid, pg and tail_logs come from bench/lib.sh.
. "$BENCH_DIR/lib.sh"

cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    stop_pid "$CHILD_PID"
    stop_pid "$MUX_PID"
    stop_pid "$BOUNCER_PID"
    if $PG_STARTED; then
        pg "$PG_BIN/pg_ctl" stop -D "$DATA" -m immediate -t 30 >/dev/null 2>&1
    fi
    if [ "$status" -ne 0 ]; then
        tail_logs "$TMP" postgres.log pgmux.log pgbouncer.log
    fi
    rm -rf "$TMP"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Run a command in the background and wait for it, so that a signal interrupts `wait`
# and the trap runs at once; the trap stops the child.
fg_child() {
    "$@" &
    CHILD_PID=$!
    local rc=0
    wait "$CHILD_PID" || rc=$?
    CHILD_PID=
    return "$rc"
}

mkdir -p "$RESULTS"
rm -f "$RESULTS/results.csv" "$RESULTS/idle_memory.csv" "$RESULTS/results.md" \
    "$RESULTS"/*.svg
COMMANDS=$TMP/commands.txt
: >"$COMMANDS"
note_cmd() { printf '%s\n' "$*" >>"$COMMANDS"; }
STARTED_AT=$(date '+%Y-%m-%d %H:%M:%S %Z')
START_S=$(date +%s)

# ------------------------------------------------------------------ PostgreSQL
say "mode $MODE: creating a PostgreSQL cluster in $DATA (port $PG_PORT)"
pg "$PG_BIN/initdb" -D "$DATA" -U postgres -N -E UTF8 --locale=C \
    --auth-local=trust --auth-host=md5 >"$TMP/initdb.log" 2>&1 ||
    { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
note_cmd "initdb -D DATA -U postgres -N -E UTF8 --locale=C --auth-local=trust --auth-host=md5"
cat >>"$DATA/postgresql.conf" <<CONF

# bench/run.sh
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$TMP'
max_connections = 1100
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
max_wal_size = 4GB
checkpoint_timeout = 30min
password_encryption = md5
log_min_messages = warning
CONF
note_cmd "postgresql.conf: max_connections=1100 shared_buffers=256MB fsync=off synchronous_commit=off full_page_writes=off max_wal_size=4GB checkpoint_timeout=30min password_encryption=md5"
pg "$PG_BIN/pg_ctl" start -D "$DATA" -l "$TMP/postgres.log" -w -t 60 >/dev/null
PG_STARTED=true
pg "$PG_BIN/pg_isready" -q -h "$TMP" -p "$PG_PORT" -t 30 || die "PostgreSQL is not ready"

psql_admin() {
    pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$TMP" -p "$PG_PORT" -U postgres "$@"
}
psql_admin -d postgres \
    -c "CREATE ROLE $DB_USER LOGIN PASSWORD '$DB_PASS'" \
    -c "CREATE DATABASE $DB_NAME OWNER $DB_USER"
note_cmd "CREATE ROLE $DB_USER LOGIN PASSWORD '$DB_PASS'; CREATE DATABASE $DB_NAME OWNER $DB_USER"

export PGPASSWORD=$DB_PASS
say "pgbench -i -s $SCALE"
"$PG_BIN/pgbench" -i -s "$SCALE" -q -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" "$DB_NAME" \
    >"$TMP/pgbench-init.log" 2>&1 || { cat "$TMP/pgbench-init.log" >&2; die "pgbench -i failed"; }
note_cmd "pgbench -i -s $SCALE -q -h 127.0.0.1 -p $PG_PORT -U $DB_USER $DB_NAME"
psql_admin -d "$DB_NAME" -c "VACUUM ANALYZE" -c "CHECKPOINT"

# ------------------------------------------------------------------ pooler configs
cat >"$TMP/pgmux.toml" <<CONF
[pgmux]
listen = "127.0.0.1:$MUX_PORT"
metrics_listen = "127.0.0.1:$METRICS_PORT"
pool_mode = "transaction"
default_pool_size = $POOL_SIZE
max_client_conn = 20000
query_wait_timeout = "120s"
auth_type = "md5"
shutdown_timeout = "2s"

[users.$DB_USER]
password = "$DB_PASS"

[databases.$DB_NAME]
host = "127.0.0.1"
port = $PG_PORT
CONF

BOUNCER_DIR=$TMP/pgbouncer
mkdir -p "$BOUNCER_DIR"
MD5_HASH=md5$(printf '%s%s' "$DB_PASS" "$DB_USER" | md5sum | cut -d' ' -f1)
printf '"%s" "%s"\n' "$DB_USER" "$MD5_HASH" >"$BOUNCER_DIR/userlist.txt"
BOUNCER_VERSION=
BOUNCER_PREPARED=false
if want pgbouncer; then
    BOUNCER_VERSION=$("$PGBOUNCER_BIN" --version 2>/dev/null | head -n 1 | grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -n 1 || true)
    # PgBouncer supports protocol-level prepared statements in transaction mode from
    # 1.21 on (max_prepared_statements); older versions do not.
    if [ -n "$BOUNCER_VERSION" ] &&
        [ "$(printf '%s\n1.21\n' "$BOUNCER_VERSION" | sort -V | head -n 1)" = 1.21 ]; then
        BOUNCER_PREPARED=true
    fi
fi
{
    printf '[databases]\n%s = host=127.0.0.1 port=%s dbname=%s\n\n' "$DB_NAME" "$PG_PORT" "$DB_NAME"
    cat <<CONF
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
listen_backlog = 4096
unix_socket_dir =
auth_type = md5
auth_file = $BOUNCER_DIR/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 20000
query_wait_timeout = 120
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
logfile = $BOUNCER_DIR/pgbouncer.log
pidfile = $BOUNCER_DIR/pgbouncer.pid
CONF
    if $BOUNCER_PREPARED; then printf 'max_prepared_statements = 200\n'; fi
} >"$BOUNCER_DIR/pgbouncer.ini"
chown -R postgres: "$BOUNCER_DIR"

start_pgmux() {
    "$PGMUX_BIN" --check --config "$TMP/pgmux.toml" >/dev/null
    (
        ulimit -n "$NOFILE"
        NO_COLOR=1 exec "$PGMUX_BIN" --config "$TMP/pgmux.toml" --log-level warn
    ) >>"$TMP/pgmux.log" 2>&1 &
    MUX_PID=$!
    wait_ready pgmux "$MUX_PORT" "$MUX_PID"
}
start_pgbouncer() {
    rm -f "$BOUNCER_DIR/pgbouncer.pid"
    (
        cd "$BOUNCER_DIR"
        ulimit -n "$NOFILE"
        # setpriv execs pgbouncer in place (no fork), so $! is pgbouncer's pid.
        exec setpriv --reuid=postgres --regid=postgres --init-groups \
            "$PGBOUNCER_BIN" "$BOUNCER_DIR/pgbouncer.ini"
    ) >>"$TMP/pgbouncer.log" 2>&1 &
    BOUNCER_PID=$!
    wait_ready pgbouncer "$BOUNCER_PORT" "$BOUNCER_PID"
    local pidfile_pid
    pidfile_pid=$(cat "$BOUNCER_DIR/pgbouncer.pid" 2>/dev/null || true)
    if [ -n "$pidfile_pid" ] && [ "$pidfile_pid" != "$BOUNCER_PID" ]; then
        die "pgbouncer pid $BOUNCER_PID differs from its pidfile ($pidfile_pid)"
    fi
}
wait_ready() { # wait_ready NAME PORT PID
    for _ in $(seq 100); do
        kill -0 "$3" 2>/dev/null || die "$1 exited early"
        if "$PG_BIN/psql" -X -q -t -h 127.0.0.1 -p "$2" -U "$DB_USER" -d "$DB_NAME" \
            -c 'SELECT 1' >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    die "$1 did not answer a query on port $2"
}
start_poolers() {
    if want pgmux; then start_pgmux; fi
    if want pgbouncer; then start_pgbouncer; fi
    return 0
}
stop_poolers() {
    stop_pid "$MUX_PID"
    MUX_PID=
    stop_pid "$BOUNCER_PID"
    BOUNCER_PID=
}
port_of() {
    case $1 in direct) echo "$PG_PORT" ;; pgmux) echo "$MUX_PORT" ;; pgbouncer) echo "$BOUNCER_PORT" ;; esac
}
pid_of() {
    case $1 in direct) echo 0 ;; pgmux) echo "$MUX_PID" ;; pgbouncer) echo "$BOUNCER_PID" ;; esac
}

# ------------------------------------------------------------------ memory per idle client
IDLE_CSV=$RESULTS/idle_memory.csv
if [ "$IDLE_CLIENTS" -gt 0 ]; then
    say "memory per idle client: $IDLE_CLIENTS idle clients (fresh pooler processes)"
    start_poolers
    for target in pgmux pgbouncer; do
        want "$target" || continue
        fg_child python3 "$BENCH_DIR/measure.py" idle --csv "$IDLE_CSV" --run-mode "$MODE" \
            --target "$target" --port "$(port_of "$target")" --pid "$(pid_of "$target")" \
            --user "$DB_USER" --password "$DB_PASS" --dbname "$DB_NAME" \
            --clients "$IDLE_CLIENTS" --workdir "$TMP" ||
            say "idle-client measurement for $target failed; continuing"
    done
    stop_poolers
fi

# ------------------------------------------------------------------ pgbench matrix
CSV=$RESULTS/results.csv
say "pgbench matrix: ${DURATION}s per run, -j $THREADS, $ROUNDS round(s) per cell, targets: $TARGETS"
start_poolers
NT=${#TARGET_LIST[@]}

prepare_db() { # before every run: same starting state for all targets
    if [ "$1" = tpcb ]; then
        psql_admin -d "$DB_NAME" -c "TRUNCATE pgbench_history" \
            -c "VACUUM pgbench_branches, pgbench_tellers"
    fi
    psql_admin -d "$DB_NAME" -c "CHECKPOINT"
}

# Whether a target cannot run a query mode at all: PgBouncer before 1.21 has no
# prepared statements in transaction mode.
unsupported() { # target proto
    [ "$1" = pgbouncer ] && [ "$2" = prepared ] && ! $BOUNCER_PREPARED &&
        [ "${BENCH_PGBOUNCER_PREPARED:-}" != run ]
}

# One pgbench run of one target in one round of a cell.
run_target() { # cell round k target workload proto clients
    local cell=$1 round=$2 k=$3 target=$4 workload=$5 proto=$6 clients=$7
    local common=(--csv "$CSV" --run-mode "$MODE" --cell "$cell" --order "$((k + 1))"
        --round "$round" --target "$target" --workload "$workload"
        --protocol "$proto" --clients "$clients" --threads "$THREADS"
        --duration "$DURATION")
    if unsupported "$target" "$proto"; then
        # A run that is not made is recorded once, not once per round.
        if [ "$round" -eq 1 ]; then
            python3 "$BENCH_DIR/measure.py" skip "${common[@]}" \
                --reason "unsupported: PgBouncer $BOUNCER_VERSION has no prepared statements in transaction mode (needs 1.21+)"
        fi
        return 0
    fi
    # A pooler that died in an earlier run is restarted so the rest still runs.
    if [ "$target" = pgmux ] && ! kill -0 "$MUX_PID" 2>/dev/null; then
        say "pgmux is not running; restarting it"
        start_pgmux
    fi
    if [ "$target" = pgbouncer ] && ! kill -0 "$BOUNCER_PID" 2>/dev/null; then
        say "pgbouncer is not running; restarting it"
        start_pgbouncer
    fi
    prepare_db "$workload" || say "preparing the database failed; running anyway"
    sleep 1
    fg_child python3 "$BENCH_DIR/measure.py" run "${common[@]}" \
        --port "$(port_of "$target")" --pid "$(pid_of "$target")" \
        --user "$DB_USER" --password "$DB_PASS" --dbname "$DB_NAME" \
        --pgbench "$PG_BIN/pgbench" --grace "$GRACE" --clk-tck "$CLK_TCK" \
        --pg-data "$DATA" --logdir "$TMP/pgbench-logs" ||
        say "measurement of $target failed; continuing"
}

# One run on this machine scatters by about 10%, too much to tell two poolers apart:
# each cell runs all targets ROUNDS times, and the report takes the median over the
# rounds.
run_cell() { # cell workload proto clients
    local cell=$1 workload=$2 proto=$3 clients=$4 round k
    for ((round = 1; round <= ROUNDS; round++)); do
        say "cell $cell, round $round of $ROUNDS: $workload -M $proto, $clients clients"
        for ((k = 0; k < NT; k++)); do
            # Rotate the order from round to round and from cell to cell, so that no
            # target always goes first.
            run_target "$cell" "$round" "$k" "${TARGET_LIST[$(((k + cell + round - 1) % NT))]}" \
                "$workload" "$proto" "$clients"
        done
    done
}

cell=0
for line in "${MATRIX[@]}"; do
    read -r workload protocols clients_list <<<"$line"
    IFS=, read -r -a protos <<<"$protocols"
    read -r -a client_counts <<<"$clients_list"
    for proto in "${protos[@]}"; do
        for clients in "${client_counts[@]}"; do
            cell=$((cell + 1))
            run_cell "$cell" "$workload" "$proto" "$clients"
        done
    done
done
note_cmd "pgbench -h 127.0.0.1 -p PORT -U $DB_USER -c CLIENTS -j $THREADS -T $DURATION -M {simple|extended|prepared} [-S] -n --max-tries=1 -l $DB_NAME  (wrapped in: timeout -k 10 $((DURATION + GRACE)); per-run commands are in results.csv)"
note_cmd "each cell: $ROUNDS round(s) of all targets back to back, the order rotating from round to round and cell to cell"
note_cmd "before each run: CHECKPOINT; before TPC-B runs also TRUNCATE pgbench_history; VACUUM pgbench_branches, pgbench_tellers"
note_cmd "pgmux --config pgmux.toml --log-level warn   (config below)"
note_cmd "setpriv --reuid=postgres --regid=postgres --init-groups pgbouncer pgbouncer.ini   (config below)"
if [ "$IDLE_CLIENTS" -gt 0 ]; then
    note_cmd "python3 bench/idle_clients.py --port PORT --user $DB_USER --dbname $DB_NAME -n $IDLE_CLIENTS --concurrency 200 (via bench/measure.py idle)"
fi
stop_poolers

# ------------------------------------------------------------------ report
say "writing the report to $RESULTS"
python3 "$BENCH_DIR/report.py" --results "$RESULTS" --run-mode "$MODE" \
    --started "$STARTED_AT" --elapsed "$(($(date +%s) - START_S))" \
    --duration "$DURATION" --commands "$COMMANDS" \
    --pgmux-config "$TMP/pgmux.toml" --pgbouncer-config "$BOUNCER_DIR/pgbouncer.ini" \
    --pg-bin "$PG_BIN" --pgmux-bin "$PGMUX_BIN" --pgbouncer-bin "$PGBOUNCER_BIN" \
    --root "$ROOT" --targets "$TARGETS"
say "done in $(($(date +%s) - START_S)) s: $RESULTS/results.md"
