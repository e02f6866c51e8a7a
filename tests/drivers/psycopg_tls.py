"""psycopg 3 against pgmux with each libpq sslmode.

Usage: psycopg_tls.py PORT DATABASE ROOT_CERT CLIENT_TLS_MODE

For each sslmode (disable, allow, prefer, require, verify-ca, verify-full) connects,
runs a query, and prints one line "sslmode=<mode> tls=<yes|no>" or
"sslmode=<mode> refused=<SQLSTATE or message>". The Rust test judges the lines.
"""

import sys

import psycopg


def main(port: str, database: str, root: str, _pgmux_mode: str) -> None:
    for sslmode in ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]:
        try:
            with psycopg.connect(
                host="localhost" if sslmode == "verify-full" else "127.0.0.1",
                port=port,
                user="app",
                password="app-secret",
                dbname=database,
                sslmode=sslmode,
                sslrootcert=root,
                connect_timeout=10,
            ) as conn:
                value = conn.execute("SELECT 40 + 2").fetchone()[0]
                assert value == 42, value
                tls = "yes" if conn.pgconn.ssl_in_use else "no"
                print(f"sslmode={sslmode} tls={tls}")
        except psycopg.OperationalError as e:
            reason = str(e).replace("\n", " ")
            print(f"sslmode={sslmode} refused={reason}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
