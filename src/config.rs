//! The TOML configuration: what the operator writes, its defaults, and validation.
//!
//! Every key is documented with its default in `conf/pgmux.toml`. Durations are strings
//! such as `"250ms"`, `"5s"` or `"2m"`; `"0"` (or `"0s"`) disables a timeout.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use crate::tls::{ClientTlsMode, ServerTlsMode};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub pgmux: General,
    #[serde(default)]
    pub users: BTreeMap<String, User>,
    #[serde(default)]
    pub databases: BTreeMap<String, Database>,
}

/// How long a server connection is kept attached to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server is attached for one transaction and returned at its end.
    Transaction,
    /// A server is attached for the client's whole connection.
    Session,
}

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthType {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "plain")]
    Plain,
    #[serde(rename = "trust")]
    Trust,
    /// A TLS client certificate, verified against `client_tls_ca`, whose common name
    /// is the user name.
    #[serde(rename = "cert")]
    Cert,
}

/// Settings under `[pgmux]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct General {
    /// Client-facing address.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Prometheus endpoint; `/metrics` is served here. Unset disables it.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Threads that serve clients. 1 runs everything on one thread, which costs the
    /// least CPU per transaction; 0 starts one per CPU core; more spread clients over
    /// that many threads (for when one thread is saturated). Needs a restart.
    #[serde(default = "defaults::worker_threads")]
    pub worker_threads: usize,
    #[serde(default = "defaults::pool_mode")]
    pub pool_mode: PoolMode,
    /// Server connections per (database, user) unless a database overrides it.
    #[serde(default = "defaults::pool_size")]
    pub default_pool_size: usize,
    /// Server connections each pool keeps open even when idle.
    #[serde(default)]
    pub min_pool_size: usize,
    /// Upper bound on server connections to one database across the pools of all its
    /// users; 0 = none. Clients over it wait as for a full pool.
    #[serde(default)]
    pub max_db_connections: usize,
    /// Prepared statements each server connection keeps, least recently used closed
    /// first; 0 passes named statements through untouched (they then work in session
    /// mode only).
    #[serde(default = "defaults::max_prepared_statements")]
    pub max_prepared_statements: usize,
    /// Prepared statements one client may hold; a Parse beyond gets SQLSTATE 53400.
    #[serde(default = "defaults::max_client_prepared_statements")]
    pub max_client_prepared_statements: usize,
    /// Connected clients beyond which new clients are refused with 53300.
    #[serde(default = "defaults::max_client_conn")]
    pub max_client_conn: usize,
    #[serde(default = "defaults::auth_type")]
    pub auth_type: AuthType,
    /// How long a client may wait for a server before it is told so and disconnected.
    #[serde(default = "defaults::query_wait_timeout", with = "duration")]
    pub query_wait_timeout: Duration,
    /// Time allowed from TCP accept to the end of authentication.
    #[serde(default = "defaults::client_login_timeout", with = "duration")]
    pub client_login_timeout: Duration,
    /// A client idle inside a transaction for longer than this is disconnected; 0 = never.
    #[serde(default, with = "duration")]
    pub idle_transaction_timeout: Duration,
    /// A query running longer than this is cancelled; 0 = never.
    #[serde(default, with = "duration")]
    pub query_timeout: Duration,
    /// Time allowed to open and log in a server connection.
    #[serde(default = "defaults::server_connect_timeout", with = "duration")]
    pub server_connect_timeout: Duration,
    /// Idle server connections above `min_pool_size` are closed after this; 0 = never.
    #[serde(default = "defaults::server_idle_timeout", with = "duration")]
    pub server_idle_timeout: Duration,
    /// Server connections are closed when released after this age; 0 = never.
    #[serde(default = "defaults::server_lifetime", with = "duration")]
    pub server_lifetime: Duration,
    /// Interval of pool upkeep: refilling to min_pool_size and closing expired servers.
    #[serde(default = "defaults::maintenance_interval", with = "duration")]
    pub maintenance_interval: Duration,
    /// Largest message a client may send; longer ones are refused before any allocation.
    #[serde(default = "defaults::max_message_size")]
    pub max_message_size: usize,
    /// Time given to clients and transactions to finish after SIGTERM.
    #[serde(default = "defaults::shutdown_timeout", with = "duration")]
    pub shutdown_timeout: Duration,
    /// Users (from `[users]`) that may run every console command.
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// Users (from `[users]`) that may run the console's SHOW commands only.
    #[serde(default)]
    pub stats_users: Vec<String>,
    /// TLS towards clients; see [`crate::tls`].
    #[serde(default)]
    pub client_tls_mode: ClientTlsMode,
    /// PEM certificate chain pgmux presents to clients.
    #[serde(default)]
    pub client_tls_cert: Option<PathBuf>,
    /// PEM private key of `client_tls_cert`.
    #[serde(default)]
    pub client_tls_key: Option<PathBuf>,
    /// PEM CA certificates that client certificates are verified against; unset means
    /// clients are not asked for certificates.
    #[serde(default)]
    pub client_tls_ca: Option<PathBuf>,
    /// TLS towards servers, as libpq's `sslmode`.
    #[serde(default)]
    pub server_tls_mode: ServerTlsMode,
    /// PEM CA certificates that server certificates are verified against.
    #[serde(default)]
    pub server_tls_ca: Option<PathBuf>,
    /// PEM client certificate pgmux presents to servers (with `server_tls_key`).
    #[serde(default)]
    pub server_tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub server_tls_key: Option<PathBuf>,
}

/// A `[users.NAME]` table: the credentials clients present, also used towards the server.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub password: String,
    /// Overrides the pool size of every database for this user.
    #[serde(default)]
    pub pool_size: Option<usize>,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("password", &"<redacted>")
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// A `[databases.NAME]` table: where the database clients name really lives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    #[serde(default = "defaults::host")]
    pub host: String,
    #[serde(default = "defaults::port")]
    pub port: u16,
    /// Server-side database name; defaults to the table's name.
    #[serde(default)]
    pub dbname: Option<String>,
    #[serde(default)]
    pub pool_size: Option<usize>,
    #[serde(default)]
    pub min_pool_size: Option<usize>,
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    /// Overrides `max_db_connections` for this database.
    #[serde(default)]
    pub max_db_connections: Option<usize>,
    /// Streaming replicas (`"host:port"`) that serve read-only transactions.
    #[serde(default)]
    pub replicas: Vec<String>,
    /// A replica further behind the primary than this gets no reads.
    #[serde(default = "defaults::max_replica_lag", with = "duration")]
    pub max_replica_lag: Duration,
    /// A replica further behind than this many bytes of WAL gets no reads; unset = no
    /// byte bound.
    #[serde(default)]
    pub max_replica_lag_bytes: Option<u64>,
    /// How often the primary's WAL position and each replica's replay position are read.
    #[serde(default = "defaults::lag_check_interval", with = "duration")]
    pub lag_check_interval: Duration,
    /// After a client's transaction on the primary, its read-only transactions go only
    /// to replicas that have replayed that transaction.
    #[serde(default = "defaults::read_your_writes")]
    pub read_your_writes: bool,
    /// A second database name for the same servers whose clients are read-only sessions.
    #[serde(default)]
    pub read_only_alias: Option<String>,
    /// What a read-only transaction does when no replica is eligible.
    #[serde(default = "defaults::replica_fallback")]
    pub replica_fallback: ReplicaFallback,
    /// Single autocommit statements that parse as plain SELECTs also go to replicas.
    #[serde(default)]
    pub route_autocommit_selects: bool,
    /// The user the lag probes log in as; defaults to the first user in `[users]`.
    #[serde(default)]
    pub lag_check_user: Option<String>,
}

/// What a read-only transaction does when no replica is eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaFallback {
    /// Run on the primary.
    Primary,
    /// Wait for a replica to become eligible, up to `query_wait_timeout`.
    Wait,
}

/// Splits `"host:port"` (IPv6 hosts in brackets).
pub fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().ok()?;
    (!host.is_empty() && port != 0).then(|| (host.to_string(), port))
}

impl Database {
    /// The name to ask the server for.
    pub fn server_dbname<'a>(&'a self, client_name: &'a str) -> &'a str {
        self.dbname.as_deref().unwrap_or(client_name)
    }
}

/// A configuration that could not be loaded, with the key or reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

/// A TOML error as a line number and the message, without the quoted source line that
/// `toml` adds: that line may hold a password, and this text goes to logs and the console.
fn describe(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            // The key is safe to show, and says what is wrong better than a number.
            let source = text.lines().nth(line - 1).unwrap_or("");
            let key = source
                .split_once('=')
                .map(|(k, _)| k.trim())
                .filter(|k| !k.is_empty() && !k.contains(['"', '\'']));
            match key {
                Some(key) => format!("line {line} (`{key}`): {}", e.message().trim_end()),
                None => format!("line {line}: {}", e.message().trim_end()),
            }
        }
        None => e.message().trim_end().to_string(),
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(describe(&e, text)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let g = &self.pgmux;
        if g.default_pool_size == 0 {
            return Err(invalid("pgmux.default_pool_size", "must be at least 1"));
        }
        if g.max_client_prepared_statements == 0 {
            return Err(invalid(
                "pgmux.max_client_prepared_statements",
                "must be at least 1",
            ));
        }
        if g.worker_threads > 1024 {
            return Err(invalid("pgmux.worker_threads", "must be at most 1024"));
        }
        if g.max_client_conn == 0 {
            return Err(invalid("pgmux.max_client_conn", "must be at least 1"));
        }
        if g.max_message_size < 1024 {
            return Err(invalid("pgmux.max_message_size", "must be at least 1024"));
        }
        if g.maintenance_interval.is_zero() {
            return Err(invalid("pgmux.maintenance_interval", "must be positive"));
        }
        if g.server_connect_timeout.is_zero() {
            return Err(invalid("pgmux.server_connect_timeout", "must be positive"));
        }
        if g.client_login_timeout.is_zero() {
            return Err(invalid("pgmux.client_login_timeout", "must be positive"));
        }
        // Loads the certificates and keys, so a bad path or PEM file fails the check.
        crate::tls::acceptor(self)?;
        crate::tls::connector(self)?;
        if self.databases.contains_key(crate::ADMIN_DATABASE) {
            return Err(invalid(
                "databases.pgmux",
                "the name is reserved for pgmux's own console",
            ));
        }
        for (name, db) in &self.databases {
            let key = |field: &str| format!("databases.{name}.{field}");
            if db.pool_size == Some(0) {
                return Err(invalid(&key("pool_size"), "must be at least 1"));
            }
            if db.host.is_empty() {
                return Err(invalid(&key("host"), "must not be empty"));
            }
            if db.port == 0 {
                return Err(invalid(&key("port"), "must be a TCP port"));
            }
            for replica in &db.replicas {
                if split_host_port(replica).is_none() {
                    return Err(invalid(
                        &key("replicas"),
                        "entries must look like \"host:port\"",
                    ));
                }
            }
            if db.lag_check_interval.is_zero() {
                return Err(invalid(&key("lag_check_interval"), "must be positive"));
            }
            if let Some(alias) = &db.read_only_alias {
                if alias == crate::ADMIN_DATABASE
                    || alias == name
                    || self.databases.contains_key(alias)
                    || self.databases.iter().any(|(other, d)| {
                        other != name && d.read_only_alias.as_ref() == Some(alias)
                    })
                {
                    return Err(invalid(
                        &key("read_only_alias"),
                        "must differ from every database name and every other alias",
                    ));
                }
            }
            if let Some(user) = &db.lag_check_user {
                if !self.users.contains_key(user) {
                    return Err(invalid(&key("lag_check_user"), "is not a user in [users]"));
                }
            }
            if !db.replicas.is_empty() && self.users.is_empty() {
                return Err(invalid(
                    &key("replicas"),
                    "lag probes need a user in [users]",
                ));
            }
        }
        for (key, names) in [
            ("pgmux.admin_users", &g.admin_users),
            ("pgmux.stats_users", &g.stats_users),
        ] {
            if let Some(name) = names.iter().find(|n| !self.users.contains_key(*n)) {
                return Err(ConfigError::Invalid {
                    key: key.to_string(),
                    reason: format!("\"{name}\" is not a user in [users]"),
                });
            }
        }
        for (name, user) in &self.users {
            if user.pool_size == Some(0) {
                return Err(invalid(
                    &format!("users.{name}.pool_size"),
                    "must be at least 1",
                ));
            }
            if user.password.contains('\0') {
                return Err(invalid(
                    &format!("users.{name}.password"),
                    "contains a NUL byte",
                ));
            }
        }
        Ok(())
    }

    /// A copy with one `[pgmux]` setting changed, as the console's `SET` asks, checked
    /// like a loaded file. Only settings that can change while running are accepted.
    pub fn with_setting(&self, key: &str, value: &str) -> Result<Config, ConfigError> {
        let mut next = self.clone();
        let value = value.trim().trim_matches('\'');
        let invalid = |reason: String| ConfigError::Invalid {
            key: format!("pgmux.{key}"),
            reason,
        };
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| invalid(format!("`{value}` is not a whole number")))
        };
        let duration = || {
            if value == "0" {
                return Ok(Duration::ZERO);
            }
            humantime::parse_duration(value)
                .map_err(|e| invalid(format!("`{value}` is not a duration ({e})")))
        };
        let g = &mut next.pgmux;
        match key {
            "default_pool_size" => g.default_pool_size = number()?,
            "min_pool_size" => g.min_pool_size = number()?,
            "max_db_connections" => g.max_db_connections = number()?,
            "max_client_conn" => g.max_client_conn = number()?,
            "max_message_size" => g.max_message_size = number()?,
            "query_wait_timeout" => g.query_wait_timeout = duration()?,
            "client_login_timeout" => g.client_login_timeout = duration()?,
            "idle_transaction_timeout" => g.idle_transaction_timeout = duration()?,
            "query_timeout" => g.query_timeout = duration()?,
            "server_connect_timeout" => g.server_connect_timeout = duration()?,
            "server_idle_timeout" => g.server_idle_timeout = duration()?,
            "server_lifetime" => g.server_lifetime = duration()?,
            "maintenance_interval" => g.maintenance_interval = duration()?,
            "shutdown_timeout" => g.shutdown_timeout = duration()?,
            _ => {
                return Err(ConfigError::Invalid {
                    key: key.to_string(),
                    reason: "not a setting the console can change".to_string(),
                })
            }
        }
        next.validate()?;
        Ok(next)
    }

    /// `[pgmux]` settings as (key, value) text, as the console shows them. Passwords live
    /// only in `[users]` and never appear here.
    pub fn general_settings(&self) -> Vec<(&'static str, String)> {
        let g = &self.pgmux;
        let d = |d: Duration| {
            if d.is_zero() {
                "0".to_string()
            } else {
                humantime::format_duration(d).to_string()
            }
        };
        let mode = |m: PoolMode| match m {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        };
        let auth = match g.auth_type {
            AuthType::ScramSha256 => "scram-sha-256",
            AuthType::Md5 => "md5",
            AuthType::Plain => "plain",
            AuthType::Trust => "trust",
            AuthType::Cert => "cert",
        };
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        vec![
            ("listen", g.listen.to_string()),
            (
                "metrics_listen",
                g.metrics_listen.map(|a| a.to_string()).unwrap_or_default(),
            ),
            ("worker_threads", g.worker_threads.to_string()),
            ("pool_mode", mode(g.pool_mode).to_string()),
            ("default_pool_size", g.default_pool_size.to_string()),
            ("min_pool_size", g.min_pool_size.to_string()),
            ("max_db_connections", g.max_db_connections.to_string()),
            (
                "max_prepared_statements",
                g.max_prepared_statements.to_string(),
            ),
            (
                "max_client_prepared_statements",
                g.max_client_prepared_statements.to_string(),
            ),
            ("max_client_conn", g.max_client_conn.to_string()),
            ("auth_type", auth.to_string()),
            ("query_wait_timeout", d(g.query_wait_timeout)),
            ("client_login_timeout", d(g.client_login_timeout)),
            ("idle_transaction_timeout", d(g.idle_transaction_timeout)),
            ("query_timeout", d(g.query_timeout)),
            ("server_connect_timeout", d(g.server_connect_timeout)),
            ("server_idle_timeout", d(g.server_idle_timeout)),
            ("server_lifetime", d(g.server_lifetime)),
            ("maintenance_interval", d(g.maintenance_interval)),
            ("max_message_size", g.max_message_size.to_string()),
            ("shutdown_timeout", d(g.shutdown_timeout)),
            (
                "client_tls_mode",
                format!("{:?}", g.client_tls_mode).to_lowercase(),
            ),
            ("client_tls_cert", path(&g.client_tls_cert)),
            ("client_tls_key", path(&g.client_tls_key)),
            ("client_tls_ca", path(&g.client_tls_ca)),
            ("server_tls_mode", g.server_tls_mode.as_str().to_string()),
            ("server_tls_ca", path(&g.server_tls_ca)),
            ("server_tls_cert", path(&g.server_tls_cert)),
            ("server_tls_key", path(&g.server_tls_key)),
            ("admin_users", g.admin_users.join(",")),
            ("stats_users", g.stats_users.join(",")),
        ]
    }

    /// The database-wide server connection limit of `db`; 0 = none.
    pub fn max_db_connections(&self, db: &Database) -> usize {
        db.max_db_connections
            .unwrap_or(self.pgmux.max_db_connections)
    }

    /// Pool settings for one (database, user) pair, with defaults and overrides resolved.
    pub fn pool_settings(&self, db: &Database, user: &User) -> PoolSettings {
        let g = &self.pgmux;
        let size = user
            .pool_size
            .or(db.pool_size)
            .unwrap_or(g.default_pool_size);
        PoolSettings {
            size,
            min_size: db.min_pool_size.unwrap_or(g.min_pool_size).min(size),
            mode: db.pool_mode.unwrap_or(g.pool_mode),
            query_wait_timeout: g.query_wait_timeout,
            server_connect_timeout: g.server_connect_timeout,
            server_idle_timeout: g.server_idle_timeout,
            server_lifetime: g.server_lifetime,
            maintenance_interval: g.maintenance_interval,
            max_prepared_statements: g.max_prepared_statements,
            max_client_prepared_statements: g.max_client_prepared_statements,
        }
    }
}

/// The settings one pool runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub size: usize,
    pub min_size: usize,
    pub mode: PoolMode,
    pub query_wait_timeout: Duration,
    pub server_connect_timeout: Duration,
    pub server_idle_timeout: Duration,
    pub server_lifetime: Duration,
    pub maintenance_interval: Duration,
    pub max_prepared_statements: usize,
    pub max_client_prepared_statements: usize,
}

mod defaults {
    use super::*;

    pub fn listen() -> SocketAddr {
        "127.0.0.1:6432".parse().expect("constant address")
    }
    pub fn worker_threads() -> usize {
        1
    }
    pub fn pool_mode() -> PoolMode {
        PoolMode::Transaction
    }
    pub fn pool_size() -> usize {
        20
    }
    pub fn max_prepared_statements() -> usize {
        200
    }
    pub fn max_client_prepared_statements() -> usize {
        1000
    }
    pub fn max_client_conn() -> usize {
        10_000
    }
    pub fn auth_type() -> AuthType {
        AuthType::ScramSha256
    }
    pub fn query_wait_timeout() -> Duration {
        Duration::from_secs(120)
    }
    pub fn client_login_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn server_connect_timeout() -> Duration {
        Duration::from_secs(15)
    }
    pub fn server_idle_timeout() -> Duration {
        Duration::from_secs(600)
    }
    pub fn server_lifetime() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn maintenance_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn max_message_size() -> usize {
        64 * 1024 * 1024
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_replica_lag() -> Duration {
        Duration::from_secs(1)
    }
    pub fn lag_check_interval() -> Duration {
        Duration::from_millis(100)
    }
    pub fn read_your_writes() -> bool {
        true
    }
    pub fn replica_fallback() -> ReplicaFallback {
        ReplicaFallback::Primary
    }
    pub fn host() -> String {
        "127.0.0.1".to_string()
    }
    pub fn port() -> u16 {
        5432
    }
}

/// Durations as humane strings ("250ms", "5s", "2m"); a bare `0` means disabled.
mod duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Int(u64),
        }
        match Raw::deserialize(d)? {
            Raw::Int(0) => Ok(Duration::ZERO),
            Raw::Int(_) => Err(serde::de::Error::custom(
                "durations need a unit, as in \"5s\" or \"250ms\"",
            )),
            Raw::Text(s) if s.trim() == "0" => Ok(Duration::ZERO),
            Raw::Text(s) => humantime::parse_duration(s.trim())
                .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a duration ({e})"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [pgmux]
        listen = "127.0.0.1:6432"
        query_wait_timeout = "250ms"
        [users.app]
        password = "secret"
        [databases.appdb]
        port = 5433
    "#;

    #[test]
    fn defaults_fill_unset_keys() {
        let config = Config::parse(MINIMAL).unwrap();
        assert_eq!(config.pgmux.pool_mode, PoolMode::Transaction);
        assert_eq!(config.pgmux.default_pool_size, 20);
        assert_eq!(config.pgmux.auth_type, AuthType::ScramSha256);
        assert_eq!(config.pgmux.query_wait_timeout, Duration::from_millis(250));
        let db = &config.databases["appdb"];
        assert_eq!(db.server_dbname("appdb"), "appdb");
        assert_eq!(db.host, "127.0.0.1");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let text = MINIMAL.replace("query_wait_timeout = \"250ms\"", "default_pool_size = 0");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("pgmux.default_pool_size"), "{err}");

        let text = MINIMAL.replace("\"250ms\"", "\"soon\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("query_wait_timeout"), "{err}");

        let text = MINIMAL.replace("port = 5433", "port = 5433\nbogus = 1");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn passwords_are_not_printed() {
        let config = Config::parse(MINIMAL).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("secret"), "{shown}");
        // A syntax error on a password line names the line, not its text.
        let broken = MINIMAL.replace("password = \"secret\"", "password = \"secret");
        let err = Config::parse(&broken).unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
        assert!(err.contains("line 6"), "{err}");
    }

    #[test]
    fn replica_settings_parse_and_validate() {
        let text = MINIMAL.replace(
            "port = 5433",
            "port = 5433\nreplicas = [\"127.0.0.1:5434\", \"[::1]:5435\"]\nmax_replica_lag = \"500ms\"\nread_only_alias = \"appdb_ro\"",
        );
        let config = Config::parse(&text).unwrap();
        let db = &config.databases["appdb"];
        assert_eq!(db.replicas.len(), 2);
        assert_eq!(db.max_replica_lag, Duration::from_millis(500));
        assert_eq!(db.lag_check_interval, Duration::from_millis(100));
        assert!(db.read_your_writes);
        assert_eq!(db.replica_fallback, ReplicaFallback::Primary);
        assert_eq!(split_host_port("[::1]:5435"), Some(("::1".into(), 5435)));

        let bad = MINIMAL.replace("port = 5433", "port = 5433\nreplicas = [\"nowhere\"]");
        let err = Config::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("databases.appdb.replicas"), "{err}");
        let bad = MINIMAL.replace("port = 5433", "port = 5433\nread_only_alias = \"appdb\"");
        let err = Config::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("read_only_alias"), "{err}");
    }

    #[test]
    fn console_users_must_exist_and_set_validates() {
        let text = MINIMAL.replace("[users.app]", "admin_users = [\"app\"]\n[users.app]");
        let config = Config::parse(&text).unwrap();
        assert_eq!(config.pgmux.admin_users, vec!["app".to_string()]);
        let bad = MINIMAL.replace("[users.app]", "stats_users = [\"ghost\"]\n[users.app]");
        let err = Config::parse(&bad).unwrap_err().to_string();
        assert!(
            err.contains("pgmux.stats_users") && err.contains("ghost"),
            "{err}"
        );

        let changed = config.with_setting("default_pool_size", "7").unwrap();
        assert_eq!(changed.pgmux.default_pool_size, 7);
        let changed = config.with_setting("query_timeout", "'2s'").unwrap();
        assert_eq!(changed.pgmux.query_timeout, Duration::from_secs(2));
        assert!(config.with_setting("default_pool_size", "0").is_err());
        assert!(config.with_setting("listen", "1.2.3.4:5").is_err());
        let shown = format!("{:?}", config.general_settings());
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn overrides_resolve_per_pool() {
        let text = MINIMAL.replace("port = 5433", "port = 5433\npool_size = 3");
        let config = Config::parse(&text).unwrap();
        let settings = config.pool_settings(&config.databases["appdb"], &config.users["app"]);
        assert_eq!(settings.size, 3);
    }
}
