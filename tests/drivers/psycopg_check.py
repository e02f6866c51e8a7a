"""psycopg 3 through pgmux with the driver's default settings.

Usage: psycopg_check.py DSN CONNECTIONS

With PSYCOPG_IMPL=python, psycopg runs on the system's libpq instead of the one in
psycopg-binary; before libpq 17 it deallocates with SQL instead of a protocol Close.

psycopg prepares a query as a named statement (_pg3_N) once it has run
prepare_threshold (default 5) times on a connection, and deallocates the least recently
used one past prepared_max (default 100). Threads, more than pgmux has servers, each run
the same query 20 times (autocommit off, psycopg's default, committing each time, and
autocommit on), more than prepared_max distinct prepared queries, and pipeline mode
(also past prepared_max).
Prints one JSON line; any exception fails the run (exit status 1).
"""

import json
import sys
import threading

import psycopg


def check(dsn, i, pids):
    # Defaults: autocommit off, prepare_threshold 5, prepared_max 100.
    with psycopg.connect(dsn, connect_timeout=20) as conn:
        for r in range(20):
            row = conn.execute("SELECT %s::int * 3, pg_backend_pid()", (i * 100 + r,)).fetchone()
            assert row[0] == (i * 100 + r) * 3, row
            pids.add(row[1])
            conn.commit()
        # A transaction over several statements, prepared ones among them.
        with conn.transaction():
            for r in range(8):
                conn.execute("INSERT INTO items(v) VALUES (%s)", (f"psycopg {i} {r}",))
        n = conn.execute("SELECT count(*) FROM items WHERE v LIKE %s", (f"psycopg {i} %",)).fetchone()[0]
        assert n == 8, n
        conn.commit()
        # A rolled-back transaction keeps the prepared statements usable.
        try:
            with conn.transaction():
                conn.execute("SELECT %s::int * 3, pg_backend_pid()", (1,))
                conn.execute("SELECT 1 / 0")
        except psycopg.errors.DivisionByZero:
            pass
        assert conn.execute("SELECT %s::int * 3, pg_backend_pid()", (7,)).fetchone()[0] == 21
        conn.commit()

    with psycopg.connect(dsn, autocommit=True, connect_timeout=20) as conn:
        for r in range(20):
            row = conn.execute("SELECT %s::text || 'x', pg_backend_pid()", (f"{i}-{r}",)).fetchone()
            assert row[0] == f"{i}-{r}x", row
            pids.add(row[1])
        # More distinct prepared queries than prepared_max: psycopg deallocates the
        # oldest ones with DEALLOCATE while it goes.
        for q in range(110):
            for r in range(6):
                v = conn.execute(f"SELECT {q} + %s::int", (r,)).fetchone()[0]
                assert v == q + r, v
        # Pipeline mode: many queries in flight before the results are read.
        with conn.pipeline():
            cursors = []
            for r in range(40):
                cur = conn.cursor()
                cur.execute("SELECT %s::int + 1000", (r,))
                cursors.append((r, cur))
            for r, cur in cursors:
                assert cur.fetchone()[0] == r + 1000
        with conn.pipeline():
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO items(v) VALUES (%s)", [(f"pipe {i} {k}",) for k in range(30)]
                )
            for r in range(10):
                with conn.transaction():
                    conn.execute("INSERT INTO items(v) VALUES (%s)", (f"pipe tx {i} {r}",))
                    conn.execute("SELECT %s::int * 3, pg_backend_pid()", (r,))
        n = conn.execute("SELECT count(*) FROM items WHERE v LIKE %s", (f"pipe {i} %",)).fetchone()[0]
        assert n == 30, n
        n = conn.execute("SELECT count(*) FROM items WHERE v LIKE %s", (f"pipe tx {i} %",)).fetchone()[0]
        assert n == 10, n

    # Pipeline mode past prepared_max: psycopg deallocates from inside the pipeline,
    # with a protocol Close (libpq 17 and later) or an extended-protocol DEALLOCATE.
    with psycopg.connect(dsn, autocommit=True, connect_timeout=20) as conn:
        with conn.pipeline() as p:
            for q in range(110):
                for r in range(6):
                    cur = conn.execute(f"SELECT {q} * 2 + %s::int", (r,))
                    p.sync()
                    assert cur.fetchone()[0] == q * 2 + r

    # Pipeline mode with autocommit off: psycopg pipelines BEGIN with the statements.
    with psycopg.connect(dsn, connect_timeout=20) as conn:
        for r in range(10):
            with conn.pipeline():
                cur = conn.execute("SELECT %s::int * 3, pg_backend_pid()", (r,))
                cur2 = conn.execute("SELECT %s::text || 'x', pg_backend_pid()", (str(r),))
            assert cur.fetchone()[0] == r * 3
            assert cur2.fetchone()[0] == f"{r}x"
            conn.commit()


def main():
    dsn = sys.argv[1]
    connections = int(sys.argv[2])
    pids = set()
    errors = []

    def run(i):
        try:
            check(dsn, i, pids)
        except BaseException as e:  # reported below, the thread must not die silently
            errors.append(f"connection {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print("\n".join(errors), file=sys.stderr)
        sys.exit(1)
    print(
        json.dumps(
            {
                "psycopg": psycopg.__version__,
                "impl": psycopg.pq.__impl__,
                "libpq": psycopg.pq.version(),
                "backend_pids": len(pids),
            }
        )
    )


main()
