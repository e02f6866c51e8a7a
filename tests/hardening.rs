//! Hostile and broken clients on raw sockets. After each one, a normal client must
//! still log in and run a query, and the server connections must still be usable.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn setup(prefix: &str, general: &str) -> (String, pgmux::Running) {
    let primary = &cluster::shared().primary;
    let db = fresh_db(primary, prefix);
    let general = format!("auth_type = \"trust\"\n{general}");
    let mux = start_pgmux(&config_text(primary, &db, &general, "")).await;
    (db, mux)
}

/// A normal client logs in and queries.
async fn still_serves(addr: SocketAddr, db: &str, what: &str) {
    let client = tokio::time::timeout(Duration::from_secs(10), connect(addr, "app", "x", db))
        .await
        .unwrap_or_else(|_| panic!("after {what}: login timed out"))
        .unwrap_or_else(|e| panic!("after {what}: login failed: {e}"));
    assert_eq!(
        simple_value(&client, "SELECT 'ok'").await.as_deref(),
        Some("ok"),
        "after {what}"
    );
}

/// Everything pgmux sends until it closes; panics if it does not close within 10 s.
async fn reply_until_close(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut all = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut all)).await {
        Ok(Ok(_)) => {}
        // A reset after the error is a close too.
        Ok(Err(_)) => {}
        Err(_) => panic!("{what}: pgmux kept the connection open"),
    }
    all
}

/// The SQLSTATE of the first ErrorResponse in `bytes`.
fn first_error_code(bytes: &[u8]) -> Option<String> {
    let mut at = 0;
    while at + 5 <= bytes.len() {
        let len = i32::from_be_bytes(bytes[at + 1..at + 5].try_into().unwrap()) as usize;
        let end = (at + 1 + len).min(bytes.len());
        if bytes[at] == b'E' {
            return Some(error_code(&bytes[at + 5..end]));
        }
        at += 1 + len;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_startup_packets_are_refused() {
    let (db, mux) = setup("hard_startup", "").await;
    let mut oversized = 20_000i32.to_be_bytes().to_vec();
    oversized.extend(196_608i32.to_be_bytes());
    oversized.resize(20_000, b'a');
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("length 2", vec![0, 0, 0, 2]),
        ("length 0", vec![0, 0, 0, 0, 1, 2, 3, 4]),
        ("negative length", vec![0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0]),
        ("huge length", vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]),
        ("oversized startup packet", oversized),
        (
            "garbage before startup",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("protocol 1.0", vec![0, 0, 0, 9, 0, 1, 0, 0, 0]),
        ("no terminator", {
            let mut p = vec![0, 0, 0, 16, 0, 3, 0, 0];
            p.extend_from_slice(b"user\0app");
            p
        }),
    ];
    for (what, bytes) in cases {
        let t0 = Instant::now();
        let mut stream = TcpStream::connect(mux.addr).await.unwrap();
        let _ = stream.write_all(&bytes).await;
        let reply = reply_until_close(&mut stream, what).await;
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{what}: pgmux waited for more"
        );
        let code = first_error_code(&reply);
        assert!(
            matches!(code.as_deref(), Some("08P01") | Some("0A000")),
            "{what}: {reply:?}"
        );
        still_serves(mux.addr, &db, what).await;
    }
}

/// Logs in over a raw socket (trust), returning the socket ready for messages.
async fn logged_in(addr: SocketAddr, db: &str) -> TcpStream {
    let (stream, seen) = raw_login(addr, 196_608, &[("user", "app"), ("database", db)]).await;
    assert_eq!(seen.last().map(|m| m.0), Some(b'Z'), "{:?}", tags(&seen));
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_messages_after_login_are_refused() {
    let (db, mux) = setup("hard_msgs", "max_message_size = 65536").await;
    let mut second_startup = 9i32.to_be_bytes().to_vec();
    second_startup.extend(196_608i32.to_be_bytes());
    second_startup.push(0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("length 3", b"Q\0\0\0\x03".to_vec()),
        ("negative length", b"Q\xff\xff\xff\xfe".to_vec()),
        ("huge Query", b"Q\x7f\xff\xff\xffSELECT".to_vec()),
        ("Parse over max_message_size", b"P\0\x10\0\0".to_vec()),
        ("unknown message type", b"z\0\0\0\x04".to_vec()),
        ("server-only RowDescription", b"T\0\0\0\x06\0\0".to_vec()),
        ("server-only ReadyForQuery", b"Z\0\0\0\x05I".to_vec()),
        ("password message after login", b"p\0\0\0\x08abc\0".to_vec()),
        ("second StartupMessage", second_startup),
    ];
    for (what, bytes) in cases {
        let mut stream = logged_in(mux.addr, &db).await;
        let t0 = Instant::now();
        stream.write_all(&bytes).await.unwrap();
        let reply = reply_until_close(&mut stream, what).await;
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{what}: pgmux waited for more"
        );
        assert_eq!(
            first_error_code(&reply).as_deref(),
            Some("08P01"),
            "{what}: {reply:?}"
        );
        still_serves(mux.addr, &db, what).await;
    }
    // No server connection was spoiled: each is idle and usable.
    let primary = &cluster::shared().primary;
    let stuck = primary.psql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state <> 'idle' \
         AND backend_type = 'client backend'"
    ));
    assert_eq!(stuck, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_messages_then_close_leave_servers_clean() {
    let (db, mux) = setup("hard_trunc", "default_pool_size = 2").await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("half a header", b"Q\0\0".to_vec()),
        ("half a Query", b"Q\0\0\0\x20SELECT pg_sleep".to_vec()),
        (
            "Parse then half a Bind",
            b"P\0\0\0\x10\0SELECT 1\0\0\0B\0\0\0\x40\0\0".to_vec(),
        ),
        (
            "a transaction left open",
            b"Q\0\0\0\x0aBEGIN\0Q\0\0\0\x20INSERT".to_vec(),
        ),
    ];
    for (what, bytes) in cases {
        let mut stream = logged_in(mux.addr, &db).await;
        stream.write_all(&bytes).await.unwrap();
        // Give pgmux a moment to act on the partial bytes before the close.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(stream);
        still_serves(mux.addr, &db, what).await;
    }
    let primary = &cluster::shared().primary;
    assert!(
        eventually(Duration::from_secs(5), || {
            primary.psql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' \
                 AND state LIKE 'idle in transaction%'"
            )) == "0"
        })
        .await,
        "a server was left inside a transaction"
    );
    // The pool of two still serves two clients at once.
    let a = connect(mux.addr, "app", "x", &db).await.unwrap();
    let b = connect(mux.addr, "app", "x", &db).await.unwrap();
    a.batch_execute("BEGIN; SELECT 1").await.unwrap();
    b.batch_execute("BEGIN; SELECT 1").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    b.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_lock_out_real_clients() {
    let (db, mux) = setup("hard_slow", "client_login_timeout = \"3s\"").await;
    let mut silent = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(mux.addr).await.unwrap();
        // Some send nothing, some half a startup packet.
        if i % 2 == 1 {
            s.write_all(&[0, 0, 0, 40, 0, 3]).await.unwrap();
        }
        silent.push(s);
    }
    let t0 = Instant::now();
    let client = connect(mux.addr, "app", "x", &db).await.unwrap();
    assert_eq!(
        simple_value(&client, "SELECT 1").await.as_deref(),
        Some("1")
    );
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "login took {:?} beside 200 silent connections",
        t0.elapsed()
    );
    // All of them are dropped at client_login_timeout, with a message saying why.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, s) in silent.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut reply = Vec::new();
        let read = tokio::time::timeout(left, s.read_to_end(&mut reply)).await;
        assert!(read.is_ok(), "silent connection {i} was not dropped");
        let text = String::from_utf8_lossy(&reply);
        assert!(text.contains("client_login_timeout"), "{i}: {text}");
    }
    still_serves(mux.addr, &db, "slowloris").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_password_messages_are_refused() {
    let primary = &cluster::shared().primary;
    let db = fresh_db(primary, "hard_auth");
    let mux = start_pgmux(&config_text(primary, &db, "", "")).await;
    let packet = startup_packet(3 << 16, &[("user", "app"), ("database", &db)]);
    let cases: [(&str, &[u8]); 5] = [
        ("huge password message", b"p\x7f\xff\xff\xff"),
        ("negative length", b"p\xff\xff\xff\xff"),
        ("length 2", b"p\0\0\0\x02"),
        ("a Query instead", b"Q\0\0\0\x0dSELECT 1\0"),
        ("unknown SASL mechanism", b"p\0\0\0\x0eMD5\0\0\0\0\x02ab"),
    ];
    for (what, bytes) in cases {
        let mut stream = TcpStream::connect(mux.addr).await.unwrap();
        stream.write_all(&packet).await.unwrap();
        // AuthenticationSASL first.
        let (tag, _) = read_raw(&mut stream).await;
        assert_eq!(tag, b'R', "{what}");
        let t0 = Instant::now();
        stream.write_all(bytes).await.unwrap();
        let reply = reply_until_close(&mut stream, what).await;
        assert!(t0.elapsed() < Duration::from_secs(5), "{what}");
        assert_eq!(
            first_error_code(&reply).as_deref(),
            Some("08P01"),
            "{what}: {reply:?}"
        );
    }
    let client = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    assert_eq!(
        simple_value(&client, "SELECT 1").await.as_deref(),
        Some("1")
    );
}
