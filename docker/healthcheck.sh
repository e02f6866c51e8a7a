#!/bin/bash
# Health check for the pgmux container image, run by Docker's HEALTHCHECK.
#
# The slim runtime image has no curl, so this uses bash's /dev/tcp. Two probes:
#
# 1. Client port: sends a PostgreSQL SSLRequest and expects a one-byte protocol answer.
#    pgmux answers 'N' (no TLS). 'S' (TLS accepted) and 'E' (an error packet, for example
#    53300 when max_client_conn is reached) also show that pgmux is up and answering. The
#    probe then hangs up before any startup message: pgmux does not log that at the
#    default level and counts no error for it.
# 2. Metrics port: GET /metrics must answer HTTP 200. Skipped when
#    PGMUX_HEALTHCHECK_METRICS_PORT is set to an empty string (for a configuration
#    without metrics_listen).
#
# Environment (defaults match docker/pgmux.toml):
#   PGMUX_HEALTHCHECK_HOST          address to probe, default 127.0.0.1
#   PGMUX_HEALTHCHECK_PORT          client port, default 6432
#   PGMUX_HEALTHCHECK_METRICS_PORT  metrics port, default 9930; empty skips the probe
#
# pgmux must listen on an address reachable as PGMUX_HEALTHCHECK_HOST from inside the
# container: 0.0.0.0:PORT or 127.0.0.1:PORT both work for 127.0.0.1.
#
# Exit status: 0 healthy, 1 unhealthy (the reason goes to stderr, which `docker inspect`
# shows under .State.Health.Log).
set -u

host=${PGMUX_HEALTHCHECK_HOST:-127.0.0.1}
port=${PGMUX_HEALTHCHECK_PORT:-6432}
metrics_port=${PGMUX_HEALTHCHECK_METRICS_PORT-9930}

fail() {
    printf 'pgmux-healthcheck: %s\n' "$*" >&2
    exit 1
}

# Probe 1: SSLRequest = length 8, code 80877103 (0x04d2162f).
if ! exec 3<>"/dev/tcp/$host/$port"; then
    fail "cannot connect to the client port $host:$port"
fi
printf '\000\000\000\010\004\322\026\057' >&3 || fail "cannot write to $host:$port"
answer=
IFS= read -r -n 1 -t 5 answer <&3 || fail "no answer to SSLRequest on $host:$port"
exec 3>&-
case $answer in
    N | S | E) ;;
    *) fail "unexpected answer to SSLRequest on $host:$port: '$answer'" ;;
esac

# Probe 2: the Prometheus endpoint.
if [ -n "$metrics_port" ]; then
    if ! exec 4<>"/dev/tcp/$host/$metrics_port"; then
        fail "cannot connect to the metrics port $host:$metrics_port"
    fi
    printf 'GET /metrics HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n' \
        "$host" "$metrics_port" >&4 || fail "cannot write to $host:$metrics_port"
    status=
    IFS= read -r -t 5 status <&4 || fail "no HTTP answer from $host:$metrics_port"
    exec 4>&-
    status=${status%$'\r'}
    case $status in
        "HTTP/1."[01]" 200"*) ;;
        *) fail "metrics endpoint $host:$metrics_port answered '$status'" ;;
    esac
fi
exit 0
