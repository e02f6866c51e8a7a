//! One client connection, from TCP accept to goodbye.
//!
//! The phases follow the protocol: negotiation (SSLRequest, GSSENCRequest, CancelRequest
//! or StartupMessage), authentication, the greeting (ParameterStatus, BackendKeyData,
//! ReadyForQuery), then the session: wait for a request, attach a server, relay until a
//! transaction boundary, release the server, and wait again.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info_span, warn, Instrument};

use crate::tls::{self, ClientStream, ClientTlsMode};

use crate::cancel::SlotGuard;
use crate::config::PoolMode;
use crate::error::{Error, Result};
use crate::params::{self, ParamSet, ParamValue};
use crate::pool::Pool;
use crate::prepared::{ClientStatements, Local};
use crate::protocol::backend;
use crate::protocol::startup::{self, StartupMessage, StartupPacket};
use crate::protocol::tag;
use crate::relay::{self, ClientEnd, End, Flow, Limits, Tracker};
use crate::server::Server;
use crate::App;

/// Memory an idle client keeps for its read buffer; more is given back after a burst.
const IDLE_BUFFER: usize = 4 * 1024;

/// Entry point for an accepted connection.
pub async fn handle(app: Arc<App>, stream: TcpStream, addr: SocketAddr) {
    let span = info_span!("client", client.addr = %addr);
    async move {
        match serve(&app, stream).await {
            Ok(()) => debug!("client disconnected"),
            Err(Error::ClientIo(e)) => debug!(error = %e, "client connection lost"),
            Err(e) => {
                crate::metrics::error(e.kind());
                match &e {
                    Error::Auth { .. }
                    | Error::ClientProtocol(_)
                    | Error::UnknownDatabase(_)
                    | Error::Shutdown => {
                        debug!(error = %e, "client refused")
                    }
                    _ => warn!(error = %e, "client session ended with an error"),
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Runs the whole connection. Errors that the client should hear about have already been
/// sent to it when this returns.
async fn serve(app: &Arc<App>, tcp: TcpStream) -> Result<()> {
    let _ = tcp.set_nodelay(true);
    let mut stream = ClientStream::Plain(tcp);
    let login_timeout = app.config.pgmux.client_login_timeout;
    let login = tokio::time::timeout(login_timeout, login(app, &mut stream)).await;
    let mut client = match login {
        Ok(Ok(Some(session))) => Client {
            statements: prepared_statements(&session.pool, session.mode),
            stream,
            flow: Flow::default(),
            pool: session.pool,
            mode: session.mode,
            params: session.params,
            reported: session.reported,
            tracker: Tracker::default(),
            cancel: session.cancel,
            _admission: session.admission,
        },
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => {
            tell(&mut stream, &e).await;
            return Err(e);
        }
        Err(_) => {
            let e = Error::ClientProtocol(format!(
                "client_login_timeout ({}) expired",
                humantime::format_duration(login_timeout)
            ));
            tell(&mut stream, &e).await;
            return Err(e);
        }
    };
    let result = client.run(app).await;
    if let Err(e) = &result {
        tell(&mut client.stream, e).await;
    }
    client.pool.client_disconnected();
    result
}

/// The prepared-statement bookkeeping a client of `pool` needs: none in session mode,
/// where the client keeps its server and its statements with it, or when
/// max_prepared_statements is 0.
fn prepared_statements(pool: &Arc<Pool>, mode: PoolMode) -> Option<ClientStatements> {
    let settings = pool.settings();
    let server_cap = std::num::NonZeroUsize::new(settings.max_prepared_statements)?;
    (mode == PoolMode::Transaction).then(|| {
        ClientStatements::new(
            Arc::clone(&pool.statements),
            settings.max_client_prepared_statements,
            server_cap,
        )
    })
}

/// Sends the client the ErrorResponse for `e`, if it has one; failures are moot.
async fn tell(stream: &mut ClientStream, e: &Error) {
    let mut buf = BytesMut::new();
    e.write_response(&mut buf);
    if !buf.is_empty() {
        // A client that does not read must not keep the task alive.
        let _ = tokio::time::timeout(TELL_TIMEOUT, async {
            let _ = send(stream, &buf).await;
            // A TLS client reads the error before close_notify, not a reset.
            let _ = stream.shutdown().await;
        })
        .await;
    }
}

/// How long a last error message may take to go out.
const TELL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes `buf` and flushes: a TLS stream may keep bytes until it is flushed.
async fn send(stream: &mut ClientStream, buf: &[u8]) -> Result<()> {
    stream.write_all(buf).await.map_err(Error::ClientIo)?;
    stream.flush().await.map_err(Error::ClientIo)
}

/// A logged-in client.
struct Client {
    stream: ClientStream,
    flow: Flow,
    pool: Arc<Pool>,
    mode: PoolMode,
    params: Arc<ParamSet>,
    reported: Vec<(String, String)>,
    tracker: Tracker,
    /// Protocol-level prepared statements, kept by pgmux in transaction mode.
    statements: Option<ClientStatements>,
    cancel: SlotGuard,
    /// Keeps the max_client_conn count until the client is gone.
    _admission: crate::Admission,
}

/// What login establishes for the session.
struct Session {
    pool: Arc<Pool>,
    mode: PoolMode,
    params: Arc<ParamSet>,
    reported: Vec<(String, String)>,
    cancel: SlotGuard,
    admission: crate::Admission,
}

/// Negotiation and authentication. Returns `None` for a connection that only came to
/// cancel a query.
async fn login(app: &Arc<App>, stream: &mut ClientStream) -> Result<Option<Session>> {
    let Some(startup) = negotiate(app, stream).await? else {
        return Ok(None);
    };
    let admission = app.admit().ok_or(Error::TooManyClients)?;

    let mut out = BytesMut::new();
    if startup.minor_version != 0 || !startup.protocol_options.is_empty() {
        backend::negotiate_protocol_version(&mut out, 0, &startup.protocol_options);
        send(stream, &out).await?;
        out.clear();
    }
    if startup
        .get("replication")
        .is_some_and(|v| v != "false" && v != "0" && v != "off")
    {
        return Err(Error::Unsupported(
            "replication connections are not supported by pgmux".into(),
        ));
    }
    let user = startup
        .get("user")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| Error::ClientProtocol("no PostgreSQL user name specified".into()))?
        .to_string();
    let database = startup.get("database").unwrap_or(&user).to_string();
    let params = startup_params(&startup)?;

    let creds = app.users.get(&user);
    let transport = crate::auth::Transport {
        end_point: match (&app.tls, stream.is_tls()) {
            (Some(tls), true) => Some(Arc::clone(&tls.end_point)),
            _ => None,
        },
        peer_cert: stream.peer_certificate(),
    };
    let auth_type = app.config.pgmux.auth_type;
    crate::auth::authenticate(stream, auth_type, &user, creds, &transport).await?;

    let pool = app.pool(&database, &user)?;
    let reported = pool.reported_params().await?;
    let reported = greeting_params(&reported, &startup);

    let cancel = app.cancels.register();
    backend::authentication_ok(&mut out);
    for (name, value) in &reported {
        backend::parameter_status(&mut out, name, value);
    }
    backend::backend_key_data(&mut out, cancel.slot.process_id, cancel.slot.secret_key);
    backend::ready_for_query(&mut out, b'I');
    send(stream, &out).await?;
    debug!(user = %user, database = %database, tls = stream.is_tls(), "client logged in");

    pool.client_connected();
    let mode = pool.settings().mode;
    Ok(Some(Session {
        pool,
        mode,
        params: Arc::new(params),
        reported,
        cancel,
        admission,
    }))
}

/// Reads packets until a StartupMessage (or a CancelRequest, handled here). Runs the
/// TLS handshake on the way when the client asks for it.
async fn negotiate(app: &Arc<App>, stream: &mut ClientStream) -> Result<Option<StartupMessage>> {
    // A PostgreSQL 17 client with sslnegotiation=direct opens with a TLS ClientHello
    // instead of a packet length (whose first byte is 0 for any valid startup packet).
    if let ClientStream::Plain(tcp) = stream {
        let mut first = [0u8; 1];
        let n = tcp.peek(&mut first).await.map_err(Error::ClientIo)?;
        if n == 1 && first[0] == tls::TLS_HANDSHAKE_BYTE {
            let Some(acceptor) = &app.tls else {
                // Nothing can be said in plaintext to a TLS client: just close.
                return Err(Error::ClientIo(std::io::Error::other(
                    "direct TLS connection refused: client_tls_mode = \"disable\"",
                )));
            };
            upgrade(stream, acceptor, true).await?;
        }
    }
    // SSLRequest then GSSENCRequest is the most a real client sends before its startup.
    for _ in 0..3 {
        let packet = match startup::read(stream).await.map_err(Error::ClientIo)? {
            Ok(packet) => packet,
            Err(e @ startup::StartupError::UnsupportedVersion { .. }) => {
                return Err(Error::Unsupported(e.to_string()))
            }
            Err(e) => return Err(Error::ClientProtocol(e.to_string())),
        };
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                let ClientStream::Plain(tcp) = &*stream else {
                    return Err(Error::ClientProtocol(
                        "encryption requested on an encrypted connection".into(),
                    ));
                };
                // The client must wait for the answer: bytes already here were sent in
                // plaintext before any handshake and may have been injected
                // (CVE-2021-23214). The startup packet was read unbuffered, byte-exact,
                // so anything extra is still in the socket.
                if let Err(e) = tls::ensure_nothing_buffered(tcp) {
                    return Err(match e.kind() {
                        std::io::ErrorKind::InvalidData => Error::ClientProtocol(e.to_string()),
                        _ => Error::ClientIo(e),
                    });
                }
                match (&packet, &app.tls) {
                    (StartupPacket::SslRequest, Some(acceptor)) => {
                        send(stream, b"S").await?;
                        upgrade(stream, acceptor, false).await?;
                    }
                    _ => send(stream, b"N").await?,
                }
            }
            StartupPacket::Cancel {
                process_id,
                secret_key,
            } => {
                app.cancels.cancel(process_id, secret_key).await;
                return Ok(None);
            }
            StartupPacket::Startup(message) => {
                let require = app.tls.as_ref().map(|t| t.mode) == Some(ClientTlsMode::Require);
                if require && !stream.is_tls() {
                    let user = message.get("user").unwrap_or_default();
                    let database = message.get("database").unwrap_or(user);
                    return Err(Error::TlsRequired(format!(
                        "connection without TLS refused for user \"{user}\", database \
                         \"{database}\": pgmux has client_tls_mode = \"require\""
                    )));
                }
                return Ok(Some(message));
            }
        }
    }
    Err(Error::ClientProtocol(
        "too many negotiation requests".into(),
    ))
}

/// Runs the TLS handshake; a failed one is logged and ends the connection.
async fn upgrade(stream: &mut ClientStream, acceptor: &tls::Acceptor, direct: bool) -> Result<()> {
    stream.upgrade(acceptor, direct).await.map_err(|e| {
        debug!(error = %e, direct, "client TLS handshake failed");
        match e.kind() {
            // Direct TLS without ALPN: the handshake is done, the client can be told.
            std::io::ErrorKind::InvalidData if stream.is_tls() => {
                Error::ClientProtocol(e.to_string())
            }
            _ => Error::ClientIo(e),
        }
    })
}

/// The session parameters a startup packet asks for, `options` included.
fn startup_params(startup: &StartupMessage) -> Result<ParamSet> {
    let mut set = ParamSet::default();
    for (name, value) in &startup.params {
        match name.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                for (name, value) in parse_options(value)? {
                    add_param(&mut set, &name, &value)?;
                }
            }
            _ => add_param(&mut set, name, value)?,
        }
    }
    Ok(set)
}

fn add_param(set: &mut ParamSet, name: &str, value: &str) -> Result<()> {
    if !params::valid_name(name) {
        return Err(Error::ClientProtocol(format!(
            "invalid configuration parameter name \"{name}\""
        )));
    }
    set.set(name, ParamValue::Value(value.to_string()));
    Ok(())
}

/// Parses the `options` startup parameter: `-c name=value` and `--name=value` switches,
/// separated by spaces, with `\` escaping the next character.
fn parse_options(options: &str) -> Result<Vec<(String, String)>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            words.next()
        } else if let Some(rest) = word.strip_prefix("-c") {
            Some(rest.to_string())
        } else {
            word.strip_prefix("--").map(str::to_string)
        };
        let setting = setting.ok_or_else(|| {
            Error::ClientProtocol(format!("unsupported option \"{word}\" in options"))
        })?;
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| Error::ClientProtocol(format!("option \"{setting}\" has no value")))?;
        out.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(out)
}

/// ParameterStatus for the greeting: the server's values, with the client's own startup
/// choices in their place (the first server attached reports them normalised).
fn greeting_params(server: &[(String, String)], startup: &StartupMessage) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = server.to_vec();
    for (name, value) in &startup.params {
        if let Some(entry) = out.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            entry.1 = value.clone();
        } else if name == "application_name" {
            out.push((name.clone(), value.clone()));
        }
    }
    out
}

impl Client {
    fn limits<'a>(&self, app: &'a App, pool: &'a Pool) -> Limits<'a> {
        let g = &app.config.pgmux;
        Limits {
            max_message_size: g.max_message_size,
            stop_at_boundary: self.mode == PoolMode::Transaction,
            idle_transaction_timeout: g.idle_transaction_timeout,
            query_timeout: g.query_timeout,
            metrics: &pool.metrics,
        }
    }

    /// The session loop.
    async fn run(&mut self, app: &Arc<App>) -> Result<()> {
        loop {
            if !self.wait_for_request(app).await? {
                return Ok(());
            }
            let mut server = self.attach().await?;
            let pool = Arc::clone(&self.pool);
            let limits = self.limits(app, &pool);
            let end = relay::run(
                ClientEnd {
                    stream: &mut self.stream,
                    flow: &mut self.flow,
                    params: &mut self.params,
                    reported: &mut self.reported,
                    prepared: self.statements.as_mut(),
                },
                &mut server,
                &mut self.tracker,
                &limits,
                &mut CancelOnTimeout,
            )
            .await;
            match end {
                Ok(End::Boundary) => self.detach(server).await,
                Ok(End::Terminate) | Ok(End::ClientClosed) => {
                    self.detach(server).await;
                    return Ok(());
                }
                Err(e) => {
                    self.detach(server).await;
                    return Err(e);
                }
            }
            self.flow.shrink_if_idle(IDLE_BUFFER);
        }
    }

    /// Waits, holding no server, until the client sends something that needs one.
    /// Returns `false` when the client leaves. Requests that need no server (a lone
    /// Sync or Flush between transactions) are answered here.
    async fn wait_for_request(&mut self, app: &Arc<App>) -> Result<bool> {
        loop {
            check_header(self.flow.pending(), app.config.pgmux.max_message_size)?;
            if let Some(pending) = self.flow.pending().get(..5) {
                let tag = pending[0];
                let len = i32::from_be_bytes([pending[1], pending[2], pending[3], pending[4]]);
                let handled = match (tag, len) {
                    (tag::TERMINATE, _) => return Ok(false),
                    (tag::SYNC, 4) => {
                        self.flow.buf.advance(5);
                        let mut out = BytesMut::new();
                        backend::ready_for_query(&mut out, b'I');
                        self.stream.write_all(&out).await.map_err(Error::ClientIo)?;
                        true
                    }
                    (tag::FLUSH, 4) => {
                        self.flow.buf.advance(5);
                        true
                    }
                    (tag::PARSE | tag::CLOSE | tag::QUERY, _) if self.statements.is_some() => {
                        let statements = self.statements.as_mut().expect("checked");
                        let mut reply = BytesMut::new();
                        match statements.answer_locally(self.flow.pending(), &mut reply) {
                            Local::Answered(n) => {
                                self.flow.buf.advance(n);
                                self.stream
                                    .write_all(&reply)
                                    .await
                                    .map_err(Error::ClientIo)?;
                                true
                            }
                            Local::NeedsServer => return Ok(true),
                            // Read the rest of the request before deciding.
                            Local::Incomplete => false,
                        }
                    }
                    _ if is_request(tag) => return Ok(true),
                    _ => {
                        return Err(Error::ClientProtocol(format!(
                            "unexpected message type {:?}",
                            tag as char
                        )))
                    }
                };
                if handled {
                    continue;
                }
            }
            if self.flow.buf.capacity() - self.flow.buf.len() < 512 {
                self.flow.buf.reserve(IDLE_BUFFER);
            }
            // Whatever was written since the last read (the relay's last reply, answers
            // given here) may still sit in a TLS buffer, and the client waits for it.
            self.stream.flush().await.map_err(Error::ClientIo)?;
            let read = tokio::select! {
                read = self.stream.read_buf(&mut self.flow.buf) => read,
                _ = app.shutdown.cancelled() => return Err(Error::Shutdown),
            };
            match read {
                Ok(0) => return Ok(false),
                Ok(n) => self.pool.metrics.bytes_received.increment(n as u64),
                Err(e) => return Err(Error::ClientIo(e)),
            }
        }
    }

    /// Takes a server for the client and brings its session parameters in line.
    async fn attach(&mut self) -> Result<Server> {
        let mut server = self.pool.checkout().await?;
        if let Err(e) = self.sync_params(&mut server).await {
            let clean = !server.broken && matches!(e, Error::ServerLogin { .. });
            self.pool.release(server, clean);
            return Err(e);
        }
        self.cancel.slot.set_target(Some(server.cancel_key.clone()));
        Ok(server)
    }

    async fn sync_params(&mut self, server: &mut Server) -> Result<()> {
        let Some(sql) = params::sync_query(&self.params, &server.params) else {
            return Ok(());
        };
        let outcome = server
            .run_quietly(&sql)
            .await
            .inspect_err(|_| server.broken = true)?;
        if outcome.status != b'I' {
            server.broken = true;
        }
        if let Some((code, message)) = outcome.error {
            return Err(Error::ServerLogin {
                code,
                message: format!("could not apply session parameters: {message}"),
            });
        }
        let mut out = BytesMut::new();
        for (name, value) in &outcome.reported {
            let known = self.reported.iter().any(|(n, v)| n == name && v == value);
            if !known {
                backend::parameter_status(&mut out, name, value);
                relay::remember_reported(&mut self.reported, name, value);
            }
            if params::valid_name(name) && !params::is_read_only(name) {
                Arc::make_mut(&mut self.params).set(name, ParamValue::Value(value.clone()));
            }
        }
        if !out.is_empty() {
            self.stream.write_all(&out).await.map_err(Error::ClientIo)?;
        }
        server.params = Arc::clone(&self.params);
        Ok(())
    }

    /// Gives the server back: clean if the client left it at a boundary, rolled back if
    /// it left mid-transaction but quiet, closed otherwise.
    async fn detach(&mut self, mut server: Server) {
        self.cancel.slot.set_target(None);
        server.params = Arc::clone(&self.params);
        if let Some(statements) = self.statements.as_mut() {
            if !statements.settled() {
                // The client left mid-request: what the server holds is no longer known.
                statements.forget_server(&mut server.prepared);
            }
            statements.reset_request();
        }
        let clean = self.make_clean(&mut server).await;
        self.pool.release(server, clean);
        self.tracker = Tracker::default();
    }

    async fn make_clean(&mut self, server: &mut Server) -> bool {
        if !self.tracker.quiet()
            && !relay::settle(server, &mut self.flow, &mut self.tracker, CLEANUP_TIMEOUT).await
        {
            return false;
        }
        if server.broken || !server.flow.is_empty() {
            return false;
        }
        let reset = match (self.mode, self.tracker.status()) {
            (PoolMode::Transaction, b'I') => return true,
            (PoolMode::Transaction, _) => "ROLLBACK",
            (PoolMode::Session, b'I') => "DISCARD ALL",
            (PoolMode::Session, _) => "ROLLBACK; DISCARD ALL",
        };
        let mut ok = true;
        for statement in reset.split("; ") {
            let run = tokio::time::timeout(CLEANUP_TIMEOUT, server.run_quietly(statement)).await;
            ok &= matches!(run, Ok(Ok(ref o)) if o.error.is_none() && o.status == b'I');
        }
        if ok && self.mode == PoolMode::Session {
            server.params = Arc::new(ParamSet::default());
        }
        ok
    }
}

/// Refuses a message whose length field is impossible or over `max_message_size`,
/// before a server is taken for it (the relay checks again as it frames).
fn check_header(pending: &[u8], max: usize) -> Result<()> {
    match crate::protocol::header(pending) {
        Some(Err(len)) => Err(Error::ClientProtocol(format!(
            "invalid message length {len}"
        ))),
        Some(Ok((_, len))) if len > max => Err(Error::ClientProtocol(format!(
            "message of {len} bytes exceeds max_message_size ({max})"
        ))),
        _ => Ok(()),
    }
}

/// How long pgmux waits for a ROLLBACK or DISCARD ALL before closing the server instead.
const CLEANUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Message types that start or continue a request to the server. Copy messages
/// arriving outside a COPY are among them: PostgreSQL ignores those (a client whose
/// COPY failed early may still send CopyFail and Sync), so a server is left to do so.
fn is_request(tag: u8) -> bool {
    matches!(
        tag,
        tag::COPY_DATA
            | tag::COPY_DONE
            | tag::COPY_FAIL
            | tag::QUERY
            | tag::PARSE
            | tag::BIND
            | tag::DESCRIBE
            | tag::EXECUTE
            | tag::CLOSE
            | tag::FLUSH
            | tag::SYNC
            | tag::FUNCTION_CALL
    )
}

struct CancelOnTimeout;

impl relay::Hooks for CancelOnTimeout {
    fn query_timed_out(&mut self, server: &Server) {
        let key = server.cancel_key.clone();
        tokio::spawn(async move { crate::cancel::send(&key).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_like_postgres() {
        let parsed =
            parse_options("-c search_path=a,b  --statement-timeout=5s -cwork_mem=4MB").unwrap();
        assert_eq!(
            parsed,
            vec![
                ("search_path".to_string(), "a,b".to_string()),
                ("statement_timeout".to_string(), "5s".to_string()),
                ("work_mem".to_string(), "4MB".to_string()),
            ]
        );
        let escaped = parse_options(r"-c application_name=my\ app").unwrap();
        assert_eq!(escaped[0].1, "my app");
        assert!(parse_options("-x").is_err());
        assert!(parse_options("-c nothing").is_err());
    }

    #[test]
    fn greeting_uses_client_values() {
        let server = vec![
            ("TimeZone".to_string(), "UTC".to_string()),
            ("server_version".to_string(), "15.1".to_string()),
        ];
        let startup = StartupMessage {
            params: vec![
                ("timezone".into(), "Europe/Paris".into()),
                ("application_name".into(), "x".into()),
            ],
            ..Default::default()
        };
        let g = greeting_params(&server, &startup);
        assert!(g.contains(&("TimeZone".to_string(), "Europe/Paris".to_string())));
        assert!(g.contains(&("application_name".to_string(), "x".to_string())));
        assert!(g.contains(&("server_version".to_string(), "15.1".to_string())));
    }
}
