//! The admin console and live reconfiguration, against a real PostgreSQL primary.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio_postgres::SimpleQueryMessage;

fn primary() -> &'static cluster::Cluster {
    &cluster::shared().primary
}

/// app may run every command, app_md5 only SHOW, app_plain nothing.
const CONSOLE_USERS: &str = "admin_users = [\"app\"]\nstats_users = [\"app_md5\"]";

async fn setup(prefix: &str, general: &str) -> (String, pgmux::Running) {
    let db = fresh_db(primary(), prefix);
    let general = format!("{CONSOLE_USERS}\n{general}");
    let mux = start_pgmux(&config_text(primary(), &db, &general, "")).await;
    (db, mux)
}

async fn console(mux: &pgmux::Running, user: &str, password: &str) -> tokio_postgres::Client {
    connect(mux.addr, user, password, "pgmux")
        .await
        .unwrap_or_else(|e| panic!("console login as {user}: {e}"))
}

/// A SHOW result as column names and rows of (column -> value).
async fn show(
    client: &tokio_postgres::Client,
    sql: &str,
) -> (Vec<String>, Vec<HashMap<String, String>>) {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for m in messages {
        if let SimpleQueryMessage::Row(row) = m {
            columns = row.columns().iter().map(|c| c.name().to_string()).collect();
            let mut map = HashMap::new();
            for (i, c) in columns.iter().enumerate() {
                map.insert(c.clone(), row.get(i).unwrap_or("").to_string());
            }
            rows.push(map);
        }
    }
    (columns, rows)
}

/// The primary pool's row of SHOW POOLS for `db`.
async fn pool_row(client: &tokio_postgres::Client, db: &str) -> Option<HashMap<String, String>> {
    let (_, rows) = show(client, "SHOW POOLS").await;
    rows.into_iter()
        .find(|r| r["database"] == db && r["user"] == "app" && r["replica"].is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_commands_are_authorized_by_class() {
    let (db, mux) = setup("console_auth", "").await;
    // A user in neither list is refused at login, after a correct password.
    let denied = connect(mux.addr, "app_plain", "plain-secret", "pgmux")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&denied).as_deref(), Some("28000"), "{denied:?}");
    // A wrong password reads as any other wrong password.
    let wrong = connect(mux.addr, "app", "nope", "pgmux").await.unwrap_err();
    assert_eq!(sqlstate(&wrong).as_deref(), Some("28P01"));

    let stats = console(&mux, "app_md5", "md5-secret").await;
    for sql in [
        "SHOW POOLS",
        "SHOW STATS",
        "SHOW CLIENTS",
        "SHOW SERVERS",
        "SHOW DATABASES",
        "SHOW CONFIG",
        "SHOW VERSION",
        "SHOW LISTS",
        "SHOW REPLICAS",
    ] {
        stats
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql} as a stats user: {e}"));
    }
    for sql in [
        "PAUSE",
        "RESUME",
        "RECONNECT",
        &format!("KILL {db}"),
        "KILL_CLIENT 1",
        "RELOAD",
        "SHUTDOWN",
        "SET default_pool_size = 3",
    ] {
        let err = stats.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{sql}: {err:?}");
    }
    assert!(!mux.app.shutdown.is_cancelled());

    let admin = console(&mux, "app", "app-secret").await;
    for sql in ["PAUSE", "RESUME", "RECONNECT", "SET default_pool_size = 4"] {
        admin
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let (_, config) = show(&admin, "SHOW CONFIG").await;
    let size = config
        .iter()
        .find(|r| r["key"] == "default_pool_size")
        .unwrap();
    assert_eq!(size["value"], "4");
    // Settings read only at start say so.
    for key in ["listen", "worker_threads"] {
        let row = config.iter().find(|r| r["key"] == key).unwrap();
        assert_eq!(row["changeable"], "no", "{key}");
    }

    // Unknown commands and extended-protocol attempts get errors, never a hang; the
    // session stays usable afterwards.
    let err = admin.simple_query("FROB").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42601"));
    let err = tokio::time::timeout(Duration::from_secs(10), admin.query("SHOW POOLS", &[]))
        .await
        .expect("no hang")
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err:?}");
    assert!(message(&err).contains("simple queries only"));
    let (_, version) = show(&admin, "SHOW VERSION").await;
    assert!(version[0]["version"].contains(env!("CARGO_PKG_VERSION")));

    admin.simple_query("SHUTDOWN").await.unwrap();
    assert!(mux.app.shutdown.is_cancelled());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_output_has_pgbouncer_columns_and_returns_to_baseline() {
    let (db, mux) = setup(
        "console_show",
        "default_pool_size = 2\nauth_type = \"trust\"",
    )
    .await;
    let admin = console(&mux, "app", "app-secret").await;

    let clients: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(connect(mux.addr, "app", "app-secret", &db).await.unwrap());
        }
        v
    };
    for c in &clients {
        c.batch_execute("INSERT INTO items(v) VALUES ('x'); SELECT 1")
            .await
            .unwrap();
    }
    let (columns, _) = show(&admin, "SHOW POOLS").await;
    assert_eq!(
        &columns[..12],
        [
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "sv_used",
            "sv_tested",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode"
        ]
    );
    let row = pool_row(&admin, &db).await.expect("a pool row");
    assert_eq!(row["cl_active"], "3");
    assert_eq!(row["pool_mode"], "transaction");

    let (columns, stats) = show(&admin, "SHOW STATS").await;
    assert_eq!(
        &columns[..15],
        [
            "database",
            "total_xact_count",
            "total_query_count",
            "total_received",
            "total_sent",
            "total_xact_time",
            "total_query_time",
            "total_wait_time",
            "avg_xact_count",
            "avg_query_count",
            "avg_recv",
            "avg_sent",
            "avg_xact_time",
            "avg_query_time",
            "avg_wait_time"
        ]
    );
    assert_eq!(columns.len(), 15, "one row per database, as in PgBouncer");
    let stat = stats.iter().find(|r| r["database"] == db).unwrap();
    let n = |k: &str| stat[k].parse::<u64>().unwrap();
    assert!(n("total_xact_count") >= 3, "{stat:?}");
    assert!(n("total_query_count") >= 3, "{stat:?}");
    assert!(n("total_received") > 0 && n("total_sent") > 0, "{stat:?}");
    assert!(n("total_xact_time") > 0, "{stat:?}");

    // A client hears its ReadyForQuery a moment before pgmux marks it idle.
    let mut idle = false;
    for _ in 0..50 {
        let (_, listed) = show(&admin, "SHOW CLIENTS").await;
        let mine: Vec<_> = listed.iter().filter(|r| r["database"] == db).collect();
        assert_eq!(mine.len(), 3, "{listed:?}");
        if mine.iter().all(|r| r["state"] == "idle") {
            idle = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(idle);
    // A prepared statement (tokio-postgres prepares its queries) stays on its server.
    let row = clients[0]
        .query_one("SELECT $1::int", &[&7i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
    let (_, servers) = show(&admin, "SHOW SERVERS").await;
    assert!(servers.iter().filter(|r| r["database"] == db).count() <= 2);
    let prepared: usize = servers
        .iter()
        .filter(|r| r["database"] == db)
        .map(|r| r["prepared_statements"].parse::<usize>().unwrap())
        .sum();
    assert!(prepared >= 1, "{servers:?}");
    let (_, dbs) = show(&admin, "SHOW DATABASES").await;
    assert!(dbs.iter().any(|r| r["name"] == db));

    // No password anywhere in SHOW output.
    for sql in [
        "SHOW CONFIG",
        "SHOW DATABASES",
        "SHOW CLIENTS",
        "SHOW SERVERS",
        "SHOW POOLS",
        "SHOW LISTS",
    ] {
        let text = format!("{:?}", admin.simple_query(sql).await.unwrap());
        for secret in ["app-secret", "md5-secret", "plain-secret"] {
            assert!(!text.contains(secret), "{sql} shows a password");
        }
    }

    // One client leaves normally, one abruptly in the middle of a transaction.
    let mut clients = clients;
    clients[0].batch_execute("BEGIN; SELECT 1").await.unwrap();
    drop(clients.pop());
    drop(clients);
    // A raw socket that vanishes mid-transaction, without Terminate.
    let (mut raw, _) = raw_login(mux.addr, 196608, &[("user", "app"), ("database", &db)]).await;
    {
        use tokio::io::AsyncWriteExt;
        let mut query = vec![b'Q', 0, 0, 0, 10];
        query.extend_from_slice(b"BEGIN\0");
        raw.write_all(&query).await.unwrap();
        read_until_ready(&mut raw).await;
    }
    drop(raw);
    let mut settled = false;
    for _ in 0..100 {
        let row = pool_row(&admin, &db).await.unwrap();
        if row["cl_active"] == "0" && row["cl_waiting"] == "0" && row["sv_active"] == "0" {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(settled, "{:?}", pool_row(&admin, &db).await);
    let (_, listed) = show(&admin, "SHOW CLIENTS").await;
    assert!(listed.iter().all(|r| r["database"] != db), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_runs_console_commands() {
    let (db, mux) = setup("console_psql", "").await;
    let user = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    user.batch_execute("SELECT 1").await.unwrap();
    let port = mux.addr.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(cluster::pg_bin("psql"))
            .args([
                "-X",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "app",
                "-d",
                "pgmux",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-A", "-F", ","])
            .args(["-c", "SHOW POOLS", "-c", "SHOW VERSION", "-c", "RECONNECT"])
            .env("PGPASSWORD", "app-secret")
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("database,user,cl_active,cl_waiting"),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("{db},app,1,0")), "{stdout}");
    assert!(stdout.contains("RECONNECT"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_under_pgbench_load_lose_nothing() {
    let (db, mux) = setup(
        "console_pause",
        "default_pool_size = 3\nquery_wait_timeout = \"60s\"",
    )
    .await;
    let admin = console(&mux, "app", "app-secret").await;
    let script = std::env::temp_dir().join(format!("pgmux-pause-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "BEGIN;\nINSERT INTO items(v) VALUES ('pgbench');\nSELECT pg_sleep(0.005);\nCOMMIT;\n",
    )
    .unwrap();
    let port = mux.addr.port().to_string();
    let bench_db = db.clone();
    let bench = tokio::task::spawn_blocking(move || {
        std::process::Command::new(cluster::pg_bin("pgbench"))
            .args(["-n", "-h", "127.0.0.1", "-p", &port, "-U", "app"])
            .args(["-c", "8", "-j", "2", "-T", "6", "-f"])
            .arg(&script)
            .arg(&bench_db)
            .env("PGPASSWORD", "app-secret")
            .output()
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for _ in 0..3 {
        tokio::time::timeout(
            Duration::from_secs(20),
            admin.simple_query(&format!("PAUSE {db}")),
        )
        .await
        .expect("PAUSE returns")
        .unwrap();
        // Every server is released and none is handed out while paused.
        for _ in 0..5 {
            let row = pool_row(&admin, &db).await.unwrap();
            assert_eq!(row["sv_active"], "0", "{row:?}");
            assert_eq!(row["paused"], "1");
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        let row = pool_row(&admin, &db).await.unwrap();
        assert!(row["cl_waiting"].parse::<u32>().unwrap() > 0, "{row:?}");
        admin.simple_query(&format!("RESUME {db}")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let out = tokio::time::timeout(Duration::from_secs(60), bench)
        .await
        .expect("pgbench ends")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    assert!(
        stdout.contains("number of failed transactions: 0") || !stdout.contains("failed"),
        "{stdout}"
    );
}

/// Writes a config file and starts pgmux with it, so RELOAD reads the file again.
async fn start_with_file(name: &str, text: &str) -> (pgmux::Running, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("pgmux-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let mux = start_pgmux(text).await;
    mux.app.set_config_path(&path);
    (mux, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_shrinks_and_grows_a_pool_under_load() {
    let db = fresh_db(primary(), "reload_size");
    let config = |size: usize| {
        config_text(
            primary(),
            &db,
            &format!("{CONSOLE_USERS}\ndefault_pool_size = {size}\nquery_wait_timeout = \"60s\""),
            "",
        )
    };
    let (mux, path) = start_with_file("reload-size", &config(6)).await;
    let addr = mux.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..12 {
        let (db, stop, errors) = (db.clone(), Arc::clone(&stop), Arc::clone(&errors));
        load.push(tokio::spawn(async move {
            let client = connect(addr, "app", "app-secret", &db).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(40);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Err(e) = client
                    .batch_execute("BEGIN; SELECT pg_sleep(0.01); COMMIT")
                    .await
                {
                    eprintln!("load error: {e:?}");
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let reached_six = eventually(Duration::from_secs(10), || backends(primary(), &db) == 6).await;
    assert!(reached_six, "load uses the whole pool first");

    std::fs::write(&path, config(2)).unwrap();
    let admin = console(&mux, "app", "app-secret").await;
    admin.simple_query("RELOAD").await.unwrap();
    let settled = eventually(Duration::from_secs(10), || backends(primary(), &db) <= 2).await;
    assert!(settled, "{} backends", backends(primary(), &db));
    let db2 = db.clone();
    let max = tokio::task::spawn_blocking(move || {
        (0..20)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(50));
                backends(primary(), &db2)
            })
            .max()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(max <= 2, "saw {max} backends after shrinking to 2");
    assert_eq!(mux.app.pool_snapshot(&db, "app").unwrap().size, 2);

    // A SIGHUP-style reload through the App, growing the pool.
    std::fs::write(&path, config(5)).unwrap();
    mux.app.reload().await.unwrap();
    let grown = eventually(Duration::from_secs(10), || backends(primary(), &db) == 5).await;
    assert!(grown, "{} backends", backends(primary(), &db));

    stop.store(true, Ordering::Relaxed);
    for task in load {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0, "clients saw errors");
    assert!(backends(primary(), &db) <= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_keeps_the_old_configuration() {
    let db = fresh_db(primary(), "reload_bad");
    let text = config_text(
        primary(),
        &db,
        &format!("{CONSOLE_USERS}\ndefault_pool_size = 3"),
        "",
    );
    let (mux, path) = start_with_file("reload-bad", &text).await;
    let client = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    client.batch_execute("SELECT 1").await.unwrap();
    let admin = console(&mux, "app", "app-secret").await;

    std::fs::write(
        &path,
        text.replace("default_pool_size = 3", "default_pool_size = 0"),
    )
    .unwrap();
    let err = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("F0000"), "{err:?}");
    assert!(message(&err).contains("pgmux.default_pool_size"), "{err:?}");
    std::fs::write(&path, text.replace("[users.app_md5]", "[users.app_md5\n")).unwrap();
    assert!(mux.app.reload().await.is_err());

    assert_eq!(mux.app.config().pgmux.default_pool_size, 3);
    assert_eq!(mux.app.pool_snapshot(&db, "app").unwrap().size, 3);
    client.batch_execute("SELECT 1").await.unwrap();
    let again = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    again.batch_execute("SELECT 1").await.unwrap();
    // A bad SET is refused the same way.
    let err = admin
        .simple_query("SET default_pool_size = 0")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22023"), "{err:?}");
    assert_eq!(mux.app.config().pgmux.default_pool_size, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_a_database_and_removes_a_user() {
    let db = fresh_db(primary(), "reload_move");
    let text = config_text(primary(), &db, CONSOLE_USERS, "");
    let (mux, path) = start_with_file("reload-move", &text).await;
    let client = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    client.batch_execute("SELECT 1").await.unwrap();
    assert_eq!(backends(primary(), &db), 1);

    // Same server under another name: old servers go once released, new ones come.
    let moved = text.replace("host = \"127.0.0.1\"", "host = \"localhost\"");
    std::fs::write(&path, &moved).unwrap();
    mux.app.reload().await.unwrap();
    client.batch_execute("SELECT 1").await.unwrap();
    let admin = console(&mux, "app", "app-secret").await;
    let (_, servers) = show(&admin, "SHOW SERVERS").await;
    let mine: Vec<_> = servers.iter().filter(|r| r["database"] == db).collect();
    assert_eq!(mine.len(), 1, "{servers:?}");
    assert_eq!(mine[0]["addr"], "localhost");

    // A removed user: new logins fail, the connected client keeps working.
    let md5 = connect(mux.addr, "app_md5", "md5-secret", &db).await;
    let removed = moved
        .replace("[users.app_md5]\npassword = \"md5-secret\"", "")
        .replace("stats_users = [\"app_md5\"]", "");
    std::fs::write(&path, &removed).unwrap();
    mux.app.reload().await.unwrap();
    let err = connect(mux.addr, "app_md5", "md5-secret", &db)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"));
    if let Ok(md5) = md5 {
        // The shared cluster may not grant app_md5 this database; only check it is not cut.
        let _ = md5.batch_execute("SELECT 1").await;
    }
    client.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_and_kill_database_disconnect_clients() {
    let (db, mux) = setup("console_kill", "").await;
    let admin = console(&mux, "app", "app-secret").await;
    let victim = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let bystander = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    victim.batch_execute("SELECT 1").await.unwrap();
    bystander.batch_execute("SELECT 1").await.unwrap();
    let (_, clients) = show(&admin, "SHOW CLIENTS").await;
    let ids: Vec<u64> = clients
        .iter()
        .filter(|r| r["database"] == db)
        .map(|r| r["id"].parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    admin
        .simple_query(&format!("KILL_CLIENT {}", ids[0]))
        .await
        .unwrap();
    let err = victim.batch_execute("SELECT 1").await.unwrap_err();
    assert!(victim.is_closed() || sqlstate(&err).is_some(), "{err:?}");
    bystander.batch_execute("SELECT 1").await.unwrap();
    let err = admin.simple_query("KILL_CLIENT 999999").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42704"));

    // KILL also ends a client in the middle of a transaction, and closes its servers.
    bystander.batch_execute("BEGIN; SELECT 1").await.unwrap();
    admin.simple_query(&format!("KILL {db}")).await.unwrap();
    assert!(bystander.batch_execute("SELECT 1").await.is_err());
    let gone = eventually(Duration::from_secs(10), || backends(primary(), &db) == 0).await;
    assert!(gone);
    // As in PgBouncer, the database stays paused: a new client's query waits for RESUME.
    let fresh = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let query = tokio::spawn(async move { fresh.batch_execute("SELECT 1").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !query.is_finished(),
        "a query ran on a killed database before RESUME"
    );
    admin.simple_query(&format!("RESUME {db}")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("the query runs after RESUME")
        .unwrap()
        .unwrap();
    let err = admin.simple_query("KILL nosuchdb").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("3D000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_held_by_pause_are_counted_and_can_be_killed() {
    let (db, mux) = setup("console_held", "query_wait_timeout = \"30s\"").await;
    let admin = console(&mux, "app", "app-secret").await;
    let client = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    client.batch_execute("SELECT 1").await.unwrap();
    admin.simple_query("PAUSE").await.unwrap();
    let client = Arc::new(client);
    let held = {
        let client = Arc::clone(&client);
        tokio::spawn(async move { client.batch_execute("SELECT 1").await })
    };
    let mut counted = false;
    for _ in 0..100 {
        let row = pool_row(&admin, &db).await.unwrap();
        if row["cl_waiting"] == "1" {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(counted, "{:?}", pool_row(&admin, &db).await);
    let (_, clients) = show(&admin, "SHOW CLIENTS").await;
    let waiting = clients
        .iter()
        .find(|r| r["database"] == db)
        .expect("the client");
    assert_eq!(waiting["state"], "waiting");
    admin
        .simple_query(&format!("KILL_CLIENT {}", waiting["id"]))
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("a killed client is let go at once")
        .unwrap();
    assert!(result.is_err());
    // The client hears FATAL just before pgmux counts it out.
    let mut back = false;
    for _ in 0..100 {
        let row = pool_row(&admin, &db).await.unwrap();
        if row["cl_waiting"] == "0" && row["cl_active"] == "0" {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "{:?}", pool_row(&admin, &db).await);

    // A new client waits for RESUME, then runs.
    let later = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let run = tokio::spawn(async move { later.batch_execute("SELECT 1").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!run.is_finished());
    admin.simple_query("RESUME").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_in_the_queue_leaves_it_and_the_next_one_gets_the_server() {
    let (db, mux) = setup(
        "console_queue_kill",
        "default_pool_size = 1\nquery_wait_timeout = \"30s\"",
    )
    .await;
    let admin = console(&mux, "app", "app-secret").await;
    let holder = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    // A statement after BEGIN: a lone BEGIN is answered by pgmux and holds no server.
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();

    // Two clients queue for the one server, the victim first.
    let mut queued = Vec::new();
    let mut ids = Vec::new();
    for i in 1..=2 {
        let client = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
        queued.push(tokio::spawn(async move {
            client.query_one("SELECT pg_backend_pid()", &[]).await
        }));
        let waiting = eventually(Duration::from_secs(10), || {
            mux.app.pool_snapshot(&db, "app").unwrap().waiting == i
        })
        .await;
        assert!(waiting, "client {i} did not queue");
        let (_, clients) = show(&admin, "SHOW CLIENTS").await;
        let id = clients
            .iter()
            .filter(|r| r["database"] == db && r["state"] == "waiting")
            .map(|r| r["id"].clone())
            .find(|id| !ids.contains(id))
            .expect("the new waiting client");
        ids.push(id);
    }
    let next = queued.pop().unwrap();
    let victim = queued.pop().unwrap();
    admin
        .simple_query(&format!("KILL_CLIENT {}", ids[0]))
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), victim)
        .await
        .expect("a killed client is let go at once")
        .unwrap();
    assert!(result.is_err());
    let left = eventually(Duration::from_secs(10), || {
        mux.app.pool_snapshot(&db, "app").unwrap().waiting == 1
    })
    .await;
    assert!(left, "{:?}", mux.app.pool_snapshot(&db, "app"));

    // The server the holder releases skips the killed client's place in the queue.
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    holder.batch_execute("COMMIT").await.unwrap();
    let row = tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .expect("the next client is served when the server is released")
        .unwrap()
        .unwrap();
    assert_eq!(
        row.get::<_, i32>(0),
        holder_pid,
        "the same server, handed over"
    );
    let snapshot = mux.app.pool_snapshot(&db, "app").unwrap();
    assert_eq!((snapshot.open, snapshot.waiting), (1, 0), "{snapshot:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_lowers_limits_on_running_pools() {
    let (db, mux) = setup("console_set", "maintenance_interval = \"100ms\"").await;
    let admin = console(&mux, "app", "app-secret").await;
    let clients: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let c = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
            c.batch_execute("BEGIN; SELECT 1").await.unwrap();
            v.push(c);
        }
        v
    };
    assert_eq!(backends(primary(), &db), 3);
    admin
        .simple_query("SET max_db_connections = 1")
        .await
        .unwrap();
    for c in &clients {
        c.batch_execute("COMMIT").await.unwrap();
    }
    let settled = eventually(Duration::from_secs(10), || backends(primary(), &db) <= 1).await;
    assert!(settled, "{} backends", backends(primary(), &db));
    admin
        .simple_query("SET default_pool_size TO 2")
        .await
        .unwrap();
    admin
        .simple_query("SET max_db_connections = 0")
        .await
        .unwrap();
    let (_, pools) = show(&admin, "SHOW POOLS").await;
    let row = pools.iter().find(|r| r["database"] == db).unwrap();
    assert_eq!(row["pool_size"], "2");
    for c in &clients {
        c.batch_execute("SELECT 1").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_runs_console_commands() {
    let python = common::drivers::python();
    let (db, mux) = setup("console_psycopg", "").await;
    let user = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    user.batch_execute("SELECT 1").await.unwrap();
    let mut cmd = std::process::Command::new(python);
    cmd.arg(common::drivers::script("psycopg_console.py"))
        .arg(mux.addr.port().to_string())
        .arg(&db);
    let out = common::drivers::run_child(cmd, Duration::from_secs(60)).await;
    assert!(out.success, "{}", out.describe());
    assert!(out.stdout.starts_with("ok pools="), "{}", out.describe());
}
