//! Read-only transactions on a real streaming replica, chosen by measured lag.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{self, ClusterOptions, TestClusters};
use common::*;

/// pgmux in front of `clusters`, for a fresh database replayed on the replica.
async fn setup(
    clusters: &TestClusters,
    prefix: &str,
    general: &str,
    routing: &str,
) -> (String, pgmux::Running) {
    let db = tokio::task::block_in_place(|| {
        let db = fresh_db(&clusters.primary, prefix);
        clusters.wait_replica_caught_up();
        db
    });
    let replica = clusters.replica.as_ref().expect("a replica");
    let database = format!(
        "replicas = [\"127.0.0.1:{}\"]\nlag_check_interval = \"100ms\"\nread_only_alias = \"{db}_ro\"\n{routing}",
        replica.port()
    );
    let mux = start_pgmux(&config_text(&clusters.primary, &db, general, &database)).await;
    assert!(
        wait_rotation(&mux, &db, true, Duration::from_secs(20)).await,
        "the replica joins rotation"
    );
    (db, mux)
}

/// Waits until the replica's eligibility is `eligible`; returns whether it got there.
async fn wait_rotation(mux: &pgmux::Running, db: &str, eligible: bool, limit: Duration) -> bool {
    let router = mux.app.router(db).expect("routing is configured").clone();
    eventually(limit, || {
        router.view(0, Instant::now()).eligible == eligible
    })
    .await
}

/// Whether an autocommit statement of `client` runs on the replica.
async fn autocommit_on_replica(client: &tokio_postgres::Client) -> bool {
    match simple_value(client, "SELECT pg_is_in_recovery()")
        .await
        .as_deref()
    {
        Some("t") => true,
        Some("f") => false,
        other => panic!("pg_is_in_recovery() returned {other:?}"),
    }
}

/// Whether the transaction that `open` starts runs on the replica.
async fn runs_on_replica(client: &tokio_postgres::Client, open: &str) -> bool {
    client.batch_execute(open).await.unwrap();
    let in_recovery = simple_value(client, "SELECT pg_is_in_recovery()").await;
    client.batch_execute("COMMIT").await.unwrap();
    in_recovery.as_deref() == Some("t")
}

/// Long enough after a client's own transaction on the primary for a primary sample
/// and a replica probe to show the replica has replayed it.
async fn after_own_write() {
    tokio::time::sleep(Duration::from_millis(600)).await;
}

/// A primary with a streaming replica for one test alone, with the role `app`.
fn own_clusters() -> TestClusters {
    tokio::task::block_in_place(|| {
        let clusters = TestClusters::start(ClusterOptions {
            auth: "trust",
            with_replica: true,
            extra_conf: vec![],
        });
        clusters
            .primary
            .psql("CREATE ROLE app LOGIN PASSWORD 'app-secret'");
        clusters
    })
}

fn shared_setup_general() -> &'static str {
    "default_pool_size = 3\nauth_type = \"trust\""
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_transactions_run_on_the_replica_and_writes_on_the_primary() {
    let clusters = cluster::shared();
    let (db, mux) = setup(clusters, "route", shared_setup_general(), "").await;
    let client = connect(mux.addr, "app", "unused", &db).await.unwrap();

    for open in [
        "BEGIN READ ONLY",
        "begin transaction read only;",
        "BEGIN WORK ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        "START TRANSACTION READ ONLY",
        "start transaction isolation level repeatable read read only deferrable",
        "/* reporting */ BEGIN\n  READ ONLY -- trailing comment",
        // A bare BEGIN is answered by pgmux; the statement after it picks the server.
        "BEGIN; SET TRANSACTION READ ONLY",
        "BEGIN; set transaction isolation level repeatable read, read only",
    ] {
        let on_replica = if let Some((begin, set)) = open.split_once("; ") {
            client.batch_execute(begin).await.unwrap();
            runs_on_replica(&client, set).await
        } else {
            runs_on_replica(&client, open).await
        };
        assert!(on_replica, "{open}: should run on the replica");
    }
    for open in [
        "BEGIN",
        "BEGIN READ WRITE",
        "START TRANSACTION",
        "BEGIN ISOLATION LEVEL SERIALIZABLE",
        // A hot standby refuses SERIALIZABLE, read-only or not.
        "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
    ] {
        assert!(
            !runs_on_replica(&client, open).await,
            "{open}: should run on the primary"
        );
    }
    // Autocommit statements and writes stay on the primary.
    assert!(!autocommit_on_replica(&client).await);
    client
        .batch_execute("BEGIN; INSERT INTO items(v) VALUES ('w'); COMMIT")
        .await
        .unwrap();
    // The client's reads wait for a replica that has replayed that commit.
    after_own_write().await;

    // The extended protocol: BEGIN READ ONLY sent as Parse/Bind/Execute, then a query.
    client.execute("BEGIN READ ONLY", &[]).await.unwrap();
    let row = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "extended-protocol BEGIN READ ONLY");
    client.execute("COMMIT", &[]).await.unwrap();

    // tokio-postgres's own read-only transaction.
    let mut client = client;
    let tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .unwrap();
    let row = tx
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "build_transaction().read_only(true)");
    tx.commit().await.unwrap();

    let snapshot = mux
        .app
        .replica_snapshot(&db, "app", 0)
        .expect("replica pool");
    assert!(snapshot.open >= 1 && snapshot.open <= 3, "{snapshot:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_sessions_send_every_transaction_to_the_replica() {
    let clusters = cluster::shared();
    let (db, mux) = setup(clusters, "route_sess", shared_setup_general(), "").await;

    // default_transaction_read_only as a startup option...
    let client = connect_with(
        mux.addr,
        "app",
        "unused",
        &db,
        "options='-c default_transaction_read_only=on'",
    )
    .await
    .unwrap();
    assert!(autocommit_on_replica(&client).await);
    assert!(runs_on_replica(&client, "BEGIN").await);
    // ...unless a transaction asks for read-write.
    assert!(!runs_on_replica(&client, "BEGIN READ WRITE").await);

    // ...and by SET, which the server reports back.
    let client = connect(mux.addr, "app", "unused", &db).await.unwrap();
    assert!(!autocommit_on_replica(&client).await);
    client
        .batch_execute("SET default_transaction_read_only = on")
        .await
        .unwrap();
    after_own_write().await;
    assert!(autocommit_on_replica(&client).await);
    client
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .unwrap();
    assert!(!autocommit_on_replica(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_only_alias_behaves_like_a_standby() {
    let clusters = cluster::shared();
    let (db, mux) = setup(clusters, "route_alias", "auth_type = \"md5\"", "").await;
    let alias = format!("{db}_ro");
    let port = mux.addr.port().to_string();
    let psql = |dbname: &str, attrs: &str, sql: &str| {
        let conninfo = format!(
            "host=127.0.0.1 port={port} user=app dbname={dbname} target_session_attrs={attrs}"
        );
        std::process::Command::new(cluster::pg_bin("psql"))
            .args(["-X", "-At", "-d", &conninfo, "-c", sql])
            .env("PGPASSWORD", "app-secret")
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .unwrap()
    };
    tokio::task::block_in_place(|| {
        for attrs in ["read-only", "standby", "prefer-standby"] {
            let out = psql(&alias, attrs, "SELECT pg_is_in_recovery()");
            assert!(
                out.status.success(),
                "{attrs}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t", "{attrs}");
        }
        // The primary's own name is a read-write session, so libpq refuses it.
        let out = psql(&db, "read-only", "SELECT 1");
        assert!(
            !out.status.success(),
            "read-write name accepted as read-only"
        );
        let out = psql(&db, "read-write", "SELECT pg_is_in_recovery()");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "f");
    });

    // A write through the alias fails as on a standby.
    let client = connect(mux.addr, "app", "app-secret", &alias)
        .await
        .unwrap();
    let err = client
        .batch_execute("INSERT INTO items(v) VALUES ('nope')")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("25006"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_or_stopped_replica_leaves_rotation_and_returns() {
    // A primary and replica of its own: this test stops and pauses the replica.
    let clusters = own_clusters();
    let (db, mux) = setup(
        &clusters,
        "route_lag",
        "default_pool_size = 3\nauth_type = \"trust\"",
        "max_replica_lag = \"500ms\"",
    )
    .await;
    let router = mux.app.router(&db).unwrap().clone();
    let client = connect(mux.addr, "app", "unused", &db).await.unwrap();

    // An idle primary: the caught-up replica shows no lag, however long nothing happens.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let view = router.view(0, Instant::now());
    assert!(view.eligible, "{view:?}");
    assert_eq!(view.lag, Some(Duration::ZERO), "{view:?}");
    assert!(runs_on_replica(&client, "BEGIN READ ONLY").await);

    // Replay paused while writes continue: out of rotation within two check intervals
    // of the lag passing the bound.
    let replica = clusters.replica.as_ref().unwrap();
    tokio::task::block_in_place(|| replica.psql("SELECT pg_wal_replay_pause()"));
    let writer = connect(mux.addr, "app", "unused", &db).await.unwrap();
    let paused = Instant::now();
    let mut left_after = None;
    for _ in 0..100 {
        writer
            .batch_execute("INSERT INTO items(v) VALUES ('lag')")
            .await
            .unwrap();
        if !router.view(0, Instant::now()).eligible {
            left_after = Some(paused.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left_after = left_after.expect("the replica left rotation");
    assert!(
        left_after < Duration::from_millis(500 + 2 * 100 + 500),
        "left after {left_after:?}"
    );
    // Reads keep working, on the primary.
    assert!(!runs_on_replica(&client, "BEGIN READ ONLY").await);

    tokio::task::block_in_place(|| replica.psql("SELECT pg_wal_replay_resume()"));
    assert!(wait_rotation(&mux, &db, true, Duration::from_secs(5)).await);
    assert!(runs_on_replica(&client, "BEGIN READ ONLY").await);

    // A stopped replica leaves rotation; reads go on at the primary; it returns when
    // started again.
    tokio::task::block_in_place(|| replica.stop());
    assert!(wait_rotation(&mux, &db, false, Duration::from_secs(5)).await);
    for _ in 0..5 {
        assert!(!runs_on_replica(&client, "BEGIN READ ONLY").await);
    }
    tokio::task::block_in_place(|| replica.start());
    assert!(wait_rotation(&mux, &db, true, Duration::from_secs(20)).await);
    assert!(runs_on_replica(&client, "BEGIN READ ONLY").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_always_reads_its_own_writes() {
    // A primary and replica of its own: this test slows the replica's replay down.
    let clusters = own_clusters();
    let (db, mux) = setup(
        &clusters,
        "route_ryw",
        "default_pool_size = 3\nauth_type = \"trust\"",
        "max_replica_lag = \"10s\"",
    )
    .await;
    // Replay runs 300 ms behind every commit, so a read right after a write would miss
    // it on the replica.
    tokio::task::block_in_place(|| {
        let replica = clusters.replica.as_ref().unwrap();
        replica.append_conf("recovery_min_apply_delay = '300ms'");
        replica.reload();
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let client = connect(mux.addr, "app", "unused", &db).await.unwrap();
    for i in 0..40 {
        client
            .batch_execute(&format!("INSERT INTO items(v) VALUES ('mine {i}')"))
            .await
            .unwrap();
        client.batch_execute("BEGIN READ ONLY").await.unwrap();
        let seen = simple_value(
            &client,
            &format!("SELECT count(*) FROM items WHERE v = 'mine {i}'"),
        )
        .await;
        client.batch_execute("COMMIT").await.unwrap();
        assert_eq!(
            seen.as_deref(),
            Some("1"),
            "write {i} not visible to its own client"
        );
    }

    // Once the replica has replayed the write, reads go back to it.
    let on_replica = {
        let mut found = false;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if runs_on_replica(&client, "BEGIN READ ONLY").await {
                found = true;
                break;
            }
        }
        found
    };
    assert!(on_replica, "reads return to the replica after it caught up");
    let seen = {
        client.batch_execute("BEGIN READ ONLY").await.unwrap();
        let n = simple_value(&client, "SELECT count(*) FROM items WHERE v LIKE 'mine %'").await;
        client.batch_execute("COMMIT").await.unwrap();
        n
    };
    assert_eq!(seen.as_deref(), Some("40"));

    // Another client, which wrote nothing, reads from the replica straight away.
    let other = connect(mux.addr, "app", "unused", &db).await.unwrap();
    assert!(runs_on_replica(&other, "BEGIN READ ONLY").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autocommit_selects_go_to_replicas_when_asked_and_writes_retry_on_the_primary() {
    let clusters = cluster::shared();
    let (db, mux) = setup(
        clusters,
        "route_auto",
        shared_setup_general(),
        "route_autocommit_selects = true",
    )
    .await;
    // A view that writes: the parser cannot see it, the replica refuses it with 25006.
    tokio::task::block_in_place(|| {
        clusters.primary.psql_db(
            &db,
            "SET ROLE app; CREATE SEQUENCE s; CREATE VIEW next_s AS SELECT nextval('s') AS n;",
        );
        clusters.wait_replica_caught_up();
    });
    let client = connect(mux.addr, "app", "unused", &db).await.unwrap();
    // Simple and extended protocol, and a statement prepared earlier.
    assert!(autocommit_on_replica(&client).await);
    let row = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    let stmt = client
        .prepare("SELECT pg_is_in_recovery(), $1::int")
        .await
        .unwrap();
    for i in 0..3 {
        let row = client.query_one(&stmt, &[&i]).await.unwrap();
        assert!(row.get::<_, bool>(0));
        assert_eq!(row.get::<_, i32>(1), i);
    }
    // A function pgmux does not know may write: the primary runs it.
    assert_eq!(
        simple_value(
            &client,
            "SELECT pg_is_in_recovery(), txid_current_if_assigned()"
        )
        .await
        .as_deref(),
        Some("f")
    );

    // The writing view: refused on the replica, then answered by the primary, which
    // runs it exactly once.
    for round in 0..3i64 {
        assert_eq!(
            simple_value(&client, "SELECT n FROM next_s").await,
            Some((2 * round + 1).to_string())
        );
        let row = client.query_one("SELECT n FROM next_s", &[]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), 2 * round + 2);
    }
    // The replica connection that refused it went back to the pool, clean, and serves
    // the next read once the replica has replayed the client's writes.
    after_own_write().await;
    assert!(autocommit_on_replica(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_replica_pools_and_lag() {
    let clusters = cluster::shared();
    let general = format!("{}\nadmin_users = [\"app\"]", shared_setup_general());
    let (db, mux) = setup(clusters, "route_console", &general, "").await;
    let client = connect(mux.addr, "app", "unused", &db).await.unwrap();
    assert!(runs_on_replica(&client, "BEGIN READ ONLY").await);
    let admin = connect(mux.addr, "app", "unused", "pgmux").await.unwrap();
    let replica = format!("127.0.0.1:{}", clusters.replica.as_ref().unwrap().port());

    let rows = |messages: Vec<tokio_postgres::SimpleQueryMessage>| {
        messages
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| {
                            (
                                r.columns()[i].name().to_string(),
                                r.get(i).unwrap_or("").to_string(),
                            )
                        })
                        .collect::<std::collections::HashMap<_, _>>(),
                ),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let replicas = rows(admin.simple_query("SHOW REPLICAS").await.unwrap());
    let row = replicas
        .iter()
        .find(|r| r["database"] == db)
        .expect("a replica row");
    assert_eq!(row["replica"], replica);
    assert_eq!(row["eligible"], "yes", "{row:?}");
    assert!(row["lag_us"].parse::<u64>().is_ok(), "{row:?}");

    // The replica's pool is a row of its own, told apart by the replica column.
    let pools = rows(admin.simple_query("SHOW POOLS").await.unwrap());
    let mine: Vec<_> = pools.iter().filter(|r| r["database"] == db).collect();
    assert_eq!(mine.len(), 2, "{pools:?}");
    assert!(mine.iter().any(|r| r["replica"].is_empty()));
    let on_replica = mine.iter().find(|r| r["replica"] == replica).unwrap();
    assert_eq!(on_replica["sv_idle"], "1", "{on_replica:?}");
    // SHOW STATS has one row per database, the replica's transactions included.
    let stats = rows(admin.simple_query("SHOW STATS").await.unwrap());
    let db_stats: Vec<_> = stats.iter().filter(|r| r["database"] == db).collect();
    assert_eq!(db_stats.len(), 1, "{stats:?}");
    assert!(db_stats[0]["total_xact_count"].parse::<u64>().unwrap() >= 1);
}

/// The numbers after `replica=` and `primary=` in a driver script's last line.
fn placements(out: &drivers::Outcome) -> (u32, u32) {
    let line = out.stdout.lines().last().unwrap_or_default();
    let number = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {}", out.describe()))
    };
    (number("replica="), number("primary="))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_readonly_transactions_run_on_the_replica() {
    let python = drivers::python();
    let clusters = cluster::shared();
    let (db, mux) = setup(clusters, "route_asyncpg", "auth_type = \"md5\"", "").await;
    let mut cmd = std::process::Command::new(python);
    cmd.arg(drivers::script("asyncpg_readonly.py"))
        .arg(format!(
            "postgresql://app:app-secret@127.0.0.1:{}/{db}",
            mux.addr.port()
        ))
        .arg("10");
    let out = drivers::run_child(cmd, Duration::from_secs(120)).await;
    out.assert_clean("asyncpg");
    assert_eq!(placements(&out), (20, 1), "{}", out.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_pipelined_begin_read_only_runs_on_the_replica() {
    let jar = drivers::jdbc_jar();
    let classes = drivers::jdbc_classes(&jar, "JdbcReadOnly.java").await;
    let clusters = cluster::shared();
    let (db, mux) = setup(clusters, "route_jdbc", "auth_type = \"md5\"", "").await;
    let mut cmd = std::process::Command::new("java");
    cmd.arg("-cp")
        .arg(format!("{}:{}", classes.display(), jar.display()))
        .arg("JdbcReadOnly")
        .arg(format!(
            "jdbc:postgresql://127.0.0.1:{}/{db}?connectTimeout=20&socketTimeout=60",
            mux.addr.port()
        ))
        .args(["app", "app-secret", "10"]);
    let out = drivers::run_child(cmd, Duration::from_secs(120)).await;
    out.assert_clean("pgjdbc");
    assert_eq!(placements(&out), (10, 10), "{}", out.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_resizes_routed_pools_in_place_and_restarts_probes_when_routing_changes() {
    let clusters = cluster::shared();
    let (db, mux) = setup(clusters, "route_reload", shared_setup_general(), "").await;
    let client = connect(mux.addr, "app", "unused", &db).await.unwrap();
    assert!(runs_on_replica(&client, "BEGIN READ ONLY").await);
    let router = mux.app.router(&db).unwrap();

    let mut config = (*mux.app.config()).clone();
    config.databases.get_mut(&db).unwrap().pool_size = Some(2);
    mux.app.apply_config(config.clone()).await.unwrap();
    assert!(Arc::ptr_eq(&router, &mux.app.router(&db).unwrap()));
    assert_eq!(mux.app.pool_snapshot(&db, "app").unwrap().size, 2);
    assert_eq!(mux.app.replica_snapshot(&db, "app", 0).unwrap().size, 2);
    assert!(runs_on_replica(&client, "BEGIN READ ONLY").await);

    // A routing setting: new probes; the connected client keeps working.
    config.databases.get_mut(&db).unwrap().max_replica_lag = Duration::from_secs(2);
    mux.app.apply_config(config).await.unwrap();
    let new_router = mux.app.router(&db).unwrap();
    assert!(!Arc::ptr_eq(&router, &new_router));
    assert!(runs_on_replica(&client, "BEGIN READ ONLY").await);
    let fresh = connect(mux.addr, "app", "unused", &db).await.unwrap();
    let joined = eventually(Duration::from_secs(20), || {
        new_router.view(0, Instant::now()).eligible
    })
    .await;
    assert!(joined);
    assert!(runs_on_replica(&fresh, "BEGIN READ ONLY").await);
}
