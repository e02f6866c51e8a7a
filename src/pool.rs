//! A pool of server connections for one (database, user) pair.
//!
//! The pool never holds more than `size` connections, counting those being opened.
//! Clients that find none free wait in a FIFO queue; a released server goes straight to
//! the longest waiter, so nobody is overtaken. Idle servers are kept as a stack: the most
//! recently used one is handed out first, which leaves the rest idle long enough for
//! `server_idle_timeout` to retire them when load drops.

use std::collections::{BTreeMap, VecDeque};
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, info, warn};

use crate::config::PoolSettings;
use crate::error::{Error, Result};
use crate::interrupt::{self, Interrupt};
use crate::metrics::PoolMetrics;
use crate::params::ParamSet;
use crate::server::{Server, Target};

/// A server as the pool hands it around: boxed, so that a checkout, a hand-over to a
/// waiter and a release move a pointer instead of the whole connection state.
pub type Pooled = Box<Server>;

/// ParameterStatus name/value pairs as a server sent them at login.
pub type Reported = Arc<Vec<(String, String)>>;

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// How often the console's `avg_*` figures are recomputed, as in PgBouncer.
pub const STATS_PERIOD: Duration = Duration::from_secs(15);

/// Totals of one pool since it was created, in plain atomics: the relay bumps them per
/// ReadyForQuery, and the console reads them without going through the metrics crate.
#[derive(Default)]
pub struct PoolStats {
    pub transactions: AtomicU64,
    pub queries: AtomicU64,
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub transaction_us: AtomicU64,
    pub query_us: AtomicU64,
    pub wait_us: AtomicU64,
    /// Checkouts, the number of waits `wait_us` adds up.
    pub waits: AtomicU64,
    period: Mutex<Period>,
}

/// Plain copies of [`PoolStats`] totals.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub transactions: u64,
    pub queries: u64,
    pub received: u64,
    pub sent: u64,
    pub transaction_us: u64,
    pub query_us: u64,
    pub wait_us: u64,
    pub waits: u64,
}

/// Rates and mean durations over the last complete stats period.
#[derive(Debug, Clone, Copy, Default)]
pub struct Averages {
    pub transactions_per_s: u64,
    pub queries_per_s: u64,
    pub received_per_s: u64,
    pub sent_per_s: u64,
    pub transaction_us: u64,
    pub query_us: u64,
    pub wait_us: u64,
}

#[derive(Default)]
struct Period {
    start: Option<(Instant, Totals)>,
    last: Averages,
}

impl PoolStats {
    pub fn totals(&self) -> Totals {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            transactions: l(&self.transactions),
            queries: l(&self.queries),
            received: l(&self.received),
            sent: l(&self.sent),
            transaction_us: l(&self.transaction_us),
            query_us: l(&self.query_us),
            wait_us: l(&self.wait_us),
            waits: l(&self.waits),
        }
    }

    pub fn averages(&self) -> Averages {
        self.period.lock().unwrap_or_else(|e| e.into_inner()).last
    }

    /// Closes the stats period once it has lasted [`STATS_PERIOD`]; run by upkeep.
    fn roll_period(&self) {
        let now = Instant::now();
        let totals = self.totals();
        let mut p = self.period.lock().unwrap_or_else(|e| e.into_inner());
        let Some((start, before)) = p.start else {
            p.start = Some((now, totals));
            return;
        };
        let secs = now.duration_since(start).as_secs_f64();
        if secs < STATS_PERIOD.as_secs_f64() {
            return;
        }
        let rate = |a: u64, b: u64| (a.saturating_sub(b) as f64 / secs) as u64;
        let mean = |sum: u64, sum0: u64, n: u64, n0: u64| {
            sum.saturating_sub(sum0)
                .checked_div(n.saturating_sub(n0))
                .unwrap_or(0)
        };
        p.last = Averages {
            transactions_per_s: rate(totals.transactions, before.transactions),
            queries_per_s: rate(totals.queries, before.queries),
            received_per_s: rate(totals.received, before.received),
            sent_per_s: rate(totals.sent, before.sent),
            transaction_us: mean(
                totals.transaction_us,
                before.transaction_us,
                totals.transactions,
                before.transactions,
            ),
            query_us: mean(
                totals.query_us,
                before.query_us,
                totals.queries,
                before.queries,
            ),
            wait_us: mean(totals.wait_us, before.wait_us, totals.waits, before.waits),
        };
        p.start = Some((now, totals));
    }
}

/// What the console shows about one server connection.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub id: u64,
    pub pid: i32,
    pub connected_at: SystemTime,
    /// When it last changed between idle and in use.
    pub since: Instant,
    pub active: bool,
    /// Protocol-level prepared statements pgmux holds on it, as of its last release.
    pub prepared: usize,
}

/// A pool of servers for one (database, user).
pub struct Pool {
    pub database: String,
    pub user: String,
    /// Where servers are opened; a reload may change it, which retires older servers.
    target: Mutex<Target>,
    /// Bumped by RECONNECT and by target changes: servers of an older generation are
    /// closed instead of being reused.
    generation: AtomicU64,
    pub replica: Option<String>,
    state: Mutex<State>,
    /// Shared by every pool of the same database: `max_db_connections`.
    limit: Arc<DbLimit>,
    /// Clients of this pool waiting while the pool is below its own size, that is, held
    /// back only by the database-wide limit. Read by the other pools of the database.
    starved: AtomicUsize,
    pub metrics: PoolMetrics,
    pub stats: PoolStats,
    /// Tells clients queued behind a PAUSE that it is over.
    resumed: tokio::sync::Notify,
    /// Tells the waiter-expiry task that the front of the queue (or the timeout) may
    /// have changed, or that the pool is gone.
    queue_changed: Arc<tokio::sync::Notify>,
    /// The distinct prepared statements of this pool's clients.
    pub statements: Arc<crate::prepared::Registry>,
    /// ParameterStatus values of the first server that logged in: what new clients are
    /// told before any server is attached to them.
    reported: Mutex<Option<Reported>>,
    /// The session parameters and reported values of the last client that logged in.
    /// Clients that start alike share them (they are copied on write), which keeps idle
    /// clients small and makes the parameter check at attach a pointer comparison.
    last_session: Mutex<Option<(Arc<ParamSet>, Reported)>>,
}

struct State {
    settings: PoolSettings,
    idle: Vec<Pooled>,
    waiters: VecDeque<Waiter>,
    /// Servers that exist or are being opened, attached or idle.
    open: usize,
    /// Connected clients using this pool.
    clients: usize,
    /// Servers being opened (counted in `open` too).
    connecting: usize,
    /// PAUSE in force: no server is handed out until RESUME.
    paused: bool,
    /// Since when each client held back by PAUSE has waited.
    held: Vec<Instant>,
    /// Every server that exists, idle or attached.
    servers: BTreeMap<u64, ServerInfo>,
}

/// A client's place in the queue.
struct Waiter {
    slot: Arc<Slot>,
    /// Which wait of that client this is (see [`Slot`]).
    wait: u64,
    since: Instant,
}

impl Waiter {
    /// The client stopped this wait: it was served, timed out, or was killed.
    fn gave_up(&self) -> bool {
        !self.slot.is_waiting(self.wait)
    }
}

/// Where a released server is left for a client that waits for one. A client keeps its
/// slot for the whole session, so that a wait allocates nothing; it is made at the
/// client's first wait, which keeps clients that never wait small.
#[derive(Default)]
pub struct Handover(Option<Arc<Slot>>);

impl Handover {
    fn slot(&mut self) -> &Arc<Slot> {
        self.0.get_or_insert_with(Arc::default)
    }
}

impl Drop for Handover {
    fn drop(&mut self) {
        // Queue entries of waits given up may hold the slot a while longer; its waker
        // would keep the finished client task's memory until then.
        if let Some(slot) = &self.0 {
            slot.lock().waker = None;
        }
    }
}

/// The pool's half of a [`Handover`]. Each wait gets a number of its own: a queue entry
/// left behind by a wait the client gave up is skipped lazily, and must never serve
/// (or time out) a later wait of the same client.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// The wait in progress; 0 for none.
    waiting: u64,
    /// The number of the last wait begun.
    last: u64,
    /// The server, or the reason there is none, for the wait that just ended.
    handed: Option<Result<Pooled>>,
    /// The client task's waker. Kept after a hand-over (it is woken by reference): the
    /// task stays the same, so the next wait needs no new registration.
    waker: Option<Waker>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Begins a wait and returns its number.
    fn begin(&self) -> u64 {
        let mut s = self.lock();
        s.last += 1;
        s.waiting = s.last;
        s.last
    }

    fn is_waiting(&self, wait: u64) -> bool {
        self.lock().waiting == wait
    }

    /// Ends wait `wait` with `value` and wakes the client; gives `value` back if that
    /// wait is already over.
    fn hand(&self, wait: u64, value: Result<Pooled>) -> std::result::Result<(), Result<Pooled>> {
        let mut s = self.lock();
        if s.waiting != wait {
            return Err(value);
        }
        s.waiting = 0;
        s.handed = Some(value);
        // Waking only schedules the task, it never polls it here, so doing it under
        // the slot's lock cannot reenter it.
        if let Some(waker) = &s.waker {
            waker.wake_by_ref();
        }
        Ok(())
    }

    /// Ready with what the wait was handed.
    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Result<Pooled>> {
        let mut s = self.lock();
        if let Some(value) = s.handed.take() {
            return Poll::Ready(value);
        }
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Ends wait `wait` from the client's side; returns what was handed to it meanwhile.
    fn abandon(&self, wait: u64) -> Option<Result<Pooled>> {
        let mut s = self.lock();
        if s.waiting == wait {
            s.waiting = 0;
        }
        s.handed.take()
    }
}

/// A wait in progress. Dropped before the wait ends (the client was killed, or its
/// task is going away), it leaves the queue, and gives back a server handed over at
/// the same moment.
struct Waiting<'a> {
    pool: &'a Arc<Pool>,
    slot: &'a Slot,
    wait: u64,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(Ok(server)) = self.slot.abandon(self.wait) {
            self.pool.release(server, true);
        }
    }
}

impl Pool {
    /// Creates a pool and starts its upkeep task. A replica pool names its replica, and
    /// shares the prepared-statement registry of the primary pool of its pair.
    pub fn new(
        database: &str,
        user: &str,
        replica: Option<&str>,
        target: Target,
        settings: PoolSettings,
        limit: Arc<DbLimit>,
        statements: Arc<crate::prepared::Registry>,
    ) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            database: database.to_string(),
            user: user.to_string(),
            target: Mutex::new(target),
            generation: AtomicU64::new(0),
            replica: replica.map(str::to_string),
            limit: Arc::clone(&limit),
            starved: AtomicUsize::new(0),
            state: Mutex::new(State {
                settings,
                idle: Vec::new(),
                waiters: VecDeque::new(),
                open: 0,
                clients: 0,
                connecting: 0,
                paused: false,
                held: Vec::new(),
                servers: BTreeMap::new(),
            }),
            metrics: PoolMetrics::new(database, user, replica),
            stats: PoolStats::default(),
            resumed: tokio::sync::Notify::new(),
            queue_changed: Arc::new(tokio::sync::Notify::new()),
            statements,
            reported: Mutex::new(None),
            last_session: Mutex::new(None),
        });
        limit.register(&pool);
        tokio::spawn(upkeep(Arc::downgrade(&pool)));
        tokio::spawn(expire_waiters(
            Arc::downgrade(&pool),
            Arc::clone(&pool.queue_changed),
        ));
        pool
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain counters behind, which
        // stay meaningful; carry on rather than take every client down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The database-wide budget this pool counts against.
    pub fn limit(&self) -> &Arc<DbLimit> {
        &self.limit
    }

    pub fn settings(&self) -> PoolSettings {
        self.lock().settings.clone()
    }

    /// Obtains a server: an idle one, a new one if below size, or the next one released.
    pub async fn checkout(self: &Arc<Self>) -> Result<Pooled> {
        self.checkout_unless(
            &Interrupt::default(),
            &mut Handover::default(),
            Instant::now(),
        )
        .await
    }

    /// Like [`Pool::checkout`], but gives up with [`Error::Killed`] when `cancel` is raised for KILL
    /// while the client waits (for a server, or for the end of a PAUSE). Opening a
    /// server is not interrupted: dropping that halfway would lose its slot. The wait is
    /// counted from `start`; the server's `last_used` is set to when it was handed out.
    /// A server released while the client waits is left in `handover`.
    pub async fn checkout_unless(
        self: &Arc<Self>,
        cancel: &Interrupt,
        handover: &mut Handover,
        start: Instant,
    ) -> Result<Pooled> {
        loop {
            let next = {
                let mut st = self.lock();
                if st.paused {
                    Next::Paused(st.settings.query_wait_timeout)
                } else if let Some(server) = st.idle.pop() {
                    // No wait: the time the client asked is the time it got it.
                    mark(&mut st, server.id, true, start);
                    Next::Idle(server)
                } else if self.reserve(&mut st) {
                    Next::Open
                } else {
                    let slot = handover.slot();
                    let wait = slot.begin();
                    // Waiters that gave up stay queued until a hand-out skips them or
                    // upkeep sweeps them: no scan of the queue per checkout.
                    st.waiters.push_back(Waiter {
                        slot: Arc::clone(slot),
                        wait,
                        since: start,
                    });
                    if st.waiters.len() == 1 {
                        // A new front: its deadline is the next one to watch.
                        self.queue_changed.notify_one();
                    }
                    self.note_starved(&st);
                    let starved = st.open < st.settings.size;
                    Next::Wait(wait, starved)
                }
            };
            let mut server = match next {
                // Only a server that sat idle may have been closed meanwhile: one just
                // opened, or handed over as its last client released it clean, is
                // not probed again.
                Next::Idle(server) => match self.usable(server) {
                    Some(server) => server,
                    None => continue,
                },
                // Boxed: connecting is rare, and its state would otherwise make every
                // client task larger.
                Next::Open => match Box::pin(self.open_server()).await {
                    Ok(server) => server,
                    Err(e) => {
                        self.forget_one();
                        return Err(e);
                    }
                },
                Next::Paused(timeout) => {
                    // Boxed: a PAUSE is rare, and its timer and notification would
                    // otherwise make every transaction's state larger.
                    Box::pin(self.wait_for_resume(timeout, cancel, start)).await?;
                    continue;
                }
                Next::Wait(wait, starved) => {
                    if starved {
                        // The database as a whole is at max_db_connections: an idle
                        // server of another user's pool can make room.
                        self.limit.evict_idle_elsewhere(self);
                    }
                    let slot = handover.0.as_deref().expect("made for the wait");
                    self.wait(slot, wait, cancel).await?
                }
            };
            let now = Instant::now();
            let waited = now.saturating_duration_since(start);
            server.last_used = now;
            self.metrics.wait.record(waited);
            self.stats
                .wait_us
                .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
            self.stats.waits.fetch_add(1, Ordering::Relaxed);
            // The console already shows it in use: marked as it left the idle list, as
            // it was opened, or as its last client handed it over.
            return Ok(server);
        }
    }

    /// Waits, during a PAUSE, until RESUME (or until the pause is found over already),
    /// within what is left of `timeout` since `start`.
    async fn wait_for_resume(
        &self,
        timeout: Duration,
        cancel: &Interrupt,
        start: Instant,
    ) -> Result<()> {
        let resumed = self.resumed.notified();
        tokio::pin!(resumed);
        resumed.as_mut().enable();
        let _held = {
            let mut st = self.lock();
            if !st.paused {
                return Ok(());
            }
            st.held.push(start);
            Held {
                pool: self,
                since: start,
            }
        };
        let remaining = timeout.saturating_sub(start.elapsed());
        tokio::select! {
            r = tokio::time::timeout(remaining, resumed) => {
                if r.is_err() {
                    self.metrics.wait.record(start.elapsed());
                    return Err(Error::PoolTimeout(timeout));
                }
            }
            _ = cancel.raised(interrupt::KILL) => return Err(Error::Killed),
        }
        Ok(())
    }

    /// Waits for a server handed over by `release`, or for the expiry task's timeout.
    /// No timer per waiting client: the queue is in arrival order and shares one
    /// timeout, so one timer for its front does (see [`expire_waiters`]).
    async fn wait(self: &Arc<Self>, slot: &Slot, wait: u64, cancel: &Interrupt) -> Result<Pooled> {
        let mut waiting = Waiting {
            pool: self,
            slot,
            wait,
            done: false,
        };
        let handed = poll_fn(|cx| {
            // What was handed over counts first, even if a KILL came at the same time.
            if let Poll::Ready(handed) = slot.poll_take(cx) {
                return Poll::Ready(Some(handed));
            }
            cancel.poll_raised(cx, interrupt::KILL).map(|_| None)
        })
        .await;
        match handed {
            Some(handed) => {
                waiting.done = true;
                handed
            }
            // `waiting`, dropped here, leaves the queue and gives back a server handed
            // over in the meantime.
            None => Err(Error::Killed),
        }
    }

    /// Ends the waits that reached `query_wait_timeout` and returns when the next one
    /// does, if anyone is waiting.
    fn expire_due(&self) -> Option<Instant> {
        let mut st = self.lock();
        let timeout = st.settings.query_wait_timeout;
        let now = Instant::now();
        let next = loop {
            let Some(front) = st.waiters.front() else {
                break None;
            };
            let deadline = front.since + timeout;
            if !front.gave_up() && deadline > now {
                break Some(deadline);
            }
            let waiter = st.waiters.pop_front().expect("a front waiter");
            let timed_out = waiter
                .slot
                .hand(waiter.wait, Err(Error::PoolTimeout(timeout)));
            if timed_out.is_ok() {
                self.metrics.wait.record(now - waiter.since);
            }
        };
        self.note_starved(&st);
        next
    }

    /// Checks a server just taken from the pool; closes it if it died while idle.
    fn usable(self: &Arc<Self>, mut server: Pooled) -> Option<Pooled> {
        if server.is_usable_now() {
            return Some(server);
        }
        debug!(
            server.id = server.id,
            "idle server connection was closed by the server"
        );
        self.close(server);
        None
    }

    async fn open_server(&self) -> Result<Pooled> {
        let id = NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation.load(Ordering::Acquire);
        let target = self
            .target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let timeout = {
            let mut st = self.lock();
            st.connecting += 1;
            self.note_starved(&st);
            st.settings.server_connect_timeout
        };
        let mut result = Server::connect(&target, id, timeout).await;
        if let Ok(server) = &mut result {
            server.generation = generation;
        }
        {
            let mut st = self.lock();
            st.connecting -= 1;
            if let Ok(server) = &result {
                st.servers.insert(
                    id,
                    ServerInfo {
                        id,
                        pid: server.cancel_key.process_id,
                        connected_at: SystemTime::now(),
                        since: Instant::now(),
                        active: true,
                        prepared: 0,
                    },
                );
            }
            self.note_starved(&st);
        }
        match result {
            Ok(server) => {
                debug!(
                    server.id = id,
                    server.pid = server.cancel_key.process_id,
                    "server connection opened"
                );
                self.metrics.servers_opened.increment(1);
                let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
                if reported.is_none() {
                    *reported = Some(Arc::new(server.reported.clone()));
                }
                Ok(Box::new(server))
            }
            Err(e) => {
                warn!(
                    database = %self.database,
                    user = %self.user,
                    error = %e,
                    "could not open a server connection"
                );
                crate::metrics::error(e.kind());
                self.metrics.server_errors.increment(1);
                Err(e)
            }
        }
    }

    /// Counts a server about to be opened, if both the pool size and the database-wide
    /// limit leave room for it.
    fn reserve(&self, st: &mut State) -> bool {
        if st.open >= st.settings.size || !self.limit.try_take() {
            return false;
        }
        st.open += 1;
        true
    }

    /// Uncounts a server that was closed or never opened.
    fn unreserve(&self, st: &mut State) {
        st.open -= 1;
        self.limit.give_back();
    }

    /// An opening failed: give the slot back, and pass the chance to a waiter.
    fn forget_one(self: &Arc<Self>) {
        let mut st = self.lock();
        self.unreserve(&mut st);
        self.refill_for_waiters(&mut st);
        self.note_starved(&st);
        drop(st);
        self.limit.wake_others(self);
    }

    /// Returns a server after use. `clean` says the caller left it idle, outside any
    /// transaction, with nothing unread; otherwise it is closed.
    pub fn release(self: &Arc<Self>, mut server: Pooled, clean: bool) {
        let now = Instant::now();
        let mut st = self.lock();
        let expired = !st.settings.server_lifetime.is_zero()
            && now.saturating_duration_since(server.created) >= st.settings.server_lifetime;
        let retired = server.generation < self.generation.load(Ordering::Acquire);
        if server.broken {
            self.metrics.server_errors.increment(1);
        }
        if !clean
            || retired
            || server.broken
            || !server.flow.is_empty()
            || expired
            || st.open > st.settings.size
            || self.limit.over()
            || (st.waiters.is_empty() && self.limit.others_starved(self))
        {
            drop(st);
            self.close(server);
            return;
        }
        server.last_used = now;
        let id = server.id;
        let prepared = server.prepared.as_ref().map_or(0, |p| p.len());
        let mut unclaimed = Some(server);
        if !st.paused {
            while let Some(waiter) = st.waiters.pop_front() {
                let server = unclaimed.take().expect("held until a waiter takes it");
                match waiter.slot.hand(waiter.wait, Ok(server)) {
                    Ok(()) => break,
                    Err(Ok(returned)) => unclaimed = Some(returned),
                    Err(Err(_)) => unreachable!("only servers are sent here"),
                }
            }
        }
        if let Some(info) = st.servers.get_mut(&id) {
            info.prepared = prepared;
            // Handed over, it is in use from now on: its new client takes it as is.
            info.active = unclaimed.is_none();
            info.since = now;
        }
        if let Some(server) = unclaimed {
            st.idle.push(server);
        }
        self.note_starved(&st);
    }

    /// Closes a server for good and, if clients are waiting, opens a replacement.
    pub fn close(self: &Arc<Self>, server: Pooled) {
        debug!(server.id = server.id, "server connection closed");
        self.metrics.servers_closed.increment(1);
        if let Some(statements) = &server.prepared {
            self.statements
                .stats
                .server_statements
                .fetch_sub(statements.len() as i64, Ordering::Relaxed);
        }
        let id = server.id;
        drop(server);
        let mut st = self.lock();
        st.servers.remove(&id);
        self.unreserve(&mut st);
        self.refill_for_waiters(&mut st);
        self.note_starved(&st);
        drop(st);
        self.limit.wake_others(self);
    }

    /// Opens a server in the background for the longest waiter, if there is room.
    fn refill_for_waiters(self: &Arc<Self>, st: &mut State) {
        while st.waiters.front().is_some_and(Waiter::gave_up) {
            st.waiters.pop_front();
        }
        if st.paused || st.waiters.is_empty() || !self.reserve(st) {
            return;
        }
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            match pool.open_server().await {
                Ok(server) => pool.release(server, true),
                Err(e) => {
                    let mut st = pool.lock();
                    pool.unreserve(&mut st);
                    // Tell the longest waiter why instead of letting it time out.
                    while let Some(waiter) = st.waiters.pop_front() {
                        if waiter.slot.hand(waiter.wait, Err(clone_error(&e))).is_ok() {
                            break;
                        }
                    }
                    pool.note_starved(&st);
                    drop(st);
                    pool.limit.wake_others(&pool);
                }
            }
        });
    }

    /// The ParameterStatus values new clients are sent, opening a server if none has
    /// logged in yet.
    pub async fn reported_params(self: &Arc<Self>) -> Result<Reported> {
        if let Some(params) = self
            .reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(params);
        }
        let server = self.checkout().await?;
        self.release(server, true);
        let params = self
            .reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Ok(params.unwrap_or_default())
    }

    /// The shared copies of a new client's session parameters and reported values:
    /// those of the previous client if they are equal, else these, kept for the next.
    pub fn shared_session(
        &self,
        params: ParamSet,
        reported: Reported,
    ) -> (Arc<ParamSet>, Reported) {
        let mut last = self.last_session.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, r)) = last.as_ref() {
            if **p == params && *r == reported {
                return (Arc::clone(p), Arc::clone(r));
            }
        }
        let shared = (Arc::new(params), reported);
        *last = Some((Arc::clone(&shared.0), Arc::clone(&shared.1)));
        shared
    }

    /// Servers attached to clients or being opened.
    pub fn in_use(&self) -> usize {
        let st = self.lock();
        st.open - st.idle.len()
    }

    pub fn client_connected(&self) {
        let mut st = self.lock();
        st.clients += 1;
    }

    pub fn client_disconnected(&self) {
        let mut st = self.lock();
        st.clients -= 1;
    }

    /// Records whether clients of this pool queue while it is below its size (the
    /// database is at `max_db_connections`): other pools then give up idle servers.
    /// Runs on every change of the queue or of the open count.
    fn note_starved(&self, st: &State) {
        // Counts waiters that gave up since the last upkeep too; exact counts would
        // cost a scan of the queue on every checkout and release.
        let starved = if st.open < st.settings.size {
            st.waiters.len()
        } else {
            0
        };
        self.starved.store(starved, Ordering::Relaxed);
    }

    /// Copies the pool's counts into its Prometheus series; run by upkeep, so a scrape
    /// sees them as of at most one `maintenance_interval` ago. Setting a series costs
    /// more than the change it records, and checkouts and releases happen per
    /// transaction: the gauges and the busiest counters are not touched on that path.
    fn publish_metrics(&self, st: &State) {
        let m = &self.metrics;
        let waiting = st.waiters.iter().filter(|w| !w.gave_up()).count() + st.held.len();
        let active = st.open - st.idle.len() - st.connecting;
        m.clients.set(st.clients as f64);
        m.clients_waiting.set(waiting as f64);
        m.servers_idle.set(st.idle.len() as f64);
        m.servers_total.set(st.open as f64);
        m.servers_connecting.set(st.connecting as f64);
        m.servers_active.set(active as f64);
        m.oldest_wait
            .set(oldest_wait(st).map_or(0.0, |w| w.as_secs_f64()));
        let totals = self.stats.totals();
        m.transactions.absolute(totals.transactions);
        m.queries.absolute(totals.queries);
        m.bytes_received.absolute(totals.received);
        m.bytes_sent.absolute(totals.sent);
        m.record_prepared(&self.statements.stats);
    }

    /// Current counts, for tests and the admin console.
    pub fn snapshot(&self) -> PoolSnapshot {
        let st = self.lock();
        PoolSnapshot {
            open: st.open,
            idle: st.idle.len(),
            connecting: st.connecting,
            paused: st.paused,
            size: st.settings.size,
            mode: st.settings.mode,
            waiting: st.waiters.iter().filter(|w| !w.gave_up()).count() + st.held.len(),
            clients: st.clients,
            oldest_wait: oldest_wait(&st),
        }
    }

    /// Applies reloaded settings. A smaller pool closes idle servers above the new size
    /// now and busy ones as they are released; a bigger one serves waiting clients at
    /// once.
    pub fn update_settings(self: &Arc<Self>, settings: PoolSettings) {
        let surplus = {
            let mut st = self.lock();
            if st.settings == settings {
                return;
            }
            st.settings = settings;
            // The timeout may have changed: the front waiter's deadline with it.
            self.queue_changed.notify_one();
            let mut surplus = Vec::new();
            while st.open - surplus.len() > st.settings.size && !st.idle.is_empty() {
                surplus.push(st.idle.remove(0));
            }
            for _ in 0..st.waiters.len() {
                if st.open - surplus.len() >= st.settings.size {
                    break;
                }
                self.refill_for_waiters(&mut st);
            }
            self.note_starved(&st);
            surplus
        };
        for server in surplus {
            self.close(server);
        }
    }

    /// Points the pool at another server (a reload changed host, port, database name or
    /// password): servers already open are closed once idle, new ones go to `target`.
    pub fn set_target(self: &Arc<Self>, target: Target) {
        let mut current = self.target.lock().unwrap_or_else(|e| e.into_inner());
        if *current == target {
            return;
        }
        *current = target;
        drop(current);
        self.reconnect();
    }

    /// Retires every server open now: idle ones at once, busy ones when released.
    pub fn reconnect(self: &Arc<Self>) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.close_idle();
    }

    /// Closes every idle server.
    pub fn close_idle(self: &Arc<Self>) {
        let idle = std::mem::take(&mut self.lock().idle);
        for server in idle {
            self.close(server);
        }
    }

    /// Stops handing out servers; clients asking for one wait until [`Pool::resume`].
    pub fn pause(&self) {
        let mut st = self.lock();
        st.paused = true;
    }

    /// Ends a PAUSE: queued clients get idle servers, or new ones where there is room.
    pub fn resume(self: &Arc<Self>) {
        let mut st = self.lock();
        if !st.paused {
            return;
        }
        st.paused = false;
        while !st.waiters.is_empty() {
            let Some(server) = st.idle.pop() else { break };
            drop(st);
            // It may have sat idle for the whole PAUSE; a waiter takes it unprobed.
            if let Some(server) = self.usable(server) {
                self.release(server, true);
            }
            st = self.lock();
        }
        for _ in 0..st.waiters.len() {
            self.refill_for_waiters(&mut st);
        }
        self.note_starved(&st);
        drop(st);
        self.resumed.notify_waiters();
    }

    /// The pool's servers, for SHOW SERVERS.
    pub fn servers(&self) -> Vec<ServerInfo> {
        self.lock().servers.values().cloned().collect()
    }

    /// Where the pool opens servers: "host:port".
    pub fn target_addr(&self) -> (String, u16) {
        let t = self.target.lock().unwrap_or_else(|e| e.into_inner());
        (t.host.clone(), t.port)
    }

    /// One round of upkeep: retire idle or aged servers, keep `min_size` open.
    async fn upkeep_once(self: &Arc<Self>) {
        let (retired, missing) = {
            let mut st = self.lock();
            let s = st.settings.clone();
            let generation = self.generation.load(Ordering::Acquire);
            let mut retired = Vec::new();
            let mut i = 0;
            while i < st.idle.len() {
                let server = &st.idle[i];
                let stale = server.generation < generation;
                let idle_too_long = !s.server_idle_timeout.is_zero()
                    && server.last_used.elapsed() >= s.server_idle_timeout
                    && st.open - retired.len() > s.min_size;
                let too_old =
                    !s.server_lifetime.is_zero() && server.created.elapsed() >= s.server_lifetime;
                let over_db = self.limit.max() != 0
                    && self.limit.open().saturating_sub(retired.len()) > self.limit.max();
                if stale || idle_too_long || too_old || over_db || st.open - retired.len() > s.size
                {
                    retired.push(st.idle.remove(i));
                } else {
                    i += 1;
                }
            }
            st.waiters.retain(|w| !w.gave_up());
            self.stats.roll_period();
            self.publish_metrics(&st);
            let after = st.open - retired.len();
            let mut missing = 0;
            while !st.paused && after + missing < s.min_size && self.reserve(&mut st) {
                missing += 1;
            }
            (retired, missing)
        };
        for server in retired {
            self.close(server);
        }
        for _ in 0..missing {
            match self.open_server().await {
                Ok(server) => self.release(server, true),
                Err(_) => {
                    self.forget_one();
                    break;
                }
            }
        }
        // Servers that died while idle are found here too, not only at checkout.
        let dead: Vec<Pooled> = {
            let mut st = self.lock();
            let mut dead = Vec::new();
            let mut i = 0;
            while i < st.idle.len() {
                if st.idle[i].is_usable_now() {
                    i += 1;
                } else {
                    dead.push(st.idle.remove(i));
                }
            }
            dead
        };
        for server in dead {
            info!(server.id = server.id, database = %self.database, "idle server connection lost; replacing it");
            self.close(server);
        }
    }
}

enum Next {
    Idle(Pooled),
    Open,
    /// PAUSE is in force; wait for RESUME (within query_wait_timeout).
    Paused(Duration),
    /// The flag says the wait is caused by the database-wide limit, not the pool size.
    /// The number of the wait, in the client's [`Handover`].
    Wait(u64, bool),
}

/// The servers open to one database across the pools of all its users, bounded by
/// `max_db_connections` (0 = unbounded, counted all the same).
pub struct DbLimit {
    /// Changed by reloads; a lower value closes no busy server, it only stops new ones.
    max: AtomicUsize,
    open: AtomicUsize,
    pools: Mutex<Vec<Weak<Pool>>>,
    /// Where the next hand-out of a freed slot starts, so no pool is always last.
    turn: AtomicUsize,
}

impl DbLimit {
    pub fn new(max: usize) -> Arc<DbLimit> {
        Arc::new(DbLimit {
            max: AtomicUsize::new(max),
            open: AtomicUsize::new(0),
            pools: Mutex::new(Vec::new()),
            turn: AtomicUsize::new(0),
        })
    }

    /// Servers open to the database right now, in every pool.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn register(&self, pool: &Arc<Pool>) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
    }

    /// The other live pools of the database, starting at a rotating position. The list
    /// lock is released before any pool is locked.
    fn others(&self, me: &Arc<Pool>) -> Vec<Arc<Pool>> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let n = pools.len().max(1);
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % n;
        pools
            .iter()
            .cycle()
            .skip(start)
            .take(pools.len())
            .filter_map(Weak::upgrade)
            .filter(|p| !Arc::ptr_eq(p, me))
            .collect()
    }

    fn try_take(&self) -> bool {
        let max = self.max();
        if max == 0 {
            self.open.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// The limit; 0 = none.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// More servers are open than the limit allows: a reload lowered it.
    fn over(&self) -> bool {
        let max = self.max();
        max != 0 && self.open() > max
    }

    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    fn give_back(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// A slot came free: offer it to the other pools' waiting clients.
    fn wake_others(&self, me: &Arc<Pool>) {
        if self.max() == 0 {
            return;
        }
        for pool in self.others(me) {
            if pool.starved.load(Ordering::Relaxed) > 0 {
                let mut st = pool.lock();
                pool.refill_for_waiters(&mut st);
                pool.note_starved(&st);
            }
        }
    }

    /// Whether a client of another pool waits for room under the database-wide limit.
    fn others_starved(&self, me: &Arc<Pool>) -> bool {
        let max = self.max();
        max != 0
            && self.open() >= max
            && self
                .others(me)
                .iter()
                .any(|p| p.starved.load(Ordering::Relaxed) > 0)
    }

    /// Closes the longest-idle server of some other pool, which frees a slot for `me`.
    fn evict_idle_elsewhere(&self, me: &Arc<Pool>) {
        for pool in self.others(me) {
            let victim = {
                let mut st = pool.lock();
                if st.idle.is_empty() {
                    None
                } else {
                    Some(st.idle.remove(0))
                }
            };
            if let Some(server) = victim {
                debug!(
                    server.id = server.id,
                    database = %pool.database,
                    "closing an idle server to make room under max_db_connections"
                );
                pool.close(server);
                return;
            }
        }
    }
}

/// Counts for observers.
#[derive(Debug, Clone)]
pub struct PoolSnapshot {
    pub open: usize,
    pub idle: usize,
    pub connecting: usize,
    pub paused: bool,
    pub size: usize,
    pub mode: crate::config::PoolMode,
    pub waiting: usize,
    pub clients: usize,
    pub oldest_wait: Option<Duration>,
}

/// Errors are not `Clone` (they may hold an `io::Error`); a connect failure handed to a
/// waiter only needs its text and code.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::ServerLogin { code, message } => Error::ServerLogin {
            code: code.clone(),
            message: message.clone(),
        },
        other => Error::Connect {
            addr: String::new(),
            reason: other.to_string(),
        },
    }
}

/// How long the longest-waiting client has waited, queued or held back by PAUSE.
fn oldest_wait(st: &State) -> Option<Duration> {
    let queued = st.waiters.iter().find(|w| !w.gave_up()).map(|w| w.since);
    let held = st.held.iter().min().copied();
    [queued, held]
        .into_iter()
        .flatten()
        .min()
        .map(|t| t.elapsed())
}

/// A client held back by PAUSE; uncounted however its wait ends, even if the waiting
/// future is dropped.
struct Held<'a> {
    pool: &'a Pool,
    since: Instant,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        if let Some(i) = st.held.iter().position(|t| *t == self.since) {
            st.held.swap_remove(i);
        }
    }
}

/// Records whether a server is attached to a client, for SHOW SERVERS.
fn mark(st: &mut State, id: u64, active: bool, at: Instant) {
    if let Some(info) = st.servers.get_mut(&id) {
        info.active = active;
        info.since = at;
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Lets the expiry task see that the pool is gone.
        self.queue_changed.notify_one();
    }
}

/// Fails the waits of a pool's clients that reach `query_wait_timeout`, until the pool
/// is dropped. It sleeps until the deadline of the front waiter, or until a new front
/// arrives or the settings change.
///
/// Only the front is watched. A client that queues again (its server turned out dead)
/// keeps its first arrival time behind clients that came later, and is failed when it
/// reaches the front: up to one more timeout late.
async fn expire_waiters(pool: Weak<Pool>, queue_changed: Arc<tokio::sync::Notify>) {
    loop {
        let next = match pool.upgrade() {
            Some(pool) => pool.expire_due(),
            None => return,
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline.into()) => {}
                    _ = queue_changed.notified() => {}
                }
            }
            None => queue_changed.notified().await,
        }
    }
}

/// Runs upkeep until the pool is dropped.
async fn upkeep(pool: Weak<Pool>) {
    loop {
        let interval = match pool.upgrade() {
            Some(pool) => {
                pool.upkeep_once().await;
                pool.lock().settings.maintenance_interval
            }
            None => return,
        };
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn timeout() -> Result<Pooled> {
        Err(Error::PoolTimeout(Duration::from_secs(1)))
    }

    #[test]
    fn a_slot_serves_only_the_wait_in_progress() {
        let slot = Slot::default();
        let mut cx = Context::from_waker(Waker::noop());
        let first = slot.begin();
        assert!(slot.is_waiting(first));
        assert!(slot.poll_take(&mut cx).is_pending());
        // The client gives the first wait up; its queue entry stays behind.
        assert!(slot.abandon(first).is_none());
        assert!(!slot.is_waiting(first));
        let second = slot.begin();
        assert_ne!(first, second);
        // The stale entry neither serves nor times out the second wait.
        assert!(matches!(slot.hand(first, timeout()), Err(Err(_))));
        assert!(slot.poll_take(&mut cx).is_pending());
        assert!(slot.hand(second, timeout()).is_ok());
        assert!(!slot.is_waiting(second));
        assert!(matches!(
            slot.poll_take(&mut cx),
            Poll::Ready(Err(Error::PoolTimeout(_)))
        ));
        // Handed once: a second hand-over for the same wait comes back.
        assert!(matches!(slot.hand(second, timeout()), Err(Err(_))));
    }

    #[test]
    fn what_is_handed_as_a_wait_is_given_up_goes_back_to_the_client() {
        let slot = Slot::default();
        let wait = slot.begin();
        assert!(slot.hand(wait, timeout()).is_ok());
        assert!(matches!(
            slot.abandon(wait),
            Some(Err(Error::PoolTimeout(_)))
        ));
        assert!(slot.abandon(wait).is_none());
    }
}
