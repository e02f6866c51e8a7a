//! The `pgmux` binary: command line, config checking, and the metrics endpoint.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn pgmux() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pgmux"))
}

/// A free port below the kernel's ephemeral range, with the next one free too (for the
/// metrics endpoint). Tests in this binary run in parallel, so each call starts further
/// on.
fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let offset = NEXT.fetch_add(10, std::sync::atomic::Ordering::Relaxed);
    let start = 20_000 + (std::process::id() % 5_000) as u16 + offset;
    (start..30_000)
        .find(|p| (0..3).all(|i| TcpListener::bind(("127.0.0.1", *p + i)).is_ok()))
        .expect("a free port")
}

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("pgmux-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_accepts_the_shipped_example_and_names_bad_keys() {
    for shipped in ["conf/pgmux.toml", "docker/pgmux.toml"] {
        let ok = pgmux()
            .args(["--check", "--config", shipped])
            .output()
            .unwrap();
        assert!(
            ok.status.success(),
            "{shipped}: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
    }

    let bad = write_config("bad", "[pgmux]\ndefault_pool_size = 0\n");
    let out = pgmux().arg("--check").arg("-c").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pgmux.default_pool_size"), "{stderr}");

    let typo = write_config("typo", "[pgmux]\nquery_wait_timout = \"1s\"\n");
    let out = pgmux()
        .arg("--check")
        .arg("-c")
        .arg(&typo)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("query_wait_timout"));

    // Starting (not only checking) with an invalid config fails the same way.
    let out = pgmux().arg("-c").arg(&bad).output().unwrap();
    assert!(!out.status.success());

    let version = pgmux().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

/// Starts the pgmux binary on `config` (whose `listen` is "127.0.0.1:0") with free
/// client and metrics ports, and waits until it accepts clients. Returns the process
/// (stopped when dropped), the client address and the metrics address.
async fn spawn_with_metrics(name: &str, config: &str) -> (Process, SocketAddr, SocketAddr) {
    let (listen, metrics) = (free_port(), free_port() + 1);
    let text = config.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{listen}\"\nmetrics_listen = \"127.0.0.1:{metrics}\""),
    );
    let path = write_config(name, &text);
    let child = Process(
        pgmux()
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let up = eventually(Duration::from_secs(10), || TcpStream::connect(addr).is_ok()).await;
    assert!(up, "pgmux did not start");
    (child, addr, format!("127.0.0.1:{metrics}").parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_pool_wait_after_a_queued_workload() {
    let clusters = cluster::shared();
    let db = fresh_db(&clusters.primary, "metrics");
    let config = config_text(&clusters.primary, &db, "default_pool_size = 1", "");
    let (_child, addr, metrics_addr) = spawn_with_metrics("metrics", &config).await;

    // Five clients on one server: four of them must queue.
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let client = connect(addr, "app", "app-secret", &db).await.unwrap();
            client.batch_execute("SELECT pg_sleep(0.1)").await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let body = tokio::task::block_in_place(|| http_get(metrics_addr, "/metrics"));
    let labels = format!("database=\"{db}\",user=\"app\"");
    let count_line = body
        .lines()
        .find(|l| l.starts_with("pgmux_pool_wait_seconds_count") && l.contains(&labels))
        .unwrap_or_else(|| panic!("no wait histogram in:\n{body}"));
    let count: f64 = count_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 5.0, "{count_line}");
    assert!(body.contains(&format!(
        "pgmux_pool_wait_seconds_bucket{{{labels},le=\"0.0001\"}}"
    )));
    // Waiting clients waited about 100 ms or more: some observations exceed 50 ms.
    let under_50ms = body
        .lines()
        .find(|l| l.contains(&labels) && l.contains("le=\"0.05\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .expect("a 50 ms bucket");
    assert!(
        under_50ms < count,
        "queued clients show up in higher buckets"
    );
    for name in [
        "pgmux_transactions_total",
        "pgmux_server_connections_opened_total",
        "pgmux_pool_servers",
        "pgmux_client_bytes_received_total",
    ] {
        assert!(body.contains(name), "{name} missing");
    }
}

/// Starts the binary on `text` (whose `listen` is replaced by a free port) and waits
/// until it accepts clients.
async fn spawn_pgmux(name: &str, text: &str) -> (Process, SocketAddr, std::path::PathBuf) {
    let listen = free_port();
    let text = text.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{listen}\""),
    );
    let path = write_config(name, &text);
    // Debug logs go to a file next to the config, for tests that read them.
    let log = std::fs::File::create(path.with_extension("log")).unwrap();
    let child = Process(
        pgmux()
            .arg("-c")
            .arg(&path)
            .args(["--log-level", "pgmux=debug", "--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let up = eventually(Duration::from_secs(10), || TcpStream::connect(addr).is_ok()).await;
    assert!(up, "pgmux did not start");
    (child, addr, path)
}

fn signal(child: &Process, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.0.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_sigterm_lets_an_open_transaction_commit() {
    let clusters = cluster::shared();
    let db = fresh_db(&clusters.primary, "signals");
    let text = config_text(
        &clusters.primary,
        &db,
        "admin_users = [\"app\"]\ndefault_pool_size = 2\nshutdown_timeout = \"20s\"",
        "",
    );
    let (mut child, addr, path) = spawn_pgmux("signals", &text).await;

    // SIGHUP re-reads the file; the console shows the new size.
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("default_pool_size = 2", "default_pool_size = 3"),
    )
    .unwrap();
    signal(&child, "HUP");
    let admin = connect(addr, "app", "app-secret", "pgmux").await.unwrap();
    let mut reloaded = false;
    for _ in 0..100 {
        let size = admin
            .simple_query("SHOW CONFIG")
            .await
            .unwrap()
            .into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r)
                    if r.get(0) == Some("default_pool_size") =>
                {
                    r.get(1).map(str::to_string)
                }
                _ => None,
            });
        if size.as_deref() == Some("3") {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "SIGHUP did not reload");
    drop(admin);

    // An invalid file is rejected with its reason logged; the old configuration stays.
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        good.replace("default_pool_size = 3", "default_pool_size = 0"),
    )
    .unwrap();
    signal(&child, "HUP");
    let log_path = path.with_extension("log");
    let logged = eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("reload rejected"))
    })
    .await;
    assert!(logged, "no log line for the rejected reload");
    std::fs::write(&path, &good).unwrap();

    let open = connect(addr, "app", "app-secret", &db).await.unwrap();
    open.batch_execute("BEGIN; INSERT INTO items(v) VALUES ('during-shutdown')")
        .await
        .unwrap();
    // A lone BEGIN, which pgmux answers itself: in a transaction, holding no server.
    let begun = connect(addr, "app", "app-secret", &db).await.unwrap();
    begun.batch_execute("BEGIN").await.unwrap();
    let idle = connect(addr, "app", "app-secret", &db).await.unwrap();
    idle.batch_execute("SELECT 1").await.unwrap();

    signal(&child, "TERM");
    // No new clients once shutdown has begun.
    let refused = eventually(Duration::from_secs(10), || {
        TcpStream::connect(addr).is_err()
    })
    .await;
    assert!(refused, "still accepting after SIGTERM");
    // The open transactions may finish, and then their clients are told to go.
    begun
        .batch_execute("INSERT INTO items(v) VALUES ('during-shutdown'); COMMIT")
        .await
        .unwrap();
    assert!(begun.batch_execute("SELECT 1").await.is_err());
    open.batch_execute("COMMIT").await.unwrap();
    let err = open.batch_execute("SELECT 1").await.unwrap_err();
    assert!(
        sqlstate(&err).as_deref() == Some("57P01") || open.is_closed(),
        "{err:?}"
    );
    assert!(idle.batch_execute("SELECT 1").await.is_err());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "pgmux did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    let rows = clusters.primary.psql_db(
        &db,
        "SELECT count(*) FROM items WHERE v = 'during-shutdown'",
    );
    assert_eq!(rows.trim(), "2");

    // Debug logs carry the client's span with db and user, and no password.
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("pgmux.default_pool_size"),
        "the rejection names its key"
    );
    for secret in ["app-secret", "md5-secret", "plain-secret"] {
        assert!(!log.contains(secret), "a password in the log:\n{log}");
    }
    let in_span = log.lines().any(|l| {
        l.contains("\"client\"")
            && l.contains(&format!("\"db\":\"{db}\""))
            && l.contains("\"user\":\"app\"")
    });
    assert!(in_span, "no client span with db and user in:\n{log}");
}

/// The default is one thread; `worker_threads` other than 1 starts tokio's multi-thread
/// runtime instead, which must serve clients just the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_clients_on_one_thread_and_on_several() {
    let clusters = cluster::shared();
    let db = fresh_db(&clusters.primary, "threads");
    for threads in ["1", "0", "3"] {
        let text = config_text(
            &clusters.primary,
            &db,
            &format!("worker_threads = {threads}\ndefault_pool_size = 2"),
            "",
        );
        let (_child, addr, _) = spawn_pgmux(&format!("threads{threads}"), &text).await;
        let mut tasks = Vec::new();
        for i in 0..6 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                let client = connect(addr, "app", "app-secret", &db).await.unwrap();
                let row = client.query_one("SELECT $1::int + 1", &[&i]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), i + 1);
            }));
        }
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .unwrap_or_else(|_| panic!("worker_threads = {threads}: a client hung"))
                .unwrap();
        }
    }
}

/// A metric sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// A strict reader of the Prometheus text format: every sample line is
/// `name{label="value",...} number`, label values use only the `\\`, `\"` and `\n`
/// escapes, and each family's `# TYPE` comes before its samples. Returns the samples as
/// (name, labels, value).
fn parse_prometheus(body: &str) -> Vec<Sample> {
    fn valid_name(n: &str) -> bool {
        let mut chars = n.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut typed = std::collections::HashMap::new();
    let mut samples = Vec::new();
    for line in body.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let words: Vec<&str> = rest.splitn(3, ' ').collect();
            if words[0] == "TYPE" {
                assert!(valid_name(words[1]), "{line}");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&words[2]),
                    "{line}"
                );
                typed.insert(words[1].to_string(), words[2].to_string());
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).expect("a sample");
        let name = &line[..name_end];
        assert!(valid_name(name), "bad name in {line}");
        let mut labels = Vec::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            let mut end = None;
            loop {
                // label name
                let mut key = String::new();
                for (i, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    if c == '}' && key.is_empty() {
                        end = Some(i);
                        break;
                    }
                    key.push(c);
                }
                if end.is_some() {
                    break;
                }
                assert!(valid_name(&key), "bad label name in {line}");
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                let mut value = String::new();
                loop {
                    let (_, c) = chars.next().expect("unterminated label value");
                    match c {
                        '"' => break,
                        '\\' => match chars.next().expect("escape").1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            other => panic!("bad escape \\{other} in {line}"),
                        },
                        c => value.push(c),
                    }
                }
                labels.push((key, value));
                match chars.next() {
                    Some((_, ',')) => continue,
                    Some((i, '}')) => {
                        end = Some(i);
                        break;
                    }
                    other => panic!("unexpected {other:?} in {line}"),
                }
            }
            rest = &inner[end.unwrap() + 1..];
        }
        let value = rest.trim().split(' ').next().unwrap();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains_key(*f)))
            .unwrap_or(name);
        assert!(typed.contains_key(family), "no # TYPE before {line}");
        samples.push((name.to_string(), labels, value));
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_strictly_and_answer_while_the_pool_is_exhausted() {
    let clusters = cluster::shared();
    let db = fresh_db(&clusters.primary, "metrics_strict");
    let metrics = free_port() + 2;
    // A database name that needs escaping in label values.
    let odd = "odd\"db\\x";
    let text = config_text(
        &clusters.primary,
        &db,
        &format!(
            "metrics_listen = \"127.0.0.1:{metrics}\"\ndefault_pool_size = 1\nquery_wait_timeout = \"30s\""
        ),
        "",
    )
    .replace(
        &format!("[databases.{db}]"),
        &format!("[databases.'{odd}']\ndbname = \"{db}\""),
    );
    let (_child, addr, _) = spawn_pgmux("metrics-strict", &text).await;
    let connect_odd = || async {
        let (client, connection) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(addr.port())
            .user("app")
            .password("app-secret")
            .dbname(odd)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    };
    let holder = connect_odd().await;
    holder
        .batch_execute("SELECT 1; BEGIN; SELECT 1")
        .await
        .unwrap();
    let waiter = connect_odd().await;
    let waiting = tokio::spawn(async move { waiter.batch_execute("SELECT 1").await });

    let metrics_addr: SocketAddr = format!("127.0.0.1:{metrics}").parse().unwrap();
    let mut seen_waiting = false;
    let mut body = String::new();
    for _ in 0..40 {
        let started = std::time::Instant::now();
        body = tokio::task::block_in_place(|| http_get(metrics_addr, "/metrics"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "/metrics was slow"
        );
        let body = body.split("\r\n\r\n").nth(1).unwrap_or("");
        let samples = parse_prometheus(body);
        seen_waiting = samples.iter().any(|(name, labels, v)| {
            name == "pgmux_pool_clients_waiting"
                && labels.contains(&("database".into(), odd.into()))
                && *v == 1.0
        });
        if seen_waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen_waiting, "no waiting client in:\n{body}");
    for name in [
        "pgmux_transaction_duration_seconds_bucket",
        "pgmux_query_duration_seconds_count",
        "pgmux_pool_servers_connecting",
        "pgmux_server_errors_total",
        "pgmux_config_reloads_total",
        "pgmux_build_info",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    holder.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_replica_lag_and_routing() {
    let clusters = cluster::shared();
    let db = tokio::task::block_in_place(|| {
        let db = fresh_db(&clusters.primary, "metrics_route");
        clusters.wait_replica_caught_up();
        db
    });
    let replica = clusters.replica.as_ref().expect("a replica");
    let routing = format!("replicas = [\"127.0.0.1:{}\"]", replica.port());
    let config = config_text(&clusters.primary, &db, "", &routing);
    let (_child, addr, metrics_addr) = spawn_with_metrics("metrics_route", &config).await;
    let eligible = format!(
        "pgmux_replica_eligible{{database=\"{db}\",replica=\"127.0.0.1:{}\"}} 1",
        replica.port()
    );
    let joined = eventually(Duration::from_secs(10), || {
        http_get(metrics_addr, "/metrics").contains(&eligible)
    });
    assert!(
        tokio::task::block_in_place(|| joined).await,
        "replica never eligible"
    );

    let client = connect(addr, "app", "app-secret", &db).await.unwrap();
    for statement in ["BEGIN READ ONLY", "SELECT 1", "COMMIT"] {
        client.batch_execute(statement).await.unwrap();
    }
    client.batch_execute("SELECT 1").await.unwrap();
    let body = tokio::task::block_in_place(|| http_get(metrics_addr, "/metrics"));
    for series in [
        format!("pgmux_routed_transactions_total{{database=\"{db}\",target=\"replica\"}} 1"),
        format!("pgmux_routed_transactions_total{{database=\"{db}\",target=\"primary\"}} 1"),
        format!(
            "pgmux_replica_lag_seconds{{database=\"{db}\",replica=\"127.0.0.1:{}\"}} 0",
            replica.port()
        ),
        format!(
            "pgmux_replica_lag_bytes{{database=\"{db}\",replica=\"127.0.0.1:{}\"}}",
            replica.port()
        ),
        format!(
            "pgmux_pool_servers{{database=\"{db}\",user=\"app\",replica=\"127.0.0.1:{}\"}}",
            replica.port()
        ),
    ] {
        assert!(body.contains(&series), "{series} missing from:\n{body}");
    }
}
