//! pgmux: a PostgreSQL connection pooler.
//!
//! A connection's path through the code: [`listen`] accepts it, [`client`] negotiates,
//! authenticates ([`auth`]) and runs the session, [`pool`] lends it a [`server`]
//! connection, and [`relay`] moves the bytes until the transaction ends.

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod buffers;
pub mod cancel;
pub mod client;
pub mod config;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod interrupt;
pub mod metrics;
pub mod params;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod random;
pub mod relay;
pub mod routing;
pub mod server;
pub mod sql;
pub mod tls;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use auth::Credentials;
use config::Config;
use error::{Error, Result};
use pool::Pool;

/// The database name reserved for pgmux's own console.
pub const ADMIN_DATABASE: &str = "pgmux";

/// Everything the connection tasks share.
pub struct App {
    /// The configuration in force and what is derived from it, replaced as a whole by a
    /// reload. Sessions read it at login and at each server attach, never per message.
    shared: RwLock<Arc<Shared>>,
    /// The file RELOAD and SIGHUP read again.
    config_path: Mutex<Option<PathBuf>>,
    /// One reload at a time, so two cannot interleave their pool updates.
    reloading: tokio::sync::Mutex<()>,
    pools: Mutex<HashMap<(String, String), Arc<Pools>>>,
    cancels: Arc<cancel::Registry>,
    clients: Arc<AtomicUsize>,
    /// Every logged-in client, console sessions included, by the id SHOW CLIENTS shows.
    sessions: Mutex<BTreeMap<u64, Arc<ClientInfo>>>,
    next_client_id: AtomicU64,
    /// Databases under PAUSE: pools created for them start paused too.
    paused: Mutex<HashSet<String>>,
    /// Cancelled when pgmux starts shutting down, by [`App::begin_shutdown`] only.
    pub shutdown: CancellationToken,
    /// TLS towards clients, unless `client_tls_mode = "disable"`. A reload loads the
    /// certificates again; handshakes already under way keep the material they began
    /// with.
    tls: RwLock<Option<Arc<tls::Acceptor>>>,
}

/// A configuration and what pgmux derives from it.
pub struct Shared {
    pub config: Arc<Config>,
    users: HashMap<String, Credentials>,
    /// One `max_db_connections` budget per database, shared by its users' pools.
    db_limits: HashMap<String, Arc<pool::DbLimit>>,
    /// The same budget for each replica of a database, in `replicas` order.
    replica_limits: HashMap<String, Vec<Arc<pool::DbLimit>>>,
    /// Read routing of each database that has replicas.
    routers: HashMap<String, Arc<routing::Router>>,
    /// `read_only_alias` names, to the database they stand for.
    aliases: HashMap<String, String>,
    /// TLS towards servers, unless `server_tls_mode = "disable"`; loaded at start and
    /// carried over by reloads.
    server_tls: Option<Arc<tls::Connector>>,
}

/// The pools of one (database, user) pair: the primary's, and one per replica.
pub struct Pools {
    pub primary: Arc<Pool>,
    pub replicas: Vec<Arc<Pool>>,
    pub router: Option<Arc<routing::Router>>,
}

impl Pools {
    pub fn all(&self) -> impl Iterator<Item = &Arc<Pool>> {
        std::iter::once(&self.primary).chain(&self.replicas)
    }
}

/// A client's place under `max_client_conn`, given back on drop.
pub struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a client is doing, for SHOW CLIENTS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    /// Between transactions, holding no server.
    Idle = 0,
    /// Queued for a server.
    Waiting = 1,
    /// Holding a server.
    Active = 2,
}

/// One logged-in client, as the console sees it.
pub struct ClientInfo {
    pub id: u64,
    pub addr: SocketAddr,
    pub database: String,
    pub user: String,
    pub application_name: String,
    pub connected_at: SystemTime,
    /// A console session rather than a pooled one.
    pub console: bool,
    state: AtomicU8,
    /// Microseconds since the Unix epoch of the last state change.
    since: AtomicU64,
    /// The attached server's id, 0 for none.
    server: AtomicU64,
    /// Raised by KILL and KILL_CLIENT, and by shutdown.
    pub interrupt: interrupt::Interrupt,
}

impl ClientInfo {
    /// Records a state change that happened `at` (a time the caller read anyway, so the
    /// clock is not read again per change).
    pub fn set_state(&self, state: ClientState, server: u64, at: Instant) {
        self.state.store(state as u8, Ordering::Relaxed);
        self.server.store(server, Ordering::Relaxed);
        self.since.store(anchor_micros(at), Ordering::Relaxed);
    }

    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    /// When the state last changed.
    pub fn since(&self) -> SystemTime {
        wall_time(*ANCHOR + Duration::from_micros(self.since.load(Ordering::Relaxed)))
    }

    pub fn server(&self) -> u64 {
        self.server.load(Ordering::Relaxed)
    }
}

/// The origin of the times kept as plain numbers: monotonic, so a state change costs one
/// clock read, and turned into wall-clock time only when the console shows it.
static ANCHOR: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

fn anchor_micros(at: Instant) -> u64 {
    at.saturating_duration_since(*ANCHOR).as_micros() as u64
}

/// The wall-clock time of a monotonic instant, for display.
pub(crate) fn wall_time(at: Instant) -> SystemTime {
    let (now, wall) = (Instant::now(), SystemTime::now());
    match now.checked_duration_since(at) {
        Some(ago) => wall - ago,
        None => wall + at.duration_since(now),
    }
}

pub(crate) fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Takes a client out of the console's list when it goes away.
pub struct Registration {
    app: Arc<App>,
    pub info: Arc<ClientInfo>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.app
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.info.id);
    }
}

impl Shared {
    /// Derives everything from `config`, reusing from `prev` what did not change: SCRAM
    /// secrets (expensive to compute), database budgets, and routers (with their probes
    /// and lag history).
    fn build(
        config: Config,
        prev: Option<&Shared>,
        server_tls: Option<Arc<tls::Connector>>,
    ) -> Shared {
        let users = config
            .users
            .iter()
            .map(|(name, user)| {
                let creds = prev
                    .and_then(|p| p.users.get(name))
                    .filter(|c| c.password == user.password)
                    .cloned()
                    .unwrap_or_else(|| Credentials::new(&user.password));
                (name.clone(), creds)
            })
            .collect();
        let db_limits = config
            .databases
            .iter()
            .map(|(name, db)| {
                let max = config.max_db_connections(db);
                let limit = match prev.and_then(|p| p.db_limits.get(name)) {
                    Some(limit) => {
                        limit.set_max(max);
                        Arc::clone(limit)
                    }
                    None => pool::DbLimit::new(max),
                };
                (name.clone(), limit)
            })
            .collect();
        let replica_limits = config
            .databases
            .iter()
            .map(|(name, db)| {
                let max = config.max_db_connections(db);
                let same_replicas = prev.is_some_and(|p| {
                    p.config
                        .databases
                        .get(name)
                        .is_some_and(|old| old.replicas == db.replicas)
                });
                let limits = match prev.and_then(|p| p.replica_limits.get(name)) {
                    Some(old) if same_replicas => old
                        .iter()
                        .map(|l| {
                            l.set_max(max);
                            Arc::clone(l)
                        })
                        .collect(),
                    _ => db
                        .replicas
                        .iter()
                        .map(|_| pool::DbLimit::new(max))
                        .collect(),
                };
                (name.clone(), limits)
            })
            .collect();
        let routers = config
            .databases
            .iter()
            .filter(|(_, db)| !db.replicas.is_empty())
            .map(|(name, db)| {
                let user = db
                    .lag_check_user
                    .clone()
                    .or_else(|| config.users.keys().next().cloned())
                    .expect("validated: routing needs a user");
                let password = config.users[&user].password.clone();
                if let Some(router) = prev.and_then(|p| {
                    let old_db = p.config.databases.get(name)?;
                    let old_user = old_db
                        .lag_check_user
                        .clone()
                        .or_else(|| p.config.users.keys().next().cloned())?;
                    let unchanged = same_routing(old_db, db)
                        && old_user == user
                        && p.config.users.get(&old_user)?.password == password;
                    unchanged.then(|| p.routers.get(name).cloned()).flatten()
                }) {
                    return (name.clone(), router);
                }
                let target = |host: &str, port: u16| server::Target {
                    host: host.to_string(),
                    port,
                    dbname: db.server_dbname(name).to_string(),
                    user: user.clone(),
                    password: password.clone(),
                    tls: server_tls.clone(),
                };
                let replicas = db
                    .replicas
                    .iter()
                    .map(|r| {
                        let (host, port) = config::split_host_port(r).expect("validated");
                        target(&host, port)
                    })
                    .collect();
                let router = routing::Router::start(
                    name,
                    routing::RoutingSettings::from_config(db),
                    target(&db.host, db.port),
                    replicas,
                );
                (name.clone(), router)
            })
            .collect();
        let aliases = config
            .databases
            .iter()
            .filter_map(|(name, db)| Some((db.read_only_alias.clone()?, name.clone())))
            .collect();
        Shared {
            config: Arc::new(config),
            users,
            db_limits,
            replica_limits,
            routers,
            aliases,
            server_tls,
        }
    }

    /// The server a pool of `user` on database `name` logs in to: the primary, or the
    /// replica at `replica` ("host:port").
    fn target(&self, name: &str, user: &str, replica: Option<&str>) -> Option<server::Target> {
        let db = self.config.databases.get(name)?;
        let password = self.config.users.get(user)?.password.clone();
        let (host, port) = match replica {
            Some(addr) => config::split_host_port(addr)?,
            None => (db.host.clone(), db.port),
        };
        Some(server::Target {
            host,
            port,
            dbname: db.server_dbname(name).to_string(),
            user: user.to_string(),
            password,
            tls: self.server_tls.clone(),
        })
    }

    /// The database a client's database name stands for, and whether the name is a
    /// `read_only_alias`.
    pub fn resolve_database(&self, name: &str) -> (String, bool) {
        match self.aliases.get(name) {
            Some(database) => (database.clone(), true),
            None => (name.to_string(), false),
        }
    }

    pub fn credentials(&self, user: &str) -> Option<&Credentials> {
        self.users.get(user)
    }
}

/// Whether a database's router (its probes and their targets) can stay as it is. Pool
/// sizes, modes and the alias name do not matter to it: changing those keeps the pools.
fn same_routing(a: &config::Database, b: &config::Database) -> bool {
    a.host == b.host
        && a.port == b.port
        && a.dbname == b.dbname
        && a.replicas == b.replicas
        && a.max_replica_lag == b.max_replica_lag
        && a.max_replica_lag_bytes == b.max_replica_lag_bytes
        && a.lag_check_interval == b.lag_check_interval
        && a.read_your_writes == b.read_your_writes
        && a.replica_fallback == b.replica_fallback
        && a.route_autocommit_selects == b.route_autocommit_selects
        && a.lag_check_user == b.lag_check_user
}

/// What a successful reload changed, for the console and the log.
#[derive(Debug, Default)]
pub struct ReloadSummary {
    pub pools_updated: usize,
    pub pools_retired: usize,
    /// Settings in the file that need a restart and were left as they were.
    pub ignored: Vec<&'static str>,
}

impl App {
    /// Fails if the TLS certificates or keys cannot be loaded.
    pub fn new(config: Config) -> Result<Arc<App>, config::ConfigError> {
        std::sync::LazyLock::force(&ANCHOR);
        let tls = RwLock::new(tls::acceptor(&config)?.map(Arc::new));
        let server_tls = tls::connector(&config)?;
        Ok(Arc::new(App {
            shared: RwLock::new(Arc::new(Shared::build(config, None, server_tls))),
            config_path: Mutex::new(None),
            reloading: tokio::sync::Mutex::new(()),
            pools: Mutex::new(HashMap::new()),
            cancels: Arc::new(cancel::Registry::default()),
            clients: Arc::new(AtomicUsize::new(0)),
            sessions: Mutex::new(BTreeMap::new()),
            next_client_id: AtomicU64::new(1),
            paused: Mutex::new(HashSet::new()),
            shutdown: CancellationToken::new(),
            tls,
        }))
    }

    /// The TLS acceptor for new client connections, if client TLS is on.
    pub fn tls(&self) -> Option<Arc<tls::Acceptor>> {
        self.tls.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The configuration in force and what derives from it.
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.shared().config)
    }

    /// Sets the file that RELOAD and SIGHUP read.
    pub fn set_config_path(&self, path: impl Into<PathBuf>) {
        *self.config_path.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.into());
    }

    /// Reads the config file again and applies it; on any error the running
    /// configuration stays as it is. The error text says why.
    pub async fn reload(&self) -> std::result::Result<ReloadSummary, String> {
        let path = self
            .config_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let result = match path {
            None => Err("pgmux was started without a configuration file".to_string()),
            Some(path) => Config::load(&path).map_err(|e| format!("{}: {e}", path.display())),
        };
        match result {
            Ok(config) => self.apply_config(config).await,
            Err(e) => {
                crate::metrics::config_reload(false);
                error!(error = %e, "configuration reload rejected; the old configuration stays in force");
                Err(e)
            }
        }
    }

    /// Replaces the configuration. Pools of (database, user) pairs that remain take the
    /// new sizes, timeouts and targets in place, without dropping a client; pairs that
    /// are gone, or whose replicas or routing changed, are retired: their clients keep
    /// them until they disconnect, and new clients get new pools.
    pub async fn apply_config(&self, config: Config) -> std::result::Result<ReloadSummary, String> {
        let _one = self.reloading.lock().await;
        let prev = self.shared();
        let mut config = config;
        let mut summary = ReloadSummary::default();
        // The listeners are bound once; keeping the old addresses keeps SHOW CONFIG true.
        if config.pgmux.listen != prev.config.pgmux.listen {
            config.pgmux.listen = prev.config.pgmux.listen;
            summary.ignored.push("listen");
        }
        if config.pgmux.metrics_listen != prev.config.pgmux.metrics_listen {
            config.pgmux.metrics_listen = prev.config.pgmux.metrics_listen;
            summary.ignored.push("metrics_listen");
        }
        if config.pgmux.worker_threads != prev.config.pgmux.worker_threads {
            config.pgmux.worker_threads = prev.config.pgmux.worker_threads;
            summary.ignored.push("worker_threads");
        }
        // Certificates and keys are read again on every reload, so that renewed files
        // take effect for new handshakes; a file that cannot be loaded fails the whole
        // reload. Server-side TLS is rebuilt only when its settings changed: a new
        // connector retires every server connection (once released) to reconnect.
        let acceptor = tls::acceptor(&config).map_err(|e| e.to_string())?;
        let server_tls = {
            let (new, old) = (&config.pgmux, &prev.config.pgmux);
            let same = new.server_tls_mode == old.server_tls_mode
                && new.server_tls_ca == old.server_tls_ca
                && new.server_tls_cert == old.server_tls_cert
                && new.server_tls_key == old.server_tls_key;
            if same {
                prev.server_tls.clone()
            } else {
                tls::connector(&config).map_err(|e| e.to_string())?
            }
        };
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = acceptor.map(Arc::new);
        let next = Arc::new(Shared::build(config, Some(&prev), server_tls));
        *self.shared.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&next);
        let mut retired = Vec::new();
        {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.retain(|(database, user), set| {
                let (Some(db), Some(user_config)) = (
                    next.config.databases.get(database),
                    next.config.users.get(user),
                ) else {
                    retired.push(Arc::clone(set));
                    return false;
                };
                let same_router = match (&set.router, next.routers.get(database)) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                };
                let same_limit = Arc::ptr_eq(set.primary.limit(), &next.db_limits[database]);
                if !same_router || !same_limit {
                    retired.push(Arc::clone(set));
                    return false;
                }
                let settings = next.config.pool_settings(db, user_config);
                for pool in set.all() {
                    pool.update_settings(settings.clone());
                    if let Some(target) = next.target(database, user, pool.replica.as_deref()) {
                        pool.set_target(target);
                    }
                }
                summary.pools_updated += 1;
                true
            });
        }
        summary.pools_retired = retired.len();
        for set in retired {
            for pool in set.all() {
                pool.reconnect();
            }
        }
        crate::metrics::config_reload(true);
        if !summary.ignored.is_empty() {
            warn!(keys = ?summary.ignored, "these settings only change with a restart; kept as they were");
        }
        info!(
            pools_updated = summary.pools_updated,
            pools_retired = summary.pools_retired,
            "configuration reloaded"
        );
        Ok(summary)
    }

    /// Counts a client in, unless `max_client_conn` are connected already.
    fn admit(&self, max: usize) -> Option<Admission> {
        self.clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Admission(Arc::clone(&self.clients)))
    }

    /// Connected clients.
    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }

    /// Adds a logged-in client to the console's list.
    pub fn register(
        self: &Arc<Self>,
        addr: SocketAddr,
        database: &str,
        user: &str,
        application_name: &str,
        console: bool,
    ) -> Registration {
        let info = Arc::new(ClientInfo {
            id: self.next_client_id.fetch_add(1, Ordering::Relaxed),
            addr,
            database: database.to_string(),
            user: user.to_string(),
            application_name: application_name.to_string(),
            connected_at: SystemTime::now(),
            console,
            state: AtomicU8::new(ClientState::Idle as u8),
            since: AtomicU64::new(anchor_micros(Instant::now())),
            server: AtomicU64::new(0),
            interrupt: interrupt::Interrupt::default(),
        });
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(info.id, Arc::clone(&info));
        // After the insert: a shutdown that began before it did not see this client.
        if self.shutdown.is_cancelled() {
            info.interrupt.raise(interrupt::SHUTDOWN);
        }
        Registration {
            app: Arc::clone(self),
            info,
        }
    }

    /// Records a PAUSE or RESUME of one database, or of all (`None`).
    pub fn set_paused(&self, database: Option<&str>, paused: bool) {
        let mut set = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        let names: Vec<String> = match database {
            Some(db) => vec![db.to_string()],
            None => self.config().databases.keys().cloned().collect(),
        };
        for name in names {
            if paused {
                set.insert(name);
            } else {
                set.remove(&name);
            }
        }
    }

    pub fn paused_databases(&self) -> HashSet<String> {
        self.paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops accepting clients and tells every client to leave once it holds no server
    /// (console sessions at once).
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for client in sessions.values() {
            client.interrupt.raise(interrupt::SHUTDOWN);
        }
    }

    /// Every logged-in client, by id.
    pub fn sessions(&self) -> Vec<Arc<ClientInfo>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Every pool set, by (database, user).
    pub fn all_pools(&self) -> Vec<((String, String), Arc<Pools>)> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = pools
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The read router of a database, if it has replicas.
    pub fn router(&self, database: &str) -> Option<Arc<routing::Router>> {
        self.shared().routers.get(database).cloned()
    }

    /// The pools for a (database, user) pair, created on first use.
    fn pool(&self, shared: &Shared, database: &str, user: &str) -> Result<Arc<Pools>> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let key = (database.to_string(), user.to_string());
        if let Some(pool) = pools.get(&key) {
            return Ok(Arc::clone(pool));
        }
        // A reload may have swapped the configuration since `shared` was read; build
        // from the newest, which the pool map is kept in step with.
        let current = self.shared();
        let shared = if Arc::ptr_eq(&current.config, &shared.config) {
            shared
        } else {
            &current
        };
        let db = shared
            .config
            .databases
            .get(database)
            .ok_or_else(|| Error::UnknownDatabase(database.to_string()))?;
        let user_config = shared.config.users.get(user).ok_or_else(|| Error::Auth {
            user: user.to_string(),
            reason: "unknown user",
        })?;
        let settings = shared.config.pool_settings(db, user_config);
        let statements = Arc::new(prepared::Registry::default());
        let primary = Pool::new(
            database,
            user,
            None,
            shared.target(database, user, None).expect("checked above"),
            settings.clone(),
            Arc::clone(&shared.db_limits[database]),
            Arc::clone(&statements),
        );
        let replicas = db
            .replicas
            .iter()
            .zip(&shared.replica_limits[database])
            .map(|(addr, limit)| {
                Pool::new(
                    database,
                    user,
                    Some(addr),
                    shared
                        .target(database, user, Some(addr))
                        .expect("validated"),
                    settings.clone(),
                    Arc::clone(limit),
                    Arc::clone(&statements),
                )
            })
            .collect();
        let set = Arc::new(Pools {
            primary,
            replicas,
            router: shared.routers.get(database).cloned(),
        });
        if self.paused_databases().contains(database) {
            set.all().for_each(|p| p.pause());
        }
        pools.insert(key, Arc::clone(&set));
        Ok(set)
    }

    /// Servers open to a database across all its pools.
    pub fn db_server_count(&self, database: &str) -> usize {
        self.shared()
            .db_limits
            .get(database)
            .map_or(0, |l| l.open())
    }

    /// The prepared-statement registry (and its counters) of one pool, if it exists.
    pub fn prepared_stats(&self, database: &str, user: &str) -> Option<Arc<prepared::Registry>> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .get(&(database.to_string(), user.to_string()))
            .map(|p| Arc::clone(&p.primary.statements))
    }

    /// Counts of one pool, if it exists.
    pub fn pool_snapshot(&self, database: &str, user: &str) -> Option<pool::PoolSnapshot> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .get(&(database.to_string(), user.to_string()))
            .map(|p| p.primary.snapshot())
    }

    /// Counts of the pool of replica `i` of a pair, if it exists.
    pub fn replica_snapshot(
        &self,
        database: &str,
        user: &str,
        i: usize,
    ) -> Option<pool::PoolSnapshot> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .get(&(database.to_string(), user.to_string()))
            .and_then(|p| p.replicas.get(i).map(|r| r.snapshot()))
    }
}

/// A running pgmux instance.
pub struct Running {
    /// The address clients connect to (useful when `listen` asked for port 0).
    pub addr: SocketAddr,
    pub app: Arc<App>,
    accept: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, ends idle clients, and waits up to `timeout` for the others.
    pub async fn shutdown(self, timeout: Duration) {
        self.app.begin_shutdown();
        let _ = self.accept.await;
        let deadline = tokio::time::Instant::now() + timeout;
        while self.app.client_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Binds the client listener and starts serving. Must run inside a tokio runtime.
pub async fn start(config: Config) -> std::io::Result<Running> {
    let listener = TcpListener::bind(config.pgmux.listen).await?;
    let addr = listener.local_addr()?;
    let app = App::new(config)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let accept = tokio::spawn(listen(listener, Arc::clone(&app)));
    info!(listen = %addr, "pgmux is accepting clients");
    Ok(Running { addr, app, accept })
}

/// Accepts clients until shutdown, one task each.
async fn listen(listener: TcpListener, app: Arc<App>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = app.shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, addr)) => {
                tokio::spawn(client::handle(Arc::clone(&app), stream, addr));
            }
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection task that panics while holding the pools lock poisons it; the
    /// other connections must go on (tokio keeps the panic inside the task, and every
    /// lock is taken with `unwrap_or_else(|e| e.into_inner())`).
    #[tokio::test]
    async fn a_poisoned_pools_lock_does_not_stop_other_clients() {
        let config =
            Config::parse("[pgmux]\n[users.app]\npassword = \"x\"\n[databases.db]\nport = 1\n")
                .unwrap();
        let app = App::new(config).unwrap();
        let other = Arc::clone(&app);
        let panicked = tokio::spawn(async move {
            let _held = other.pools.lock().unwrap();
            panic!("a bug in one connection task");
        })
        .await;
        assert!(panicked.unwrap_err().is_panic());
        assert!(app.pools.is_poisoned());
        assert!(app.pool(&app.shared(), "db", "app").is_ok());
        assert!(app.pool_snapshot("db", "app").is_some());
    }
}
