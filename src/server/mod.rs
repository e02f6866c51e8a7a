//! A connection from pgmux to a PostgreSQL server: login, and the few queries pgmux
//! runs on it by itself (parameter sync, rollback, reset). Client traffic flows through
//! [`crate::relay`], which borrows the socket and the read buffer.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::error::{Error, Result};
use crate::params::{ParamSet, SharedParams};

/// Where a pool's servers live and who pgmux logs in as.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub password: String,
    /// TLS settings, unless `server_tls_mode = "disable"`.
    pub tls: Option<Arc<crate::tls::Connector>>,
}

/// A reload compares targets to see whether a pool must retire its servers; TLS
/// settings are the same object for as long as they are unchanged.
impl PartialEq for Target {
    fn eq(&self, other: &Target) -> bool {
        self.host == other.host
            && self.port == other.port
            && self.dbname == other.dbname
            && self.user == other.user
            && self.password == other.password
            && match (&self.tls, &other.tls) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl Eq for Target {}

/// Written by hand so that no log line can carry the password.
impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Target {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Server buffers start here and grow with the largest message seen.
const READ_CHUNK: usize = 16 * 1024;

/// The key a CancelRequest for this server's backend needs.
#[derive(Debug, Clone)]
pub struct CancelKey {
    pub addr: Arc<str>,
    pub process_id: i32,
    pub secret_key: i32,
    /// The server's host name (for TLS) and TLS settings: the cancel is sent the way
    /// the connection itself was made.
    pub host: Arc<str>,
    pub tls: Option<Arc<crate::tls::Connector>>,
}

/// A logged-in server connection.
pub struct Server {
    pub stream: crate::tls::ServerStream,
    /// Bytes read from the server and not yet delivered; see [`crate::relay::Flow`].
    pub flow: crate::relay::Flow,
    /// Shared with the cancel slot of the client it serves: handing it over is one
    /// reference count, not three.
    pub cancel_key: Arc<CancelKey>,
    /// Session parameters as last applied to this connection.
    pub params: SharedParams,
    /// ParameterStatus values reported at login: the server's defaults.
    pub reported: Vec<(String, String)>,
    pub id: u64,
    /// The pool's generation when it was opened: RECONNECT and target changes retire
    /// older ones.
    pub generation: u64,
    pub created: Instant,
    /// When it last changed hands: handed to a client, or given back to the pool.
    pub last_used: Instant,
    /// Set when the connection can no longer be trusted (FATAL seen, I/O failure).
    pub broken: bool,
    /// Protocol-level prepared statements pgmux created here, in transaction mode;
    /// `None` until the first one, and again whenever that list cannot be trusted.
    pub prepared: Option<crate::prepared::ServerStatements>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("id", &self.id)
            .field("backend_pid", &self.cancel_key.process_id)
            .finish()
    }
}

impl Server {
    /// A server on a plain stream that went through no login, with no real backend to
    /// cancel: for the fuzzing entry points and for tests that play the server's side.
    pub fn unauthenticated(stream: tokio::net::TcpStream) -> Server {
        Server {
            stream: crate::tls::ServerStream::Plain(stream),
            flow: crate::relay::Flow::with_capacity(1024),
            cancel_key: Arc::new(CancelKey {
                addr: Arc::from("127.0.0.1:1"),
                process_id: 0,
                secret_key: 0,
                host: Arc::from("127.0.0.1"),
                tls: None,
            }),
            params: Arc::new(crate::params::ParamSet::default()),
            reported: Vec::new(),
            id: 0,
            generation: 0,
            created: Instant::now(),
            last_used: Instant::now(),
            broken: false,
            prepared: None,
        }
    }

    /// Opens a connection and logs in, within `timeout`.
    pub async fn connect(target: &Target, id: u64, timeout: Duration) -> Result<Server> {
        let addr = target.addr();
        match tokio::time::timeout(timeout, Server::connect_inner(target, id, &addr)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Connect {
                addr,
                reason: format!(
                    "server_connect_timeout ({}) expired",
                    humantime::format_duration(timeout)
                ),
            }),
        }
    }

    async fn connect_inner(target: &Target, id: u64, addr: &str) -> Result<Server> {
        let connect_error = |e: io::Error| Error::Connect {
            addr: addr.to_string(),
            reason: e.to_string(),
        };
        let tcp = TcpStream::connect(addr).await.map_err(connect_error)?;
        tcp.set_nodelay(true).map_err(connect_error)?;
        let mut stream = crate::tls::connect_server(tcp, &target.host, target.tls.as_deref())
            .await
            .map_err(|reason| Error::Connect {
                addr: addr.to_string(),
                reason,
            })?;

        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", target.user.as_str()),
                ("database", target.dbname.as_str()),
            ],
            &mut out,
        )
        .map_err(connect_error)?;
        stream.write_all(&out).await.map_err(connect_error)?;
        stream.flush().await.map_err(connect_error)?;

        let mut server = Server {
            stream,
            flow: crate::relay::Flow::with_capacity(READ_CHUNK),
            cancel_key: Arc::new(CancelKey {
                addr: Arc::from(addr),
                process_id: 0,
                secret_key: 0,
                host: Arc::from(target.host.as_str()),
                tls: target.tls.clone(),
            }),
            params: Arc::new(ParamSet::default()),
            reported: Vec::new(),
            id,
            generation: 0,
            created: Instant::now(),
            last_used: Instant::now(),
            broken: false,
            prepared: None,
        };
        server.login(target).await?;
        Ok(server)
    }

    /// Reads the next backend message during login or a pgmux-issued query.
    async fn next_message(&mut self) -> Result<Message> {
        loop {
            match Message::parse(&mut self.flow.buf) {
                Ok(Some(message)) => return Ok(message),
                Ok(None) => {}
                Err(e) => return Err(Error::ServerProtocol(e.to_string())),
            }
            self.flow.buf.reserve(READ_CHUNK);
            let n = self
                .stream
                .read_buf(&mut self.flow.buf)
                .await
                .map_err(Error::ServerIo)?;
            if n == 0 {
                return Err(Error::ServerIo(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    async fn send(&mut self, out: &mut BytesMut) -> Result<()> {
        self.stream.write_all(out).await.map_err(Error::ServerIo)?;
        self.stream.flush().await.map_err(Error::ServerIo)?;
        out.clear();
        Ok(())
    }

    async fn login(&mut self, target: &Target) -> Result<()> {
        let mut out = BytesMut::new();
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.next_message().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(target.password.as_bytes(), &mut out)
                        .map_err(Error::ServerIo)?;
                    self.send(&mut out).await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        target.user.as_bytes(),
                        target.password.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut out)
                        .map_err(Error::ServerIo)?;
                    self.send(&mut out).await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let (mut plain, mut plus) = (false, false);
                    while let Some(m) = mechanisms
                        .next()
                        .map_err(|e| Error::ServerProtocol(e.to_string()))?
                    {
                        plain |= m == sasl::SCRAM_SHA_256;
                        plus |= m == sasl::SCRAM_SHA_256_PLUS;
                    }
                    // Over TLS, bind the exchange to the server's certificate when the
                    // server offers it: a man in the middle then cannot relay it.
                    let end_point = self.stream.server_end_point().filter(|_| plus);
                    let (mechanism, binding) = match end_point {
                        Some(data) => (
                            sasl::SCRAM_SHA_256_PLUS,
                            ChannelBinding::tls_server_end_point(data),
                        ),
                        None if plain => (sasl::SCRAM_SHA_256, ChannelBinding::unsupported()),
                        None => {
                            return Err(Error::ServerProtocol(
                                "server offered no SASL mechanism pgmux supports".into(),
                            ))
                        }
                    };
                    let client = ScramSha256::new(target.password.as_bytes(), binding);
                    frontend::sasl_initial_response(mechanism, client.message(), &mut out)
                        .map_err(Error::ServerIo)?;
                    self.send(&mut out).await?;
                    scram = Some(client);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let mut client = scram
                        .take()
                        .ok_or_else(|| Error::ServerProtocol("SASLContinue without SASL".into()))?;
                    check_server_first(body.data()).map_err(Error::ServerProtocol)?;
                    // Deriving the key takes thousands of SHA-256 rounds, milliseconds of
                    // CPU: on the blocking pool, so that the thread serving every other
                    // client is not held up meanwhile (pgmux runs on one by default).
                    let challenge = body.data().to_vec();
                    let client = tokio::task::spawn_blocking(move || {
                        client.update(&challenge).map(|()| client)
                    })
                    .await
                    .map_err(|e| Error::ServerProtocol(format!("SCRAM: {e}")))?
                    .map_err(|e| Error::ServerProtocol(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(client.message(), &mut out).map_err(Error::ServerIo)?;
                    scram = Some(client);
                    self.send(&mut out).await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| Error::ServerProtocol("SASLFinal without SASL".into()))?;
                    client.finish(body.data()).map_err(|e| {
                        Error::ServerProtocol(format!("server's SCRAM signature is invalid: {e}"))
                    })?;
                }
                Message::ParameterStatus(body) => {
                    let name = body.name().map_err(Error::ServerIo)?;
                    let value = body.value().map_err(Error::ServerIo)?;
                    self.reported.push((name.to_string(), value.to_string()));
                }
                Message::BackendKeyData(body) => {
                    let key = Arc::make_mut(&mut self.cancel_key);
                    key.process_id = body.process_id();
                    key.secret_key = body.secret_key();
                }
                Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    let (code, message) = error_fields(&body);
                    return Err(Error::ServerLogin { code, message });
                }
                _ => {
                    return Err(Error::ServerProtocol(
                        "unexpected message during login".into(),
                    ))
                }
            }
        }
    }

    /// [`Server::run_quietly`] in a box of its own, for callers whose own state should
    /// stay small.
    pub async fn run_quietly_boxed(&mut self, sql: &str) -> Result<QuietOutcome> {
        Box::pin(self.run_quietly(sql)).await
    }

    /// Runs `sql` as a simple query, discarding its results. Returns the server's error
    /// message if the query failed, and the ParameterStatus messages it caused.
    pub async fn run_quietly(&mut self, sql: &str) -> Result<QuietOutcome> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(Error::ServerIo)?;
        self.send(&mut out).await?;
        let mut outcome = QuietOutcome::default();
        loop {
            match self.next_message().await? {
                Message::ReadyForQuery(body) => {
                    outcome.status = body.status();
                    return Ok(outcome);
                }
                Message::ErrorResponse(body) => outcome.error = Some(error_fields(&body)),
                Message::ParameterStatus(body) => outcome.reported.push((
                    body.name().map_err(Error::ServerIo)?.to_string(),
                    body.value().map_err(Error::ServerIo)?.to_string(),
                )),
                Message::CopyInResponse(_) => {
                    frontend::copy_fail("pgmux does not feed COPY", &mut out)
                        .map_err(Error::ServerIo)?;
                    self.send(&mut out).await?;
                }
                _ => {}
            }
        }
    }

    /// Discards the rest of an answer the client will never see: bytes the relay framed
    /// but did not deliver, then every message up to the `owed`-th ReadyForQuery, whose
    /// status is returned.
    pub async fn discard_until_ready(&mut self, owed: u32) -> Result<u8> {
        if self.flow.mid_message() {
            return Err(Error::ServerProtocol("answer cut short".into()));
        }
        let framed = self.flow.ready().len();
        self.flow.consume(framed);
        let mut status = b'I';
        for _ in 0..owed {
            loop {
                if let Message::ReadyForQuery(body) = self.next_message().await? {
                    status = body.status();
                    break;
                }
            }
        }
        Ok(status)
    }

    /// Runs `sql` as a simple query and returns the text values of its first row; an
    /// error if the query failed or returned no row. For pgmux's own probes.
    pub async fn query_row(&mut self, sql: &str) -> Result<Vec<Option<String>>> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(Error::ServerIo)?;
        self.send(&mut out).await?;
        let mut row = None;
        let mut error = None;
        loop {
            match self.next_message().await? {
                Message::DataRow(body) if row.is_none() => {
                    let buf = body.buffer();
                    let mut values = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(range) = ranges.next().map_err(Error::ServerIo)? {
                        values.push(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    row = Some(values);
                }
                Message::ErrorResponse(body) => error = Some(error_fields(&body)),
                Message::ReadyForQuery(body) => {
                    if body.status() != b'I' {
                        self.broken = true;
                    }
                    return match (error, row) {
                        (Some((code, message)), _) => Err(Error::ServerLogin { code, message }),
                        (None, Some(row)) => Ok(row),
                        (None, None) => Err(Error::ServerProtocol(format!("no row from {sql}"))),
                    };
                }
                _ => {}
            }
        }
    }

    /// Whether the idle connection is still usable right now, without waiting: a server
    /// that closed, or sent anything while nobody asked, is not.
    pub fn is_usable_now(&mut self) -> bool {
        if self.broken || !self.flow.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        matches!(
            std::pin::Pin::new(&mut self.stream).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }
}

/// What [`Server::run_quietly`] saw.
#[derive(Debug, Default)]
pub struct QuietOutcome {
    pub status: u8,
    pub error: Option<(String, String)>,
    pub reported: Vec<(String, String)>,
}

/// Most PBKDF2 iterations pgmux computes for a server's SCRAM challenge. PostgreSQL uses
/// 4096 unless `scram_iterations` says otherwise; a server asking for millions would
/// cost pgmux seconds of CPU per login.
const MAX_SCRAM_ITERATIONS: u32 = 100_000;

/// Longest server nonce accepted in a SCRAM challenge; PostgreSQL's are 42 characters
/// with the client's part.
const MAX_SCRAM_NONCE: usize = 1024;

/// Refuses a SCRAM server-first-message (`r=nonce,s=salt,i=iterations`) whose nonce is
/// oversized or whose iteration count is beyond [`MAX_SCRAM_ITERATIONS`], before any work
/// is done for it.
fn check_server_first(data: &[u8]) -> std::result::Result<(), String> {
    let text = std::str::from_utf8(data).map_err(|_| "SCRAM challenge is not UTF-8")?;
    for attribute in text.split(',') {
        if let Some(nonce) = attribute.strip_prefix("r=") {
            if nonce.len() > MAX_SCRAM_NONCE {
                return Err(format!("SCRAM nonce of {} bytes is too long", nonce.len()));
            }
        } else if let Some(count) = attribute.strip_prefix("i=") {
            let count: u64 = count
                .parse()
                .map_err(|_| format!("SCRAM iteration count {count:?} is not a number"))?;
            if count > u64::from(MAX_SCRAM_ITERATIONS) {
                return Err(format!(
                    "server asks for {count} SCRAM iterations; pgmux computes at most {MAX_SCRAM_ITERATIONS}"
                ));
            }
        }
    }
    Ok(())
}

/// SQLSTATE and message of a server ErrorResponse.
fn error_fields(body: &postgres_protocol::message::backend::ErrorResponseBody) -> (String, String) {
    let mut code = String::from("08006");
    let mut message = String::from("server error");
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        match field.type_() {
            b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            _ => {}
        }
    }
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scram_challenges_are_bounded() {
        assert!(check_server_first(b"r=abc,s=c2FsdA==,i=4096").is_ok());
        assert!(check_server_first(b"r=abc,s=c2FsdA==,i=100000").is_ok());
        let err = check_server_first(b"r=abc,s=c2FsdA==,i=2147483647").unwrap_err();
        assert!(err.contains("2147483647"), "{err}");
        assert!(check_server_first(b"r=abc,s=c2FsdA==,i=-1").is_err());
        let long = format!("r={},s=c2FsdA==,i=4096", "n".repeat(2000));
        assert!(check_server_first(long.as_bytes()).is_err());
    }
}
