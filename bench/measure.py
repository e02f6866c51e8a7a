#!/usr/bin/env python3
"""Measurement steps for bench/run.sh (standard library only).

  measure.py run   ...   run pgbench once against one target, watch the pooler process,
                         append one row to the results CSV
  measure.py skip  ...   append a row for a run that is not made (e.g. unsupported)
  measure.py idle  ...   memory per idle client: RSS of the pooler with N idle clients
                         (bench/idle_clients.py) minus its RSS with none

See bench/README.md for what each column means.
"""

import argparse
import csv
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import resource

HERE = os.path.dirname(os.path.abspath(__file__))

RUN_FIELDS = [
    "run_mode", "cell", "workload", "protocol", "clients", "threads", "target",
    "order_in_cell", "round", "duration_s", "status", "exit_code", "tps", "lat_avg_ms",
    "lat_p50_ms", "lat_p99_ms", "lat_avg_pgbench_ms", "transactions", "failed_tx",
    "aborted_clients", "conn_time_ms", "pooler_cpu_s", "pooler_cpu_us_per_tx",
    "pooler_rss_max_kb", "pooler_vmhwm_kb", "pgbench_cpu_s", "wall_s", "started_at",
    "note", "command",
    # Added later, at the end so that older CSVs still line up column by column.
    "pg_cpu_s", "pg_cpu_us_per_tx", "pgbench_cpu_us_per_tx", "machine_busy_s",
    "machine_idle_s", "machine_busy_us_per_tx", "machine_idle_us_per_tx",
]

IDLE_FIELDS = [
    "run_mode", "target", "requested", "connected", "failed", "rss_zero_kb",
    "rss_idle_kb", "rss_after_close_kb", "vmhwm_kb", "bytes_per_client",
    "seconds_to_connect_all", "note", "command",
]

WORKLOAD_FLAGS = {"select": ["-S"], "tpcb": []}


# ---------------------------------------------------------------- /proc helpers

def proc_status_kb(pid, key):
    """A 'kB' field of /proc/PID/status (VmRSS, VmHWM), or None."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def proc_stat_fields(pid):
    """The fields of /proc/PID/stat from field 3 (state) on, or None. fields[k] is
    field k + 3: ppid (4) is fields[1], utime, stime, cutime, cstime (14-17) are
    fields[11:15]."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces or parentheses: split after the last ')'.
    return data[data.rindex(")") + 2:].split()


def proc_cpu_ticks(pid):
    """utime + stime of the whole process (all threads), in clock ticks."""
    fields = proc_stat_fields(pid)
    return None if fields is None else int(fields[11]) + int(fields[12])


def postmaster_pid(data_dir):
    """The postmaster's pid: the first line of DATA/postmaster.pid."""
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            return int(f.readline())
    except (OSError, ValueError):
        return None


def pg_cpu_ticks(postmaster):
    """CPU time of PostgreSQL as a whole, in clock ticks, and how many children the
    postmaster has: (ticks, children), or (None, 0).

    Every PostgreSQL process is a child of the postmaster. The postmaster's own
    utime+stime plus its cutime+cstime (the CPU of children that exited and that it
    reaped) plus the CPU of its live children only grows: a backend that exits moves
    from the live sum into cutime/cstime. So the difference of two readings is all the
    CPU PostgreSQL used in between, also when backends start and end on the way (each
    direct pgbench client has a backend of its own). A live child counts its own
    cutime+cstime too, since those also move into the postmaster's when it exits."""
    for _ in range(5):
        own = proc_stat_fields(postmaster)
        if own is None:
            return None, 0
        ticks, children = 0, 0
        for path in glob.glob("/proc/[0-9]*/stat"):
            pid = int(path.split("/")[2])
            fields = proc_stat_fields(pid)
            if fields is None or int(fields[1]) != postmaster:
                continue
            ticks += sum(int(x) for x in fields[11:15])
            children += 1
        again = proc_stat_fields(postmaster)
        if again is None:
            return None, 0
        # A child reaped during the scan is either missed or counted twice; the
        # postmaster's cutime/cstime then moved, and the reading is taken again.
        if again[13:15] == own[13:15]:
            return ticks + sum(int(x) for x in again[11:15]), children
    return ticks + sum(int(x) for x in again[11:15]), children


def wait_for_backends(postmaster, children, limit=3.0):
    """After a run, wait until the backends of its clients are gone: a direct client's
    backend exits after pgbench has, and the CPU of its exit belongs to the run. Stop
    when the postmaster has no more children than before the run, or when their number
    has not moved for 0.2 s (a pooler may have opened server connections it keeps)."""
    deadline = time.monotonic() + limit
    last, still = None, 0
    while time.monotonic() < deadline:
        ticks, now = pg_cpu_ticks(postmaster)
        if ticks is None or now <= children:
            return
        still = still + 1 if now == last else 0
        if still >= 4:
            return
        last = now
        time.sleep(0.05)


def machine_cpu_ticks():
    """(busy, idle) clock ticks of all CPUs since boot, from the first line of
    /proc/stat: busy = user+nice+system+irq+softirq+steal, idle = idle+iowait (guest
    time is already part of user)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = \
        [int(x) for x in (fields[1:9] + ["0"] * 8)[:8]]
    return user + nice + system + irq + softirq + steal, idle + iowait


class RssSampler(threading.Thread):
    """Samples VmRSS of a process every `interval` seconds; keeps the maximum."""

    def __init__(self, pid, interval=0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.max_kb = proc_status_kb(pid, "VmRSS")
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.is_set():
            kb = proc_status_kb(self.pid, "VmRSS")
            if kb is not None and (self.max_kb is None or kb > self.max_kb):
                self.max_kb = kb
            self.stop_event.wait(self.interval)

    def stop(self):
        self.stop_event.set()
        self.join()
        kb = proc_status_kb(self.pid, "VmRSS")
        if kb is not None and (self.max_kb is None or kb > self.max_kb):
            self.max_kb = kb
        return self.max_kb


# ---------------------------------------------------------------- child handling

CHILD = [None]


def on_term(signum, _frame):
    """Stop the running child (timeout forwards the signal to pgbench), then exit."""
    child = CHILD[0]
    if child is not None and child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
    sys.exit(128 + signum)


def install_signal_handlers():
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)


def append_row(path, fields, row):
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})


def fmt(value, digits):
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------- pgbench output

def parse_pgbench_stdout(text):
    out = {}
    patterns = {
        "transactions": r"number of transactions actually processed: (\d+)",
        "failed_tx": r"number of failed transactions: (\d+)",
        "lat_avg_pgbench_ms": r"latency average = ([\d.]+) ms",
        "conn_time_ms": r"initial connection time = ([\d.]+) ms",
        "tps": r"tps = ([\d.]+) \(without initial connection time\)",
    }
    for key, pat in patterns.items():
        m = re.search(pat, text)
        if m:
            out[key] = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    return out


ABORT_RE = re.compile(r"client (\d+) (?:script \d+ )?aborted")


def first_error(stderr):
    for line in stderr.splitlines():
        low = line.lower()
        if "error" in low or "fatal" in low or "aborted" in low:
            return line.strip()[:300]
    return ""


def read_txn_logs(prefix):
    """Latencies (µs) of successful transactions and the count of failed ones, from
    pgbench's per-transaction logs (--log): one file per thread, PREFIX.PID[.N].
    Line format (PostgreSQL 15): client_id transaction_no time script_no time_epoch
    time_us [schedule_lag] [retries]; `time` is the latency in µs, or 'failed' /
    'skipped'."""
    latencies, failed, first_epoch, last_epoch = [], 0, None, None
    for path in glob.glob(prefix + ".*"):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6:
                    continue
                if parts[2] == "failed":
                    failed += 1
                    continue
                if parts[2] == "skipped":
                    continue
                latencies.append(int(parts[2]))
                t = int(parts[4]) + int(parts[5]) / 1e6
                if first_epoch is None or t < first_epoch:
                    first_epoch = t
                if last_epoch is None or t > last_epoch:
                    last_epoch = t
        os.unlink(path)
    return latencies, failed, first_epoch, last_epoch


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


# ---------------------------------------------------------------- run

def pgbench_command(a, log_prefix):
    cmd = [a.pgbench, "-h", a.host, "-p", str(a.port), "-U", a.user,
           "-c", str(a.clients), "-j", str(a.threads), "-T", str(a.duration),
           "-M", a.protocol] + WORKLOAD_FLAGS[a.workload] + [
           "-n", "--max-tries=1", "-l", "--log-prefix=" + log_prefix, a.dbname]
    limit = a.duration + a.grace
    return ["timeout", "-k", "10", str(limit)] + cmd


def shown_command(cmd, log_prefix):
    """The command as recorded: the temporary log path replaced by a placeholder."""
    return " ".join("--log-prefix=LOGDIR/pgbench_log" if c.startswith("--log-prefix=")
                    else c for c in cmd)


def cmd_run(a):
    install_signal_handlers()
    os.makedirs(a.logdir, exist_ok=True)
    log_prefix = os.path.join(a.logdir, "pgbench_log")
    for stale in glob.glob(log_prefix + ".*"):
        os.unlink(stale)
    cmd = pgbench_command(a, log_prefix)
    row = {
        "run_mode": a.run_mode, "cell": a.cell, "workload": a.workload,
        "protocol": a.protocol, "clients": a.clients, "threads": a.threads,
        "target": a.target, "order_in_cell": a.order, "round": a.round,
        "duration_s": a.duration, "command": shown_command(cmd, log_prefix),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    pid = a.pid if a.pid and a.pid > 0 else None
    tick = a.clk_tck or os.sysconf("SC_CLK_TCK")
    postmaster = postmaster_pid(a.pg_data) if a.pg_data else None
    pg0, pg_children = pg_cpu_ticks(postmaster) if postmaster else (None, 0)
    cpu0 = proc_cpu_ticks(pid) if pid else None
    sampler = RssSampler(pid) if pid else None
    if sampler:
        sampler.start()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine0 = machine_cpu_ticks()
    t0 = time.monotonic()
    env = dict(os.environ, PGPASSWORD=a.password)
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=env, text=True, errors="replace")
    CHILD[0] = child
    stdout, stderr = child.communicate()
    CHILD[0] = None
    wall = time.monotonic() - t0
    machine1 = machine_cpu_ticks()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rc = child.returncode
    row["wall_s"] = round(wall, 2)
    row["exit_code"] = rc
    row["pgbench_cpu_s"] = round((ru1.ru_utime - ru0.ru_utime)
                                 + (ru1.ru_stime - ru0.ru_stime), 3)
    if sampler:
        row["pooler_rss_max_kb"] = sampler.stop()
        row["pooler_vmhwm_kb"] = proc_status_kb(pid, "VmHWM")
    cpu1 = proc_cpu_ticks(pid) if pid else None
    pg1 = None
    if pg0 is not None:
        wait_for_backends(postmaster, pg_children)
        pg1 = pg_cpu_ticks(postmaster)[0]

    with open(os.path.join(a.logdir, "pgbench.out"), "w") as f:
        f.write("$ %s\n--- stdout\n%s--- stderr\n%s" % (" ".join(cmd), stdout, stderr))

    parsed = parse_pgbench_stdout(stdout)
    row.update(parsed)
    latencies, log_failed, first_t, last_t = read_txn_logs(log_prefix)
    latencies.sort()
    if latencies:
        row["lat_avg_ms"] = fmt(sum(latencies) / len(latencies) / 1000.0, 3)
        row["lat_p50_ms"] = fmt(percentile(latencies, 50) / 1000.0, 3)
        row["lat_p99_ms"] = fmt(percentile(latencies, 99) / 1000.0, 3)
    aborted = len(set(ABORT_RE.findall(stderr)))
    row["aborted_clients"] = aborted
    timed_out = rc in (124, 137, -9)
    if "transactions" not in row:
        # pgbench printed no summary (killed or failed early): fall back on the logs.
        row["transactions"] = len(latencies)
        row["failed_tx"] = log_failed
        if latencies and first_t is not None and last_t > first_t:
            row["tps"] = fmt(len(latencies) / (last_t - first_t), 3)
    if "failed_tx" not in row:
        row["failed_tx"] = log_failed
    if pid and cpu0 is not None and cpu1 is not None:
        cpu_s = (cpu1 - cpu0) / float(tick)
        row["pooler_cpu_s"] = round(cpu_s, 3)
        if row["transactions"]:
            row["pooler_cpu_us_per_tx"] = fmt(cpu_s / row["transactions"] * 1e6, 2)
    tx = row["transactions"]
    if pg0 is not None and pg1 is not None:
        pg_s = (pg1 - pg0) / float(tick)
        row["pg_cpu_s"] = round(pg_s, 3)
        if tx:
            row["pg_cpu_us_per_tx"] = fmt(pg_s / tx * 1e6, 2)
    if tx:
        row["pgbench_cpu_us_per_tx"] = fmt(row["pgbench_cpu_s"] / tx * 1e6, 2)
    if machine0 and machine1:
        busy_s = (machine1[0] - machine0[0]) / float(tick)
        idle_s = (machine1[1] - machine0[1]) / float(tick)
        row["machine_busy_s"], row["machine_idle_s"] = round(busy_s, 3), round(idle_s, 3)
        if tx:
            row["machine_busy_us_per_tx"] = fmt(busy_s / tx * 1e6, 2)
            row["machine_idle_us_per_tx"] = fmt(idle_s / tx * 1e6, 2)

    err = first_error(stderr)
    if timed_out:
        row["status"] = "timeout"
        row["note"] = "killed after %d s; %s" % (a.duration + a.grace, err)
    elif aborted:
        row["status"] = "aborted"
        row["note"] = "%d of %d clients aborted; %s" % (aborted, a.clients, err)
    elif rc != 0:
        row["status"] = "error"
        row["note"] = "pgbench exit %d; %s" % (rc, err)
    elif row.get("failed_tx"):
        row["status"] = "failures"
        row["note"] = err
    elif not row.get("transactions"):
        row["status"] = "error"
        row["note"] = "no transaction completed; " + err
    else:
        row["status"] = "ok"
    append_row(a.csv, RUN_FIELDS, row)
    print("  r%-2s %-9s %-6s %-8s c=%-5s %-8s tps=%-10s avg=%-8s p99=%-8s cpu/tx=%sus "
          "pg/tx=%sus pgbench/tx=%sus busy/tx=%sus rss=%skB %s"
          % (a.round, a.target, a.workload, a.protocol, a.clients, row["status"],
             row.get("tps"), row.get("lat_avg_ms"), row.get("lat_p99_ms"),
             row.get("pooler_cpu_us_per_tx", "-"), row.get("pg_cpu_us_per_tx", "-"),
             row.get("pgbench_cpu_us_per_tx", "-"), row.get("machine_busy_us_per_tx", "-"),
             row.get("pooler_rss_max_kb", "-"), row.get("note", "")[:120]), flush=True)
    return 0


def cmd_skip(a):
    row = {"run_mode": a.run_mode, "cell": a.cell, "workload": a.workload,
           "protocol": a.protocol, "clients": a.clients, "threads": a.threads,
           "target": a.target, "order_in_cell": a.order, "round": a.round,
           "duration_s": a.duration, "status": "n/a", "note": a.reason,
           "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    append_row(a.csv, RUN_FIELDS, row)
    print("  r%-2s %-9s %-6s %-8s c=%-5s n/a (%s)" % (a.round, a.target, a.workload,
                                                     a.protocol, a.clients, a.reason),
          flush=True)
    return 0


# ---------------------------------------------------------------- idle memory

def cmd_idle(a):
    install_signal_handlers()
    pid = a.pid
    ready = os.path.join(a.workdir, "idle-%s.ready" % a.target)
    if os.path.exists(ready):
        os.unlink(ready)
    base = [sys.executable, os.path.join(HERE, "idle_clients.py"), "--host", a.host,
            "--port", str(a.port), "--user", a.user, "--dbname", a.dbname]
    env = dict(os.environ, PGPASSWORD=a.password)
    # Warm-up: one client logs in, so that the pool and its first server connection
    # exist before the zero-client reading.
    subprocess.run(base + ["-n", "1", "--hold", "0"], env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    time.sleep(a.settle)
    rss0 = proc_status_kb(pid, "VmRSS")
    cmd = base + ["-n", str(a.clients), "--hold", str(a.max_hold),
                  "--concurrency", str(a.concurrency), "--ready-file", ready]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    CHILD[0] = child
    deadline = time.monotonic() + a.max_hold
    while not os.path.exists(ready) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(a.settle)
    samples = []
    for _ in range(5):
        kb = proc_status_kb(pid, "VmRSS")
        if kb is not None:
            samples.append(kb)
        time.sleep(0.4)
    rss_idle = max(samples) if samples else None
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        child.kill()
        stdout, stderr = child.communicate()
    CHILD[0] = None
    time.sleep(a.settle)
    rss_after = proc_status_kb(pid, "VmRSS")
    summary = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            summary = json.loads(line)
    connected = summary.get("connected", 0)
    row = {
        "run_mode": a.run_mode, "target": a.target, "requested": a.clients,
        "connected": connected, "failed": summary.get("failed"),
        "rss_zero_kb": rss0, "rss_idle_kb": rss_idle, "rss_after_close_kb": rss_after,
        "vmhwm_kb": proc_status_kb(pid, "VmHWM"),
        "seconds_to_connect_all": summary.get("seconds_to_connect_all"),
        "command": " ".join(["idle_clients.py"] + cmd[2:]).replace(ready, "READYFILE"),
    }
    if connected and rss0 is not None and rss_idle is not None:
        row["bytes_per_client"] = round((rss_idle - rss0) * 1024.0 / connected)
    notes = []
    if summary.get("errors"):
        notes.append("; ".join("%dx %s" % (n, e) for e, n in
                               sorted(summary["errors"].items(), key=lambda x: -x[1])[:3]))
    if not summary:
        notes.append("idle_clients.py gave no summary: " + stderr.strip()[-300:])
    row["note"] = " ".join(notes)
    append_row(a.csv, IDLE_FIELDS, row)
    print("  %-9s idle clients %s/%s: RSS %s kB -> %s kB (after close %s kB), %s bytes/client %s"
          % (a.target, connected, a.clients, rss0, rss_idle, rss_after,
             row.get("bytes_per_client"), row["note"][:200]), flush=True)
    return 0


# ---------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--csv", required=True)
        sp.add_argument("--run-mode", default="quick")
        sp.add_argument("--target", required=True)
        sp.add_argument("--host", default="127.0.0.1")
        sp.add_argument("--port", type=int, default=0)
        sp.add_argument("--user", default="bench")
        sp.add_argument("--password", default=os.environ.get("PGPASSWORD", ""))
        sp.add_argument("--dbname", default="bench")
        sp.add_argument("--pid", type=int, default=0, help="pooler process id (0: none)")

    def cell(sp):
        sp.add_argument("--cell", type=int, default=0)
        sp.add_argument("--order", type=int, default=0, help="position within the round")
        sp.add_argument("--round", type=int, default=1,
                        help="which round of the cell (run.sh repeats each cell)")
        sp.add_argument("--workload", choices=sorted(WORKLOAD_FLAGS), required=True)
        sp.add_argument("--protocol", choices=["simple", "extended", "prepared"],
                        required=True)
        sp.add_argument("--clients", type=int, required=True)
        sp.add_argument("--threads", type=int, default=2)
        sp.add_argument("--duration", type=int, default=5)

    r = sub.add_parser("run")
    common(r)
    cell(r)
    r.add_argument("--pgbench", default="pgbench")
    r.add_argument("--grace", type=int, default=30,
                   help="seconds past --duration before timeout kills pgbench")
    r.add_argument("--clk-tck", type=int, default=0)
    r.add_argument("--pg-data", default="",
                   help="PostgreSQL's data directory, to find the postmaster and measure "
                        "PostgreSQL's CPU (empty: not measured)")
    r.add_argument("--logdir", required=True)

    s = sub.add_parser("skip")
    common(s)
    cell(s)
    s.add_argument("--reason", required=True)

    i = sub.add_parser("idle")
    common(i)
    i.add_argument("--clients", type=int, default=10000)
    i.add_argument("--concurrency", type=int, default=200)
    i.add_argument("--settle", type=float, default=2.0)
    i.add_argument("--max-hold", type=float, default=300.0)
    i.add_argument("--workdir", required=True)

    a = p.parse_args()
    return {"run": cmd_run, "skip": cmd_skip, "idle": cmd_idle}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
