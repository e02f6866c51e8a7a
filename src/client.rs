//! One client connection, from TCP accept to goodbye.
//!
//! The phases follow the protocol: negotiation (SSLRequest, GSSENCRequest, CancelRequest
//! or StartupMessage), authentication, the greeting (ParameterStatus, BackendKeyData,
//! ReadyForQuery), then the session: wait for a request, attach a server, relay until a
//! transaction boundary, release the server, and wait again.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, field, info_span, warn, Instrument};

use crate::tls::{self, ClientStream, ClientTlsMode};

use crate::cancel::SlotGuard;
use crate::config::PoolMode;
use crate::error::{Error, Result};
use crate::interrupt;
use crate::params::{self, ParamSet, ParamValue};
use crate::pool::{Handover, Pool, Pooled};
use crate::prepared::{ClientStatements, Local};
use crate::protocol::backend;
use crate::protocol::startup::{self, StartupMessage, StartupPacket};
use crate::protocol::tag;
use crate::relay::{self, ClientEnd, End, Flow, Limits, Tracker};
use crate::routing::classify::{self, Opening};
use crate::routing::request::{self, BeginScan};
use crate::server::Server;
use crate::sql;
use crate::{App, ClientState, Pools};

/// Entry point for an accepted connection: the future its task runs.
///
/// Not an `async fn`: one would hold the session future and, moved into it, the same
/// future wrapped in its span, side by side, and every client's task would carry the
/// session's space twice. Returning the wrapped future makes it the task's whole state.
pub fn handle(
    app: Arc<App>,
    stream: TcpStream,
    addr: SocketAddr,
) -> impl std::future::Future<Output = ()> {
    // db and user are filled in once the startup packet names them.
    let span = info_span!("client", client.addr = %addr, db = field::Empty, user = field::Empty);
    async move {
        match serve(&app, stream, addr).await {
            Ok(()) => debug!("client disconnected"),
            Err(Error::ClientIo(e)) => debug!(error = %e, "client connection lost"),
            Err(e) => {
                crate::metrics::error(e.kind());
                match &e {
                    Error::Auth { .. }
                    | Error::ClientProtocol(_)
                    | Error::UnknownDatabase(_)
                    | Error::ConsoleDenied(_)
                    | Error::Killed
                    | Error::Shutdown => {
                        debug!(error = %e, "client refused")
                    }
                    _ => warn!(error = %e, "client session ended with an error"),
                }
            }
        }
    }
    .instrument(span)
}

/// Runs the whole connection. Errors that the client should hear about have already been
/// sent to it when this returns.
async fn serve(app: &Arc<App>, tcp: TcpStream, addr: SocketAddr) -> Result<()> {
    // Boxed, here and on the other slow paths below: a client task is as large as its
    // largest state, and an idle client should not carry the space that login, a
    // console session, a server connect or a cleanup needs. What stays is the `Client`
    // and the state of its wait for the next request.
    let Some(mut client) = Box::pin(open_session(app, tcp, addr)).await? else {
        return Ok(());
    };
    let result = client.run(app).await;
    if let Err(e) = &result {
        Box::pin(tell(&mut client.stream, e)).await;
    }
    client.pool.client_disconnected();
    result
}

/// Logs the client in. Returns the pooled client, ready for its first request, or
/// `None` when the connection ended during login or was a console session (served here
/// to its end).
async fn open_session(app: &Arc<App>, tcp: TcpStream, addr: SocketAddr) -> Result<Option<Client>> {
    let _ = tcp.set_nodelay(true);
    let mut stream = ClientStream::Plain(tcp);
    let login_timeout = app.config().pgmux.client_login_timeout;
    let login = tokio::time::timeout(login_timeout, login(app, &mut stream, addr)).await;
    match login {
        Ok(Ok(Some(Login::Console(console)))) => {
            let result =
                crate::admin::serve(app, &mut stream, console.role, &console.registration.info)
                    .await;
            if let Err(e) = &result {
                tell(&mut stream, e).await;
            }
            result.map(|()| None)
        }
        Ok(Ok(Some(Login::Pooled(session)))) => Ok(Some(Client {
            registration: session.registration,
            statements: prepared_statements(&session.pools.primary, session.mode),
            stream,
            flow: Flow::default(),
            pool: Arc::clone(&session.pools.primary),
            route: Route {
                alias: session.alias,
                ..Route::default()
            },
            pools: session.pools,
            mode: session.mode,
            params: session.params,
            reported: session.reported,
            tracker: Tracker::default(),
            cancel: session.cancel,
            handover: Handover::default(),
            _admission: session.admission,
        })),
        Ok(Ok(None)) => Ok(None),
        Ok(Err(e)) => {
            tell(&mut stream, &e).await;
            Err(e)
        }
        Err(_) => {
            let e = Error::ClientProtocol(format!(
                "client_login_timeout ({}) expired",
                humantime::format_duration(login_timeout)
            ));
            tell(&mut stream, &e).await;
            Err(e)
        }
    }
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
    /// Its entry in SHOW CLIENTS, with the token KILL cancels.
    registration: crate::Registration,
    stream: ClientStream,
    flow: Flow,
    pool: Arc<Pool>,
    mode: PoolMode,
    params: Arc<ParamSet>,
    reported: Arc<Vec<(String, String)>>,
    tracker: Tracker,
    /// Protocol-level prepared statements, kept by pgmux in transaction mode.
    statements: Option<ClientStatements>,
    /// The primary pool and, where the database has replicas, theirs.
    pools: Arc<Pools>,
    route: Route,
    cancel: SlotGuard,
    /// Where a pool leaves the server this client waits for.
    handover: Handover,
    /// Keeps the max_client_conn count until the client is gone.
    _admission: crate::Admission,
}

/// What read routing remembers about a client between transactions.
#[derive(Debug, Default)]
struct Route {
    /// The client connected through a `read_only_alias`: a read-only session.
    alias: bool,
    /// When the client's last transaction on the primary ended, and once known, the
    /// primary position that covers it: its reads need a replica that has replayed it.
    last_write: Option<(std::time::Instant, Option<u64>)>,
    /// A `BEGIN` pgmux answered itself; it is sent to whichever server the next
    /// statement chooses, with that statement.
    deferred_begin: Option<DeferredBegin>,
    /// The request in the buffer was refused by a replica and goes to the primary.
    force_primary: bool,
}

/// A `BEGIN` the client was told succeeded, which no server has run yet. In transaction
/// mode pgmux answers a lone `BEGIN` itself and holds no server until the statement
/// after it: the server is spared the round trip, and a client that thinks between the
/// two holds none. The block's `now()` is then the time of that statement.
#[derive(Debug)]
enum DeferredBegin {
    /// A plain `BEGIN` (see [`sql::plain_begin`]), which no idle server refuses: it goes
    /// out in the same write as the request after it. `unnamed`: the client sent it
    /// through the unnamed statement, which then holds it.
    Plain { unnamed: bool },
    /// A `BEGIN` with modes, held only where the statement after it chooses between
    /// the primary and a replica: run on its own first, since a standby refuses some
    /// modes (SERIALIZABLE).
    Modes(String),
}

/// Where one transaction (or, in session mode, the session) runs.
struct Choice {
    pool: Arc<Pool>,
    /// Judged read-only: it cannot have written, wherever it runs.
    read_only: bool,
    /// An autocommit SELECT on a replica: run again on the primary if the replica
    /// refuses it as a write before answering.
    retry: bool,
}

/// What the statement opening a transaction says about it.
struct Access {
    /// It cannot write, wherever it runs.
    read_only: bool,
    /// A replica can run it.
    on_replica: bool,
    /// It is an autocommit SELECT that pgmux judged read-only by itself.
    retry: bool,
}

/// Largest Query or Parse held back whole so its statement can be classified.
const CLASSIFY_MAX: usize = 64 * 1024;

/// What a login leads to.
enum Login {
    Pooled(Session),
    Console(Console),
}

/// A session of the admin console.
struct Console {
    role: crate::admin::Role,
    registration: crate::Registration,
    _cancel: SlotGuard,
    _admission: crate::Admission,
}

/// What login establishes for the session.
struct Session {
    registration: crate::Registration,
    pools: Arc<Pools>,
    alias: bool,
    mode: PoolMode,
    params: Arc<ParamSet>,
    reported: Arc<Vec<(String, String)>>,
    cancel: SlotGuard,
    admission: crate::Admission,
}

/// What the authentication exchange may bind to: the TLS channel (for
/// SCRAM-SHA-256-PLUS) and the client's certificate.
/// `acceptor` is the one that ran this connection's handshake: a reload may have loaded
/// other certificates since.
fn transport(acceptor: Option<&tls::Acceptor>, stream: &ClientStream) -> crate::auth::Transport {
    crate::auth::Transport {
        end_point: match (acceptor, stream.is_tls()) {
            (Some(tls), true) => Some(Arc::clone(&tls.end_point)),
            _ => None,
        },
        peer_cert: stream.peer_certificate(),
    }
}

/// Authenticates the client as `user` the way the configuration says.
async fn authenticate(
    stream: &mut ClientStream,
    shared: &crate::Shared,
    user: &str,
    acceptor: Option<&tls::Acceptor>,
) -> Result<()> {
    let transport = transport(acceptor, stream);
    let creds = shared.credentials(user);
    crate::auth::authenticate(
        stream,
        shared.config.pgmux.auth_type,
        user,
        creds,
        &transport,
    )
    .await
}

/// What tells a client it is logged in: AuthenticationOk, the `reported` parameter
/// values, its cancel key and ReadyForQuery.
fn write_welcome<'a>(
    out: &mut BytesMut,
    reported: impl IntoIterator<Item = (&'a str, &'a str)>,
    cancel: &SlotGuard,
) {
    backend::authentication_ok(out);
    for (name, value) in reported {
        backend::parameter_status(out, name, value);
    }
    backend::backend_key_data(out, cancel.slot.process_id, cancel.slot.secret_key);
    backend::ready_for_query(out, b'I');
}

/// Negotiation and authentication. Returns `None` for a connection that only came to
/// cancel a query.
async fn login(
    app: &Arc<App>,
    stream: &mut ClientStream,
    addr: SocketAddr,
) -> Result<Option<Login>> {
    let mut acceptor = None;
    let Some(startup) = negotiate(app, stream, &mut acceptor).await? else {
        return Ok(None);
    };
    // One configuration for the whole login, even if a reload lands meanwhile.
    let shared = app.shared();
    let admission = app
        .admit(shared.config.pgmux.max_client_conn)
        .ok_or(Error::TooManyClients)?;

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
    let requested = startup.get("database").unwrap_or(&user).to_string();
    let span = tracing::Span::current();
    span.record("db", requested.as_str());
    span.record("user", user.as_str());
    let application_name = startup.get("application_name").unwrap_or("").to_string();
    if requested == crate::ADMIN_DATABASE {
        authenticate(stream, &shared, &user, acceptor.as_deref()).await?;
        let g = &shared.config.pgmux;
        let role = if g.admin_users.contains(&user) {
            crate::admin::Role::Admin
        } else if g.stats_users.contains(&user) {
            crate::admin::Role::Stats
        } else {
            return Err(Error::ConsoleDenied(user));
        };
        let cancel = app.cancels.register();
        let greeting = crate::admin::greeting();
        let mut reported: Vec<(&str, &str)> =
            greeting.iter().map(|(n, v)| (*n, v.as_str())).collect();
        if !application_name.is_empty() {
            reported.push(("application_name", &application_name));
        }
        write_welcome(&mut out, reported, &cancel);
        // Listed before the client hears it is logged in, so that the console shows
        // every client that has been told so, in the order they were.
        let registration =
            app.register(addr, crate::ADMIN_DATABASE, &user, &application_name, true);
        send(stream, &out).await?;
        debug!(role = ?role, "console session opened");
        return Ok(Some(Login::Console(Console {
            role,
            registration,
            _cancel: cancel,
            _admission: admission,
        })));
    }
    let (database, alias) = shared.resolve_database(&requested);
    let mut params = startup_params(&startup)?;
    if alias {
        // Clients of the read-only name get the session a standby would give them.
        params.set(
            "default_transaction_read_only",
            ParamValue::Value("on".into()),
        );
    }

    authenticate(stream, &shared, &user, acceptor.as_deref()).await?;

    let pools = app.pool(&shared, &database, &user)?;
    let reported = pools.primary.reported_params().await?;
    let mut reported = Arc::new(greeting_params(&reported, &startup));
    if alias {
        for (name, value) in [
            ("default_transaction_read_only", "on"),
            ("in_hot_standby", "on"),
        ] {
            relay::remember_reported(&mut reported, name, value);
        }
    }

    let cancel = app.cancels.register();
    write_welcome(
        &mut out,
        reported.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        &cancel,
    );
    // Listed before the client hears it is logged in (see the console case above).
    let registration = app.register(addr, &database, &user, &application_name, false);
    send(stream, &out).await?;
    debug!(user = %user, database = %database, tls = stream.is_tls(), "client logged in");

    pools.primary.client_connected();
    let mode = pools.primary.settings().mode;
    let (params, reported) = pools.primary.shared_session(params, reported);
    Ok(Some(Login::Pooled(Session {
        registration,
        pools,
        alias,
        mode,
        params,
        reported,
        cancel,
        admission,
    })))
}

/// Reads packets until a StartupMessage (or a CancelRequest, handled here). Runs the
/// TLS handshake on the way when the client asks for it.
/// `used` gets the TLS acceptor that ran the handshake, if one did.
async fn negotiate(
    app: &Arc<App>,
    stream: &mut ClientStream,
    used: &mut Option<Arc<tls::Acceptor>>,
) -> Result<Option<StartupMessage>> {
    // A PostgreSQL 17 client with sslnegotiation=direct opens with a TLS ClientHello
    // instead of a packet length (whose first byte is 0 for any valid startup packet).
    if let ClientStream::Plain(tcp) = stream {
        let mut first = [0u8; 1];
        let n = tcp.peek(&mut first).await.map_err(Error::ClientIo)?;
        if n == 1 && first[0] == tls::TLS_HANDSHAKE_BYTE {
            let Some(acceptor) = app.tls() else {
                // Nothing can be said in plaintext to a TLS client: just close.
                return Err(Error::ClientIo(std::io::Error::other(
                    "direct TLS connection refused: client_tls_mode = \"disable\"",
                )));
            };
            upgrade(stream, &acceptor, true).await?;
            *used = Some(acceptor);
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
                match (&packet, app.tls()) {
                    (StartupPacket::SslRequest, Some(acceptor)) => {
                        send(stream, b"S").await?;
                        upgrade(stream, &acceptor, false).await?;
                        *used = Some(acceptor);
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
                let require = app.tls().map(|t| t.mode) == Some(ClientTlsMode::Require);
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
    fn limits<'a>(&self, config: &crate::config::Config, pool: &'a Pool) -> Limits<'a> {
        let g = &config.pgmux;
        Limits {
            max_message_size: g.max_message_size,
            stop_at_boundary: self.mode == PoolMode::Transaction,
            idle_transaction_timeout: g.idle_transaction_timeout,
            query_timeout: g.query_timeout,
            metrics: &pool.metrics,
            stats: &pool.stats,
            hold_for_retry: false,
        }
    }

    /// The session loop.
    async fn run(&mut self, app: &Arc<App>) -> Result<()> {
        loop {
            if !self.wait_for_request(app).await? {
                return Ok(());
            }
            // Boxed: a transaction's state (choosing, attaching, relaying, detaching)
            // exists only while it runs, and idle clients stay small.
            if !Box::pin(self.transaction(app)).await? {
                return Ok(());
            }
            self.flow.release_if_empty();
        }
    }

    /// Serves the request waiting in the buffer, up to the end of its transaction (or,
    /// in session mode, of the session). Returns `false` when the client has left.
    async fn transaction(&mut self, app: &Arc<App>) -> Result<bool> {
        // Read once per transaction: a reload's timeouts apply from the next one.
        let config = app.config();
        let choice = self.choose(&config).await?;
        let pool = choice.pool;
        let request = choice.retry.then(|| BytesMut::from(self.flow.pending()));
        let started = std::time::Instant::now();
        self.registration
            .info
            .set_state(ClientState::Waiting, 0, started);
        let mut server = self.attach(&pool, started).await?;
        self.registration
            .info
            .set_state(ClientState::Active, server.id, server.last_used);
        let mut limits = self.limits(&config, &pool);
        limits.hold_for_retry = choice.retry;
        let mut hooks = CancelOnTimeout;
        let relayed = tokio::select! {
            biased;
            _ = self.registration.info.interrupt.raised(interrupt::KILL) => None,
            end = relay::run(
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
                &mut hooks,
            ) => Some(end),
        };
        let ended = self
            .tracker
            .last_ready()
            .unwrap_or_else(std::time::Instant::now);
        self.registration
            .info
            .set_state(ClientState::Idle, 0, ended);
        let Some(end) = relayed else {
            // Killed mid-transaction: the server's state is unknown, so it goes.
            self.cancel.slot.set_target(None);
            pool.release(server, false);
            return Err(Error::Killed);
        };
        if !choice.read_only && self.pools.router.is_some() && self.tracker.wrote() {
            self.route.last_write = Some((std::time::Instant::now(), None));
        }
        match end {
            Ok(End::RetryOnPrimary) => {
                let request = request.expect("only held requests are retried");
                self.give_back_refused(server, &pool, request).await?;
                Ok(true)
            }
            Ok(End::Boundary) => {
                self.detach(server, &pool).await;
                Ok(true)
            }
            Ok(End::Terminate) | Ok(End::ClientClosed) => {
                self.detach(server, &pool).await;
                Ok(false)
            }
            Err(e) => {
                self.detach(server, &pool).await;
                Err(e)
            }
        }
    }

    /// Waits, holding no server, until the client sends something that needs one.
    /// Returns `false` when the client leaves. Requests that need no server (a lone
    /// Sync or Flush between transactions) are answered here.
    async fn wait_for_request(&mut self, app: &Arc<App>) -> Result<bool> {
        // Read once per wait, not per message: a reload applies from the next request.
        let max_message_size = app.config().pgmux.max_message_size;
        loop {
            // Only unframed bytes wait here: the answers below consume from the front.
            debug_assert!(self.flow.ready().is_empty());
            check_header(self.flow.pending(), max_message_size)?;
            if let Some(pending) = self.flow.pending().get(..5) {
                let tag = pending[0];
                let len = i32::from_be_bytes([pending[1], pending[2], pending[3], pending[4]]);
                let routing = self.routes_transactions();
                let whole = usize::try_from(len).is_ok_and(|len| self.flow.pending().len() > len);
                let incomplete = match self.defer_begin(tag, whole) {
                    LoneBegin::Answer(answer) => {
                        self.stream
                            .write_all(answer)
                            .await
                            .map_err(Error::ClientIo)?;
                        continue;
                    }
                    LoneBegin::Incomplete => true,
                    LoneBegin::Not => false,
                };
                let handled = match (tag, len) {
                    (tag::TERMINATE, _) => return Ok(false),
                    // Read the rest of the request before deciding.
                    _ if incomplete => false,
                    (tag::SYNC, 4) => {
                        self.flow.buf.advance(5);
                        let mut out = BytesMut::new();
                        let status = if self.route.deferred_begin.is_some() {
                            b'T'
                        } else {
                            b'I'
                        };
                        backend::ready_for_query(&mut out, status);
                        self.stream.write_all(&out).await.map_err(Error::ClientIo)?;
                        true
                    }
                    // The statement that opens a transaction chooses its server: read
                    // all of it first.
                    (tag::QUERY | tag::PARSE | tag::BIND, _)
                        if routing && !whole && (len as usize) <= CLASSIFY_MAX =>
                    {
                        false
                    }
                    (tag::FLUSH, 4) => {
                        self.flow.buf.advance(5);
                        true
                    }
                    // Also inside a block pgmux opened for the client and holds no
                    // server for yet: pgbench -M prepared prepares each statement of a
                    // transaction with a blocking call, and while one of its clients
                    // waited for a server to prepare on, none of its other clients
                    // would be served, and they hold the servers.
                    (tag::PARSE | tag::CLOSE | tag::QUERY, _) if self.statements.is_some() => {
                        let status = if self.route.deferred_begin.is_some() {
                            b'T'
                        } else {
                            b'I'
                        };
                        let statements = self.statements.as_mut().expect("checked");
                        let mut reply = BytesMut::new();
                        match statements.answer_locally(self.flow.pending(), status, &mut reply) {
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
            // Whatever was written since the last read (the relay's last reply, answers
            // given here) may still sit in a TLS buffer, and the client waits for it.
            self.stream.flush().await.map_err(Error::ClientIo)?;
            let read = match self.route.deferred_begin {
                None => self.read_between_transactions().await,
                // Boxed, as rare waits are: its timer would make every idle client's
                // state larger.
                Some(_) => Box::pin(self.read_in_deferred_block(app)).await,
            };
            match read? {
                0 => return Ok(false),
                n => {
                    self.pool
                        .stats
                        .received
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    /// Reads the client's next request between transactions, unless KILL or a
    /// shutdown comes first.
    async fn read_between_transactions(&mut self) -> Result<usize> {
        tokio::select! {
            // First: a client that always has its next request ready still hears about
            // a shutdown between transactions.
            biased;
            raised = self.registration.info.interrupt.raised(interrupt::KILL | interrupt::SHUTDOWN) => {
                Err(if raised & interrupt::KILL != 0 {
                    Error::Killed
                } else {
                    Error::Shutdown
                })
            }
            read = self.stream.read_idle(&mut self.flow.buf) => read.map_err(Error::ClientIo),
        }
    }

    /// Reads the next request of a client inside a block pgmux opened for it (a
    /// deferred BEGIN). The client is in a transaction: shutdown lets it finish, as it
    /// lets one on a server, and idle_transaction_timeout applies as on a server.
    async fn read_in_deferred_block(&mut self, app: &Arc<App>) -> Result<usize> {
        let limit = app.config().pgmux.idle_transaction_timeout;
        let idle = async {
            if limit.is_zero() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(limit).await;
        };
        tokio::select! {
            biased;
            _ = self.registration.info.interrupt.raised(interrupt::KILL) => Err(Error::Killed),
            () = idle => Err(Error::IdleTransactionTimeout(limit)),
            read = self.stream.read_idle(&mut self.flow.buf) => read.map_err(Error::ClientIo),
        }
    }

    /// Whether this client's transactions are routed one by one between the primary and
    /// replicas.
    fn routes_transactions(&self) -> bool {
        self.pools.router.is_some() && self.mode == PoolMode::Transaction
    }

    /// Takes a lone `BEGIN` waiting in the buffer, which starts with `tag`, as a block
    /// pgmux opens for the client itself (see [`DeferredBegin`]), and says what to
    /// answer. Plain ones, by simple Query or in the shapes of the extended protocol
    /// that [`request::extended_begin`] knows; where transactions are routed, also one
    /// with modes, so that the statement after it can still choose the server
    /// (`SET TRANSACTION READ ONLY` goes to a replica).
    fn defer_begin(&mut self, tag: u8, whole: bool) -> LoneBegin {
        if self.mode != PoolMode::Transaction || self.route.deferred_begin.is_some() {
            return LoneBegin::Not;
        }
        let pending = self.flow.pending();
        let (deferred, answer) = match tag {
            tag::QUERY if whole => {
                let len = i32::from_be_bytes([pending[1], pending[2], pending[3], pending[4]]);
                if pending.len() != len as usize + 1 {
                    return LoneBegin::Not;
                }
                let body = &pending[5..];
                let text = body.strip_suffix(b"\0").unwrap_or(body);
                match sql::plain_begin(text) {
                    Some(plain) => (DeferredBegin::Plain { unnamed: false }, plain.answer()),
                    None if self.routes_transactions() => match begin_with_modes(text) {
                        Some(found) => found,
                        None => return LoneBegin::Not,
                    },
                    None => return LoneBegin::Not,
                }
            }
            tag::PARSE | tag::BIND => {
                match request::extended_begin(pending, self.statements.as_ref()) {
                    BeginScan::Begin(begin) => (
                        DeferredBegin::Plain {
                            unnamed: begin.parsed,
                        },
                        extended_begin_answer(begin),
                    ),
                    BeginScan::Incomplete => return LoneBegin::Incomplete,
                    BeginScan::Other => return LoneBegin::Not,
                }
            }
            _ => return LoneBegin::Not,
        };
        let len = pending.len();
        self.flow.buf.advance(len);
        self.route.deferred_begin = Some(deferred);
        LoneBegin::Answer(answer)
    }

    /// Whether the session is read-only: a `read_only_alias` client, or one whose
    /// `default_transaction_read_only` is on.
    fn session_read_only(&self) -> bool {
        self.route.alias
            || match self.params.get("default_transaction_read_only") {
                Some(ParamValue::Value(v)) => classify::is_on(v),
                Some(ParamValue::Statement(s)) => {
                    s.rsplit([' ', '=']).next().is_some_and(classify::is_on)
                }
                None => false,
            }
    }

    /// Whether the request waiting in the buffer opens a read-only transaction, and
    /// whether a replica can run it.
    fn pending_access(&self) -> Access {
        let pending = self.flow.pending();
        if request::executes_nothing(pending) {
            // Preparing, describing or closing statements writes nothing.
            return Access {
                read_only: true,
                on_replica: false,
                retry: false,
            };
        }
        let text = request::opening_text(pending, self.statements.as_ref());
        let opening = text.map_or(Opening::Other, |t| {
            classify::opening(&String::from_utf8_lossy(t))
        });
        let in_block = self.route.deferred_begin.is_some();
        let replica = |read_only| Access {
            read_only,
            on_replica: read_only && !self.serializable_by_default(),
            retry: false,
        };
        match opening {
            Opening::BeginReadOnly => replica(true),
            Opening::SerializableReadOnly => Access {
                read_only: true,
                on_replica: false,
                retry: false,
            },
            Opening::SetReadOnly => replica(in_block || self.session_read_only()),
            // A standby refuses read-write transactions; so does the read-only name.
            Opening::BeginReadWrite | Opening::SetReadWrite => replica(self.route.alias),
            Opening::Other
                if !self.session_read_only()
                    && !in_block
                    && self
                        .pools
                        .router
                        .as_ref()
                        .is_some_and(|r| r.settings.autocommit_selects)
                    && request::lone_autocommit_select(pending, self.statements.as_ref()) =>
            {
                Access {
                    read_only: true,
                    on_replica: true,
                    retry: true,
                }
            }
            Opening::BeginDefault | Opening::Other => replica(self.session_read_only()),
        }
    }

    /// A replica refused the held request as a write: lets its server finish the answer
    /// nobody will see, gives it back, and puts the request in front of the buffer
    /// again, for the primary.
    async fn give_back_refused(
        &mut self,
        mut server: Pooled,
        pool: &Arc<Pool>,
        request: BytesMut,
    ) -> Result<()> {
        self.cancel.slot.set_target(None);
        server.params = Arc::clone(&self.params);
        if let Some(statements) = self.statements.as_mut() {
            statements.forget_server(&mut server.prepared);
            statements.reset_request();
        }
        let owed = self.tracker.owed();
        // Boxed, like the other rare waits below: a timer inline would make every
        // transaction's state larger, and that state is allocated and copied per
        // transaction.
        let drained = Box::pin(tokio::time::timeout(
            CLEANUP_TIMEOUT,
            server.discard_until_ready(owed),
        ))
        .await;
        let clean = matches!(drained, Ok(Ok(b'I')));
        pool.release(server, clean);
        self.tracker = Tracker::default();
        // The client was not read while its answer was held, so the buffer holds at most
        // the unsent end of the same request, which `request` has in full.
        self.flow = Flow::default();
        self.flow.buf = request;
        self.route.force_primary = true;
        if let Some(router) = &self.pools.router {
            router.count(false, Some(crate::routing::Fallback::Retried));
        }
        Ok(())
    }

    /// Whether the session's transactions are SERIALIZABLE unless they say otherwise,
    /// which a hot standby refuses.
    fn serializable_by_default(&self) -> bool {
        match self.params.get("default_transaction_isolation") {
            Some(ParamValue::Value(v) | ParamValue::Statement(v)) => {
                v.to_ascii_lowercase().contains("serializable")
            }
            None => false,
        }
    }

    /// Chooses the server for the request waiting in the buffer: a replica for a
    /// read-only transaction when one is eligible, the primary otherwise.
    async fn choose(&mut self, config: &crate::config::Config) -> Result<Choice> {
        let primary = |read_only| Choice {
            pool: Arc::clone(&self.pools.primary),
            read_only,
            retry: false,
        };
        let Some(router) = self.pools.router.clone() else {
            return Ok(primary(false));
        };
        if std::mem::take(&mut self.route.force_primary) {
            // The replica refused it as a write: on the primary, it writes.
            return Ok(primary(false));
        }
        let access = match self.mode {
            PoolMode::Transaction => self.pending_access(),
            PoolMode::Session => Access {
                read_only: self.session_read_only(),
                on_replica: self.session_read_only() && !self.serializable_by_default(),
                retry: false,
            },
        };
        if !access.on_replica {
            router.count(false, None);
            return Ok(primary(access.read_only));
        }
        let deadline = tokio::time::Instant::now() + config.pgmux.query_wait_timeout;
        loop {
            let min_lsn = match &mut self.route.last_write {
                Some((at, lsn)) if router.settings.read_your_writes => {
                    if lsn.is_none() {
                        *lsn = router.position_after(*at);
                    }
                    // No sample after the write yet: no replica can be shown to have it.
                    Some(lsn.unwrap_or(u64::MAX))
                }
                _ => None,
            };
            let replicas = &self.pools.replicas;
            let fallback = match router.pick(min_lsn, |i| replicas[i].in_use()) {
                Ok(i) => {
                    router.count(true, None);
                    return Ok(Choice {
                        pool: Arc::clone(&replicas[i]),
                        read_only: true,
                        retry: access.retry,
                    });
                }
                Err(fallback) => fallback,
            };
            let wait = router.settings.fallback == crate::config::ReplicaFallback::Wait;
            if !wait {
                router.count(false, Some(fallback));
                debug!(reason = ?fallback, "read-only transaction runs on the primary");
                return Ok(primary(true));
            }
            if tokio::time::Instant::now() >= deadline {
                router.count(false, Some(fallback));
                return Err(Error::NoReplica(config.pgmux.query_wait_timeout));
            }
            let poll = router
                .settings
                .interval
                .min(std::time::Duration::from_millis(50));
            Box::pin(tokio::time::sleep(poll)).await;
        }
    }

    /// Takes a server from `pool` for the client and brings its session parameters in
    /// line; sends a `BEGIN` pgmux answered earlier.
    async fn attach(&mut self, pool: &Arc<Pool>, started: std::time::Instant) -> Result<Pooled> {
        let mut server = pool
            .checkout_unless(
                &self.registration.info.interrupt,
                &mut self.handover,
                started,
            )
            .await?;
        if let Err(e) = self.sync_params(&mut server).await {
            let clean = !server.broken && matches!(e, Error::ServerLogin { .. });
            pool.release(server, clean);
            return Err(e);
        }
        let begin = match self.route.deferred_begin.take() {
            Some(DeferredBegin::Plain { unnamed })
                if relay::begin_ahead(&mut self.flow, &mut self.tracker, unnamed) =>
            {
                None
            }
            Some(DeferredBegin::Plain { .. }) => Some(std::borrow::Cow::Borrowed("BEGIN")),
            Some(DeferredBegin::Modes(text)) => Some(std::borrow::Cow::Owned(text)),
            None => None,
        };
        if let Some(begin) = begin {
            let outcome = Box::pin(server.run_quietly(&begin)).await;
            match outcome {
                Ok(o) if o.error.is_none() && o.status == b'T' => self.tracker.began(),
                _ => {
                    // The client was told its block is open, and it is not: nothing
                    // pgmux can say keeps that session consistent.
                    let clean = matches!(outcome, Ok(ref o) if o.status == b'I');
                    pool.release(server, clean);
                    return Err(Error::ServerProtocol(
                        "the server refused a BEGIN pgmux had already confirmed".into(),
                    ));
                }
            }
        }
        self.cancel
            .slot
            .set_target(Some(Arc::clone(&server.cancel_key)));
        Ok(server)
    }

    async fn sync_params(&mut self, server: &mut Server) -> Result<()> {
        let Some(sql) = params::sync_query(&self.params, &server.params) else {
            return Ok(());
        };
        let outcome = server
            .run_quietly_boxed(&sql)
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
    async fn detach(&mut self, mut server: Pooled, pool: &Arc<Pool>) {
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
        pool.release(server, clean);
        self.tracker = Tracker::default();
    }

    async fn make_clean(&mut self, server: &mut Server) -> bool {
        if !self.tracker.quiet()
            && !Box::pin(relay::settle(
                server,
                &mut self.flow,
                &mut self.tracker,
                CLEANUP_TIMEOUT,
            ))
            .await
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
            let run = Box::pin(tokio::time::timeout(
                CLEANUP_TIMEOUT,
                server.run_quietly(statement),
            ))
            .await;
            ok &= matches!(run, Ok(Ok(ref o)) if o.error.is_none() && o.status == b'I');
        }
        if ok && self.mode == PoolMode::Session {
            server.params = Arc::new(ParamSet::default());
        }
        ok
    }
}

/// What [`Client::defer_begin`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoneBegin {
    /// A lone `BEGIN`, now held by pgmux: this is the answer the client is owed.
    Answer(&'static [u8]),
    /// It may be one once the rest of the request has arrived.
    Incomplete,
    Not,
}

/// A lone `BEGIN` with modes, for routing (see [`DeferredBegin::Modes`]), and the answer
/// it is owed.
fn begin_with_modes(text: &[u8]) -> Option<(DeferredBegin, &'static [u8])> {
    let text = String::from_utf8_lossy(text);
    if !classify::opening(&text).is_bare_begin() {
        return None;
    }
    let start = sql::single_statement_words(&text)
        .is_some_and(|(words, _)| words.first().is_some_and(|w| w == "start"));
    let begin = if start {
        sql::PlainBegin::StartTransaction
    } else {
        sql::PlainBegin::Begin
    };
    Some((DeferredBegin::Modes(text.into_owned()), begin.answer()))
}

/// What the server answers an extended-protocol `BEGIN` with: ParseComplete,
/// BindComplete and NoData as the request asked for, then CommandComplete and
/// ReadyForQuery. The eight possible answers are made once.
fn extended_begin_answer(begin: request::ExtendedBegin) -> &'static [u8] {
    static ANSWERS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    let index = |parsed: bool, described: bool, start: bool| {
        usize::from(parsed) | usize::from(described) << 1 | usize::from(start) << 2
    };
    let answers = ANSWERS.get_or_init(|| {
        (0..8)
            .map(|i| {
                let (parsed, described, start) = (i & 1 != 0, i & 2 != 0, i & 4 != 0);
                let mut answer = Vec::new();
                // Bodiless messages: a tag and the length 4.
                for (tag, wanted) in [(b'1', parsed), (b'2', true), (b'n', described)] {
                    if wanted {
                        answer.extend_from_slice(&[tag, 0, 0, 0, 4]);
                    }
                }
                let begin = if start {
                    sql::PlainBegin::StartTransaction
                } else {
                    sql::PlainBegin::Begin
                };
                answer.extend_from_slice(begin.answer());
                debug_assert_eq!(i, index(parsed, described, start));
                answer
            })
            .collect()
    });
    let start = begin.begin == sql::PlainBegin::StartTransaction;
    &answers[index(begin.parsed, begin.described, start)]
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
        let key = Arc::clone(&server.cancel_key);
        tokio::spawn(async move { crate::cancel::send(&key).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle client costs mostly its task, and the task is as large as the future
    /// `handle` returns: a change that makes the state kept between requests larger, or
    /// that holds the session future twice again, shows here before it shows in RSS.
    #[tokio::test]
    async fn a_client_task_stays_small() {
        let config = crate::config::Config::parse(
            r#"
            [pgmux]
            [users.app]
            password = "secret"
            [databases.appdb]
            port = 5433
            "#,
        )
        .unwrap();
        let app = App::new(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let task = handle(app, stream, addr);
        let size = std::mem::size_of_val(&task);
        // When this was written: 1,024 bytes in test builds and 1,000 in release builds;
        // 1,040 in test builds once a deferred BEGIN was held here.
        // With `handle` an `async fn` holding the session future twice it was 1,144 in
        // test builds and 3,248 in release builds. A change that needs more must say
        // so here, knowing every idle client pays for it.
        assert!(size <= 1_100, "a client's task state grew to {size} bytes");
    }

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
