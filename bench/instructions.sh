#!/usr/bin/env bash
# Instructions pgmux executes per pgbench transaction, counted by valgrind's callgrind.
#
#   bench/instructions.sh [simple|extended|prepared]      (default simple)
#
# Timing on a shared 2-core machine moves by 10% or more between runs; an instruction
# count does not, so this is the number to compare before and after a change to the
# hot path (it does not show cache misses or lock contention: confirm a gain with
# bench/run.sh). It starts a throwaway PostgreSQL (pgbench scale 1, or 10 for TPC-B,
# trust on loopback), then pgmux under callgrind twice, with the metrics endpoint on as
# in bench/run.sh, and runs `pgbench -S -c CLIENTS -j 2 -t N` through it (without -S
# for BENCH_WORKLOAD=tpcb: TPC-B-like, seven statements in a block; at scale 1 every
# transaction would wait for the one branch row): once with 10 transactions per
# client, once with 10 + TRANSACTIONS. The difference of the two totals, divided by the
# extra transactions, is the cost of one transaction with logins taken out; start-up is
# not counted at all (see count below). How many events one wake-up of the event loop
# handles varies from run to run, which short runs would show; with 200 extra
# transactions per client, repeated runs here mostly agree to within about 15
# instructions, with an odd run about 2% off.
#
# Environment: BENCH_POOLER (pgmux, the default, or pgbouncer: Debian's PgBouncer,
# configured as in bench/run.sh, counted the same way), PGMUX_BIN (default: cargo build
# --release, target/release/pgmux),
# PG_BIN (default /usr/lib/postgresql/15/bin), BENCH_CLIENTS (default 100; more than the
# pool of 20, so clients queue for servers as at 500), BENCH_WORKLOAD (select, the
# default, or tpcb), BENCH_KEEP (a directory to copy both callgrind files to, for
# callgrind_annotate), BENCH_TRANSACTIONS (extra
# transactions per client, default 200), BENCH_PG_PORT (default 25442),
# BENCH_PGMUX_PORT (default 26442). Needs root (PostgreSQL runs as `postgres`) and
# valgrind (installed with apt-get when missing).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
. "$BENCH_DIR/lib.sh"

PROTOCOL=${1:-simple}
case $PROTOCOL in simple | extended | prepared) ;; *)
    echo "instructions.sh: protocol must be simple, extended or prepared" >&2
    exit 2
    ;;
esac
POOLER=${BENCH_POOLER:-pgmux}
case $POOLER in pgmux | pgbouncer) ;; *)
    echo "instructions.sh: BENCH_POOLER must be pgmux or pgbouncer" >&2
    exit 2
    ;;
esac
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_PORT=${BENCH_PG_PORT:-25442}
MUX_PORT=${BENCH_PGMUX_PORT:-26442}
CLIENTS=${BENCH_CLIENTS:-100}
EXTRA=${BENCH_TRANSACTIONS:-200}
WORKLOAD=${BENCH_WORKLOAD:-select}
case $WORKLOAD in select) SCRIPT=-S SCALE=1 ;; tpcb) SCRIPT= SCALE=10 ;; *)
    echo "instructions.sh: BENCH_WORKLOAD must be select or tpcb" >&2
    exit 2
    ;;
esac

if ! command -v valgrind >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind >/dev/null
fi
if [ "$POOLER" = pgbouncer ] && ! command -v pgbouncer >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >/dev/null
fi
if [ "$POOLER" = pgmux ] && [ -z "${PGMUX_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release -q)
    PGMUX_BIN=$ROOT/target/release/pgmux
fi

TMP=$(mktemp -d /tmp/pgmux-instructions.XXXXXX)
chown postgres "$TMP"
MUX_PID=
cleanup() {
    set +e
    stop_pid "$MUX_PID"
    pkill -f "callgrind-out-file=$TMP/" 2>/dev/null
    pg "$PG_BIN/pg_ctl" stop -D "$TMP/data" -m immediate >/dev/null 2>&1
    rm -rf "$TMP"
}
trap cleanup EXIT

pg "$PG_BIN/initdb" -D "$TMP/data" -U postgres -N --auth=trust >/dev/null
cat >>"$TMP/data/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$TMP'
fsync = off
max_connections = 200
CONF
pg "$PG_BIN/pg_ctl" start -D "$TMP/data" -l "$TMP/postgres.log" -w >/dev/null
"$PG_BIN/pgbench" -i -s "$SCALE" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >/dev/null 2>&1

cat >"$TMP/pgmux.toml" <<CONF
[pgmux]
listen = "127.0.0.1:$MUX_PORT"
metrics_listen = "127.0.0.1:$((MUX_PORT + 1))"
auth_type = "trust"
default_pool_size = 20
[users.postgres]
password = "unused"
[databases.postgres]
host = "127.0.0.1"
port = $PG_PORT
CONF
# PgBouncer configured alike: transaction pooling, pool 20, trust, same port.
cat >"$TMP/pgbouncer.ini" <<CONF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $MUX_PORT
unix_socket_dir =
auth_type = trust
auth_file = $TMP/users.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 1000
logfile = $TMP/pgbouncer.log
CONF
echo '"postgres" ""' >"$TMP/users.txt"
chown postgres "$TMP/pgbouncer.ini" "$TMP/users.txt"

# Total instructions of one pooler process that served CLIENTS x $1 transactions.
#
# Start-up is left out of the count: callgrind starts with its instrumentation off and
# is switched on once the pooler accepts connections. Start-up work is the same in both
# runs except where it loops on the clock, as the metrics exporter's clock calibration
# does: under callgrind that took from about 9 to 20 million instructions from one run
# to the next, which moved the result by up to 1,200 per transaction.
count() {
    local out=$TMP/callgrind.$1
    local vg=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out")
    local on=(timeout 60 callgrind_control -i on)
    if [ "$POOLER" = pgmux ]; then
        "${vg[@]}" "$PGMUX_BIN" -c "$TMP/pgmux.toml" --log-level warn 2>"$TMP/valgrind.log" &
    else
        # PgBouncer refuses to run as root.
        pg "${vg[@]}" pgbouncer -q "$TMP/pgbouncer.ini" 2>"$TMP/valgrind.log" &
    fi
    MUX_PID=$!
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$MUX_PORT") 2>/dev/null && break
        sleep 0.1
    done
    # The probe above opened and closed one connection, which may still be handled
    # after this: a cost that is the same in both runs.
    if [ "$POOLER" = pgmux ]; then
        "${on[@]}" "$MUX_PID" >/dev/null
    else
        # MUX_PID is the shell that runs runuser: valgrind is found by its command and
        # switched on by callgrind_control run as the same user.
        pg "${on[@]}" "$(pgrep -f "^[^ ]*valgrind.*callgrind-out-file=$out" | tail -n 1)" >/dev/null
    fi
    "$PG_BIN/pgbench" -n $SCRIPT -M "$PROTOCOL" -c "$CLIENTS" -j 2 -t "$1" \
        -h 127.0.0.1 -p "$MUX_PORT" -U postgres postgres >"$TMP/pgbench.$1" 2>&1 ||
        { cat "$TMP/pgbench.$1" >&2; exit 1; }
    # SIGINT: pgmux and PgBouncer both exit once no client is left, and callgrind
    # writes its totals as they do.
    if [ "$POOLER" = pgmux ]; then
        kill -INT "$MUX_PID"
    else
        pkill -INT -f "callgrind-out-file=$out" || true
    fi
    wait "$MUX_PID" || true
    MUX_PID=
    awk '/^summary:/ {print $2}' "$out"
    if [ -n "${BENCH_KEEP:-}" ]; then cp "$out" "$BENCH_KEEP/"; fi
}

few=$(count 10)
many=$(count $((10 + EXTRA)))
python3 -c "print(f'$POOLER instructions per transaction ($WORKLOAD, -M $PROTOCOL, $CLIENTS clients): {($many - $few) / ($EXTRA * $CLIENTS):.0f}')"
