//! Test harness that starts real PostgreSQL 15 servers for pgmux's integration tests.
//!
//! Only `std` is used, so the harness adds no dev-dependencies and builds quickly.
//!
//! What the harness takes care of:
//! * Running as root. PostgreSQL refuses to run as root. When the effective uid is 0,
//!   every PostgreSQL binary runs as the `postgres` user via `runuser`, in directories
//!   owned by that user.
//! * Ports. Ports come from 20000..30000 and never 5432. That range is below the
//!   kernel's ephemeral range (32768+), so outgoing connections cannot take our ports
//!   between the free-port check and the server start. If a port is still taken, the
//!   start is retried with a different one.
//! * Cleanup. Rust never drops statics, so the cluster from [`shared`] would outlive
//!   the test process. Every cluster therefore gets a small detached `sh` watchdog.
//!   It polls the test process and stops and removes the cluster once that process
//!   has gone, whether it exited normally, panicked or was killed.
#![allow(dead_code)] // each integration-test binary uses a different subset of this module

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// Directory of the PostgreSQL 15 binaries on the test machines (Debian/Ubuntu layout).
const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// Seconds that `pg_ctl` may wait for a start or stop. Generous, because CI machines
/// with 2 cores can be slow while cargo is compiling in parallel.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Upper bound for every readiness or replication wait in this module.
const WAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Number of different ports tried before `pg_ctl start` gives up because each port was taken.
const START_ATTEMPTS: usize = 8;

/// Unix socket paths are limited to 107 bytes. The socket `.s.PGSQL.NNNNN` lives in
/// the data directory, so the directory path must stay well below that limit.
const MAX_DIR_PATH_LEN: usize = 80;

/// Counter for data-directory names, so that parallel tests in one process never clash.
static DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Counter for port picks. Together with the pid it spreads the ports of concurrent
/// test processes and of parallel tests in one process.
static PORT_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The pg_hba methods that a test may choose for non-replication TCP connections.
const AUTH_METHODS: [&str; 4] = ["trust", "scram-sha-256", "md5", "password"];

/// One PostgreSQL server (primary or streaming replica) started by this harness.
///
/// A `Cluster` by itself does not stop its server when dropped. Cleanup belongs to
/// [`TestClusters`] (its `Drop`) and to the per-cluster watchdog process. This way a
/// `Cluster` can be borrowed from the never-dropped [`shared`] instance.
#[derive(Debug)]
pub struct Cluster {
    /// Data directory. It also holds the unix socket and the server log, so one
    /// `rm -rf` removes everything the server created.
    data_dir: PathBuf,
    /// TCP port on 127.0.0.1. It is fixed once the server has started, so `stop()`
    /// followed by `start()` keeps the port that pgmux configs already point to.
    port: u16,
    /// True for a streaming replica made with `pg_basebackup -R`.
    replica: bool,
}

/// Settings for [`TestClusters::start`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// pg_hba method for non-replication TCP connections from 127.0.0.1: `"trust"`,
    /// `"scram-sha-256"`, `"md5"` or `"password"`. With `"md5"`, `password_encryption`
    /// is also set to `md5`, so that roles created later store md5 hashes and the md5
    /// handshake is used. Otherwise `password_encryption` is `scram-sha-256`. A line in
    /// `extra_conf` can override this, because extra lines are appended last.
    pub auth: &'static str,
    /// Also create a streaming replica (hot standby) of the primary.
    pub with_replica: bool,
    /// Extra `postgresql.conf` lines, appended after the harness defaults. The replica
    /// gets them too, because `pg_basebackup` copies the primary's configuration.
    pub extra_conf: Vec<String>,
}

impl Default for ClusterOptions {
    /// SCRAM is PostgreSQL 15's default and what production deployments use, so it
    /// is the default here. No replica, because a replica roughly doubles start-up time.
    fn default() -> Self {
        ClusterOptions {
            auth: "scram-sha-256",
            with_replica: false,
            extra_conf: Vec::new(),
        }
    }
}

/// A primary and, optionally, its streaming replica.
///
/// Dropping this stops both servers (immediate mode) and removes their directories.
/// The watchdogs cover the instances that are never dropped, such as [`shared`].
#[derive(Debug)]
pub struct TestClusters {
    pub primary: Cluster,
    pub replica: Option<Cluster>,
}

impl TestClusters {
    /// Starts a fresh primary (and a replica if `opts.with_replica`) and waits until
    /// they accept connections. A replica is also in recovery and streaming before this
    /// returns. Panics with the server log on failure, because a test cannot continue
    /// without its servers.
    pub fn start(opts: ClusterOptions) -> TestClusters {
        assert!(
            AUTH_METHODS.contains(&opts.auth),
            "unsupported auth method {:?}, expected one of {:?}",
            opts.auth,
            AUTH_METHODS
        );
        let t0 = Instant::now();
        let primary = start_primary(&opts);
        let t_primary = t0.elapsed();
        let replica = if opts.with_replica {
            Some(start_replica(&primary))
        } else {
            None
        };
        eprintln!(
            "[pgmux test cluster] primary on port {} ({:?}){} in {:?} total",
            primary.port,
            t_primary,
            replica
                .as_ref()
                .map(|r| format!(", replica on port {}", r.port))
                .unwrap_or_default(),
            t0.elapsed()
        );
        TestClusters { primary, replica }
    }

    /// Blocks until the replica has replayed all WAL that the primary had written when
    /// this was called. Tests call this so that data they just wrote on the primary is
    /// visible on the replica. Does nothing without a replica. Panics after a bounded wait.
    pub fn wait_replica_caught_up(&self) {
        let Some(replica) = &self.replica else { return };
        let lsn = self.primary.psql("SELECT pg_current_wal_insert_lsn()");
        let sql = format!("SELECT coalesce(pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn, false)");
        wait_until(
            &format!("replica on port {} to replay up to {lsn}", replica.port),
            || {
                replica
                    .try_psql("postgres", &sql)
                    .map(|o| o == "t")
                    .unwrap_or(false)
            },
        );
    }
}

impl Drop for TestClusters {
    /// Best effort and never panics, because a panic in drop during unwinding would
    /// abort the process. The replica goes first so that it does not log reconnect
    /// attempts to a primary that has gone.
    fn drop(&mut self) {
        if let Some(replica) = &self.replica {
            replica.destroy();
        }
        self.primary.destroy();
    }
}

impl Cluster {
    /// TCP port on 127.0.0.1 where the server listens (and where pgmux should connect).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Data directory. It also holds the unix socket and `server.log`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// True if this cluster is a streaming replica (hot standby).
    pub fn is_replica(&self) -> bool {
        self.replica
    }

    /// Server log file (`pg_ctl -l`). Look here when a test fails.
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join("server.log")
    }

    /// Runs SQL with psql as superuser `postgres` in database `postgres`, over the
    /// unix socket in the data dir. That socket always uses `trust`, whatever the TCP
    /// auth method is, so no password is needed. Flags: `-X -A -t -q -v ON_ERROR_STOP=1`.
    /// The SQL goes in on stdin, so several statements (including `CREATE DATABASE`,
    /// which cannot run in a multi-statement `-c` string) can be passed at once.
    /// Returns the trimmed stdout (rows separated by newlines, columns by `|`).
    /// Panics with psql's stderr on any error.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    /// Same as [`Cluster::psql`], but connects to database `db`.
    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        match self.try_psql(db, sql) {
            Ok(out) => out,
            Err(e) => panic!(
                "psql on port {} db {db} failed: {e}\n--- SQL ---\n{sql}",
                self.port
            ),
        }
    }

    /// Non-panicking psql, used by the polling loops where errors (for example "the
    /// database system is starting up") are expected for a while.
    fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut cmd = pg_command("psql");
        cmd.arg("-X")
            .arg("-A")
            .arg("-t")
            .arg("-q")
            .args(["-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", db, "-f", "-"]);
        let out = run_with_stdin(cmd, sql)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "{} (stdout: {})",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ))
        }
    }

    /// Stops the server with `pg_ctl stop -m fast` and waits for it to exit. Tests use
    /// this to simulate a backend outage. The data directory is kept, so
    /// [`Cluster::start`] can bring the server back.
    pub fn stop(&self) {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("stop").arg("-D").arg(&self.data_dir).args([
            "-m",
            "fast",
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
        ]);
        let out = run(cmd).unwrap_or_else(|e| panic!("pg_ctl stop: {e}"));
        if !out.status.success() {
            panic!(
                "pg_ctl stop of port {} failed: {}\n{}",
                self.port,
                describe(&out),
                self.log_tail()
            );
        }
    }

    /// Starts a stopped server again on the same port and waits until it accepts
    /// connections. A replica resumes streaming from its primary by itself.
    pub fn start(&self) {
        if let Err(e) = pg_ctl_start(&self.data_dir) {
            panic!("restarting server on port {} failed: {e}", self.port);
        }
        self.wait_ready();
    }

    /// Appends one line to `postgresql.conf`. Later lines override earlier ones, so
    /// this changes a setting. It takes effect after [`Cluster::reload`] (or after
    /// `stop()` + `start()` for settings that need a restart).
    pub fn append_conf(&self, line: &str) {
        append_to(&self.data_dir.join("postgresql.conf"), &format!("{line}\n"));
    }

    /// Makes the server re-read its configuration files (`pg_ctl reload`, i.e. SIGHUP).
    /// The reload finishes asynchronously, shortly after this returns.
    pub fn reload(&self) {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("reload").arg("-D").arg(&self.data_dir);
        let out = run(cmd).unwrap_or_else(|e| panic!("pg_ctl reload: {e}"));
        if !out.status.success() {
            panic!(
                "pg_ctl reload of port {} failed: {}",
                self.port,
                describe(&out)
            );
        }
    }

    /// Waits until the server accepts TCP connections (`pg_isready`) and answers a
    /// query over its socket. A replica must also report `pg_is_in_recovery()`, so
    /// that the caller gets a hot standby and not an accidentally promoted copy.
    fn wait_ready(&self) {
        let port = self.port.to_string();
        wait_until(
            &format!("server on port {port} to accept connections"),
            || {
                let mut cmd = pg_command("pg_isready");
                cmd.args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-t",
                    "2",
                ]);
                matches!(run(cmd), Ok(out) if out.status.success())
                    && self.try_psql("postgres", "SELECT 1").is_ok()
            },
        );
        if self.replica {
            wait_until(&format!("replica on port {port} to be in recovery"), || {
                self.try_psql("postgres", "SELECT pg_is_in_recovery()")
                    .as_deref()
                    == Ok("t")
            });
        }
    }

    /// Last part of the server log, added to panic messages so that a failing start
    /// explains itself in the test output.
    fn log_tail(&self) -> String {
        log_tail(&self.log_path())
    }

    /// Immediate shutdown and removal of the data dir. Best effort and never panics
    /// (used from `Drop`).
    fn destroy(&self) {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "-t", "10"]);
        let _ = run(cmd);
        let _ = fs::remove_dir_all(&self.data_dir);
    }
}

/// Returns the cluster shared by all tests in one test binary. It is started on first
/// use and stopped by the watchdogs when the process exits. Starting PostgreSQL takes
/// seconds, so most tests reuse this one instead of starting their own.
///
/// Layout:
/// * a primary and a streaming replica
/// * pg_hba `md5` for TCP. PostgreSQL's `md5` method runs SCRAM for roles whose stored
///   password is a SCRAM hash and MD5 for roles with an md5 hash, so one server covers
///   both handshakes. `password_encryption` stays `scram-sha-256`.
/// * role `app` / `app-secret` (SCRAM hash), role `app_md5` / `md5-secret` (md5 hash),
///   role `app_plain` / `plain-secret` (SCRAM hash), all LOGIN
/// * database `appdb` owned by `app`, containing `public.items(id serial primary key,
///   v text)` owned by `app`
///
/// All of this has been replayed on the replica before this function returns.
/// Tests should create their own uniquely named objects rather than changing these.
/// If start-up fails, every later call panics with the same message instead of
/// trying to start again, so one broken environment does not cost every test another
/// full start-up.
pub fn shared() -> &'static TestClusters {
    static SHARED: OnceLock<Result<TestClusters, String>> = OnceLock::new();
    let result = SHARED.get_or_init(|| {
        std::panic::catch_unwind(start_shared).map_err(|payload| {
            payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string())
        })
    });
    match result {
        Ok(clusters) => clusters,
        Err(msg) => panic!("shared test cluster failed to start: {msg}"),
    }
}

/// Builds the [`shared`] clusters. Kept apart so that `shared` can catch its panic.
fn start_shared() -> TestClusters {
    let clusters = TestClusters::start(ClusterOptions {
        auth: "md5",
        with_replica: true,
        // "md5" would otherwise switch password_encryption to md5. SCRAM must stay the
        // default, and only app_md5 gets an md5 hash (by a session-level SET below).
        extra_conf: vec!["password_encryption = 'scram-sha-256'".to_string()],
    });
    let primary = &clusters.primary;
    primary.psql(
        "CREATE ROLE app LOGIN PASSWORD 'app-secret';\n\
         SET password_encryption = 'md5';\n\
         CREATE ROLE app_md5 LOGIN PASSWORD 'md5-secret';\n\
         SET password_encryption = 'scram-sha-256';\n\
         CREATE ROLE app_plain LOGIN PASSWORD 'plain-secret';\n\
         CREATE DATABASE appdb OWNER app;",
    );
    // Created as app, so the table and its serial sequence are owned by app.
    // PostgreSQL 15's public schema belongs to the database owner, so app may create here.
    primary.psql_db(
        "appdb",
        "SET ROLE app;\nCREATE TABLE public.items(id serial PRIMARY KEY, v text);",
    );
    let hashes = primary.psql(
        "SELECT rolname || '=' || CASE WHEN rolpassword LIKE 'md5%' THEN 'md5' \
         ELSE split_part(rolpassword, '$', 1) END FROM pg_authid \
         WHERE rolname IN ('app', 'app_md5', 'app_plain') ORDER BY rolname",
    );
    assert_eq!(
        hashes, "app=SCRAM-SHA-256\napp_md5=md5\napp_plain=SCRAM-SHA-256",
        "unexpected password hash kinds"
    );
    let replica = clusters
        .replica
        .as_ref()
        .expect("shared cluster has a replica");
    wait_until("replica to replay database appdb", || {
        replica
            .try_psql(
                "postgres",
                "SELECT count(*) FROM pg_database WHERE datname = 'appdb'",
            )
            .map(|o| o == "1")
            .unwrap_or(false)
    });
    clusters.wait_replica_caught_up();
    clusters
}

/// Path of a PostgreSQL client or server binary (`pgbench`, `psql`, ...). Uses
/// `/usr/lib/postgresql/15/bin/<name>`, because on Debian `/usr/bin` has only wrapper
/// scripts for some tools and this pins the major version. Falls back to a `PATH`
/// lookup for other layouts. If neither has it, returns the bare name, so that
/// spawning fails with a "not found" error that names the program.
pub fn pg_bin(name: &str) -> PathBuf {
    let pinned = Path::new(PG_BIN_DIR).join(name);
    if pinned.is_file() {
        return pinned;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(name)
}

// ---------------------------------------------------------------------------
// internals
// ---------------------------------------------------------------------------

/// Creates the primary's data dir, runs initdb, writes config and pg_hba, and starts it.
fn start_primary(opts: &ClusterOptions) -> Cluster {
    let dir = new_cluster_dir();
    let mut cmd = pg_command("initdb");
    cmd.arg("-D")
        .arg(&dir)
        // -N: no fsync. -A trust: initdb's own default; pg_hba.conf is replaced below anyway.
        .args(["-N", "-A", "trust", "-U", "postgres", "--no-instructions"])
        // Fixed locale and encoding, so results do not depend on the host's LANG.
        .args(["--locale=C", "-E", "UTF8"]);
    let out = run(cmd).unwrap_or_else(|e| panic!("initdb: {e}"));
    if !out.status.success() {
        panic!("initdb -D {} failed: {}", dir.display(), describe(&out));
    }

    let password_encryption = if opts.auth == "md5" {
        "md5"
    } else {
        "scram-sha-256"
    };
    let mut conf = String::from("\n# --- pgmux test harness ---\n");
    for line in [
        "listen_addresses = '127.0.0.1'".to_string(),
        format!("unix_socket_directories = '{}'", conf_quote(&dir)),
        // Durability is pointless for throwaway test data and costs a lot of time.
        "fsync = off".to_string(),
        "synchronous_commit = off".to_string(),
        "full_page_writes = off".to_string(),
        // Pool tests open many server connections at once.
        "max_connections = 300".to_string(),
        "wal_level = replica".to_string(),
        "max_wal_senders = 5".to_string(),
        "hot_standby = on".to_string(),
        "hot_standby_feedback = on".to_string(),
        // Keep WAL around, so that a replica a test has stopped (to create lag) can
        // catch up again without a replication slot.
        "wal_keep_size = '128MB'".to_string(),
        "shared_buffers = 64MB".to_string(),
        // Output goes to the pg_ctl -l file. No collector process and no log/ subdirectory.
        "logging_collector = off".to_string(),
        format!("password_encryption = '{password_encryption}'"),
    ] {
        conf.push_str(&line);
        conf.push('\n');
    }
    for line in &opts.extra_conf {
        conf.push_str(line);
        conf.push('\n');
    }
    append_to(&dir.join("postgresql.conf"), &conf);

    // Replaces initdb's file completely, because its `host all all 127.0.0.1/32 trust`
    // line would match first and make every auth test pass vacuously.
    let hba = format!(
        "# pgmux test harness\n\
         local all all trust\n\
         host replication all 127.0.0.1/32 trust\n\
         host all all 127.0.0.1/32 {}\n",
        opts.auth
    );
    write_existing(&dir.join("pg_hba.conf"), &hba);

    start_on_free_port(dir, false)
}

/// Clones the primary with `pg_basebackup -R` (which writes `standby.signal` and
/// `primary_conninfo`), points it at its own port and socket dir, and starts it.
fn start_replica(primary: &Cluster) -> Cluster {
    let dir = new_cluster_dir();
    let mut cmd = pg_command("pg_basebackup");
    cmd.args(["-h", "127.0.0.1", "-p"])
        .arg(primary.port.to_string())
        .args(["-U", "postgres", "-D"])
        .arg(&dir)
        .args(["-c", "fast", "-R", "-X", "stream"]);
    let out = run(cmd).unwrap_or_else(|e| panic!("pg_basebackup: {e}"));
    if !out.status.success() {
        panic!(
            "pg_basebackup from port {} failed: {}\n{}",
            primary.port,
            describe(&out),
            primary.log_tail()
        );
    }
    // pg_basebackup copies the primary's server.log too. Remove it, so the replica's
    // log has only its own messages.
    let _ = fs::remove_file(dir.join("server.log"));
    // It also copies the primary's socket lock file (`.s.PGSQL.<port>.lock`), which
    // would be a stale lock in the replica's socket dir.
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".s.PGSQL.") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    // The copied postgresql.conf still names the primary's socket dir. These lines
    // come later, so they win.
    append_to(
        &dir.join("postgresql.conf"),
        &format!(
            "\n# --- pgmux test harness: replica ---\nunix_socket_directories = '{}'\n",
            conf_quote(&dir)
        ),
    );
    let replica = start_on_free_port(dir, true);
    // Serving read-only queries is not enough: pgmux measures lag from the WAL
    // receiver, so wait until streaming has really started.
    wait_until(
        &format!(
            "replica on port {} to stream from the primary",
            replica.port
        ),
        || {
            replica
                .try_psql("postgres", "SELECT status FROM pg_stat_wal_receiver")
                .map(|s| s == "streaming")
                .unwrap_or(false)
        },
    );
    replica
}

/// Picks a free port, writes it to `postgresql.conf`, and starts the server. If
/// another process takes the port between the check and the start, tries again
/// with another port. The watchdog is spawned before the first start attempt, so
/// even a half-started server is cleaned up when the process exits.
fn start_on_free_port(dir: PathBuf, replica: bool) -> Cluster {
    spawn_watchdog(&dir);
    let log = dir.join("server.log");
    let mut last_err = String::new();
    for _ in 0..START_ATTEMPTS {
        let port = pick_free_port();
        append_to(&dir.join("postgresql.conf"), &format!("port = {port}\n"));
        match pg_ctl_start(&dir) {
            Ok(()) => {
                let cluster = Cluster {
                    data_dir: dir,
                    port,
                    replica,
                };
                cluster.wait_ready();
                return cluster;
            }
            Err(e) => {
                let log_text = fs::read_to_string(&log).unwrap_or_default();
                let port_taken = log_text.contains("could not bind")
                    || log_text.contains("Address already in use")
                    || log_text.contains("could not create any TCP/IP sockets");
                if !port_taken {
                    panic!("starting server in {} failed: {e}", dir.display());
                }
                last_err = e;
                // Start the next attempt with an empty log, so that the old bind error
                // does not look like a new one.
                let _ = fs::write(&log, "");
            }
        }
    }
    panic!(
        "could not start server in {} after {START_ATTEMPTS} port attempts: {last_err}",
        dir.display()
    );
}

/// `pg_ctl start -w` with the log in the data dir. Returns the error with the log
/// tail, so that the caller can decide whether to retry.
fn pg_ctl_start(dir: &Path) -> Result<(), String> {
    let log = dir.join("server.log");
    let mut cmd = pg_command("pg_ctl");
    cmd.arg("start")
        .arg("-D")
        .arg(dir)
        .arg("-l")
        .arg(&log)
        .args(["-w", "-t", PG_CTL_TIMEOUT_SECS]);
    let out = run(cmd)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "pg_ctl start failed: {}\n{}",
            describe(&out),
            log_tail(&log)
        ))
    }
}

/// Chooses a port in 20000..30000 from the pid and a process-wide counter, so that
/// concurrent test processes and parallel tests usually get different ports without
/// any coordination. Each candidate is checked by binding it on 127.0.0.1. The
/// listener is dropped right away, so a race with another process remains possible.
/// [`start_on_free_port`] handles that race by retrying.
fn pick_free_port() -> u16 {
    let pid = std::process::id() as u64;
    for _ in 0..1000 {
        let n = PORT_COUNTER.fetch_add(1, Ordering::Relaxed);
        // 37 is coprime to 10000, so one process walks through all 10000 ports before
        // it repeats one.
        let port = 20000 + ((pid.wrapping_mul(7919) + n.wrapping_mul(37)) % 10000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port found in 20000..30000");
}

/// Creates an empty data dir `<tmp>/pgmux-test-<pid>-<n>` owned by the user that
/// will run PostgreSQL, with mode 0700 (PostgreSQL refuses looser permissions).
fn new_cluster_dir() -> PathBuf {
    let n = DIR_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("pgmux-test-{}-{n}", std::process::id());
    let mut base = std::env::temp_dir();
    // A long TMPDIR would make the unix socket path too long for PostgreSQL.
    if base.join(&name).as_os_str().len() > MAX_DIR_PATH_LEN {
        base = PathBuf::from("/tmp");
    }
    let dir = base.join(name);
    // Only matters if a pid got reused after an earlier run that was SIGKILLed together
    // with its watchdog.
    if dir.exists() {
        let _ = fs::remove_dir_all(&dir);
    }
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
    if is_root() {
        make_traversable(&base);
        let status = Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(&dir)
            .status()
            .unwrap_or_else(|e| panic!("running chown: {e}"));
        assert!(status.success(), "chown postgres {} failed", dir.display());
    }
    dir
}

/// Adds the search (x) bit for group and others to `dir` and all its ancestors, so
/// that the `postgres` user can reach a data dir under, for example, a TMPDIR inside
/// /root. Directories that are already traversable (such as /tmp) are left alone.
fn make_traversable(dir: &Path) {
    for d in dir.ancestors() {
        if let Ok(meta) = fs::metadata(d) {
            let mode = meta.permissions().mode();
            if mode & 0o011 != 0o011 {
                let _ = fs::set_permissions(d, fs::Permissions::from_mode((mode | 0o011) & 0o7777));
            }
        }
    }
}

/// Starts the detached watchdog for one cluster. It is a `sh` loop that exits once
/// the test process has gone, then stops the server (immediate mode) and deletes its
/// directory. This is the only cleanup for the [`shared`] clusters, because statics
/// are never dropped. It runs in its own process group and ignores SIGINT/SIGHUP, so
/// a Ctrl-C on `cargo test` kills the tests but not the cleanup.
#[allow(clippy::zombie_processes)] // never waited for on purpose, see above
fn spawn_watchdog(dir: &Path) {
    let pid = std::process::id();
    let pg_ctl = sh_quote(&pg_bin("pg_ctl"));
    let stop = if is_root() {
        format!("runuser -u postgres -- {pg_ctl}")
    } else {
        pg_ctl
    };
    let qdir = sh_quote(dir);
    let script = format!(
        "trap '' INT HUP\n\
         while kill -0 {pid} 2>/dev/null; do sleep 1; done\n\
         cd /\n\
         if [ -f {qdir}/postmaster.pid ]; then {stop} stop -D {qdir} -m immediate -w -t 10; fi\n\
         rm -rf {qdir}\n"
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .current_dir("/")
        // Must not inherit the test's stdout/stderr. A test runner that waits for EOF
        // on those pipes would otherwise hang until the watchdog exits.
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    // The Child handle is dropped without a wait: the watchdog must outlive this process.
    cmd.spawn()
        .unwrap_or_else(|e| panic!("spawning cluster watchdog: {e}"));
}

/// True when the effective uid is 0. Read from `/proc/self/status` (`Uid:` lists
/// real, effective, saved and fs uid), with `id -u` as fallback, so no libc is needed.
fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        if let Ok(status) = fs::read_to_string("/proc/self/status") {
            if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
                if let Some(euid) = line.split_whitespace().nth(2) {
                    return euid == "0";
                }
            }
        }
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

/// Command for a PostgreSQL binary. Under root it runs as `postgres` via `runuser`.
/// The working directory is `/`, because initdb and pg_ctl complain if the postgres
/// user cannot access the current directory. `PG*` environment variables are cleared,
/// so that a developer's PGOPTIONS/PGSERVICE/... cannot change the harness's
/// connections, and LC_ALL=C keeps messages in English for the error checks above.
fn pg_command(name: &str) -> Command {
    let bin = pg_bin(name);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.current_dir("/");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd.env("LC_ALL", "C");
    cmd
}

/// Runs a command to completion and captures its output. Err only if it could not be spawned.
fn run(mut cmd: Command) -> Result<Output, String> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|e| format!("spawning {:?}: {e}", cmd.get_program()))
}

/// Like [`run`], but feeds `input` to stdin. A separate writer thread avoids a
/// deadlock when the child fills its stdout pipe before it has read all of stdin.
fn run_with_stdin(mut cmd: Command, input: &str) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning {:?}: {e}", cmd.get_program()))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_string();
    let writer = thread::spawn(move || {
        // A write error (EPIPE after psql exited early) shows up in the exit status.
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {:?}: {e}", cmd.get_program()))?;
    let _ = writer.join();
    Ok(out)
}

/// Polls `check` until it returns true, every 100 ms for at most [`WAIT_TIMEOUT`]
/// (and at most 1000 polls, should each check return immediately). Panics naming
/// `what`, so that a hung test fails with a clear message instead of hanging.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    for _ in 0..1000 {
        if check() {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {WAIT_TIMEOUT:?} waiting for {what}");
}

/// Appends text to an existing file without changing its owner (important under
/// root: the file must stay readable and writable by `postgres`).
fn append_to(path: &Path, text: &str) {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for append: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

/// Overwrites an existing file in place (truncate + write), which keeps its owner
/// and mode, unlike creating a new file as root.
fn write_existing(path: &Path, text: &str) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for write: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Last ~40 lines of a log file, for panic messages.
fn log_tail(path: &Path) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(40);
            format!(
                "--- {} (tail) ---\n{}",
                path.display(),
                lines[start..].join("\n")
            )
        }
        Err(e) => format!("(no log at {}: {e})", path.display()),
    }
}

/// Exit status plus stdout/stderr of a finished command, for panic messages.
fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// Quotes a path for a single-quoted postgresql.conf value (`'` is doubled).
fn conf_quote(path: &Path) -> String {
    path.display().to_string().replace('\'', "''")
}

/// Quotes a path as one `sh` word.
fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}
