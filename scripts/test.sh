#!/usr/bin/env bash
# The test command: unit tests and integration tests. The integration tests start their
# own PostgreSQL 15 servers from /usr/lib/postgresql/15/bin. Extra arguments go to
# `cargo test`, e.g. `scripts/test.sh --test smoke`.
#
# The driver tests (tests/drivers.rs) run Python drivers from a virtualenv made here,
# target/venv (PGMUX_TEST_VENV to put it elsewhere), with the versions pinned in
# tests/drivers/requirements.txt. It is reused while those pins stay the same. Likewise
# node-postgres goes into target/node.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=${PGMUX_TEST_VENV:-$PWD/target/venv}
requirements=tests/drivers/requirements.txt
if ! cmp -s "$requirements" "$venv/requirements.txt" ||
    ! "$venv/bin/python" -c 'import asyncpg, psycopg' 2>/dev/null; then
    echo "test.sh: creating the Python virtualenv $venv for the driver tests" >&2
    rm -rf "$venv"
    if ! python3 -m venv "$venv"; then
        echo "test.sh: 'python3 -m venv' failed; on Debian, apt-get install python3-venv" >&2
        exit 1
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-input -r "$requirements"
    cp "$requirements" "$venv/requirements.txt"
fi
export PGMUX_TEST_PYTHON=$venv/bin/python

# node-postgres, from tests/drivers/package-lock.json, into target/node
# (PGMUX_TEST_NODE_DIR to put it elsewhere); reused while the lock file stays the same.
node_dir=${PGMUX_TEST_NODE_DIR:-$PWD/target/node}
if ! cmp -s tests/drivers/package-lock.json "$node_dir/package-lock.json" ||
    [ ! -d "$node_dir/node_modules/pg" ]; then
    if ! command -v npm >/dev/null; then
        echo "test.sh: npm is missing (the driver tests need node-postgres); on Debian, apt-get install nodejs npm" >&2
        exit 1
    fi
    echo "test.sh: installing node-postgres into $node_dir for the driver tests" >&2
    rm -rf "$node_dir"
    mkdir -p "$node_dir"
    cp tests/drivers/package.json tests/drivers/package-lock.json "$node_dir/"
    (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi
export PGMUX_TEST_NODE_MODULES=$node_dir/node_modules

exec cargo test "$@"
