#!/usr/bin/env bash
# The test command: unit tests and integration tests. The integration tests start their
# own PostgreSQL 15 servers from /usr/lib/postgresql/15/bin. Extra arguments go to
# `cargo test`, e.g. `scripts/test.sh --test smoke`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec cargo test "$@"
