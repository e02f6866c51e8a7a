//! The admin console: the virtual database `pgmux` on the client listener.
//!
//! It speaks the simple query protocol only, like PgBouncer's console: one command per
//! Query message, answered with text columns. `admin_users` may run every command,
//! `stats_users` only the SHOW commands; other users are refused at login.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::pool::{Averages, Totals};
use crate::protocol::backend::{self, Severity};
use crate::protocol::tag;
use crate::{App, ClientInfo, ClientState, Pools};

/// What a console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every command.
    Admin,
    /// SHOW commands only.
    Stats,
}

/// The largest message the console reads: commands are short.
const MAX_MESSAGE: usize = 1024 * 1024;

/// The parameters a console session is told at login. `server_version` names pgmux, as
/// PgBouncer's console names itself, so no client mistakes it for a PostgreSQL server.
pub fn greeting() -> Vec<(&'static str, String)> {
    vec![
        (
            "server_version",
            format!("{}/pgmux", env!("CARGO_PKG_VERSION")),
        ),
        ("server_encoding", "UTF8".into()),
        ("client_encoding", "UTF8".into()),
        ("DateStyle", "ISO".into()),
        ("integer_datetimes", "on".into()),
        ("standard_conforming_strings", "on".into()),
        ("TimeZone", "UTC".into()),
    ]
}

/// A command's answer: rows, or a completion tag alone, or an error.
enum Reply {
    Rows {
        columns: Vec<&'static str>,
        rows: Vec<Vec<String>>,
    },
    Done(&'static str, Option<String>),
}

/// An error the console reports and survives.
struct Failure {
    code: &'static str,
    message: String,
}

fn fail(code: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// Serves one console session until the client leaves, is killed, or pgmux shuts down.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    app: &Arc<App>,
    stream: &mut S,
    role: Role,
    me: &ClientInfo,
) -> Result<()> {
    let mut buf = BytesMut::with_capacity(1024);
    // After an extended-protocol message, everything up to the next Sync is skipped,
    // as PostgreSQL does after an error in an extended batch.
    let mut skipping = false;
    loop {
        while buf.len() >= 5 {
            let tag = buf[0];
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
            let len = usize::try_from(len)
                .ok()
                .filter(|l| (4..=MAX_MESSAGE).contains(l))
                .ok_or_else(|| Error::ClientProtocol("invalid message length".into()))?;
            if buf.len() < len + 1 {
                break;
            }
            let body = buf[5..len + 1].to_vec();
            buf.advance(len + 1);
            let mut out = BytesMut::new();
            match tag {
                tag::TERMINATE => return Ok(()),
                tag::QUERY if !skipping => {
                    let text = String::from_utf8_lossy(body.strip_suffix(b"\0").unwrap_or(&body));
                    me.set_state(ClientState::Active, 0, std::time::Instant::now());
                    let reply = run(app, role, me, text.trim()).await;
                    me.set_state(ClientState::Idle, 0, std::time::Instant::now());
                    write_reply(&mut out, reply);
                    backend::ready_for_query(&mut out, b'I');
                }
                tag::SYNC => {
                    skipping = false;
                    backend::ready_for_query(&mut out, b'I');
                }
                tag::FLUSH => {}
                tag::PARSE
                | tag::BIND
                | tag::DESCRIBE
                | tag::EXECUTE
                | tag::CLOSE
                | tag::FUNCTION_CALL
                    if !skipping =>
                {
                    backend::error_response(
                        &mut out,
                        Severity::Error,
                        "0A000",
                        "the pgmux console accepts simple queries only",
                    );
                    if tag == tag::FUNCTION_CALL {
                        backend::ready_for_query(&mut out, b'I');
                    } else {
                        skipping = true;
                    }
                }
                _ if skipping => {}
                _ => {
                    return Err(Error::ClientProtocol(format!(
                        "unexpected message type {:?}",
                        tag as char
                    )))
                }
            }
            if !out.is_empty() {
                stream.write_all(&out).await.map_err(Error::ClientIo)?;
            }
        }
        let read = tokio::select! {
            read = stream.read_buf(&mut buf) => read,
            _ = app.shutdown.cancelled() => return Err(Error::Shutdown),
            _ = me.interrupt.raised(crate::interrupt::KILL) => return Err(Error::Killed),
        };
        match read {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(Error::ClientIo(e)),
        }
    }
}

fn write_reply(out: &mut BytesMut, reply: std::result::Result<Reply, Failure>) {
    match reply {
        Ok(Reply::Rows { columns, rows }) => {
            backend::row_description(out, &columns);
            for row in &rows {
                let values: Vec<Option<&str>> = row.iter().map(|v| Some(v.as_str())).collect();
                backend::data_row(out, &values);
            }
            backend::command_complete(out, "SHOW");
        }
        Ok(Reply::Done(tag, notice)) => {
            if let Some(notice) = notice {
                backend::notice_response(out, "00000", &notice);
            }
            backend::command_complete(out, tag);
        }
        Err(f) => backend::error_response(out, Severity::Error, f.code, &f.message),
    }
}

/// Runs one command.
async fn run(
    app: &Arc<App>,
    role: Role,
    me: &ClientInfo,
    text: &str,
) -> std::result::Result<Reply, Failure> {
    let text = text.trim_end_matches(';').trim();
    if text.contains(';') {
        return Err(fail(
            "42601",
            "the pgmux console runs one command per query",
        ));
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    let Some(first) = words.first() else {
        return Ok(Reply::Done("EMPTY", None));
    };
    let command = first.to_ascii_uppercase();
    if command == "SHOW" {
        let what = words
            .get(1)
            .map(|w| w.to_ascii_uppercase())
            .unwrap_or_default();
        if words.len() > 2 {
            return Err(fail("42601", format!("SHOW {what} takes no argument")));
        }
        return show(app, &what);
    }
    if role != Role::Admin {
        return Err(fail(
            "42501",
            format!("{command} needs a user listed in admin_users"),
        ));
    }
    let arg = words.get(1).copied();
    let too_many = words.len() > 2 && command != "SET";
    if too_many {
        return Err(fail(
            "42601",
            format!("{command} takes at most one argument"),
        ));
    }
    info!(command = %text, user = %me.user, "console command");
    match command.as_str() {
        "PAUSE" => pause(app, me, arg).await,
        "RESUME" => {
            let sets = pool_sets(app, arg)?;
            app.set_paused(arg, false);
            for (_, set) in &sets {
                set.all().for_each(|p| p.resume());
            }
            Ok(Reply::Done("RESUME", None))
        }
        "RECONNECT" => {
            for (_, set) in pool_sets(app, arg)? {
                set.all().for_each(|p| p.reconnect());
            }
            Ok(Reply::Done("RECONNECT", None))
        }
        "KILL" => kill_database(app, arg),
        "KILL_CLIENT" => {
            let id: u64 = arg
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| fail("42601", "KILL_CLIENT needs a client id from SHOW CLIENTS"))?;
            let client = app
                .sessions()
                .into_iter()
                .find(|c| c.id == id)
                .ok_or_else(|| fail("42704", format!("no client with id {id}")))?;
            client.interrupt.raise(crate::interrupt::KILL);
            warn!(client.id = id, client.addr = %client.addr, "console KILL_CLIENT");
            Ok(Reply::Done("KILL_CLIENT", None))
        }
        "RELOAD" => match app.reload().await {
            Ok(summary) => Ok(Reply::Done("RELOAD", ignored_notice(&summary.ignored))),
            Err(e) => Err(fail("F0000", format!("configuration reload rejected: {e}"))),
        },
        "SHUTDOWN" => {
            warn!(user = %me.user, "console SHUTDOWN");
            app.begin_shutdown();
            Ok(Reply::Done("SHUTDOWN", None))
        }
        "SET" => {
            let (key, value) =
                parse_set(text).ok_or_else(|| fail("42601", "use SET key = value"))?;
            let next = app.config().with_setting(&key, &value).map_err(|e| {
                crate::metrics::config_reload(false);
                fail("22023", e.to_string())
            })?;
            app.apply_config(next).await.map_err(|e| fail("F0000", e))?;
            Ok(Reply::Done("SET", None))
        }
        _ => Err(fail(
            "42601",
            format!("unknown console command \"{first}\""),
        )),
    }
}

/// Holds back new transactions of the pools of `database` (or of all), until RESUME.
fn pause_pools(app: &Arc<App>, database: Option<&str>, sets: &PoolSets) {
    app.set_paused(database, true);
    for (_, set) in sets {
        set.all().for_each(|p| p.pause());
    }
}

/// `PAUSE [db]`: returns once no server of those pools is attached to a client or being
/// opened for one (a client that was opening one when PAUSE came runs its transaction
/// first).
async fn pause(
    app: &Arc<App>,
    me: &ClientInfo,
    database: Option<&str>,
) -> std::result::Result<Reply, Failure> {
    let sets = pool_sets(app, database)?;
    pause_pools(app, database, &sets);
    loop {
        let busy: usize = sets
            .iter()
            .flat_map(|(_, s)| s.all())
            .map(|p| p.in_use())
            .sum();
        if busy == 0 {
            return Ok(Reply::Done("PAUSE", None));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            _ = me.interrupt.raised(crate::interrupt::KILL) => return Err(fail("57P01", "killed")),
            _ = app.shutdown.cancelled() => return Err(fail("57P01", "pgmux is shutting down")),
        }
    }
}

/// `KILL db`: disconnects the database's clients and closes its servers. As in
/// PgBouncer, the database stays paused: new transactions wait for RESUME instead of
/// reopening servers at once.
fn kill_database(app: &Arc<App>, database: Option<&str>) -> std::result::Result<Reply, Failure> {
    let db = database.ok_or_else(|| fail("42601", "KILL needs a database name"))?;
    let sets = pool_sets(app, Some(db))?;
    pause_pools(app, Some(db), &sets);
    let mut killed = 0;
    for client in app.sessions() {
        if !client.console && client.database == db {
            client.interrupt.raise(crate::interrupt::KILL);
            killed += 1;
        }
    }
    for (_, set) in sets {
        set.all().for_each(|p| p.reconnect());
    }
    warn!(database = %db, clients = killed, "console KILL: clients disconnected");
    Ok(Reply::Done("KILL", None))
}

fn ignored_notice(ignored: &[&str]) -> Option<String> {
    (!ignored.is_empty()).then(|| {
        format!(
            "{} only change with a restart; kept as they were",
            ignored.join(", ")
        )
    })
}

/// `SET key = value` or `SET key TO value`.
fn parse_set(text: &str) -> Option<(String, String)> {
    let rest = text.get(3..)?.trim();
    let (key, value) = match rest.split_once('=') {
        Some((k, v)) => (k.trim(), v.trim()),
        None => {
            let mut parts = rest.splitn(3, char::is_whitespace);
            let key = parts.next()?;
            parts.next().filter(|w| w.eq_ignore_ascii_case("to"))?;
            (key, parts.next()?.trim())
        }
    };
    (!key.is_empty() && !value.is_empty()).then(|| (key.to_ascii_lowercase(), value.to_string()))
}

/// Pool sets by (database, user).
type PoolSets = Vec<((String, String), Arc<Pools>)>;

/// The pool sets of one database, or of all; an unknown database is an error.
fn pool_sets(app: &App, db: Option<&str>) -> std::result::Result<PoolSets, Failure> {
    if let Some(db) = db {
        if !app.config().databases.contains_key(db) {
            return Err(fail(
                "3D000",
                format!("database \"{db}\" is not configured"),
            ));
        }
    }
    Ok(app
        .all_pools()
        .into_iter()
        .filter(|((d, _), _)| db.is_none_or(|db| d == db))
        .collect())
}

fn rows(columns: Vec<&'static str>, rows: Vec<Vec<String>>) -> std::result::Result<Reply, Failure> {
    Ok(Reply::Rows { columns, rows })
}

fn time(t: SystemTime) -> String {
    let secs = crate::unix_micros(t) / 1_000_000;
    // Civil time in UTC from the Unix day count (proleptic Gregorian calendar).
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF)
}

fn mode(m: crate::config::PoolMode) -> String {
    match m {
        crate::config::PoolMode::Transaction => "transaction".into(),
        crate::config::PoolMode::Session => "session".into(),
    }
}

fn show(app: &Arc<App>, what: &str) -> std::result::Result<Reply, Failure> {
    match what {
        "POOLS" => show_pools(app),
        "STATS" => show_stats(app),
        "CLIENTS" => show_clients(app),
        "SERVERS" => show_servers(app),
        "DATABASES" => show_databases(app),
        "CONFIG" => show_config(app),
        "VERSION" => rows(
            vec!["version"],
            vec![vec![format!("pgmux {}", env!("CARGO_PKG_VERSION"))]],
        ),
        "LISTS" => show_lists(app),
        "REPLICAS" => show_replicas(app),
        "" => Err(fail("42601", "SHOW needs a subject, e.g. SHOW POOLS")),
        other => Err(fail("42601", format!("unknown SHOW subject \"{other}\""))),
    }
}

/// `SHOW POOLS`.
fn show_pools(app: &Arc<App>) -> std::result::Result<Reply, Failure> {
    let mut out = Vec::new();
    for ((db, user), set) in app.all_pools() {
        for pool in set.all() {
            let s = pool.snapshot();
            let wait = s.oldest_wait.unwrap_or_default();
            let active = s.open - s.idle - s.connecting;
            out.push(vec![
                db.clone(),
                user.clone(),
                s.clients.saturating_sub(s.waiting).to_string(),
                s.waiting.to_string(),
                active.to_string(),
                s.idle.to_string(),
                "0".into(),
                "0".into(),
                s.connecting.to_string(),
                wait.as_secs().to_string(),
                wait.subsec_micros().to_string(),
                mode(s.mode),
                pool.replica.clone().unwrap_or_default(),
                s.size.to_string(),
                if s.paused { "1" } else { "0" }.into(),
            ]);
        }
    }
    rows(
        vec![
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
            "pool_mode",
            "replica",
            "pool_size",
            "paused",
        ],
        out,
    )
}

/// `SHOW STATS`.
fn show_stats(app: &Arc<App>) -> std::result::Result<Reply, Failure> {
    // One row per database, as in PgBouncer (whose exporters key on the name):
    // the pools of all its users and replicas add up.
    let mut by_db: BTreeMap<String, (Totals, Averages)> = BTreeMap::new();
    for ((db, _user), set) in app.all_pools() {
        let (t, a) = by_db.entry(db.clone()).or_default();
        for pool in set.all() {
            add_stats(t, a, &pool.stats.totals(), &pool.stats.averages());
        }
    }
    let out = by_db
        .into_iter()
        .map(|(db, (t, a))| {
            vec![
                db,
                t.transactions.to_string(),
                t.queries.to_string(),
                t.received.to_string(),
                t.sent.to_string(),
                t.transaction_us.to_string(),
                t.query_us.to_string(),
                t.wait_us.to_string(),
                a.transactions_per_s.to_string(),
                a.queries_per_s.to_string(),
                a.received_per_s.to_string(),
                a.sent_per_s.to_string(),
                a.transaction_us.to_string(),
                a.query_us.to_string(),
                a.wait_us.to_string(),
            ]
        })
        .collect();
    rows(
        vec![
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
            "avg_wait_time",
        ],
        out,
    )
}

/// `SHOW CLIENTS`.
fn show_clients(app: &Arc<App>) -> std::result::Result<Reply, Failure> {
    let now = SystemTime::now();
    let out = app
        .sessions()
        .into_iter()
        .map(|c| {
            let state = c.state();
            let since = c.since();
            let wait = if state == ClientState::Waiting {
                now.duration_since(since).unwrap_or_default()
            } else {
                Duration::ZERO
            };
            let server = c.server();
            vec![
                "C".into(),
                c.user.clone(),
                c.database.clone(),
                match state {
                    ClientState::Idle => "idle",
                    ClientState::Waiting => "waiting",
                    ClientState::Active => "active",
                }
                .into(),
                c.addr.ip().to_string(),
                c.addr.port().to_string(),
                time(c.connected_at),
                time(since),
                wait.as_secs().to_string(),
                wait.subsec_micros().to_string(),
                if server == 0 {
                    String::new()
                } else {
                    server.to_string()
                },
                c.application_name.clone(),
                c.id.to_string(),
            ]
        })
        .collect();
    rows(
        vec![
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "connect_time",
            "request_time",
            "wait",
            "wait_us",
            "link",
            "application_name",
            "id",
        ],
        out,
    )
}

/// `SHOW SERVERS`.
fn show_servers(app: &Arc<App>) -> std::result::Result<Reply, Failure> {
    let mut out = Vec::new();
    let clients: std::collections::HashMap<u64, u64> = app
        .sessions()
        .iter()
        .filter(|c| c.server() != 0)
        .map(|c| (c.server(), c.id))
        .collect();
    for ((db, user), set) in app.all_pools() {
        for pool in set.all() {
            let (host, port) = pool.target_addr();
            for s in pool.servers() {
                out.push(vec![
                    "S".into(),
                    user.clone(),
                    db.clone(),
                    if s.active { "active" } else { "idle" }.into(),
                    host.clone(),
                    port.to_string(),
                    time(s.connected_at),
                    time(crate::wall_time(s.since)),
                    s.pid.to_string(),
                    clients.get(&s.id).map(u64::to_string).unwrap_or_default(),
                    s.id.to_string(),
                    pool.replica.clone().unwrap_or_default(),
                    s.prepared.to_string(),
                ]);
            }
        }
    }
    rows(
        vec![
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "connect_time",
            "request_time",
            "remote_pid",
            "link",
            "id",
            "replica",
            "prepared_statements",
        ],
        out,
    )
}

/// `SHOW DATABASES`.
fn show_databases(app: &Arc<App>) -> std::result::Result<Reply, Failure> {
    let shared = app.shared();
    let config = &shared.config;
    let paused = app.paused_databases();
    let out = config
        .databases
        .iter()
        .map(|(name, db)| {
            vec![
                name.clone(),
                db.host.clone(),
                db.port.to_string(),
                db.server_dbname(name).to_string(),
                db.pool_size
                    .unwrap_or(config.pgmux.default_pool_size)
                    .to_string(),
                db.min_pool_size
                    .unwrap_or(config.pgmux.min_pool_size)
                    .to_string(),
                mode(db.pool_mode.unwrap_or(config.pgmux.pool_mode)),
                config.max_db_connections(db).to_string(),
                app.db_server_count(name).to_string(),
                if paused.contains(name) { "1" } else { "0" }.into(),
                db.replicas.join(","),
                db.read_only_alias.clone().unwrap_or_default(),
            ]
        })
        .collect();
    rows(
        vec![
            "name",
            "host",
            "port",
            "database",
            "pool_size",
            "min_pool_size",
            "pool_mode",
            "max_connections",
            "current_connections",
            "paused",
            "replicas",
            "read_only_alias",
        ],
        out,
    )
}

/// `SHOW CONFIG`.
fn show_config(app: &Arc<App>) -> std::result::Result<Reply, Failure> {
    let config = app.config();
    let out = config
        .general_settings()
        .into_iter()
        .map(|(k, v)| {
            // Read only at start; a reload or SET keeps the value in use.
            let changeable = !matches!(k, "listen" | "metrics_listen" | "worker_threads");
            vec![
                k.to_string(),
                v,
                if changeable { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    rows(vec!["key", "value", "changeable"], out)
}

/// `SHOW LISTS`.
fn show_lists(app: &Arc<App>) -> std::result::Result<Reply, Failure> {
    let config = app.config();
    let sessions = app.sessions();
    let pools = app.all_pools();
    let servers: usize = pools
        .iter()
        .flat_map(|(_, s)| s.all())
        .map(|p| p.snapshot().open)
        .sum();
    let pool_count: usize = pools.iter().map(|(_, s)| 1 + s.replicas.len()).sum();
    let used = sessions.iter().filter(|c| !c.console).count();
    let list = [
        ("databases", config.databases.len()),
        ("users", config.users.len()),
        ("pools", pool_count),
        ("used_clients", used),
        ("console_clients", sessions.len() - used),
        ("used_servers", servers),
    ];
    rows(
        vec!["list", "items"],
        list.iter()
            .map(|(k, v)| vec![k.to_string(), v.to_string()])
            .collect(),
    )
}

/// `SHOW REPLICAS`.
fn show_replicas(app: &Arc<App>) -> std::result::Result<Reply, Failure> {
    let config = app.config();
    let now = std::time::Instant::now();
    let mut out = Vec::new();
    for name in config.databases.keys() {
        let Some(router) = app.router(name) else {
            continue;
        };
        for i in 0..router.replicas.len() {
            let v = router.view(i, now);
            let mut lag_us = String::new();
            if let Some(lag) = v.lag {
                let _ = write!(lag_us, "{}", lag.as_micros());
            }
            out.push(vec![
                name.clone(),
                v.addr.clone(),
                if v.eligible { "yes" } else { "no" }.into(),
                v.reason.to_string(),
                lag_us,
                v.lag_bytes.to_string(),
                lsn(v.replay_lsn),
            ]);
        }
    }
    rows(
        vec![
            "database",
            "replica",
            "eligible",
            "reason",
            "lag_us",
            "lag_bytes",
            "replay_lsn",
        ],
        out,
    )
}

/// Adds one pool's counters to a database's. Rates add up; mean durations are weighted
/// by how many transactions (or queries) each pool ran in the period.
fn add_stats(t: &mut Totals, a: &mut Averages, pt: &Totals, pa: &Averages) {
    t.transactions += pt.transactions;
    t.queries += pt.queries;
    t.received += pt.received;
    t.sent += pt.sent;
    t.transaction_us += pt.transaction_us;
    t.query_us += pt.query_us;
    t.wait_us += pt.wait_us;
    t.waits += pt.waits;
    let mean = |mine: u64, my_n: u64, theirs: u64, their_n: u64| {
        (mine * my_n + theirs * their_n)
            .checked_div(my_n + their_n)
            .unwrap_or(0)
    };
    a.transaction_us = mean(
        a.transaction_us,
        a.transactions_per_s,
        pa.transaction_us,
        pa.transactions_per_s,
    );
    a.wait_us = mean(
        a.wait_us,
        a.transactions_per_s,
        pa.wait_us,
        pa.transactions_per_s,
    );
    a.query_us = mean(a.query_us, a.queries_per_s, pa.query_us, pa.queries_per_s);
    a.transactions_per_s += pa.transactions_per_s;
    a.queries_per_s += pa.queries_per_s;
    a.received_per_s += pa.received_per_s;
    a.sent_per_s += pa.sent_per_s;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_parses_both_spellings() {
        assert_eq!(
            parse_set("SET default_pool_size = 5"),
            Some(("default_pool_size".into(), "5".into()))
        );
        assert_eq!(
            parse_set("set Query_Timeout to '2s'"),
            Some(("query_timeout".into(), "'2s'".into()))
        );
        assert_eq!(parse_set("SET x"), None);
    }

    #[test]
    fn times_print_in_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_661);
        assert_eq!(time(t), "2000-02-29 01:01:01 UTC");
        assert_eq!(lsn(0x1_0000_00A0), "1/A0");
    }
}
