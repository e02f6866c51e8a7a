"""The pgmux console from psycopg 3, as operators' scripts use it.

Usage: psycopg_console.py PORT DATABASE

Logs in to the virtual database `pgmux` as the admin user `app` and as the stats user
`app_md5`, runs SHOW commands, PAUSE and RESUME, and checks that the stats user may not
pause and that an ordinary user is refused. The console speaks the simple query
protocol only, so queries go through a ClientCursor, as with PgBouncer's console.
Prints "ok" and the SHOW POOLS row count.
"""

import sys

import psycopg


def connect(port: str, user: str, password: str) -> psycopg.Connection:
    return psycopg.connect(
        host="127.0.0.1",
        port=port,
        user=user,
        password=password,
        dbname="pgmux",
        autocommit=True,
        connect_timeout=10,
        cursor_factory=psycopg.ClientCursor,
    )


def main(port: str, database: str) -> None:
    with connect(port, "app", "app-secret") as admin:
        cur = admin.execute("SHOW POOLS")
        columns = [c.name for c in cur.description]
        assert columns[:3] == ["database", "user", "cl_active"], columns
        pools = [dict(zip(columns, row)) for row in cur.fetchall()]
        assert any(p["database"] == database for p in pools), pools
        stats = admin.execute("SHOW STATS").fetchall()
        assert stats, "SHOW STATS returned nothing"
        version = admin.execute("SHOW VERSION").fetchone()[0]
        assert "pgmux" in version, version
        admin.execute(f"PAUSE {database}")
        admin.execute(f"RESUME {database}")

    with connect(port, "app_md5", "md5-secret") as stats_user:
        stats_user.execute("SHOW POOLS").fetchall()
        try:
            stats_user.execute(f"PAUSE {database}")
        except psycopg.errors.InsufficientPrivilege:
            pass
        else:
            raise AssertionError("a stats user could PAUSE")

    try:
        connect(port, "app_plain", "plain-secret").close()
    except psycopg.OperationalError as e:
        assert "28000" in str(e) or "not allowed" in str(e) or "console" in str(e), e
    else:
        raise AssertionError("an ordinary user got into the console")
    print(f"ok pools={len(pools)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
