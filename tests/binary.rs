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

/// A free port below the kernel's ephemeral range.
fn free_port() -> u16 {
    let start = 20_000 + (std::process::id() % 5_000) as u16;
    (start..30_000)
        .find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_pool_wait_after_a_queued_workload() {
    let clusters = cluster::shared();
    let db = fresh_db(&clusters.primary, "metrics");
    let (listen, metrics) = (free_port(), free_port() + 1);
    let text = config_text(&clusters.primary, &db, "default_pool_size = 1", "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{listen}\"\nmetrics_listen = \"127.0.0.1:{metrics}\""),
    );
    let path = write_config("metrics", &text);
    let _child = Process(
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

    let metrics_addr: SocketAddr = format!("127.0.0.1:{metrics}").parse().unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_replica_lag_and_routing() {
    let clusters = cluster::shared();
    let db = tokio::task::block_in_place(|| {
        let db = fresh_db(&clusters.primary, "metrics_route");
        clusters.wait_replica_caught_up();
        db
    });
    let replica = clusters.replica.as_ref().expect("a replica");
    let (listen, metrics) = (free_port(), free_port() + 1);
    let routing = format!("replicas = [\"127.0.0.1:{}\"]", replica.port());
    let text = config_text(&clusters.primary, &db, "", &routing).replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{listen}\"\nmetrics_listen = \"127.0.0.1:{metrics}\""),
    );
    let path = write_config("metrics_route", &text);
    let _child = Process(
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
    let metrics_addr: SocketAddr = format!("127.0.0.1:{metrics}").parse().unwrap();
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
