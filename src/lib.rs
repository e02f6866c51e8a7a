//! pgmux: a PostgreSQL connection pooler.
//!
//! A connection's path through the code: [`listen`] accepts it, [`client`] negotiates,
//! authenticates ([`auth`]) and runs the session, [`pool`] lends it a [`server`]
//! connection, and [`relay`] moves the bytes until the transaction ends.

#![forbid(unsafe_code)]

pub mod auth;
pub mod cancel;
pub mod client;
pub mod config;
pub mod error;
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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use auth::Credentials;
use config::Config;
use error::{Error, Result};
use pool::Pool;

/// The database name reserved for pgmux's own console.
pub const ADMIN_DATABASE: &str = "pgmux";

/// Everything the connection tasks share.
pub struct App {
    pub config: Config,
    users: HashMap<String, Credentials>,
    pools: Mutex<HashMap<(String, String), Arc<Pools>>>,
    /// One `max_db_connections` budget per database, shared by its users' pools.
    db_limits: HashMap<String, Arc<pool::DbLimit>>,
    /// The same budget for each replica of a database, in `replicas` order.
    replica_limits: HashMap<String, Vec<Arc<pool::DbLimit>>>,
    /// Read routing of each database that has replicas.
    routers: HashMap<String, Arc<routing::Router>>,
    /// `read_only_alias` names, to the database they stand for.
    aliases: HashMap<String, String>,
    cancels: Arc<cancel::Registry>,
    clients: Arc<AtomicUsize>,
    /// Cancelled when pgmux starts shutting down.
    pub shutdown: CancellationToken,
    /// TLS towards clients, unless `client_tls_mode = "disable"`.
    pub tls: Option<tls::Acceptor>,
    /// TLS towards servers, unless `server_tls_mode = "disable"`.
    server_tls: Option<Arc<tls::Connector>>,
}

/// The pools of one (database, user) pair: the primary's, and one per replica.
pub struct Pools {
    pub primary: Arc<Pool>,
    pub replicas: Vec<Arc<Pool>>,
    pub router: Option<Arc<routing::Router>>,
}

/// A client's place under `max_client_conn`, given back on drop.
pub struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl App {
    /// Fails if the TLS certificates or keys cannot be loaded.
    pub fn new(config: Config) -> Result<Arc<App>, config::ConfigError> {
        let tls = tls::acceptor(&config)?;
        let server_tls = tls::connector(&config)?;
        Ok(App::with_tls(config, tls, server_tls))
    }

    fn with_tls(
        config: Config,
        tls: Option<tls::Acceptor>,
        server_tls: Option<Arc<tls::Connector>>,
    ) -> Arc<App> {
        let users = config
            .users
            .iter()
            .map(|(name, user)| (name.clone(), Credentials::new(&user.password)))
            .collect();
        let db_limits = config
            .databases
            .iter()
            .map(|(name, db)| {
                let limit = pool::DbLimit::new(config.max_db_connections(db));
                (name.clone(), limit)
            })
            .collect();
        let replica_limits = config
            .databases
            .iter()
            .map(|(name, db)| {
                let max = config.max_db_connections(db);
                let limits = db
                    .replicas
                    .iter()
                    .map(|_| pool::DbLimit::new(max))
                    .collect();
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
        Arc::new(App {
            config,
            users,
            pools: Mutex::new(HashMap::new()),
            db_limits,
            replica_limits,
            routers,
            aliases,
            cancels: Arc::new(cancel::Registry::default()),
            clients: Arc::new(AtomicUsize::new(0)),
            shutdown: CancellationToken::new(),
            tls,
            server_tls,
        })
    }

    /// Counts a client in, unless `max_client_conn` are connected already.
    fn admit(&self) -> Option<Admission> {
        let max = self.config.pgmux.max_client_conn;
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

    /// The database a client's database name stands for, and whether the name is a
    /// `read_only_alias`.
    pub fn resolve_database<'a>(&'a self, name: &'a str) -> (&'a str, bool) {
        match self.aliases.get(name) {
            Some(database) => (database, true),
            None => (name, false),
        }
    }

    /// The read router of a database, if it has replicas.
    pub fn router(&self, database: &str) -> Option<&Arc<routing::Router>> {
        self.routers.get(database)
    }

    /// The pools for a (database, user) pair, created on first use.
    fn pool(&self, database: &str, user: &str) -> Result<Arc<Pools>> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let key = (database.to_string(), user.to_string());
        if let Some(pool) = pools.get(&key) {
            return Ok(Arc::clone(pool));
        }
        let db = self
            .config
            .databases
            .get(database)
            .ok_or_else(|| Error::UnknownDatabase(database.to_string()))?;
        let user_config = self.config.users.get(user).ok_or_else(|| Error::Auth {
            user: user.to_string(),
            reason: "unknown user",
        })?;
        let target = |host: &str, port: u16| server::Target {
            host: host.to_string(),
            port,
            dbname: db.server_dbname(database).to_string(),
            user: user.to_string(),
            password: user_config.password.clone(),
            tls: self.server_tls.clone(),
        };
        let settings = self.config.pool_settings(db, user_config);
        let statements = Arc::new(prepared::Registry::default());
        let primary = Pool::new(
            database,
            user,
            None,
            target(&db.host, db.port),
            settings.clone(),
            Arc::clone(&self.db_limits[database]),
            Arc::clone(&statements),
        );
        let replicas = db
            .replicas
            .iter()
            .zip(&self.replica_limits[database])
            .map(|(addr, limit)| {
                let (host, port) = config::split_host_port(addr).expect("validated");
                Pool::new(
                    database,
                    user,
                    Some(addr),
                    target(&host, port),
                    settings.clone(),
                    Arc::clone(limit),
                    Arc::clone(&statements),
                )
            })
            .collect();
        let set = Arc::new(Pools {
            primary,
            replicas,
            router: self.routers.get(database).cloned(),
        });
        pools.insert(key, Arc::clone(&set));
        Ok(set)
    }

    /// Servers open to a database across all its pools.
    pub fn db_server_count(&self, database: &str) -> usize {
        self.db_limits.get(database).map_or(0, |l| l.open())
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
        self.app.shutdown.cancel();
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
        assert!(app.pool("db", "app").is_ok());
        assert!(app.pool_snapshot("db", "app").is_some());
    }
}
