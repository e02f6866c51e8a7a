# Shell helpers shared by the benchmark scripts (sourced, not run).

# stop_pid PID: SIGTERM, wait up to 10 s, then SIGKILL. Nothing for an empty or dead PID.
stop_pid() {
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# pg CMD...: runs a PostgreSQL program as the postgres user, from $TMP (which it owns).
pg() { (cd "$TMP" && runuser -u postgres -- "$@"); }

# tail_logs DIR NAME...: after a failure, the last lines of each non-empty DIR/NAME, on
# stderr.
tail_logs() {
    local dir=$1 log
    shift
    for log in "$@"; do
        if [ -s "$dir/$log" ]; then
            printf '\n--- last lines of %s ---\n' "$log" >&2
            tail -n 15 "$dir/$log" >&2
        fi
    done
}
