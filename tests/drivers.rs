//! Real drivers, with their default settings, through pgmux in transaction mode with
//! two servers per pool, so that a statement a client prepared on one server is used
//! on another. Each test checks the driver's results and that no prepared-statement
//! error (26000 "does not exist", 42P05 "already exists") reached it.
//!
//! The Python drivers run in the virtualenv that `scripts/test.sh` creates
//! (`PGMUX_TEST_PYTHON`, or `target/venv/bin/python` when that exists); pgjdbc is
//! Debian's jar (`PGMUX_TEST_JDBC_JAR`, default `/usr/share/java/postgresql.jar`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::drivers::*;
use common::*;

const POOL: &str = "default_pool_size = 2\nauth_type = \"scram-sha-256\"";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

async fn setup(prefix: &str) -> (String, pgmux::Running) {
    let clusters = cluster::shared();
    let db = fresh_db(&clusters.primary, prefix);
    let mux = start_pgmux(&config_text(&clusters.primary, &db, POOL, "")).await;
    (db, mux)
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    client_parses: u64,
    server_parses: u64,
    local_answers: u64,
}

fn stats(mux: &pgmux::Running, db: &str) -> Stats {
    let registry = mux.app.prepared_stats(db, "app").expect("pool exists");
    let s = &registry.stats;
    Stats {
        client_parses: s.client_parses.load(Relaxed),
        server_parses: s.server_parses.load(Relaxed),
        local_answers: s.local_answers.load(Relaxed),
    }
}

fn pgbench(port: u16, db: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(Path::new(PG_BIN).join("pgbench"));
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"])
        .args(args)
        .arg(db);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd.env("PGPASSWORD", "app-secret").env("LC_ALL", "C");
    cmd
}

/// pgbench's count of `label: N` in its summary.
fn summary_number(out: &str, label: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in pgbench's output:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_select_only_and_tpcb() {
    let (db, mux) = setup("drv_pgbench").await;
    let port = mux.addr.port();
    let init = run_child(
        pgbench(port, &db, &["-i", "-s", "1", "-q"]),
        Duration::from_secs(120),
    )
    .await;
    init.assert_clean("pgbench -i through pgmux");

    // 100 clients on 2 servers, select-only, every query a prepared statement.
    let run = run_child(
        pgbench(
            port,
            &db,
            &[
                "-M", "prepared", "-S", "-n", "-c", "100", "-j", "2", "-T", "5",
            ],
        ),
        Duration::from_secs(90),
    )
    .await;
    run.assert_clean("pgbench -M prepared -S -c 100");
    assert_eq!(
        summary_number(&run.stdout, "number of failed transactions: "),
        0
    );
    let done = summary_number(&run.stdout, "number of transactions actually processed: ");
    assert!(done > 100, "{}", run.describe());
    let select_only = stats(&mux, &db);
    eprintln!("pgbench -S: {done} transactions, {select_only:?}");
    assert!(
        select_only.client_parses >= 100,
        "every client prepared: {select_only:?}"
    );
    assert!(
        select_only.server_parses < select_only.client_parses,
        "servers parse less than clients do: {select_only:?}"
    );
    assert!(
        select_only.server_parses >= 2,
        "the statement was prepared on both servers: {select_only:?}"
    );
    // pgbench prepares with Parse+Sync, which pgmux answers without a server once some
    // server has accepted the text.
    assert!(
        select_only.local_answers > 0,
        "prepares answered without a server: {select_only:?}"
    );

    // TPC-B-like: BEGIN, three UPDATEs, a SELECT, an INSERT, END, all prepared.
    let run = run_child(
        pgbench(
            port,
            &db,
            &["-M", "prepared", "-n", "-c", "20", "-j", "2", "-T", "3"],
        ),
        Duration::from_secs(90),
    )
    .await;
    run.assert_clean("pgbench -M prepared (TPC-B) -c 20");
    assert_eq!(
        summary_number(&run.stdout, "number of failed transactions: "),
        0
    );
    assert!(
        summary_number(&run.stdout, "number of transactions actually processed: ") > 20,
        "{}",
        run.describe()
    );
    let history: i64 = clusters_count(&db, "SELECT count(*) FROM pgbench_history");
    assert!(history > 20, "history rows: {history}");
    let after = stats(&mux, &db);
    eprintln!("pgbench TPC-B: {history} transactions, {after:?}");
    assert!(
        after.server_parses - select_only.server_parses
            < after.client_parses - select_only.client_parses,
        "TPC-B statements shared: {select_only:?} then {after:?}"
    );
    mux.shutdown(Duration::from_secs(2)).await;
}

fn clusters_count(db: &str, sql: &str) -> i64 {
    cluster::shared()
        .primary
        .psql_db(db, sql)
        .parse()
        .expect("a count")
}

/// The `backend_pids` number of a driver script's JSON line.
fn backend_pids(out: &Outcome) -> u64 {
    out.stdout
        .split("\"backend_pids\": ")
        .nth(1)
        .and_then(|rest| {
            rest.trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no backend_pids in the output: {}", out.describe()))
}

fn dsn(mux: &pgmux::Running, db: &str) -> String {
    format!(
        "postgresql://app:app-secret@127.0.0.1:{}/{db}",
        mux.addr.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_statement_cache_and_prepare() {
    let python = python();
    let (db, mux) = setup("drv_asyncpg").await;
    let mut cmd = Command::new(python);
    cmd.arg(script("asyncpg_check.py"))
        .arg(dsn(&mux, &db))
        .arg("8");
    let out = run_child(cmd, Duration::from_secs(120)).await;
    out.assert_clean("asyncpg");
    eprintln!("asyncpg: {} {:?}", out.stdout.trim(), stats(&mux, &db));
    assert!(
        backend_pids(&out) >= 2,
        "the prepared statement ran on both servers: {}",
        out.describe()
    );
    let s = stats(&mux, &db);
    assert!(s.client_parses > 0, "{s:?}");
    assert!(s.server_parses < s.client_parses, "{s:?}");
    assert_eq!(
        clusters_count(&db, "SELECT count(*) FROM items WHERE v LIKE 'asyncpg %'"),
        8 * 30
    );
    mux.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_past_prepare_threshold_and_pipeline() {
    let python = python();
    let (db, mux) = setup("drv_psycopg").await;
    let mut cmd = Command::new(python);
    cmd.arg(script("psycopg_check.py"))
        .arg(dsn(&mux, &db))
        .arg("6");
    let out = run_child(cmd, Duration::from_secs(120)).await;
    out.assert_clean("psycopg");
    eprintln!("psycopg: {} {:?}", out.stdout.trim(), stats(&mux, &db));
    assert!(backend_pids(&out) >= 2, "{}", out.describe());
    let s = stats(&mux, &db);
    assert!(
        s.client_parses >= 6 * 100,
        "psycopg prepared its queries: {s:?}"
    );
    assert!(s.server_parses < s.client_parses, "{s:?}");
    mux.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_on_the_system_libpq() {
    let python = python();
    let (db, mux) = setup("drv_psycopg_libpq").await;
    let mut cmd = Command::new(python);
    cmd.env("PSYCOPG_IMPL", "python")
        .arg(script("psycopg_check.py"))
        .arg(dsn(&mux, &db))
        .arg("3");
    let out = run_child(cmd, Duration::from_secs(120)).await;
    out.assert_clean("psycopg (system libpq)");
    eprintln!(
        "psycopg, system libpq: {} {:?}",
        out.stdout.trim(),
        stats(&mux, &db)
    );
    assert!(
        out.stdout.contains("\"impl\": \"python\""),
        "{}",
        out.describe()
    );
    assert!(backend_pids(&out) >= 2, "{}", out.describe());
    mux.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_prepare_threshold_batches_and_transactions() {
    let jar = jdbc_jar();
    let classes = jdbc_classes(&jar, "JdbcCheck.java").await;
    let (db, mux) = setup("drv_jdbc").await;
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(format!("{}:{}", classes.display(), jar.display()))
        .arg("JdbcCheck")
        .arg(format!(
            "jdbc:postgresql://127.0.0.1:{}/{db}?connectTimeout=20&socketTimeout=60",
            mux.addr.port()
        ))
        .args(["app", "app-secret", "6"]);
    let out = run_child(cmd, Duration::from_secs(120)).await;
    out.assert_clean("pgjdbc");
    eprintln!("pgjdbc: {} {:?}", out.stdout.trim(), stats(&mux, &db));
    let pids: u64 = out
        .stdout
        .trim()
        .strip_prefix("ok backend_pids=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output: {}", out.describe()));
    assert!(pids >= 2, "{}", out.describe());
    let s = stats(&mux, &db);
    assert!(
        s.client_parses > 0,
        "pgjdbc prepared named statements: {s:?}"
    );
    assert!(s.server_parses < s.client_parses, "{s:?}");
    assert_eq!(
        clusters_count(&db, "SELECT count(*) FROM items WHERE v LIKE 'jdbc tx %'"),
        6 * 16
    );
    mux.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_pool_larger_than_pgmux_pool() {
    use sqlx::postgres::PgPoolOptions;
    use sqlx::Row;

    let (db, mux) = setup("drv_sqlx").await;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&dsn(&mux, &db))
        .await
        .expect("sqlx connects through pgmux");
    let mut tasks = Vec::new();
    for i in 0..32i32 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut pids = std::collections::HashSet::new();
            for r in 0..20i32 {
                let row = sqlx::query("SELECT $1::int4 + 1, pg_backend_pid()")
                    .bind(i * 100 + r)
                    .fetch_one(&pool)
                    .await?;
                assert_eq!(row.get::<i32, _>(0), i * 100 + r + 1);
                pids.insert(row.get::<i32, _>(1));
                let s: String = sqlx::query_scalar("SELECT $1::text || '!'")
                    .bind(format!("{i}/{r}"))
                    .fetch_one(&pool)
                    .await?;
                assert_eq!(s, format!("{i}/{r}!"));
            }
            let mut tx = pool.begin().await?;
            for r in 0..5i32 {
                sqlx::query("INSERT INTO items(v) VALUES ($1)")
                    .bind(format!("sqlx {i} {r}"))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(pids)
        }));
    }
    let mut pids = std::collections::HashSet::new();
    for task in tasks {
        let got = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("finishes in time")
            .expect("task")
            .unwrap_or_else(|e| panic!("sqlx error through pgmux: {e}"));
        pids.extend(got);
    }
    assert!(pids.len() >= 2, "queries ran on both servers: {pids:?}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items WHERE v LIKE 'sqlx %'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 32 * 5);
    pool.close().await;
    let s = stats(&mux, &db);
    eprintln!("sqlx: {} backends, {s:?}", pids.len());
    assert!(s.client_parses > 0, "{s:?}");
    assert!(s.server_parses < s.client_parses, "{s:?}");
    mux.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_pool_with_named_queries() {
    let modules = match std::env::var_os("PGMUX_TEST_NODE_MODULES") {
        Some(p) => PathBuf::from(p),
        None => manifest_dir().join("target/node/node_modules"),
    };
    assert!(
        modules.join("pg").exists(),
        "node-postgres is missing from {}: run scripts/test.sh, which installs it there \
         with npm ci and sets PGMUX_TEST_NODE_MODULES",
        modules.display()
    );
    let (db, mux) = setup("drv_node").await;
    let mut cmd = Command::new("node");
    cmd.env("NODE_PATH", &modules)
        .arg(script("pg_check.js"))
        .arg(dsn(&mux, &db))
        .arg("16");
    let out = run_child(cmd, Duration::from_secs(120)).await;
    out.assert_clean("node-postgres");
    eprintln!(
        "node-postgres: {} {:?}",
        out.stdout.trim(),
        stats(&mux, &db)
    );
    assert!(
        out.stdout.contains("\"backend_pids\":2"),
        "named queries ran on both servers: {}",
        out.describe()
    );
    let s = stats(&mux, &db);
    assert!(s.client_parses > 0, "{s:?}");
    assert!(s.server_parses < s.client_parses, "{s:?}");
    assert_eq!(
        clusters_count(&db, "SELECT count(*) FROM items WHERE v LIKE 'node %'"),
        16 * 4
    );
    mux.shutdown(Duration::from_secs(2)).await;
}
