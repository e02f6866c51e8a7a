//! Read-only transactions on streaming replicas, chosen by measured lag.
//!
//! Each database with `replicas` gets one [`Router`]. Its probe tasks read the primary's
//! WAL insert position and every replica's replay position on connections of their own, every
//! `lag_check_interval` ([`lag`] says how lag follows from those). A replica is eligible
//! for reads while its last probe succeeded recently, it is still in recovery, and its
//! lag is within `max_replica_lag` (and `max_replica_lag_bytes`, if set). A probe that
//! fails or is late makes it ineligible until one succeeds again.
//!
//! Routing reads only atomics that the probes keep up to date, so it costs no lock and
//! no round trip. Read-your-writes needs no extra round trip either: a commit that had
//! completed before a primary sample was sent is covered by that sample's position, so a
//! client's next read may go to a replica only once a sample taken after its last
//! primary transaction shows a position that the replica has replayed.

pub mod classify;
pub mod lag;
pub mod request;
pub mod select;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, Counter, Gauge};
use tracing::{info, warn};

use crate::config::{Database, ReplicaFallback};
use crate::server::{Server, Target};
use lag::{parse_lsn, Samples};

/// `u64::MAX` in an atomic timestamp: never, or not behind.
const NEVER: u64 = u64::MAX;

/// How a database routes reads, from its config table.
#[derive(Debug, Clone)]
pub struct RoutingSettings {
    pub max_lag: Duration,
    pub max_lag_bytes: Option<u64>,
    pub interval: Duration,
    pub read_your_writes: bool,
    pub fallback: ReplicaFallback,
    pub autocommit_selects: bool,
}

impl RoutingSettings {
    pub fn from_config(db: &Database) -> RoutingSettings {
        RoutingSettings {
            max_lag: db.max_replica_lag,
            max_lag_bytes: db.max_replica_lag_bytes,
            interval: db.lag_check_interval,
            read_your_writes: db.read_your_writes,
            fallback: db.replica_fallback,
            autocommit_selects: db.route_autocommit_selects,
        }
    }

    /// A probe older than this no longer vouches for a replica.
    fn stale_after(&self) -> Duration {
        (self.interval * 3).max(Duration::from_millis(300))
    }

    /// Longest a single probe (connect or query) may take.
    fn probe_timeout(&self) -> Duration {
        self.interval.max(Duration::from_secs(1))
    }
}

/// What the probes last learnt about one replica.
pub struct Replica {
    pub addr: String,
    /// Microseconds since [`Router::base`] at which the last probe succeeded.
    last_ok: AtomicU64,
    replay_lsn: AtomicU64,
    /// Since when it has been behind the primary (microseconds since base), or NEVER.
    behind_since: AtomicU64,
    lag_bytes: AtomicU64,
    in_recovery: AtomicBool,
    /// Whether it was eligible at the last probe; for the log line on changes.
    in_rotation: AtomicBool,
    lag_seconds_gauge: Gauge,
    lag_bytes_gauge: Gauge,
    eligible_gauge: Gauge,
}

/// Why a read went to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// No replica is eligible (lagging, down, or not yet probed).
    NoneEligible,
    /// Eligible replicas exist, but none has replayed the client's last transaction yet.
    ReadYourWrites,
    /// An autocommit SELECT that a replica refused as a write (25006), run again.
    Retried,
}

impl Fallback {
    fn label(self) -> &'static str {
        match self {
            Fallback::NoneEligible => "no_replica_eligible",
            Fallback::ReadYourWrites => "read_your_writes",
            Fallback::Retried => "read_only_error",
        }
    }
}

/// A replica's state as seen at one moment.
#[derive(Debug, Clone)]
pub struct ReplicaView {
    pub addr: String,
    pub eligible: bool,
    pub lag: Option<Duration>,
    pub lag_bytes: u64,
    pub replay_lsn: u64,
    pub reason: &'static str,
}

/// Read routing for one database.
pub struct Router {
    pub database: String,
    pub settings: RoutingSettings,
    base: Instant,
    /// When the last primary sample was taken (microseconds since base), or NEVER.
    primary_ok: AtomicU64,
    samples: Mutex<Samples>,
    pub replicas: Vec<Replica>,
    to_primary: Counter,
    to_replica: Counter,
    fallback_none: Counter,
    fallback_ryw: Counter,
    fallback_retried: Counter,
}

impl Router {
    /// Creates the router and starts its probes. `primary` and `replicas` say where to
    /// log in, as the lag-check user.
    pub fn start(
        database: &str,
        settings: RoutingSettings,
        primary: Target,
        replicas: Vec<Target>,
    ) -> Arc<Router> {
        let window = (settings.max_lag * 4).max(Duration::from_secs(10));
        let labels = |addr: &str| {
            [
                ("database", database.to_string()),
                ("replica", addr.to_string()),
            ]
        };
        let transactions = |target: &'static str| counter!("pgmux_routed_transactions_total", "database" => database.to_string(), "target" => target);
        let fallbacks = |reason: &'static str| counter!("pgmux_replica_fallbacks_total", "database" => database.to_string(), "reason" => reason);
        let router = Arc::new(Router {
            database: database.to_string(),
            base: Instant::now(),
            primary_ok: AtomicU64::new(NEVER),
            samples: Mutex::new(Samples::new(window)),
            replicas: replicas
                .iter()
                .map(|t| {
                    let addr = t.addr();
                    Replica {
                        lag_seconds_gauge: gauge!("pgmux_replica_lag_seconds", &labels(&addr)),
                        lag_bytes_gauge: gauge!("pgmux_replica_lag_bytes", &labels(&addr)),
                        eligible_gauge: gauge!("pgmux_replica_eligible", &labels(&addr)),
                        addr,
                        last_ok: AtomicU64::new(NEVER),
                        replay_lsn: AtomicU64::new(0),
                        behind_since: AtomicU64::new(NEVER),
                        lag_bytes: AtomicU64::new(0),
                        in_recovery: AtomicBool::new(false),
                        in_rotation: AtomicBool::new(false),
                    }
                })
                .collect(),
            to_primary: transactions("primary"),
            to_replica: transactions("replica"),
            fallback_none: fallbacks(Fallback::NoneEligible.label()),
            fallback_ryw: fallbacks(Fallback::ReadYourWrites.label()),
            fallback_retried: fallbacks(Fallback::Retried.label()),
            settings,
        });
        tokio::spawn(probe_primary(Arc::downgrade(&router), primary));
        for (i, target) in replicas.into_iter().enumerate() {
            tokio::spawn(probe_replica(Arc::downgrade(&router), i, target));
        }
        router
    }

    fn micros(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_micros() as u64
    }

    fn instant(&self, micros: u64) -> Instant {
        self.base + Duration::from_micros(micros)
    }

    fn samples(&self) -> std::sync::MutexGuard<'_, Samples> {
        self.samples.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state of replica `i` at `now`.
    pub fn view(&self, i: usize, now: Instant) -> ReplicaView {
        let r = &self.replicas[i];
        let s = &self.settings;
        let last_ok = r.last_ok.load(Ordering::Acquire);
        let primary_ok = self.primary_ok.load(Ordering::Acquire);
        let behind = r.behind_since.load(Ordering::Acquire);
        let lag = (last_ok != NEVER).then(|| match behind {
            NEVER => Duration::ZERO,
            since => now.saturating_duration_since(self.instant(since)),
        });
        let lag_bytes = r.lag_bytes.load(Ordering::Acquire);
        let fresh = |t: u64| {
            t != NEVER && now.saturating_duration_since(self.instant(t)) <= s.stale_after()
        };
        let reason = if !fresh(last_ok) {
            "replica probe failed or late"
        } else if !fresh(primary_ok) {
            "primary probe failed or late"
        } else if !r.in_recovery.load(Ordering::Acquire) {
            "not in recovery"
        } else if lag.is_some_and(|l| l > s.max_lag) {
            "lag above max_replica_lag"
        } else if s.max_lag_bytes.is_some_and(|max| lag_bytes > max) {
            "lag above max_replica_lag_bytes"
        } else {
            ""
        };
        ReplicaView {
            addr: r.addr.clone(),
            eligible: reason.is_empty(),
            lag,
            lag_bytes,
            replay_lsn: r.replay_lsn.load(Ordering::Acquire),
            reason,
        }
    }

    fn eligible(&self, i: usize, now: Instant) -> Option<Duration> {
        let view = self.view(i, now);
        view.eligible.then(|| view.lag.unwrap_or_default())
    }

    /// The replica a read-only transaction should use: among eligible ones that have
    /// replayed `min_lsn` (if given), the one with the fewest servers in use (`active`),
    /// ties going to the lower lag.
    pub fn pick(
        &self,
        min_lsn: Option<u64>,
        active: impl Fn(usize) -> usize,
    ) -> Result<usize, Fallback> {
        let now = Instant::now();
        let mut best: Option<(usize, usize, Duration)> = None;
        let mut any_eligible = false;
        for i in 0..self.replicas.len() {
            let Some(lag) = self.eligible(i, now) else {
                continue;
            };
            any_eligible = true;
            let replayed = self.replicas[i].replay_lsn.load(Ordering::Acquire);
            if min_lsn.is_some_and(|min| replayed < min) {
                continue;
            }
            let load = active(i);
            if best.is_none_or(|(_, l, d)| (load, lag) < (l, d)) {
                best = Some((i, load, lag));
            }
        }
        match best {
            Some((i, _, _)) => Ok(i),
            None if any_eligible => Err(Fallback::ReadYourWrites),
            None => Err(Fallback::NoneEligible),
        }
    }

    /// The primary position that covers every commit completed by `t`, once a sample
    /// taken after `t` exists.
    pub fn position_after(&self, t: Instant) -> Option<u64> {
        self.samples().position_after(t)
    }

    /// Counts a transaction by where it ran, and a read's fallback by its reason.
    pub fn count(&self, replica: bool, fallback: Option<Fallback>) {
        if replica {
            self.to_replica.increment(1);
        } else {
            self.to_primary.increment(1);
        }
        match fallback {
            Some(Fallback::NoneEligible) => self.fallback_none.increment(1),
            Some(Fallback::ReadYourWrites) => self.fallback_ryw.increment(1),
            Some(Fallback::Retried) => self.fallback_retried.increment(1),
            None => {}
        }
    }

    /// Logs a replica entering or leaving rotation, and updates its gauges.
    fn after_probe(&self, i: usize) {
        let now = Instant::now();
        let view = self.view(i, now);
        let r = &self.replicas[i];
        r.lag_seconds_gauge
            .set(view.lag.map_or(f64::NAN, |l| l.as_secs_f64()));
        r.lag_bytes_gauge.set(view.lag_bytes as f64);
        r.eligible_gauge.set(if view.eligible { 1.0 } else { 0.0 });
        let was = r.in_rotation.swap(view.eligible, Ordering::AcqRel);
        if was && !view.eligible {
            warn!(database = %self.database, replica = %r.addr, reason = view.reason, lag = ?view.lag, lag_bytes = view.lag_bytes, "replica left read rotation");
        } else if !was && view.eligible {
            info!(database = %self.database, replica = %r.addr, lag = ?view.lag, "replica joined read rotation");
        }
    }
}

/// A probe connection, reopened after any failure.
struct Probe {
    target: Target,
    server: Option<Server>,
    timeout: Duration,
}

impl Probe {
    /// A probe of `target` and the timer it runs on (every `lag_check_interval`), unless
    /// the router is already gone.
    fn new(router: &Weak<Router>, target: Target) -> Option<(Probe, tokio::time::Interval)> {
        let settings = router.upgrade()?.settings.clone();
        let mut tick = tokio::time::interval(settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let probe = Probe {
            target,
            server: None,
            timeout: settings.probe_timeout(),
        };
        Some((probe, tick))
    }

    async fn row(&mut self, sql: &str) -> Option<Vec<Option<String>>> {
        let work = async {
            if self.server.is_none() {
                let server = Server::connect(&self.target, 0, self.timeout).await.ok()?;
                self.server = Some(server);
            }
            self.server.as_mut()?.query_row(sql).await.ok()
        };
        let row = tokio::time::timeout(self.timeout, work)
            .await
            .ok()
            .flatten();
        if row.is_none() || self.server.as_ref().is_some_and(|s| s.broken) {
            self.server = None;
        }
        row
    }
}

async fn probe_primary(router: Weak<Router>, target: Target) {
    let Some((mut probe, mut tick)) = Probe::new(&router, target) else {
        return;
    };
    loop {
        tick.tick().await;
        let sent = Instant::now();
        // The insert position, not the write position: with synchronous_commit = off a
        // commit returns before its WAL is written, and read-your-writes must still
        // cover it.
        let row = probe.row("SELECT pg_current_wal_insert_lsn()").await;
        let Some(router) = router.upgrade() else {
            return;
        };
        let lsn = row
            .as_ref()
            .and_then(|r| r.first()?.as_deref().and_then(parse_lsn));
        match lsn {
            Some(lsn) => {
                router.samples().push(sent, lsn);
                router
                    .primary_ok
                    .store(router.micros(sent), Ordering::Release);
            }
            None => warn!(database = %router.database, "lag probe of the primary failed"),
        }
    }
}

async fn probe_replica(router: Weak<Router>, i: usize, target: Target) {
    let Some((mut probe, mut tick)) = Probe::new(&router, target) else {
        return;
    };
    loop {
        tick.tick().await;
        let sent = Instant::now();
        let row = probe
            .row("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()")
            .await;
        let Some(router) = router.upgrade() else {
            return;
        };
        let r = &router.replicas[i];
        let parsed = row.as_ref().and_then(|row| {
            let in_recovery = row.first()?.as_deref()? == "t";
            let replay = row.get(1)?.as_deref().and_then(parse_lsn);
            Some((in_recovery, replay))
        });
        match parsed {
            Some((in_recovery, replay)) => {
                // A promoted server reports no replay position; it is no replica now.
                let replay = replay.unwrap_or(0);
                let (behind, bytes) = {
                    let samples = router.samples();
                    let behind = samples.behind_since(replay);
                    let bytes = samples.latest().map_or(0, |p| p.saturating_sub(replay));
                    (behind, bytes)
                };
                r.in_recovery.store(in_recovery, Ordering::Release);
                r.replay_lsn.store(replay, Ordering::Release);
                r.lag_bytes.store(bytes, Ordering::Release);
                let behind = behind.map_or(NEVER, |t| router.micros(t));
                r.behind_since.store(behind, Ordering::Release);
                r.last_ok.store(router.micros(sent), Ordering::Release);
            }
            None => r.last_ok.store(NEVER, Ordering::Release),
        }
        router.after_probe(i);
    }
}
