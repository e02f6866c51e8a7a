"""asyncpg through pgmux with the driver's default settings.

Usage: asyncpg_check.py DSN CONNECTIONS

asyncpg prepares every query as a named statement (its statement cache, on by default)
and keeps it for the life of the connection. Several connections, more than pgmux has
servers, run cached queries, a Connection.prepare() statement reused across many
transactions, executemany, a Pool, and a schema change under cached statements.
Prints one JSON line with what it saw; any exception fails the run (exit status 1).
"""

import asyncio
import json
import sys

import asyncpg


async def one_connection(dsn, i):
    conn = await asyncpg.connect(dsn, timeout=20)
    pids = set()
    try:
        # The statement cache: the same texts again and again, with new arguments.
        for r in range(30):
            v = await conn.fetchval("SELECT $1::int + 1", i * 1000 + r)
            assert v == i * 1000 + r + 1, v
            s = await conn.fetchval("SELECT $1::text || '!'", f"c{i}r{r}")
            assert s == f"c{i}r{r}!", s
        # An explicit prepared statement, reused in many transactions: each transaction
        # may get another server, which never saw this connection's Parse.
        stmt = await conn.prepare("SELECT $1::int * 2, pg_backend_pid()")
        for r in range(30):
            async with conn.transaction():
                row = await stmt.fetchrow(r)
                assert row[0] == r * 2, row
                pids.add(row[1])
                await conn.execute("INSERT INTO items(v) VALUES ($1)", f"asyncpg {i} {r}")
            # Outside a transaction too, between other clients' transactions.
            row = await stmt.fetchrow(r + 1)
            assert row[0] == (r + 1) * 2, row
            pids.add(row[1])
            await asyncio.sleep(0)
        # executemany: one Parse, many Bind/Execute in one batch.
        await conn.executemany(
            "INSERT INTO items(v) VALUES ($1)", [(f"many {i} {k}",) for k in range(20)]
        )
        n = await conn.fetchval("SELECT count(*) FROM items WHERE v LIKE $1", f"many {i} %")
        assert n == 20, n
        # Types that make asyncpg introspect the catalog with its own statements.
        row = await conn.fetchrow("SELECT $1::int[] AS a, $2::jsonb AS j", [1, 2, 3], '{"a": 1}')
        assert row["a"] == [1, 2, 3], row
        assert json.loads(row["j"]) == {"a": 1}, row
        # A failing statement must not break the cached ones.
        try:
            await conn.fetchval("SELECT 1 / $1::int", 0)
            raise AssertionError("division by zero succeeded")
        except asyncpg.DivisionByZeroError:
            pass
        assert await stmt.fetchval(21) == 42
    finally:
        await conn.close(timeout=10)
    return pids


async def with_pool(dsn, tasks):
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=6, timeout=20)
    try:

        async def task(i):
            for r in range(15):
                async with pool.acquire() as conn:
                    v = await conn.fetchval("SELECT $1::int + $2::int", i, r)
                    assert v == i + r, v

        await asyncio.gather(*(task(i) for i in range(tasks)))
    finally:
        await asyncio.wait_for(pool.close(), 20)


async def schema_change(dsn):
    # After ALTER TABLE, a cached statement fails with "cached plan must not change
    # result type"; asyncpg then prepares the query again and retries it by itself.
    a = await asyncpg.connect(dsn, timeout=20)
    b = await asyncpg.connect(dsn, timeout=20)
    try:
        await a.execute("CREATE TABLE ddl_t(x int); INSERT INTO ddl_t VALUES (1)")
        for conn in (a, b):
            rows = await conn.fetch("SELECT * FROM ddl_t WHERE x > $1", 0)
            assert [tuple(r) for r in rows] == [(1,)], rows
        await a.execute("ALTER TABLE ddl_t ADD COLUMN y int DEFAULT 7")
        for conn in (a, b, a, b):
            rows = await conn.fetch("SELECT * FROM ddl_t WHERE x > $1", 0)
            assert [tuple(r) for r in rows] == [(1, 7)], rows
    finally:
        await a.close(timeout=10)
        await b.close(timeout=10)


async def main():
    dsn = sys.argv[1]
    connections = int(sys.argv[2])
    results = await asyncio.gather(*(one_connection(dsn, i) for i in range(connections)))
    await with_pool(dsn, 12)
    await schema_change(dsn)
    pids = set().union(*results)
    print(json.dumps({"asyncpg": asyncpg.__version__, "backend_pids": len(pids)}))


asyncio.run(main())
