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
import subprocess
from xml.sax.saxutils import escape

TARGET_ORDER = ["direct", "pgmux", "pgbouncer"]
COLORS = {"direct": "#555555", "pgmux": "#d9480f", "pgbouncer": "#1c7ed6"}
WORKLOAD_NAMES = {"select": "select-only (-S)", "tpcb": "TPC-B-like"}


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
    out.append('<text x="%d" y="44" fill="#333">× = run with aborted clients, failed '
               'transactions or timeout (value shown as measured; 0 if none)</text>' % lx)
    for wi, workload in enumerate(workloads):
        cols = [p for p in protocols if (workload, p) in panels]
        for ci, proto in enumerate(cols):
            x0 = 20 + ci * (pw + ml + mr) + ml
            y0 = 60 + wi * (ph + mt + mb) + mt
            prow = [r for r in rows if r["workload"] == workload and r["protocol"] == proto
                    and r["status"] != "n/a"]
            clients = sorted({int(r["clients"]) for r in rows
                              if r["workload"] == workload and r["protocol"] == proto})
            values = [num(r[metric]) for r in prow if num(r[metric]) is not None]
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
                    pts.append((xmap(int(r["clients"])), ymap(v), bad))
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

def write_markdown(a, rows, idle, facts):
    lines = []
    add = lines.append
    finished = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    add("# pgmux benchmark results (%s mode)" % a.run_mode)
    add("")
    add("Generated by `bench/run.sh --%s`. Started %s, finished %s (%s s in all). "
        "Each pgbench run lasted %s s. See `bench/README.md` for method and caveats; "
        "raw numbers: `results.csv`, `idle_memory.csv`."
        % (a.run_mode, a.started or "?", finished, a.elapsed or "?", a.duration or "?"))
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
        "and server (also for direct connections). pgbench `-j 2`; the order of the three "
        "targets rotates from cell to cell. Everything (PostgreSQL, pooler, pgbench) "
        "shares the same %s CPUs." % (sh(["nproc"]) or "?"))
    add("")

    # TPS overview
    cells = []
    for r in rows:
        key = (r["workload"], r["protocol"], int(r["clients"]))
        if key not in cells:
            cells.append(key)
    targets = [t for t in TARGET_ORDER if any(r["target"] == t for r in rows)]
    by = {(r["workload"], r["protocol"], int(r["clients"]), r["target"]): r for r in rows}

    def cell_text(r):
        if r is None:
            return "–"
        if r["status"] == "n/a":
            return "n/a (unsupported)" if "unsupported" in r.get("note", "") else "n/a"
        text = f(r["tps"], 0)
        if r["status"] != "ok":
            text += " (%s)" % r["status"]
        return text

    if rows:
        add("## Throughput (TPS, excluding connection time)")
        add("")
        head = "| workload | -M | clients | " + " | ".join(targets)
        extra = [t for t in targets if t != "direct"] if "direct" in targets else []
        head += "".join(" | %s / direct" % t for t in extra) + " |"
        add(head)
        add("|---|---|--:|" + "--:|" * (len(targets) + len(extra)))
        for w, p, c in cells:
            parts = [WORKLOAD_NAMES.get(w, w), p, str(c)]
            parts += [cell_text(by.get((w, p, c, t))) for t in targets]
            d = by.get((w, p, c, "direct"))
            for t in extra:
                r = by.get((w, p, c, t))
                dt, rt = num(d["tps"]) if d else None, num(r["tps"]) if r else None
                ok = r is not None and r["status"] == "ok" and d is not None \
                    and d["status"] == "ok"
                parts.append("%.2f" % (rt / dt) if ok and dt and rt is not None else "–")
            add("| " + " | ".join(parts) + " |")
        add("")
        add("![TPS by number of clients](tps.svg)")
        add("")
        add("![p99 latency by number of clients](p99.svg)")
        add("")
        add("## All runs")
        add("")
        add("Latencies are from pgbench's per-transaction log (successful transactions "
            "only). Pooler CPU is utime+stime of the pooler process over the whole "
            "pgbench run (connection setup included), divided by the transactions pgbench "
            "completed. RSS max is the highest VmRSS sampled every 100 ms during the run; "
            "VmHWM is the process's lifetime peak at the end of the run.")
        add("")
        add("| workload | -M | clients | target | status | TPS | avg ms | p99 ms | "
            "failed tx | aborted clients | pooler CPU µs/tx | pooler RSS max MiB | "
            "VmHWM MiB |")
        add("|---|---|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
        for w, p, c in cells:
            for t in targets:
                r = by.get((w, p, c, t))
                if r is None:
                    continue
                add("| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    WORKLOAD_NAMES.get(w, w), p, c, t,
                    "n/a (unsupported)" if r["status"] == "n/a" else r["status"],
                    f(r["tps"], 0), f(r["lat_avg_ms"], 2), f(r["lat_p99_ms"], 2),
                    r["failed_tx"] or "–", r["aborted_clients"] or "–",
                    "n/a" if t == "direct" else f(r["pooler_cpu_us_per_tx"], 1),
                    "n/a" if t == "direct" else f(r["pooler_rss_max_kb"], 1, 1 / 1024.0),
                    "n/a" if t == "direct" else f(r["pooler_vmhwm_kb"], 1, 1 / 1024.0)))
        add("")
        problems = [r for r in rows if r["status"] not in ("ok",)]
        if problems:
            add("### Runs that did not finish cleanly")
            add("")
            for r in problems:
                add("- %s -M %s, %s clients, %s: **%s**: %s" % (
                    WORKLOAD_NAMES.get(r["workload"], r["workload"]), r["protocol"],
                    r["clients"], r["target"],
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
    rows = read_csv(os.path.join(a.results, "results.csv"))
    idle = read_csv(os.path.join(a.results, "idle_memory.csv"))
    if rows and a.run_mode == "?":
        a.run_mode = rows[0]["run_mode"]
    facts = machine_facts(a)
    svg_plot(rows, "tps", "transactions per second",
             "pgbench TPS vs clients (%s mode; × = errors)" % a.run_mode,
             os.path.join(a.results, "tps.svg"))
    svg_plot(rows, "lat_p99_ms", "p99 latency, ms (log scale)",
             "pgbench p99 latency vs clients (%s mode)" % a.run_mode,
             os.path.join(a.results, "p99.svg"), log_y=True)
    write_markdown(a, rows, idle, facts)


if __name__ == "__main__":
    main()
