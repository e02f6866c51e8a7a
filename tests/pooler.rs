//! The transaction-mode pooler against a real PostgreSQL primary, driven by real clients.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::types::Type;

/// A fresh database on the shared cluster and a pgmux in front of it.
async fn setup(prefix: &str, general: &str) -> (String, pgmux::Running) {
    let clusters = cluster::shared();
    let db = fresh_db(&clusters.primary, prefix);
    let mux = start_pgmux(&config_text(&clusters.primary, &db, general, "")).await;
    (db, mux)
}

fn primary() -> &'static cluster::Cluster {
    &cluster::shared().primary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_succeeds_and_fails_per_auth_type() {
    let clusters = cluster::shared();
    let db = fresh_db(&clusters.primary, "auth");
    for auth in ["scram-sha-256", "md5", "plain", "trust"] {
        let general = format!("auth_type = \"{auth}\"");
        let mux = start_pgmux(&config_text(&clusters.primary, &db, &general, "")).await;

        let client = connect(mux.addr, "app", "app-secret", &db).await;
        let client = client.unwrap_or_else(|e| panic!("{auth}: right password refused: {e}"));
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1, "{auth}");

        let unknown = connect(mux.addr, "nobody", "app-secret", &db)
            .await
            .unwrap_err();
        assert_eq!(
            sqlstate(&unknown).as_deref(),
            Some("28P01"),
            "{auth}: {unknown}"
        );
        let unknown_text = unknown.as_db_error().unwrap().message().to_string();
        assert_eq!(
            unknown_text, "password authentication failed for user \"nobody\"",
            "{auth}"
        );
        if auth != "trust" {
            let wrong = connect(mux.addr, "app", "wrong", &db).await.unwrap_err();
            assert_eq!(
                sqlstate(&wrong).as_deref(),
                Some("28P01"),
                "{auth}: {wrong}"
            );
            assert_eq!(
                wrong.as_db_error().unwrap().message(),
                "password authentication failed for user \"app\"",
                "{auth}: unknown user and wrong password read alike"
            );
        }
        mux.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_auth_scram_md5_and_cleartext() {
    // The shared cluster asks SCRAM of `app` and MD5 of `app_md5` (its hash is md5).
    let (db, mux) = setup("srvauth", "").await;
    primary().psql(&format!("GRANT ALL ON DATABASE {db} TO app_md5, app_plain"));
    for (user, password) in [("app", "app-secret"), ("app_md5", "md5-secret")] {
        let client = connect(mux.addr, user, password, &db).await.unwrap();
        let who: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, user);
    }

    // A cluster that asks for cleartext passwords.
    let plain = cluster::TestClusters::start(cluster::ClusterOptions {
        auth: "password",
        with_replica: false,
        extra_conf: vec![],
    });
    plain
        .primary
        .psql("CREATE ROLE app_plain LOGIN PASSWORD 'plain-secret'");
    let text = config_text(&plain.primary, "postgres", "", "");
    let mux = start_pgmux(&text).await;
    let client = connect(mux.addr, "app_plain", "plain-secret", "postgres")
        .await
        .unwrap();
    let who: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "app_plain");

    // pgmux's own login failing at the server reaches the client with the server's code.
    let wrong = config_text(&plain.primary, "postgres", "", "").replace("plain-secret", "nope");
    let mux = start_pgmux(&wrong).await;
    let err = connect(mux.addr, "app_plain", "nope", "postgres")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err}");
    assert!(message(&err).contains("server login failed"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_share_five_servers() {
    let (db, mux) = setup(
        "load",
        "default_pool_size = 5\nauth_type = \"trust\"\nquery_wait_timeout = \"60s\"",
    )
    .await;
    let addr = mux.addr;
    let stop_sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop_sampling);
        let db = db.clone();
        tokio::task::spawn_blocking(move || {
            let mut max = 0;
            let mut samples = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && samples < 2000 {
                max = max.max(backends(primary(), &db));
                samples += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            (max, samples)
        })
    };

    let mut tasks = Vec::new();
    for i in 0..500 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(addr, "app", "unused", &db).await?;
            for j in 0..3 {
                let tx = client.transaction().await?;
                tx.execute("INSERT INTO items(v) VALUES ($1)", &[&format!("{i}-{j}")])
                    .await?;
                let n: i64 = tx
                    .query_one("SELECT count(*) FROM items", &[])
                    .await?
                    .get(0);
                assert!(n >= 1);
                tx.commit().await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    let mut failures = Vec::new();
    for task in tasks {
        if let Err(e) = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("load finishes in time")
            .unwrap()
        {
            failures.push(format!("{e:?}"));
        }
    }
    stop_sampling.store(true, std::sync::atomic::Ordering::Relaxed);
    let (max_backends, samples) = sampler.await.unwrap();

    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(samples > 0);
    assert!(
        max_backends <= 5,
        "saw {max_backends} server backends for pool_size 5"
    );
    let check = connect(addr, "app", "unused", &db).await.unwrap();
    let rows: i64 = check
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1500);
    let snapshot = mux.app.pool_snapshot(&db, "app").unwrap();
    assert!(snapshot.open <= 5, "{snapshot:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_clients_are_served_in_arrival_order() {
    let (db, mux) = setup(
        "fifo",
        "default_pool_size = 1\nquery_wait_timeout = \"30s\"",
    )
    .await;
    let holder = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    // A statement after BEGIN: a lone BEGIN is answered by pgmux and holds no server.
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let mut waiters = Vec::new();
    for i in 1..=4 {
        let client = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
        waiters.push(tokio::spawn(async move {
            client
                .batch_execute(&format!("INSERT INTO items(v) VALUES ('{i}')"))
                .await
        }));
        let queued = eventually(Duration::from_secs(10), || {
            mux.app.pool_snapshot(&db, "app").unwrap().waiting == i
        })
        .await;
        assert!(queued, "client {i} did not queue");
    }
    holder.batch_execute("COMMIT").await.unwrap();
    for w in waiters {
        w.await.unwrap().unwrap();
    }
    let rows = holder
        .query("SELECT v FROM items ORDER BY id", &[])
        .await
        .unwrap();
    let order: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(order, ["1", "2", "3", "4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_disconnects_the_waiting_client() {
    let (db, mux) = setup(
        "qwt",
        "default_pool_size = 1\nquery_wait_timeout = \"300ms\"",
    )
    .await;
    let holder = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    // A statement after BEGIN: a lone BEGIN is answered by pgmux and holds no server.
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();

    // Several waiters, queued one behind the other: each one's wait ends in turn.
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let db = db.clone();
        waiting.push(tokio::spawn(async move {
            let waiter = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
            let err = waiter.batch_execute("SELECT 1").await.unwrap_err();
            assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
            assert!(message(&err).contains("query_wait_timeout"), "{err:?}");
            assert!(
                waiter.batch_execute("SELECT 1").await.is_err(),
                "connection is closed"
            );
        }));
    }
    for waiter in waiting {
        tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("the wait ended")
            .unwrap();
    }

    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(mux.app.pool_snapshot(&db, "app").unwrap().waiting, 0);
}

/// Connects with the connection task kept, so the test can drop the socket abruptly.
async fn connect_killable(
    addr: std::net::SocketAddr,
    db: &str,
) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
    let dsn = format!(
        "host={} port={} user=app password=app-secret dbname={db}",
        addr.ip(),
        addr.port()
    );
    let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_leaves_no_open_transaction() {
    let (db, mux) = setup("kill", "default_pool_size = 1").await;
    let (victim, task) = connect_killable(mux.addr, &db).await;
    let victim_pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    victim
        .batch_execute("BEGIN; INSERT INTO items(v) VALUES ('uncommitted')")
        .await
        .unwrap();
    task.abort(); // the socket closes without Terminate
    drop(victim);

    let next = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let pid: i32 = next
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid, victim_pid, "the rolled-back server is reused");
    let seen: i64 = next
        .query_one("SELECT count(*) FROM items WHERE v = 'uncommitted'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 0);
    next.batch_execute("BEGIN").await.unwrap();
    let err = next.batch_execute("BEGIN").await;
    assert!(err.is_ok(), "a nested BEGIN only warns");
    next.batch_execute("ROLLBACK").await.unwrap();
    let idle_in_tx: i64 = primary()
        .psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state LIKE 'idle in transaction%'"
        ))
        .parse()
        .unwrap();
    assert_eq!(idle_in_tx, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_mid_query_gets_its_query_cancelled() {
    let (db, mux) = setup("killq", "default_pool_size = 1").await;
    let (victim, task) = connect_killable(mux.addr, &db).await;
    let victim = Arc::new(victim);
    let running = {
        let victim = Arc::clone(&victim);
        tokio::spawn(async move { victim.batch_execute("SELECT pg_sleep(30)").await })
    };
    let started = eventually(Duration::from_secs(10), || {
        primary().psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND query LIKE 'SELECT pg_sleep%' AND state = 'active'"
        )) == "1"
    })
    .await;
    assert!(started);
    task.abort();
    let _ = running.await;

    let next = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let t0 = std::time::Instant::now();
    let one: i32 = next.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "not stuck behind the sleep"
    );
    assert_eq!(backends(primary(), &db), 1, "no orphaned backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_query_and_the_connection_stays_usable() {
    let (db, mux) = setup("cancel", "default_pool_size = 2").await;
    let client = Arc::new(connect(mux.addr, "app", "app-secret", &db).await.unwrap());
    let token = client.cancel_token();
    let running = {
        let client = Arc::clone(&client);
        tokio::spawn(async move { client.batch_execute("SELECT pg_sleep(20)").await })
    };
    let started = eventually(Duration::from_secs(10), || {
        primary().psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND query LIKE 'SELECT pg_sleep%' AND state = 'active'"
        )) == "1"
    })
    .await;
    assert!(started);
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("cancelled in time")
        .unwrap()
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    // A cancel with a made-up key, or for an idle client, changes nothing.
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_parameters_stay_with_their_client() {
    let (db, mux) = setup("params", "default_pool_size = 1").await;
    let default_tz = primary().psql_db(&db, "SHOW TimeZone");

    let a = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let b = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let pid_a: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    a.batch_execute("SET statement_timeout = '1234ms'")
        .await
        .unwrap();
    a.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    a.execute("SET search_path TO pg_catalog, public", &[])
        .await
        .unwrap();

    let pid_b: i32 = b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid_a, pid_b, "pool_size 1: both use one server");
    assert_eq!(show(&b, "statement_timeout").await, "0");
    assert_eq!(show(&b, "TimeZone").await, default_tz);
    assert_eq!(show(&b, "search_path").await, "\"$user\", public");

    assert_eq!(show(&a, "statement_timeout").await, "1234ms");
    assert_eq!(show(&a, "TimeZone").await, "Asia/Tokyo");
    assert_eq!(show(&a, "search_path").await, "pg_catalog, public");

    a.batch_execute("RESET statement_timeout").await.unwrap();
    assert_eq!(show(&b, "statement_timeout").await, "0");
    assert_eq!(show(&a, "statement_timeout").await, "0");

    let c = connect_with(
        mux.addr,
        "app",
        "app-secret",
        &db,
        "application_name=reporting options='-c search_path=pg_catalog -c work_mem=8MB'",
    )
    .await
    .unwrap();
    assert_eq!(show(&c, "application_name").await, "reporting");
    assert_eq!(show(&c, "search_path").await, "pg_catalog");
    assert_eq!(show(&c, "work_mem").await, "8MB");
    assert_eq!(show(&b, "application_name").await, "");
    assert_eq!(show(&b, "work_mem").await, "4MB");
}

async fn show(client: &tokio_postgres::Client, name: &str) -> String {
    let row = client
        .query_one(&format!("SHOW {name}"), &[])
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    let (db, mux) = setup("copy", "default_pool_size = 2").await;
    let client = connect(mux.addr, "app", "app-secret", &db).await.unwrap();

    let sink = client.copy_in("COPY items(v) FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("row-{i}-{}\n", "x".repeat(i % 200)));
    }
    for chunk in data.as_bytes().chunks(7000) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, 5000);

    let stream = client
        .copy_out("COPY (SELECT v FROM items ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(String::from_utf8(out).unwrap(), data);

    // A failed COPY leaves the connection usable. (Through the extended protocol,
    // tokio-postgres itself loses track after a failed copy_in, against PostgreSQL
    // directly too, so the simple protocol is used here, as psql does.)
    let err = client
        .batch_execute("COPY nosuch FROM STDIN")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42P01"));
    let n: i64 = client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rows_and_notices_pass_through() {
    let (db, mux) = setup("large", "default_pool_size = 1").await;
    let client = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let big: String = client
        .query_one("SELECT repeat('ab', 4000000)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(big.len(), 8_000_000);
    // Errors inside a pipeline: the failing statement errors, the others still run.
    let (r1, r2, r3) = tokio::join!(
        client.query_one("SELECT 1::int", &[]),
        client.query_one("SELECT 1/0", &[]),
        client.query_one("SELECT 3::int", &[]),
    );
    assert_eq!(r1.unwrap().get::<_, i32>(0), 1);
    assert_eq!(sqlstate(&r2.unwrap_err()).as_deref(), Some("22012"));
    assert_eq!(r3.unwrap().get::<_, i32>(0), 3);
    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
        .await
        .unwrap();
    let empty = client.simple_query("").await.unwrap();
    assert!(
        empty.is_empty()
            || matches!(
                empty[0],
                tokio_postgres::SimpleQueryMessage::CommandComplete(0)
            )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_terminated_while_idle_is_replaced_without_client_error() {
    let (db, mux) = setup("term", "default_pool_size = 1").await;
    let client = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    primary().psql(&format!("SELECT pg_terminate_backend({pid})"));
    let gone = eventually(Duration::from_secs(10), || backends(primary(), &db) == 0).await;
    assert!(gone);

    let new_pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(new_pid, pid);

    // Killed mid-transaction: this client hears about it, others carry on.
    client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    primary().psql(&format!("SELECT pg_terminate_backend({new_pid})"));
    let err = client.batch_execute("SELECT 1").await.unwrap_err();
    assert!(
        client.is_closed() || err.as_db_error().is_some() || err.is_closed(),
        "{err}"
    );
    let other = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let one: i32 = other.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_refuses_with_53300() {
    let (db, mux) = setup("maxconn", "max_client_conn = 2").await;
    let _a = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let _b = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let err = connect(mux.addr, "app", "app-secret", &db)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    drop(_a);
    let freed = eventually(Duration::from_secs(5), || mux.app.client_count() == 1).await;
    assert!(freed);
    connect(mux.addr, "app", "app-secret", &db).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_is_refused_after_authentication() {
    let (_db, mux) = setup("unknowndb", "").await;
    let err = connect(mux.addr, "app", "app-secret", "nosuchdb")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("3D000"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_resets_servers_between_clients() {
    let (db, mux) = setup("session", "pool_mode = \"session\"\ndefault_pool_size = 1").await;
    let a = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let pid: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    a.batch_execute("CREATE TEMP TABLE scratch(x int); SET statement_timeout = '5s'")
        .await
        .unwrap();
    a.batch_execute("BEGIN; SELECT 1").await.unwrap();
    drop(a);

    let b = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let pid_b: i32 = b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid, pid_b, "the same server, reset");
    let temp: i64 = b
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'scratch'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(temp, 0);
    let timeout: String = b
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_closes_the_client_and_frees_the_server() {
    let (db, mux) = setup(
        "idletx",
        "default_pool_size = 1\nidle_transaction_timeout = \"300ms\"",
    )
    .await;
    let a = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    a.batch_execute("BEGIN; INSERT INTO items(v) VALUES ('abandoned')")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let err = a.batch_execute("COMMIT").await.unwrap_err();
    assert!(
        err.is_closed() || sqlstate(&err).as_deref() == Some("25P03"),
        "{err}"
    );

    let b = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let n: i64 = b
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the abandoned transaction was rolled back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_pgbench_work_through_pgmux() {
    let (db, mux) = setup("bench", "default_pool_size = 4\nauth_type = \"md5\"").await;
    let port = mux.addr.port().to_string();
    let run = |bin: &str, args: &[&str]| {
        std::process::Command::new(cluster::pg_bin(bin))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "app"])
            .args(args)
            .env("PGPASSWORD", "app-secret")
            .output()
            .unwrap()
    };
    let out = tokio::task::block_in_place(|| {
        run("psql", &["-X", "-At", "-d", &db, "-c", "SELECT 40 + 2"])
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    let init = tokio::task::block_in_place(|| run("pgbench", &["-i", "-s", "1", "-q", &db]));
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    for mode in ["simple", "extended"] {
        let out = tokio::task::block_in_place(|| {
            run(
                "pgbench",
                &["-c", "20", "-j", "2", "-t", "50", "-M", mode, &db],
            )
        });
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("number of transactions actually processed: 1000/1000"),
            "{mode}: {stdout}"
        );
        assert!(
            stdout.contains("number of failed transactions: 0"),
            "{mode}: {stdout}"
        );
    }
    assert!(backends(primary(), &db) <= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_connections_bounds_all_users_of_a_database() {
    let (db, mux) = setup(
        "dblimit",
        "default_pool_size = 5\nmax_db_connections = 3\nauth_type = \"trust\"\nquery_wait_timeout = \"30s\"",
    )
    .await;
    let addr = mux.addr;
    let stop_sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop_sampling);
        let db = db.clone();
        tokio::task::spawn_blocking(move || {
            let mut max = 0;
            let mut samples = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && samples < 1000 {
                max = max.max(backends(primary(), &db));
                samples += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            (max, samples)
        })
    };
    let mut tasks = Vec::new();
    for i in 0..60 {
        let db = db.clone();
        let user = if i % 2 == 0 { "app" } else { "app_md5" };
        tasks.push(tokio::spawn(async move {
            let client = connect(addr, user, "unused", &db).await?;
            for _ in 0..5 {
                // Simple protocol: named prepared statements are not this test's subject.
                let who = simple_value(&client, "SELECT current_user, pg_sleep(0.01)").await;
                assert_eq!(who.as_deref(), Some(user));
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("load finishes in time")
            .unwrap()
            .expect("every query succeeds under the database-wide limit");
    }
    stop_sampling.store(true, std::sync::atomic::Ordering::Relaxed);
    let (max_backends, samples) = sampler.await.unwrap();
    assert!(samples > 0);
    assert!(
        max_backends <= 3,
        "saw {max_backends} server backends with max_db_connections = 3"
    );
    assert!(mux.app.db_server_count(&db) <= 3);

    // Fill the whole budget with idle servers of one user...
    let holders: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(connect(addr, "app", "unused", &db).await.unwrap());
        }
        v
    };
    let mut txs = Vec::new();
    for c in &holders {
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
        txs.push(c);
    }
    for c in &txs {
        c.batch_execute("COMMIT").await.unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || mux.app.db_server_count(&db) == 3).await);
    // ...then another user's client gets a server by retiring one of them, long before
    // its query_wait_timeout.
    let other = connect(addr, "app_md5", "unused", &db).await.unwrap();
    let started = std::time::Instant::now();
    let who = tokio::time::timeout(
        Duration::from_secs(10),
        simple_value(&other, "SELECT current_user"),
    )
    .await
    .expect("served without waiting for the query_wait_timeout");
    assert_eq!(who.as_deref(), Some("app_md5"));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(mux.app.db_server_count(&db) <= 3);
    assert!(backends(primary(), &db) <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_protocol_versions_are_negotiated_down_and_old_ones_refused() {
    let (db, mux) = setup("npv", "auth_type = \"trust\"").await;
    let (_stream, seen) = raw_login(
        mux.addr,
        (3 << 16) | 2,
        &[
            ("user", "app"),
            ("database", &db),
            ("_pq_.frobnicate", "on"),
        ],
    )
    .await;
    let (tag, body) = &seen[0];
    assert_eq!(*tag, b'v', "NegotiateProtocolVersion comes first: {seen:?}");
    assert_eq!(&body[0..4], &0i32.to_be_bytes(), "minor version 0 offered");
    assert_eq!(&body[4..8], &1i32.to_be_bytes(), "one option refused");
    assert_eq!(&body[8..], b"_pq_.frobnicate\0");
    assert_eq!(
        seen.last().unwrap().0,
        b'Z',
        "login then completes: {seen:?}"
    );

    let (_stream, seen) = raw_login(mux.addr, 2 << 16, &[("user", "app")]).await;
    let (tag, body) = seen.last().unwrap();
    assert_eq!(*tag, b'E', "protocol 2.0 is refused: {seen:?}");
    assert_eq!(error_code(body), "0A000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_passes_through() {
    use tokio::io::AsyncWriteExt;
    let (db, mux) = setup("fcall", "auth_type = \"trust\"\ndefault_pool_size = 1").await;
    let (mut stream, seen) =
        raw_login(mux.addr, 3 << 16, &[("user", "app"), ("database", &db)]).await;
    assert_eq!(seen.last().unwrap().0, b'Z');
    // int4pl(20, 22), oid 177, binary arguments and result.
    let mut body = Vec::new();
    body.extend_from_slice(&177i32.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&2i16.to_be_bytes());
    for v in [20i32, 22] {
        body.extend_from_slice(&4i32.to_be_bytes());
        body.extend_from_slice(&v.to_be_bytes());
    }
    body.extend_from_slice(&1i16.to_be_bytes());
    let mut msg = vec![b'F'];
    msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    msg.extend_from_slice(&body);
    for _ in 0..2 {
        stream.write_all(&msg).await.unwrap();
        let (tag, body) = read_raw(&mut stream).await;
        assert_eq!(tag, b'V', "FunctionCallResponse");
        assert_eq!(&body[0..4], &4i32.to_be_bytes());
        assert_eq!(&body[4..8], &42i32.to_be_bytes());
        let (tag, body) = read_raw(&mut stream).await;
        assert_eq!((tag, body), (b'Z', vec![b'I']));
    }
    // The server went back to the pool after each call: another client can use it.
    let other = connect(mux.addr, "app", "unused", &db).await.unwrap();
    let n: i32 = other.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(n, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_behind_sync_does_not_hold_the_server() {
    use tokio::io::AsyncWriteExt;
    let (db, mux) = setup("flush", "auth_type = \"trust\"\ndefault_pool_size = 1").await;
    let (mut stream, seen) =
        raw_login(mux.addr, 3 << 16, &[("user", "app"), ("database", &db)]).await;
    assert_eq!(seen.last().unwrap().0, b'Z');
    // What libpq's pipeline mode sends when a pipeline ends (psycopg's `with
    // conn.pipeline()`): the batch, Sync, then a Flush to get the results at once.
    let mut m = bytes::BytesMut::new();
    postgres_protocol::message::frontend::parse("", "SELECT 1", std::iter::empty(), &mut m)
        .unwrap();
    postgres_protocol::message::frontend::bind(
        "",
        "",
        std::iter::empty::<i16>(),
        std::iter::empty::<i32>(),
        |_: i32,
         _: &mut bytes::BytesMut|
         -> Result<postgres_protocol::IsNull, Box<dyn std::error::Error + Sync + Send>> {
            unreachable!()
        },
        Some(0),
        &mut m,
    )
    .map_err(|_| ())
    .unwrap();
    postgres_protocol::message::frontend::execute("", 0, &mut m).unwrap();
    postgres_protocol::message::frontend::sync(&mut m);
    postgres_protocol::message::frontend::flush(&mut m);
    stream.write_all(&m).await.unwrap();
    assert_eq!(tags(&read_until_ready(&mut stream).await), "12DCZ");
    // The only server went back to the pool at that ReadyForQuery.
    let other = connect(mux.addr, "app", "unused", &db).await.unwrap();
    let n: i32 = tokio::time::timeout(Duration::from_secs(5), other.query_one("SELECT 7", &[]))
        .await
        .expect("the server is free for another client")
        .unwrap()
        .get(0);
    assert_eq!(n, 7);
}

/// A lone BEGIN is answered by pgmux, and the server is taken (and the BEGIN sent, in
/// the same write) only with the statement after it; the block is still one
/// transaction on one server, as the client expects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_begin_takes_a_server_only_with_the_next_statement() {
    let (db, mux) = setup("begin_deferred", "default_pool_size = 1").await;
    let a = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let b = Arc::new(connect(mux.addr, "app", "app-secret", &db).await.unwrap());

    a.batch_execute("BEGIN").await.unwrap();
    let snapshot = mux.app.pool_snapshot(&db, "app").unwrap();
    assert_eq!(snapshot.idle, snapshot.open, "{snapshot:?}");
    tokio::time::timeout(Duration::from_secs(5), b.batch_execute("SELECT 1"))
        .await
        .expect("the one server is free while `a` is only inside its BEGIN")
        .unwrap();

    let first = simple_value(&a, "SELECT txid_current()").await;
    a.batch_execute("INSERT INTO items(v) VALUES ('rolled back')")
        .await
        .unwrap();
    assert_eq!(simple_value(&a, "SELECT txid_current()").await, first);
    assert_eq!(
        simple_value(&a, "SELECT now() = statement_timestamp()")
            .await
            .as_deref(),
        Some("f"),
        "the block began before this statement"
    );
    // Now `a` holds the server: `b` waits until the block ends.
    let waiter = {
        let b = Arc::clone(&b);
        tokio::spawn(async move { b.batch_execute("SELECT 1").await })
    };
    let queued = eventually(Duration::from_secs(10), || {
        mux.app.pool_snapshot(&db, "app").unwrap().waiting == 1
    })
    .await;
    assert!(queued, "b did not wait for the server a holds");
    a.batch_execute("ROLLBACK").await.unwrap();
    waiter.await.unwrap().unwrap();
    let count = |v: &'static str| {
        let b = Arc::clone(&b);
        async move { simple_value(&b, &format!("SELECT count(*) FROM items WHERE v = '{v}'")).await }
    };
    assert_eq!(count("rolled back").await.as_deref(), Some("0"));

    // Prepared statements inside the block (tokio-postgres prepares each one), and
    // START TRANSACTION.
    a.batch_execute("START TRANSACTION").await.unwrap();
    let insert = a.prepare("INSERT INTO items(v) VALUES ($1)").await.unwrap();
    a.execute(&insert, &[&"kept"]).await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(count("kept").await.as_deref(), Some("1"));

    // A block that holds nothing but BEGIN and COMMIT, and a nested BEGIN.
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("ROLLBACK").await.unwrap();
    let idle_in_tx = primary().psql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' \
         AND state LIKE 'idle in transaction%'"
    ));
    assert_eq!(idle_in_tx, "0");
}

/// The same with the extended protocol, in the shapes drivers send: libpq's
/// Parse/Bind/Describe/Execute/Sync of the unnamed statement, and a Bind of a statement
/// prepared earlier. The client gets the answers the server would have sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_protocol_begin_is_answered_like_the_server_would() {
    use postgres_protocol::message::frontend;
    use tokio::io::AsyncWriteExt;
    let (db, mux) = setup(
        "begin_extended",
        "default_pool_size = 1\nauth_type = \"trust\"",
    )
    .await;
    let (mut s, _) = raw_login(mux.addr, 196608, &[("user", "app"), ("database", &db)]).await;
    let other = connect(mux.addr, "app", "x", &db).await.unwrap();
    let bind = |m: &mut bytes::BytesMut, statement: &str| {
        frontend::bind(
            "",
            statement,
            std::iter::empty::<i16>(),
            std::iter::empty::<i32>(),
            |_: i32, _: &mut bytes::BytesMut| -> Result<
                postgres_protocol::IsNull,
                Box<dyn std::error::Error + Sync + Send>,
            > { unreachable!() },
            Some(0),
            m,
        )
        .map_err(|_| ())
        .unwrap();
    };

    let mut m = bytes::BytesMut::new();
    frontend::parse("", "BEGIN", std::iter::empty(), &mut m).unwrap();
    bind(&mut m, "");
    frontend::describe(b'P', "", &mut m).unwrap();
    frontend::execute("", 0, &mut m).unwrap();
    frontend::sync(&mut m);
    s.write_all(&m).await.unwrap();
    let answer = read_until_ready(&mut s).await;
    assert_eq!(tags(&answer), "12nCZ");
    assert_eq!(answer[3].1, b"BEGIN\0");
    assert_eq!(answer[4].1, b"T");
    // No server is held yet.
    tokio::time::timeout(Duration::from_secs(5), other.batch_execute("SELECT 1"))
        .await
        .expect("the server is free")
        .unwrap();
    // The unnamed statement holds BEGIN as the client left it: run again, it warns.
    let mut m = bytes::BytesMut::new();
    bind(&mut m, "");
    frontend::execute("", 0, &mut m).unwrap();
    frontend::sync(&mut m);
    s.write_all(&m).await.unwrap();
    let answer = read_until_ready(&mut s).await;
    assert_eq!(tags(&answer), "2NCZ", "{answer:?}");
    assert_eq!(answer.last().unwrap().1, b"T");
    s.write_all(&query_packet("ROLLBACK")).await.unwrap();
    let answer = read_until_ready(&mut s).await;
    assert_eq!(answer.last().unwrap().1, b"I");

    // A statement prepared earlier and bound without a Parse (pgbench -M prepared).
    let mut m = bytes::BytesMut::new();
    frontend::parse(
        "begin_stmt",
        "START TRANSACTION",
        std::iter::empty(),
        &mut m,
    )
    .unwrap();
    frontend::sync(&mut m);
    s.write_all(&m).await.unwrap();
    assert_eq!(tags(&read_until_ready(&mut s).await), "1Z");
    let mut m = bytes::BytesMut::new();
    bind(&mut m, "begin_stmt");
    frontend::describe(b'P', "", &mut m).unwrap();
    frontend::execute("", 0, &mut m).unwrap();
    frontend::sync(&mut m);
    s.write_all(&m).await.unwrap();
    let answer = read_until_ready(&mut s).await;
    assert_eq!(tags(&answer), "2nCZ");
    assert_eq!(answer[2].1, b"START TRANSACTION\0");
    tokio::time::timeout(Duration::from_secs(5), other.batch_execute("SELECT 1"))
        .await
        .expect("the server is free")
        .unwrap();
    s.write_all(&query_packet("SELECT txid_current(); COMMIT"))
        .await
        .unwrap();
    let answer = read_until_ready(&mut s).await;
    assert_eq!(tags(&answer), "TDCCZ", "{answer:?}");
    assert_eq!(answer.last().unwrap().1, b"I");
}

/// idle_transaction_timeout counts from a lone BEGIN too, though no server is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_applies_after_a_lone_begin() {
    let (db, mux) = setup("begin_idle", "idle_transaction_timeout = \"300ms\"").await;
    let a = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let err = a.batch_execute("SELECT 1").await.unwrap_err();
    assert!(
        a.is_closed() || sqlstate(&err).as_deref() == Some("25P03"),
        "{err}"
    );
    let b = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.batch_execute("SELECT 1; COMMIT").await.unwrap();
}

/// Clients queued for one server get their own answers as it passes from one to the
/// next: behind a lone BEGIN, with the extended protocol, and with session parameters
/// of their own (which are brought in line first); a waiter that left meanwhile does
/// not spoil the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_clients_get_their_own_answers_from_a_handed_over_server() {
    let (db, mux) = setup(
        "handover",
        "default_pool_size = 1\nquery_wait_timeout = \"30s\"",
    )
    .await;
    let holder = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let begun = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    begun.batch_execute("BEGIN").await.unwrap();
    let (leaver, leaver_task) = connect_killable(mux.addr, &db).await;
    let extended = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let named = connect_with(
        mux.addr,
        "app",
        "app-secret",
        &db,
        "application_name=waiter-four",
    )
    .await
    .unwrap();

    let queued = |n: usize| {
        let mux = &mux;
        let db = &db;
        async move {
            eventually(Duration::from_secs(10), || {
                mux.app.pool_snapshot(db, "app").unwrap().waiting == n
            })
            .await
        }
    };
    let mut waiting = Vec::new();
    waiting.push(tokio::spawn(async move {
        begun
            .batch_execute("INSERT INTO items(v) VALUES ('handed over')")
            .await
            .unwrap();
        let first = simple_value(&begun, "SELECT txid_current()").await;
        let again = simple_value(&begun, "SELECT txid_current()").await;
        begun.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(first, again, "the block ran on one server");
        first
    }));
    assert!(queued(1).await);
    let leaving = tokio::spawn(async move {
        let _ = leaver
            .batch_execute("INSERT INTO items(v) VALUES ('left')")
            .await;
    });
    assert!(queued(2).await);
    leaver_task.abort();
    leaving.abort();
    waiting.push(tokio::spawn(async move {
        // query_typed: the unnamed statement, Parse/Bind/Describe/Execute/Sync.
        let rows = extended
            .query_typed("SELECT $1::text || 'x'", &[(&"extended", Type::TEXT)])
            .await
            .unwrap();
        Some(rows[0].get::<_, String>(0))
    }));
    assert!(queued(3).await);
    waiting.push(tokio::spawn(async move {
        simple_value(&named, "SELECT current_setting('application_name')").await
    }));
    assert!(queued(4).await);

    holder.batch_execute("COMMIT").await.unwrap();
    let mut answers = Vec::new();
    for w in waiting {
        answers.push(
            tokio::time::timeout(Duration::from_secs(20), w)
                .await
                .expect("served")
                .unwrap(),
        );
    }
    assert!(answers[0].is_some());
    assert_eq!(answers[1].as_deref(), Some("extendedx"));
    assert_eq!(answers[2].as_deref(), Some("waiter-four"));
    let count = |v: &'static str| {
        let holder = &holder;
        async move {
            simple_value(
                holder,
                &format!("SELECT count(*) FROM items WHERE v = '{v}'"),
            )
            .await
        }
    };
    assert_eq!(count("handed over").await.as_deref(), Some("0"));
    // The one that left is noticed only when the server is handed to it: its
    // statement, sent in full before it left, runs to its end in autocommit.
    assert_eq!(count("left").await.as_deref(), Some("1"));
    let idle_in_tx = primary().psql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' \
         AND state LIKE 'idle in transaction%'"
    ));
    assert_eq!(idle_in_tx, "0");
}
