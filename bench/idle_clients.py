#!/usr/bin/env python3
"""Open many idle PostgreSQL client connections and hold them open.

Each connection does the protocol-3.0 startup and password authentication (md5,
cleartext or SCRAM-SHA-256, whichever the server asks for), waits for ReadyForQuery,
then sits idle for --hold seconds before it sends Terminate and closes.

When every connection has either reached ReadyForQuery or failed, the tool writes one
line to --ready-file (if given) and to stderr:  READY <connected> <failed>
A measuring script can poll for that file, take its readings while the connections are
idle, and then send SIGTERM (or SIGINT) to end the hold early. At the end the tool prints
a JSON summary on stdout.

Standard library only. Example:
    idle_clients.py --port 26432 --user bench --password bench-secret --dbname bench \
        -n 10000 --hold 30 --ready-file /tmp/ready
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import resource
import secrets
import signal
import struct
import sys
import time

PROTOCOL_3_0 = 196608


class AuthError(Exception):
    pass


def raise_nofile(wanted):
    """Raise RLIMIT_NOFILE's soft limit as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def message(kind, payload):
    return kind + struct.pack("!I", len(payload) + 4) + payload


def startup_packet(user, dbname, application_name):
    params = b""
    for key, value in (("user", user), ("database", dbname),
                       ("application_name", application_name)):
        params += key.encode() + b"\0" + value.encode() + b"\0"
    payload = struct.pack("!I", PROTOCOL_3_0) + params + b"\0"
    return struct.pack("!I", len(payload) + 4) + payload


def md5_password(user, password, salt):
    inner = hashlib.md5((password + user).encode()).hexdigest()
    outer = hashlib.md5(inner.encode() + salt).hexdigest()
    return "md5" + outer


class Scram:
    """Client side of SCRAM-SHA-256 (RFC 5802/7677), without channel binding."""

    def __init__(self, password):
        self.password = password.encode()
        self.nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self.first_bare = "n=,r=" + self.nonce
        self.server_signature = None

    def client_first(self):
        return ("n,," + self.first_bare).encode()

    def client_final(self, server_first):
        text = server_first.decode()
        attrs = dict(item.split("=", 1) for item in text.split(","))
        nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        if not nonce.startswith(self.nonce):
            raise AuthError("SCRAM server nonce does not extend the client nonce")
        salted = hashlib.pbkdf2_hmac("sha256", self.password, salt, iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = "c=biws,r=" + nonce
        auth_message = ",".join((self.first_bare, text, without_proof)).encode()
        client_sig = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, client_sig))
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self.server_signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
        return (without_proof + ",p=" + base64.b64encode(proof).decode()).encode()

    def check_final(self, server_final):
        attrs = dict(item.split("=", 1) for item in server_final.decode().split(","))
        if "e" in attrs:
            raise AuthError("SCRAM error from server: " + attrs["e"])
        if base64.b64decode(attrs.get("v", "")) != self.server_signature:
            raise AuthError("SCRAM server signature does not match")


async def read_message(reader):
    header = await reader.readexactly(5)
    kind = header[:1]
    (length,) = struct.unpack("!I", header[1:])
    body = await reader.readexactly(length - 4) if length > 4 else b""
    return kind, body


def error_text(body):
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return "%s %s %s" % (fields.get("S", "?"), fields.get("C", "?"), fields.get("M", "?"))


async def login(reader, writer, args):
    """Run startup and authentication until ReadyForQuery."""
    writer.write(startup_packet(args.user, args.dbname, args.application_name))
    await writer.drain()
    scram = None
    while True:
        kind, body = await read_message(reader)
        if kind == b"R":
            (code,) = struct.unpack("!I", body[:4])
            if code == 0:  # AuthenticationOk
                continue
            if code == 3:  # cleartext
                writer.write(message(b"p", args.password.encode() + b"\0"))
            elif code == 5:  # md5 with a 4-byte salt
                writer.write(message(b"p", md5_password(args.user, args.password,
                                                         body[4:8]).encode() + b"\0"))
            elif code == 10:  # SASL: list of mechanisms
                mechanisms = [m for m in body[4:].split(b"\0") if m]
                if b"SCRAM-SHA-256" not in mechanisms:
                    raise AuthError("no supported SASL mechanism: %r" % mechanisms)
                scram = Scram(args.password)
                first = scram.client_first()
                payload = b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first
                writer.write(message(b"p", payload))
            elif code == 11:  # SASLContinue
                writer.write(message(b"p", scram.client_final(body[4:])))
            elif code == 12:  # SASLFinal
                scram.check_final(body[4:])
                continue
            else:
                raise AuthError("unsupported authentication request %d" % code)
            await writer.drain()
        elif kind == b"E":
            raise AuthError(error_text(body))
        elif kind == b"Z":
            return
        # ParameterStatus (S), BackendKeyData (K), NoticeResponse (N): ignore.


class Stats:
    def __init__(self):
        self.connected = 0
        self.failed = 0
        self.errors = {}
        self.login_times = []

    def fail(self, text):
        self.failed += 1
        self.errors[text] = self.errors.get(text, 0) + 1


async def one_client(args, stats, gate, done_login, release):
    writer = None
    try:
        async with gate:
            start = time.monotonic()
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(args.host, args.port), args.connect_timeout)
            await asyncio.wait_for(login(reader, writer, args), args.connect_timeout)
            stats.login_times.append(time.monotonic() - start)
        stats.connected += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, AuthError) as exc:
        text = "%s: %s" % (type(exc).__name__, exc)
        stats.fail(text[:200])
        if writer is not None:
            writer.close()
        writer = None
    finally:
        done_login()
    if writer is None:
        return
    try:
        await release.wait()
        writer.write(message(b"X", b""))
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def main_async(args):
    stats = Stats()
    gate = asyncio.Semaphore(args.concurrency)
    release = asyncio.Event()
    all_in = asyncio.Event()
    pending = [args.clients]

    def done_login():
        pending[0] -= 1
        if pending[0] == 0:
            all_in.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, release.set)

    started = time.monotonic()
    tasks = [asyncio.create_task(one_client(args, stats, gate, done_login, release))
             for _ in range(args.clients)]
    if args.clients == 0:
        all_in.set()
    waiter = asyncio.create_task(all_in.wait())
    await asyncio.wait([waiter, asyncio.create_task(release.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    login_seconds = time.monotonic() - started
    line = "READY %d %d" % (stats.connected, stats.failed)
    print(line, file=sys.stderr, flush=True)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, args.ready_file)
    try:
        await asyncio.wait_for(release.wait(), args.hold)
    except asyncio.TimeoutError:
        pass
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    times = sorted(stats.login_times)
    summary = {
        "requested": args.clients,
        "connected": stats.connected,
        "failed": stats.failed,
        "errors": stats.errors,
        "seconds_to_connect_all": round(login_seconds, 3),
        "login_ms_median": round(1000 * times[len(times) // 2], 3) if times else None,
        "login_ms_max": round(1000 * times[-1], 3) if times else None,
    }
    print(json.dumps(summary))
    return 0 if stats.failed == 0 else 1


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", default=os.environ.get("PGPASSWORD", ""))
    p.add_argument("--dbname", required=True)
    p.add_argument("-n", "--clients", type=int, default=1000,
                   help="number of connections (default 1000)")
    p.add_argument("--hold", type=float, default=10.0,
                   help="seconds to stay connected after all logins (default 10); "
                        "SIGTERM/SIGINT end it early")
    p.add_argument("--concurrency", type=int, default=200,
                   help="logins in flight at once (default 200)")
    p.add_argument("--connect-timeout", type=float, default=60.0,
                   help="seconds allowed for one connect + login (default 60)")
    p.add_argument("--ready-file", help="write 'READY <ok> <failed>' here when logins end")
    p.add_argument("--application-name", default="idle_clients")
    args = p.parse_args()
    if args.clients < 0 or args.concurrency < 1:
        p.error("--clients must be >= 0 and --concurrency >= 1")
    limit = raise_nofile(args.clients + 64)
    if limit < args.clients + 16:
        print("idle_clients: open-file limit %d is too low for %d connections"
              % (limit, args.clients), file=sys.stderr)
        return 2
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
