#!/usr/bin/env python3
"""Write bench/results/results.md and the SVG plots from the CSVs that bench/run.sh
produced (results.csv, idle_memory.csv). Standard library only.

It can be re-run on its own to regenerate the report from existing CSVs:
    python3 bench/report.py --results bench/results
"""

import argparse
import csv
import datetime
import math
import os
import platform
import re
import statistics
import subprocess
from xml.sax.saxutils import escape

TARGET_ORDER = ["direct", "pgmux", "pgbouncer"]
COLORS = {"direct": "#555555", "pgmux": "#d9480f", "pgbouncer": "#1c7ed6"}
WORKLOAD_NAMES = {"select": "select-only (-S)", "tpcb": "TPC-B-like"}

# The bar pgmux is measured against: many clients on a pool of 20, where a pooler earns
# its keep, compared with PgBouncer there and with direct connections at few clients.
BAR_CLIENTS = 500
BAR_DIRECT_CLIENTS = 20
BAR_TARGET_TPS = 1.3
BAR_TARGET_CPU = 0.8
BAR_TARGET_DIRECT = 0.8
# Fewer rounds than this cannot tell a difference of a few per cent from the scatter of
# single runs (about ±10% on the reference machine).
ENOUGH_ROUNDS = 3


# ---------------------------------------------------------------- helpers

def sh(cmd, keep_indent=False):
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, timeout=30)
        return out.stdout.rstrip() if keep_indent else out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def num(value):
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def f(value, digits=1, scale=1.0):
    v = num(value)
    if v is None:
        return "–"
    return "{:,.{d}f}".format(v * scale, d=digits)


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# Columns that later versions of measure.py added at the end of results.csv.
LATER_COLUMNS = ["pg_cpu_s", "pg_cpu_us_per_tx", "pgbench_cpu_us_per_tx", "machine_busy_s",
                 "machine_idle_s", "machine_busy_us_per_tx", "machine_idle_us_per_tx"]


def read_runs(path):
    """results.csv, with the round of every run as an int. A CSV written before cells
    were repeated has no round column: its one run per cell is round 1. One written
    before PostgreSQL's and the machine's CPU were measured lacks those columns: they
    read as empty, except pgbench's CPU per transaction, which its CPU time and
    transactions give."""
    rows = read_csv(path)
    for r in rows:
        r["round"] = int(num(r.get("round")) or 1)
        for key in LATER_COLUMNS:
            if r.get(key) is None:
                r[key] = ""
        cpu, tx = num(r.get("pgbench_cpu_s")), num(r.get("transactions"))
        if num(r["pgbench_cpu_us_per_tx"]) is None and cpu is not None and tx:
            r["pgbench_cpu_us_per_tx"] = cpu / tx * 1e6
    return rows


def group_runs(rows):
    """{(workload, protocol, clients, target): its runs in the order of their rounds}"""
    runs = {}
    for r in rows:
        key = (r["workload"], r["protocol"], int(r["clients"]), r["target"])
        runs.setdefault(key, []).append(r)
    for key in runs:
        runs[key].sort(key=lambda r: (r["round"], num(r["order_in_cell"]) or 0))
    return runs


def median(values):
    return statistics.median(values) if values else None


def summarize(runs):
    """The rounds of one target in one cell: medians and ranges over the rounds that
    finished ok (a round that failed says nothing about the steady state)."""
    made = [r for r in runs if r["status"] != "n/a"]
    ok = [r for r in made if r["status"] == "ok"]
    s = {"runs": runs, "made": made, "ok": ok}
    for key in ("tps", "lat_p99_ms", "pooler_cpu_us_per_tx"):
        values = [num(r[key]) for r in ok if num(r[key]) is not None]
        s[key] = median(values)
        s[key + "_lo"] = min(values) if values else None
        s[key + "_hi"] = max(values) if values else None
    return s


def plot_rows(summaries):
    """One row per (cell, target) for the plots: the medians of the clean rounds; if no
    round was clean, the median of what the rounds measured, marked as not ok."""
    rows = []
    for (w, p, c, t), s in summaries.items():
        row = {"workload": w, "protocol": p, "clients": c, "target": t}
        if not s["made"]:
            row["status"] = "n/a"
        else:
            bad = [r["status"] for r in s["made"] if r["status"] != "ok"]
            row["status"] = bad[0] if bad else "ok"
        for key in ("tps", "lat_p99_ms"):
            if s["ok"]:
                row[key] = s[key]
                row[key + "_lo"], row[key + "_hi"] = s[key + "_lo"], s[key + "_hi"]
            else:
                row[key] = median([num(r[key]) for r in s["made"]
                                   if num(r[key]) is not None])
        rows.append(row)
    return rows


def ratio(a, b):
    return a / b if a is not None and b else None


def fr(value):
    return "–" if value is None else "%.2f" % value


# ---------------------------------------------------------------- machine facts

def machine_facts(a):
    facts = []
    model, cpus = "", 0
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("processor"):
                    cpus += 1
    except OSError:
        pass
    facts.append(("CPU (/proc/cpuinfo)", "%s, %d logical CPUs" % (model or "?", cpus)))
    facts.append(("nproc", sh(["nproc"])))
    facts.append(("kernel", sh(["uname", "-srvm"]) or platform.platform()))
    osname = ""
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    osname = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    if osname:
        facts.append(("OS", osname))
    pg_bin = a.pg_bin
    facts.append(("PostgreSQL", sh([os.path.join(pg_bin, "postgres"), "--version"])))
    facts.append(("pgbench", sh([os.path.join(pg_bin, "pgbench"), "--version"])))
    if a.pgbouncer_bin:
        out = sh([a.pgbouncer_bin, "--version"]).splitlines()
        facts.append(("PgBouncer", "%s; binary %s" % (out[0] if out else "?",
                                                     a.pgbouncer_bin)))
    if a.pgmux_bin:
        version = sh([a.pgmux_bin, "--version"]).splitlines()
        version = version[0] if version and "pgmux" in version[0].lower() else ""
        if not version:
            try:
                with open(os.path.join(a.root, "Cargo.toml")) as fh:
                    m = re.search(r'^version\s*=\s*"([^"]+)"', fh.read(), re.M)
                    version = "pgmux %s (Cargo.toml)" % (m.group(1) if m else "?")
            except OSError:
                version = "pgmux"
        commit = sh(["git", "-C", a.root, "rev-parse", "--short", "HEAD"])
        dirty = sh(["git", "-C", a.root, "status", "--porcelain", "--untracked-files=no"])
        if commit and "fatal" not in commit:
            version += ", git %s%s" % (commit, " (working tree modified)" if dirty else "")
        facts.append(("pgmux", "%s; binary %s" % (version, a.pgmux_bin)))
    facts.append(("python", platform.python_version()))
    return facts


def cpu_count(facts):
    """The CPUs PostgreSQL, the pooler and pgbench share: nproc from the machine facts,
    else what Python sees."""
    try:
        return int(dict(facts).get("nproc") or 0) or os.cpu_count()
    except ValueError:
        return os.cpu_count()


# ---------------------------------------------------------------- SVG plots

def nice_step(span, ticks=5):
    raw = span / float(ticks)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def svg_plot(rows, metric, ylabel, title, path, log_y=False):
    panels = []
    for r in rows:
        key = (r["workload"], r["protocol"])
        if key not in panels:
            panels.append(key)
    if not panels:
        return False
    workloads = []
    for w, _ in panels:
        if w not in workloads:
            workloads.append(w)
    protocols = ["simple", "extended", "prepared"]
    ncols = max(len([p for w2, p in panels if w2 == w]) for w in workloads)
    pw, ph, ml, mr, mt, mb = 300, 230, 62, 12, 34, 44
    width = ncols * (pw + ml + mr) + 20
    height = len(workloads) * (ph + mt + mb) + 70
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
           'viewBox="0 0 %d %d" font-family="sans-serif" font-size="11">'
           % (width, height, width, height),
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="%d" y="20" font-size="15" font-weight="bold" text-anchor="middle">%s</text>'
           % (width / 2, escape(title))]
    # legend
    lx = 20
    for t in TARGET_ORDER:
        if any(r["target"] == t for r in rows):
            out.append('<line x1="%d" y1="40" x2="%d" y2="40" stroke="%s" stroke-width="2.5"/>'
                       '<circle cx="%d" cy="40" r="3.5" fill="%s"/>'
                       '<text x="%d" y="44">%s</text>'
                       % (lx, lx + 24, COLORS[t], lx + 12, COLORS[t], lx + 30, t))
            lx += 110
    out.append('<text x="%d" y="44" fill="#333">× = a round with aborted clients, failed '
               'transactions or timeout (median of the clean rounds shown, else as measured; '
               '0 if none)</text>' % lx)
    for wi, workload in enumerate(workloads):
        cols = [p for p in protocols if (workload, p) in panels]
        for ci, proto in enumerate(cols):
            x0 = 20 + ci * (pw + ml + mr) + ml
            y0 = 60 + wi * (ph + mt + mb) + mt
            prow = [r for r in rows if r["workload"] == workload and r["protocol"] == proto
                    and r["status"] != "n/a"]
            clients = sorted({int(r["clients"]) for r in rows
                              if r["workload"] == workload and r["protocol"] == proto})
            values = [num(r.get(k)) for r in prow for k in (metric, metric + "_lo",
                                                             metric + "_hi")
                      if num(r.get(k)) is not None]
            out.append('<text x="%d" y="%d" font-size="12" font-weight="bold" '
                       'text-anchor="middle">%s, -M %s</text>'
                       % (x0 + pw / 2, y0 - 10, escape(WORKLOAD_NAMES.get(workload, workload)),
                          proto))
            out.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#999"/>'
                       % (x0, y0, pw, ph))
            # y axis
            if log_y:
                pos = [v for v in values if v > 0]
                lo = 10 ** math.floor(math.log10(min(pos))) if pos else 0.1
                hi = 10 ** math.ceil(math.log10(max(pos))) if pos else 10
                if hi <= lo:
                    hi = lo * 10

                def ymap(v, lo=lo, hi=hi):
                    v = max(v, lo)
                    return y0 + ph - (math.log10(v) - math.log10(lo)) / \
                        (math.log10(hi) - math.log10(lo)) * ph
                ticks = []
                t = lo
                while t <= hi * 1.0001:
                    ticks.append(t)
                    t *= 10
            else:
                top = max(values) if values else 1.0
                top = top if top > 0 else 1.0
                step = nice_step(top * 1.08)
                hi = step * math.ceil(top * 1.08 / step)

                def ymap(v, hi=hi):
                    return y0 + ph - v / hi * ph
                ticks = [i * step for i in range(int(round(hi / step)) + 1)]
            for t in ticks:
                y = ymap(t)
                out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#e5e5e5"/>'
                           % (x0, y, x0 + pw, y))
                label = ("%g" % t) if log_y else ("{:,.0f}".format(t) if step >= 1 else "%g" % t)
                out.append('<text x="%d" y="%.1f" text-anchor="end">%s</text>'
                           % (x0 - 5, y + 4, label))
            out.append('<text transform="translate(%d,%d) rotate(-90)" text-anchor="middle">'
                       '%s</text>' % (x0 - ml + 12, y0 + ph / 2, escape(ylabel)))
            # x axis: client counts, evenly spaced
            n = len(clients)

            def xmap(c, clients=clients, n=n, x0=x0):
                i = clients.index(c)
                return x0 + (pw / 2.0 if n == 1 else 25 + i * (pw - 50) / (n - 1.0))
            for c in clients:
                out.append('<text x="%.1f" y="%d" text-anchor="middle">%d</text>'
                           % (xmap(c), y0 + ph + 15, c))
            out.append('<text x="%d" y="%d" text-anchor="middle">clients</text>'
                       % (x0 + pw / 2, y0 + ph + 32))
            missing = sorted({r["target"] for r in rows if r["workload"] == workload
                              and r["protocol"] == proto and r["status"] == "n/a"},
                             key=TARGET_ORDER.index)
            for k, t in enumerate(missing):
                out.append('<text x="%d" y="%d" text-anchor="end" fill="%s">'
                           '%s: n/a (unsupported)</text>'
                           % (x0 + pw - 6, y0 + 14 + 13 * k, COLORS[t], t))
            for t in TARGET_ORDER:
                pts = []
                for r in sorted((r for r in prow if r["target"] == t),
                                key=lambda r: int(r["clients"])):
                    v = num(r[metric])
                    bad = r["status"] != "ok"
                    if v is None and bad and metric == "tps":
                        v = 0.0
                    if v is None:
                        continue
                    x = xmap(int(r["clients"]))
                    lo, hi = num(r.get(metric + "_lo")), num(r.get(metric + "_hi"))
                    if lo is not None and hi is not None and hi > lo:
                        # The lowest to the highest of the rounds behind the median, set
                        # apart a little per target so that overlapping ranges stay visible.
                        bx = x + 4 * (TARGET_ORDER.index(t) - 1)
                        out.append('<path d="M%.1f %.1fH%.1fM%.1f %.1fV%.1fM%.1f %.1fH%.1f" '
                                   'stroke="%s" stroke-width="1.2" fill="none"/>'
                                   % (bx - 3, ymap(lo), bx + 3, bx, ymap(lo), ymap(hi),
                                      bx - 3, ymap(hi), bx + 3, COLORS[t]))
                    pts.append((x, ymap(v), bad))
                if len(pts) > 1:
                    out.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>'
                               % (COLORS[t], " ".join("%.1f,%.1f" % (x, y) for x, y, _ in pts)))
                for x, y, bad in pts:
                    if bad:
                        out.append('<path d="M%.1f %.1fl8 8m0 -8l-8 8" stroke="%s" '
                                   'stroke-width="2.2"/>' % (x - 4, y - 4, COLORS[t]))
                    else:
                        out.append('<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s"/>'
                                   % (x, y, COLORS[t]))
    out.append("</svg>")
    with open(path, "w") as fh:
        fh.write("\n".join(out) + "\n")
    return True


# ---------------------------------------------------------------- markdown

def write_bar(add, cells, targets, summary, rounds):
    """## Against the bar: pgmux at BAR_CLIENTS clients against PgBouncer in the same
    cell, and against direct connections at BAR_DIRECT_CLIENTS clients."""
    add("## Against the bar")
    add("")
    add("The bar: at %d clients with pool 20, pgmux serves at least PgBouncer's TPS with "
        "no more CPU per transaction; the target is %.1fx PgBouncer's TPS at %.1fx its "
        "CPU per transaction and at least %.1fx the TPS of direct connections at %d "
        "clients." % (BAR_CLIENTS, BAR_TARGET_TPS, BAR_TARGET_CPU, BAR_TARGET_DIRECT,
                      BAR_DIRECT_CLIENTS))
    add("")
    if "pgmux" not in targets or "pgbouncer" not in targets:
        add("Not judged: this run did not include both pgmux and PgBouncer.")
        add("")
        return
    bar_cells = [(w, p, c) for w, p, c in cells
                 if c == BAR_CLIENTS and w in ("select", "tpcb")
                 and summary(w, p, c, "pgbouncer")["made"]]
    if not bar_cells:
        add("Not judged: no select-only or TPC-B cell at %d clients that PgBouncer ran."
            % BAR_CLIENTS)
        add("")
        return
    if rounds < ENOUGH_ROUNDS:
        add("With %s per cell, this verdict rests on too few rounds to separate a "
            "difference from noise (single runs on the reference machine scatter by about ±10%%)."
            % ("%d rounds" % rounds if rounds > 1 else "one round"))
    else:
        add("Ratios of the medians over the rounds that finished ok (%d rounds per cell)."
            % rounds)
    add("")
    add("| workload | -M | pgmux / pgbouncer TPS | pgmux / pgbouncer CPU/tx | "
        "pgmux at %d / direct at %d TPS | matches PgBouncer | target |"
        % (BAR_CLIENTS, BAR_DIRECT_CLIENTS))
    add("|---|---|--:|--:|--:|---|---|")
    thin = []
    for w, p, c in bar_cells:
        m, b = summary(w, p, c, "pgmux"), summary(w, p, c, "pgbouncer")
        d = summary(w, p, BAR_DIRECT_CLIENTS, "direct")
        # Verdicts are taken on the ratios as shown (two decimals), so that a row never
        # reads "1.00" next to "no".
        tps = ratio(m["tps"], b["tps"])
        cpu = ratio(m["pooler_cpu_us_per_tx"], b["pooler_cpu_us_per_tx"])
        direct = ratio(m["tps"], d["tps"])
        tps, cpu, direct = [None if x is None else round(x, 2) for x in (tps, cpu, direct)]
        add("| %s | %s | %s | %s | %s | %s | %s |" % (
            WORKLOAD_NAMES.get(w, w), p, fr(tps), fr(cpu), fr(direct),
            verdict([at_least(tps, 1.0), at_most(cpu, 1.0)]),
            verdict([at_least(tps, BAR_TARGET_TPS), at_most(cpu, BAR_TARGET_CPU),
                     at_least(direct, BAR_TARGET_DIRECT)])))
        fewest = min(len(m["ok"]), len(b["ok"]))
        if rounds > 1 and fewest < rounds:
            thin.append("%s -M %s: pgmux %d, PgBouncer %d of %d rounds finished ok"
                        % (WORKLOAD_NAMES.get(w, w), p, len(m["ok"]), len(b["ok"]), rounds))
    add("")
    for line in thin:
        add("- " + line)
    if thin:
        add("")


# The CPU per transaction of each part, as (column, heading) in the order shown.
CPU_PARTS = [("pooler_cpu_us_per_tx", "pooler"), ("pg_cpu_us_per_tx", "PostgreSQL"),
             ("pgbench_cpu_us_per_tx", "pgbench")]


def cpu_sum(r):
    """pooler + PostgreSQL + pgbench CPU per transaction of one run (direct runs have
    no pooler), or None when a part was not measured."""
    parts = [num(r.get(key)) for key, _ in CPU_PARTS]
    if r["target"] == "direct":
        parts[0] = 0.0
    return None if None in parts else sum(parts)


def pg_and_pgbench(r):
    """PostgreSQL + pgbench CPU per transaction of one run, or None when either was not
    measured."""
    pg, bench = num(r.get("pg_cpu_us_per_tx")), num(r.get("pgbench_cpu_us_per_tx"))
    return None if pg is None or bench is None else pg + bench


def ceiling_tps(r, ncpu):
    """The TPS of one run had the pooler used no CPU at all: every CPU busy with
    PostgreSQL and pgbench, at their CPU per transaction in that run."""
    both = pg_and_pgbench(r)
    if both is None or both <= 0 or not ncpu:
        return None
    return ncpu * 1e6 / both


def write_cpu(add, cells, targets, summary, ncpu):
    """## Where the CPU goes: the CPU per transaction of the pooler, PostgreSQL, pgbench
    and the machine at BAR_CLIENTS clients (and direct at BAR_DIRECT_CLIENTS), and the
    TPS a pooler could reach at most on this machine."""
    add("## Where the CPU goes")
    add("")
    groups = []
    for w, p, c in cells:
        if c == BAR_CLIENTS and (w, p) not in groups:
            groups.append((w, p))
    if not groups:
        add("No cell at %d clients in this run." % BAR_CLIENTS)
        add("")
        return
    if not any(num(r["pg_cpu_us_per_tx"]) is not None
               for w, p, c in cells for t in targets for r in summary(w, p, c, t)["runs"]):
        add("Not measured: these results come from a version of the benchmark that did "
            "not record the CPU of PostgreSQL and of the machine.")
        add("")
        return

    def med(rs, value):
        return median([v for v in (value(r) for r in rs) if v is not None])

    add("CPU time per transaction in µs: the median over the rounds that finished ok. "
        "Pooler, PostgreSQL (all its processes) and pgbench are user + system time of "
        "those processes; machine busy and idle are the time all %s CPUs spent busy and "
        "idle (from `/proc/stat`) while pgbench ran. Busy minus the three is the rest: "
        "interrupt work the kernel does not charge to a process, the benchmark's own "
        "bookkeeping, and anything else running on the machine."
        % (ncpu or "?"))
    add("")
    add("| workload | -M | clients | target | TPS | pooler | PostgreSQL | pgbench | "
        "pooler + PostgreSQL + pgbench | machine busy | machine idle |")
    add("|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|")
    for w, p in groups:
        rows = [(BAR_DIRECT_CLIENTS, "direct")] if "direct" in targets else []
        rows += [(BAR_CLIENTS, t) for t in targets]
        for c, t in rows:
            rs = summary(w, p, c, t)["ok"]
            if not rs:
                continue
            add("| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                WORKLOAD_NAMES.get(w, w), p, c, t, f(med(rs, lambda r: num(r["tps"])), 0),
                "n/a" if t == "direct" else
                f(med(rs, lambda r: num(r["pooler_cpu_us_per_tx"])), 1),
                f(med(rs, lambda r: num(r["pg_cpu_us_per_tx"])), 1),
                f(med(rs, lambda r: num(r["pgbench_cpu_us_per_tx"])), 1),
                f(med(rs, cpu_sum), 1),
                f(med(rs, lambda r: num(r["machine_busy_us_per_tx"])), 1),
                f(med(rs, lambda r: num(r["machine_idle_us_per_tx"])), 1)))
    add("")
    poolers = [t for t in ("pgmux", "pgbouncer") if t in targets]
    if not poolers:
        return
    add("### The most a pooler could reach here")
    add("")
    add("PostgreSQL, pgbench and the pooler share the same %s CPUs, so every µs of CPU "
        "a transaction costs PostgreSQL and pgbench is taken from what a pooler could "
        "use. Even a pooler that used no CPU at all would serve at most %s × 1,000,000 / "
        "(PostgreSQL + pgbench µs per transaction) transactions per second, and only "
        "with every CPU busy; the pooler's own CPU and any idle time bring its TPS "
        "below that. So on this machine a pooler's TPS is bounded by the ceiling below, "
        "taken at the CPU per transaction PostgreSQL and pgbench spent in the same "
        "runs (the median over the rounds), and a target above it cannot be met by "
        "pgmux or by any other pooler." % (ncpu or "?", ncpu or "N"))
    add("")
    add("| workload | -M | target | PostgreSQL + pgbench µs/tx | TPS if the pooler used "
        "no CPU at all | measured TPS | measured / ceiling | PgBouncer TPS × %.1f |"
        % BAR_TARGET_TPS)
    add("|---|---|---|--:|--:|--:|--:|--:|")
    verdicts = []
    for w, p in groups:
        bouncer = med(summary(w, p, BAR_CLIENTS, "pgbouncer")["ok"], lambda r: num(r["tps"]))
        goal = None if bouncer is None else bouncer * BAR_TARGET_TPS
        ceilings = {}
        for t in poolers:
            rs = summary(w, p, BAR_CLIENTS, t)["ok"]
            if not rs:
                continue
            both = med(rs, pg_and_pgbench)
            ceiling = med(rs, lambda r: ceiling_tps(r, ncpu))
            tps = med(rs, lambda r: num(r["tps"]))
            ceilings[t] = ceiling
            add("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                WORKLOAD_NAMES.get(w, w), p, t, f(both, 1), f(ceiling, 0), f(tps, 0),
                fr(ratio(tps, ceiling)), f(goal, 0)))
        m, b = ceilings.get("pgmux"), ceilings.get("pgbouncer")
        if goal is None or m is None:
            continue
        name = "%s -M %s" % (WORKLOAD_NAMES.get(w, w), p)
        if goal > max(m, b or 0):
            verdicts.append("%s: %.1fx PgBouncer's TPS (%s) is above the ceiling of every "
                            "run, so no pooler reaches it on this machine."
                            % (name, BAR_TARGET_TPS, f(goal, 0)))
        elif goal > m:
            verdicts.append("%s: %.1fx PgBouncer's TPS (%s) is above the ceiling at the "
                            "CPU PostgreSQL and pgbench spent behind pgmux (%s), below "
                            "the one behind PgBouncer (%s)."
                            % (name, BAR_TARGET_TPS, f(goal, 0), f(m, 0), f(b, 0)))
        else:
            verdicts.append("%s: %.1fx PgBouncer's TPS (%s) is below the ceiling behind "
                            "pgmux (%s)." % (name, BAR_TARGET_TPS, f(goal, 0), f(m, 0)))
    add("")
    for line in verdicts:
        add("- " + line)
    if verdicts:
        add("")


def at_least(value, bound):
    return None if value is None else value >= bound


def at_most(value, bound):
    return None if value is None else value <= bound


def verdict(checks):
    """yes when every check passes, no when one fails, – when one cannot be made."""
    if any(c is False for c in checks):
        return "no"
    if any(c is None for c in checks):
        return "–"
    return "yes"


def write_markdown(a, rows, runs, summaries, rounds, idle, facts):
    lines = []
    add = lines.append
    finished = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    add("# pgmux benchmark results (%s mode)" % a.run_mode)
    add("")
    add("Generated by `bench/run.sh --%s`. Started %s, finished %s (%s s in all). "
        "Each pgbench run lasted %s s. See `bench/README.md` for method and caveats; "
        "raw numbers: %s."
        % (a.run_mode, a.started or "?", finished, a.elapsed or "?", a.duration or "?",
           # A run with BENCH_IDLE_CLIENTS=0 writes no idle-memory file.
           "`results.csv`, `idle_memory.csv`" if idle else "`results.csv`"))
    add("")
    add("## Machine and versions")
    add("")
    add("| | |")
    add("|---|---|")
    for k, v in facts:
        add("| %s | %s |" % (k, str(v).replace("|", "\\|")))
    add("")
    add("`free -g`:")
    add("")
    add("```")
    add(sh(["free", "-g"], keep_indent=True))
    add("```")
    add("")
    add("Setup: PostgreSQL on loopback, `pgbench -i -s 10`, fsync off. pgmux and PgBouncer "
        "in transaction mode with 20 server connections, md5 authentication for clients "
        "and server (also for direct connections). pgbench `-j 2`; each cell ran %s of "
        "the targets back to back, and their order rotates from round to round and from "
        "cell to cell. Everything (PostgreSQL, pooler, pgbench) shares the same %s CPUs."
        % ("%d rounds" % rounds if rounds > 1 else "one round", sh(["nproc"]) or "?"))
    add("")

    # TPS overview
    cells = []
    for r in rows:
        key = (r["workload"], r["protocol"], int(r["clients"]))
        if key not in cells:
            cells.append(key)
    targets = [t for t in TARGET_ORDER if any(r["target"] == t for r in rows)]
    empty = summarize([])

    def summary(w, p, c, t):
        return summaries.get((w, p, c, t), empty)

    def cell_text(s):
        if not s["runs"]:
            return "–"
        if not s["made"]:
            return "n/a (unsupported)" if "unsupported" in s["runs"][0].get("note", "") \
                else "n/a"
        notes = []
        if s["ok"]:
            text = f(s["tps"], 0)
            if len(s["ok"]) > 1:
                notes.append("%s–%s" % (f(s["tps_lo"], 0), f(s["tps_hi"], 0)))
        else:
            text = f(median([num(r["tps"]) for r in s["made"] if num(r["tps"]) is not None]),
                     0)
        bad = [r["status"] for r in s["made"] if r["status"] != "ok"]
        if bad and len(s["made"]) == 1:
            notes.append(bad[0])
        elif bad:
            notes.append("%s of %d rounds" % (", ".join("%s in %d" % (b, bad.count(b))
                                                        for b in sorted(set(bad))),
                                              len(s["made"])))
        return text + (" (%s)" % "; ".join(notes) if notes else "")

    poolers = [t for t in ("pgmux", "pgbouncer") if t in targets]
    both = len(poolers) == 2
    if rows:
        add("## Throughput (TPS, excluding connection time)")
        add("")
        if rounds > 1:
            add("Each number is the median over the rounds that finished ok, with the lowest "
                "and highest of them in brackets; pooler CPU per transaction is the median "
                "too, and the ratios are ratios of medians.")
        else:
            add("One round per cell: each number is a single run, which on the reference "
                "machine scatters by about ±10%.")
        add("")
        head = "| workload | -M | clients | " + " | ".join(targets)
        extra = [t for t in targets if t != "direct"] if "direct" in targets else []
        head += "".join(" | %s / direct" % t for t in extra)
        head += "".join(" | %s CPU µs/tx" % t for t in poolers)
        if both:
            head += " | pgmux / pgbouncer TPS | pgmux / pgbouncer CPU/tx"
        add(head + " |")
        add("|---|---|--:|" + "--:|" * (len(targets) + len(extra) + len(poolers)
                                         + (2 if both else 0)))
        for w, p, c in cells:
            parts = [WORKLOAD_NAMES.get(w, w), p, str(c)]
            parts += [cell_text(summary(w, p, c, t)) for t in targets]
            d = summary(w, p, c, "direct")
            for t in extra:
                parts.append(fr(ratio(summary(w, p, c, t)["tps"], d["tps"])))
            for t in poolers:
                parts.append(f(summary(w, p, c, t)["pooler_cpu_us_per_tx"], 1))
            if both:
                m, b = summary(w, p, c, "pgmux"), summary(w, p, c, "pgbouncer")
                parts.append(fr(ratio(m["tps"], b["tps"])))
                parts.append(fr(ratio(m["pooler_cpu_us_per_tx"], b["pooler_cpu_us_per_tx"])))
            add("| " + " | ".join(parts) + " |")
        add("")
        add("![TPS by number of clients](tps.svg)")
        add("")
        add("![p99 latency by number of clients](p99.svg)")
        add("")
        write_bar(add, cells, targets, summary, rounds)
        write_cpu(add, cells, targets, summary, cpu_count(facts))
        add("## All runs")
        add("")
        add("Latencies are from pgbench's per-transaction log (successful transactions "
            "only). Pooler CPU is utime+stime of the pooler process over the whole "
            "pgbench run (connection setup included), divided by the transactions pgbench "
            "completed; PostgreSQL CPU is measured the same way over all of PostgreSQL's "
            "processes (see `bench/README.md`), pgbench CPU is pgbench's own. RSS max is the highest VmRSS sampled every 100 ms "
            "during the run; VmHWM is the process's lifetime peak at the end of the run.")
        add("")
        add("| workload | -M | clients | target | round | status | TPS | avg ms | p99 ms | "
            "failed tx | aborted clients | pooler CPU µs/tx | PostgreSQL CPU µs/tx | "
            "pgbench CPU µs/tx | pooler RSS max MiB | VmHWM MiB |")
        add("|---|---|--:|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for w, p, c in cells:
            for t in targets:
                for r in runs.get((w, p, c, t), []):
                    add("| %s | %s | %d | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | "
                        "%s | %s | %s |" % (
                            WORKLOAD_NAMES.get(w, w), p, c, t, r["round"],
                            "n/a (unsupported)" if r["status"] == "n/a" else r["status"],
                            f(r["tps"], 0), f(r["lat_avg_ms"], 2), f(r["lat_p99_ms"], 2),
                            r["failed_tx"] or "–", r["aborted_clients"] or "–",
                            "n/a" if t == "direct" else f(r["pooler_cpu_us_per_tx"], 1),
                            f(r["pg_cpu_us_per_tx"], 1), f(r["pgbench_cpu_us_per_tx"], 1),
                            "n/a" if t == "direct" else f(r["pooler_rss_max_kb"], 1,
                                                          1 / 1024.0),
                            "n/a" if t == "direct" else f(r["pooler_vmhwm_kb"], 1,
                                                          1 / 1024.0)))
        add("")
        problems = [r for r in rows if r["status"] not in ("ok",)]
        if problems:
            add("### Runs that did not finish cleanly")
            add("")
            for r in problems:
                add("- %s -M %s, %s clients, %s%s: **%s**: %s" % (
                    WORKLOAD_NAMES.get(r["workload"], r["workload"]), r["protocol"],
                    r["clients"], r["target"],
                    ", round %d" % r["round"] if rounds > 1 and r["status"] != "n/a" else "",
                    "n/a" if r["status"] == "n/a" else r["status"],
                    (r.get("note") or "").replace("|", "\\|").replace("\n", " ")))
            add("")

    add("## Memory per idle client")
    add("")
    if idle:
        add("RSS (VmRSS) of the pooler with N idle clients connected and authenticated "
            "(`bench/idle_clients.py`), minus its RSS with none (after one warm-up login "
            "that creates the pool), divided by the clients that connected. Fresh pooler "
            "processes, before any pgbench run.")
        add("")
        add("| target | idle clients connected | failed | RSS at 0 MiB | RSS idle MiB | "
            "per client KiB | RSS after close MiB | VmHWM MiB | seconds to connect all |")
        add("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
        for r in idle:
            add("| %s | %s / %s | %s | %s | %s | %s | %s | %s | %s |" % (
                r["target"], r["connected"], r["requested"], r["failed"] or "0",
                f(r["rss_zero_kb"], 1, 1 / 1024.0), f(r["rss_idle_kb"], 1, 1 / 1024.0),
                f(r["bytes_per_client"], 2, 1 / 1024.0),
                f(r["rss_after_close_kb"], 1, 1 / 1024.0), f(r["vmhwm_kb"], 1, 1 / 1024.0),
                f(r["seconds_to_connect_all"], 1)))
        notes = [r for r in idle if r.get("note")]
        for r in notes:
            add("")
            add("- %s: %s" % (r["target"], r["note"]))
    else:
        add("Not measured in this run.")
    add("")

    add("## Commands")
    add("")
    add("```")
    if a.commands and os.path.exists(a.commands):
        with open(a.commands) as fh:
            add(fh.read().rstrip())
    add("```")
    add("")
    used = a.targets.split()
    for label, path, target in (("pgmux.toml", a.pgmux_config, "pgmux"),
                                ("pgbouncer.ini", a.pgbouncer_config, "pgbouncer")):
        if target in used and path and os.path.exists(path):
            add("`%s` (ports and paths as used in this run):" % label)
            add("")
            add("```")
            with open(path) as fh:
                add(fh.read().rstrip())
            add("```")
            add("")
    with open(os.path.join(a.results, "results.md"), "w") as fh:
        fh.write("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", required=True)
    p.add_argument("--run-mode", default="?")
    p.add_argument("--started", default="")
    p.add_argument("--elapsed", default="")
    p.add_argument("--duration", default="")
    p.add_argument("--commands", default="")
    p.add_argument("--pgmux-config", default="")
    p.add_argument("--pgbouncer-config", default="")
    p.add_argument("--pg-bin", default="/usr/lib/postgresql/15/bin")
    p.add_argument("--pgmux-bin", default="")
    p.add_argument("--pgbouncer-bin", default="")
    p.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--targets", default="direct pgmux pgbouncer")
    a = p.parse_args()
    rows = read_runs(os.path.join(a.results, "results.csv"))
    idle = read_csv(os.path.join(a.results, "idle_memory.csv"))
    if rows and a.run_mode == "?":
        a.run_mode = rows[0]["run_mode"]
    facts = machine_facts(a)
    runs = group_runs(rows)
    summaries = {key: summarize(v) for key, v in runs.items()}
    rounds = max([r["round"] for r in rows] or [1])
    # The plots show one point per cell and target: the median over its rounds.
    medians = plot_rows(summaries)
    over = "median of %d rounds, bars: lowest to highest; " % rounds if rounds > 1 else ""
    svg_plot(medians, "tps", "transactions per second",
             "pgbench TPS vs clients (%s mode; %s× = errors)" % (a.run_mode, over),
             os.path.join(a.results, "tps.svg"))
    svg_plot(medians, "lat_p99_ms", "p99 latency, ms (log scale)",
             "pgbench p99 latency vs clients (%s mode%s)"
             % (a.run_mode, "; " + over.rstrip("; ") if over else ""),
             os.path.join(a.results, "p99.svg"), log_y=True)
    write_markdown(a, rows, runs, summaries, rounds, idle, facts)


if __name__ == "__main__":
    main()
