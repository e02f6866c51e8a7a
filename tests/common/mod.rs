//! Shared helpers for pgmux's integration tests: real PostgreSQL servers (see
//! [`cluster`]), pgmux instances started in-process, and real clients.
#![allow(dead_code)] // each test binary uses a different subset

pub mod cluster;
pub mod drivers;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cluster::Cluster;

/// Each test gets its own database, so counts in pg_stat_activity are its own.
pub fn fresh_db(primary: &Cluster, prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    primary.psql(&format!("CREATE DATABASE {name} OWNER app"));
    primary.psql_db(
        &name,
        "SET ROLE app; CREATE TABLE items(id serial PRIMARY KEY, v text);",
    );
    name
}

/// A pgmux configuration for one database of `primary`, served to users app, app_md5
/// and app_plain. `general` and `database` are extra TOML lines for those tables.
pub fn config_text(primary: &Cluster, db: &str, general: &str, database: &str) -> String {
    format!(
        r#"
[pgmux]
listen = "127.0.0.1:0"
{general}

[users.app]
password = "app-secret"

[users.app_md5]
password = "md5-secret"

[users.app_plain]
password = "plain-secret"

[databases.{db}]
host = "127.0.0.1"
port = {port}
{database}
"#,
        port = primary.port()
    )
}

/// Starts pgmux in this process.
pub async fn start_pgmux(config: &str) -> pgmux::Running {
    let config = pgmux::config::Config::parse(config).expect("test config is valid");
    pgmux::start(config).await.expect("pgmux starts")
}

/// Connects through pgmux (or anything) with tokio-postgres.
pub async fn connect(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect_with(addr, user, password, db, "").await
}

/// Like [`connect`], with extra libpq-style `key=value` settings.
pub async fn connect_with(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
    extra: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let dsn = format!(
        "host={} port={} user={user} password={password} dbname={db} connect_timeout=10 {extra}",
        addr.ip(),
        addr.port()
    );
    let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Server backends pgmux holds open to `db` (pg_stat_activity on the primary).
pub fn backends(primary: &Cluster, db: &str) -> usize {
    primary
        .psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND backend_type = 'client backend'"
        ))
        .parse()
        .expect("a count")
}

/// The message pgmux or the server sent, or the error's own text.
pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// The SQLSTATE of a tokio-postgres error, if the server (or pgmux) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|db| db.code().code().to_string())
}

/// Polls `f` every 50 ms until it holds, for at most `limit`.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first column of the first row of a simple-protocol query.
pub async fn simple_value(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
    let messages = client.simple_query(sql).await.expect("query succeeds");
    messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
        _ => None,
    })
}

/// A StartupMessage for protocol `version` (`3 << 16` is 3.0) with `params`. Any
/// version, so that tests can send ones PostgreSQL does not speak.
pub fn startup_packet(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// A Query message.
pub fn query_packet(sql: &str) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut buf).unwrap();
    buf.to_vec()
}

/// A raw protocol connection to pgmux with `auth_type = "trust"`: startup, then every
/// message up to the first ReadyForQuery. Returns the socket and those message types.
pub async fn raw_login(
    addr: std::net::SocketAddr,
    version: i32,
    params: &[(&str, &str)],
) -> (tokio::net::TcpStream, Vec<(u8, Vec<u8>)>) {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&startup_packet(version, params))
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let (tag, body) = read_raw(&mut stream).await;
        seen.push((tag, body));
        if tag == b'Z' || tag == b'E' {
            return (stream, seen);
        }
    }
}

pub async fn read_raw(stream: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut head))
        .await
        .expect("a message in time")
        .expect("a message");
    let len = i32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0; len - 4];
    stream.read_exact(&mut body).await.unwrap();
    (head[0], body)
}

/// The SQLSTATE field of an ErrorResponse body.
pub fn error_code(body: &[u8]) -> String {
    body.split(|b| *b == 0)
        .find(|f| f.first() == Some(&b'C'))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
        .unwrap_or_default()
}

/// Reads messages up to and including the next ReadyForQuery.
pub async fn read_until_ready(stream: &mut tokio::net::TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut seen = Vec::new();
    loop {
        let (tag, body) = read_raw(stream).await;
        seen.push((tag, body));
        if tag == b'Z' {
            return seen;
        }
    }
}

/// The message types of `messages`, as a string: "12CZ".
pub fn tags(messages: &[(u8, Vec<u8>)]) -> String {
    messages.iter().map(|(t, _)| *t as char).collect()
}
