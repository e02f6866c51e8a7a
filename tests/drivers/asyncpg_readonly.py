"""asyncpg's read-only transactions through pgmux with a replica.

Usage: asyncpg_readonly.py DSN ROUNDS

Each round runs `transaction(readonly=True)` (and one at REPEATABLE READ) and checks that
the transaction ran on the replica (pg_is_in_recovery() is true inside it), then a
read-write transaction that must run on the primary. Prints "ok replica=N primary=M".
"""

import asyncio
import sys

import asyncpg


async def main(dsn: str, rounds: int) -> None:
    conn = await asyncpg.connect(dsn, timeout=20)
    replica = primary = 0
    try:
        for _ in range(rounds):
            async with conn.transaction(readonly=True):
                if await conn.fetchval("SELECT pg_is_in_recovery()"):
                    replica += 1
            async with conn.transaction(readonly=True, isolation="repeatable_read"):
                if await conn.fetchval("SELECT pg_is_in_recovery()"):
                    replica += 1
        async with conn.transaction():
            await conn.execute("INSERT INTO items(v) VALUES ('asyncpg rw')")
            if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                primary += 1
    finally:
        await conn.close()
    print(f"ok replica={replica} primary={primary}")


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(sys.argv[1], int(sys.argv[2])), timeout=90))
