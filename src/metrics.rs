//! Prometheus metrics: names, labels, and the exporter.
//!
//! Every pool registers its handles once at creation. Histograms are recorded as things
//! happen. A pool's gauges and its per-transaction counters (transactions, queries,
//! bytes) are copied from the pool's own atomic counts by its upkeep, every
//! `maintenance_interval`: the relay does not touch the metrics registry per message.
//! Metric names follow Prometheus conventions: base units, `_total` for counters.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub const POOL_WAIT: &str = "pgmux_pool_wait_seconds";
pub const TRANSACTION_DURATION: &str = "pgmux_transaction_duration_seconds";
pub const QUERY_DURATION: &str = "pgmux_query_duration_seconds";

/// Buckets for transaction and query durations: 100 µs to 5 minutes.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Buckets for the pool wait histogram: from 100 µs up to beyond `query_wait_timeout`,
/// so a timed-out wait still lands in a finite bucket.
pub fn wait_buckets(query_wait_timeout: Duration) -> Vec<f64> {
    let mut buckets = vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0, 60.0, 120.0,
    ];
    let beyond = query_wait_timeout.as_secs_f64() * 1.5;
    buckets.retain(|&b| b < beyond);
    buckets.push(beyond.max(0.001));
    buckets
}

/// Installs the global recorder and serves `/metrics` on `addr`.
pub fn install(addr: SocketAddr, query_wait_timeout: Duration) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(POOL_WAIT.to_string()),
            &wait_buckets(query_wait_timeout),
        )
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(
            Matcher::Full(TRANSACTION_DURATION.to_string()),
            DURATION_BUCKETS,
        )
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(Matcher::Full(QUERY_DURATION.to_string()), DURATION_BUCKETS)
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| e.to_string())?;
    gauge!("pgmux_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Both series exist from the start, so a dashboard sees 0 rather than nothing.
    for result in ["success", "failure"] {
        counter!("pgmux_config_reloads_total", "result" => result).absolute(0);
    }
    Ok(())
}

/// Counts a configuration reload (`pgmux_config_reloads_total{result}`).
pub fn config_reload(ok: bool) {
    let result = if ok { "success" } else { "failure" };
    counter!("pgmux_config_reloads_total", "result" => result).increment(1);
}

/// Handles for one pool's series, labelled `database` and `user`.
pub struct PoolMetrics {
    pub wait: Histogram,
    pub clients: Gauge,
    pub clients_waiting: Gauge,
    pub servers_active: Gauge,
    pub servers_idle: Gauge,
    pub servers_total: Gauge,
    pub servers_connecting: Gauge,
    pub oldest_wait: Gauge,
    pub transaction_duration: Histogram,
    pub query_duration: Histogram,
    /// Server connections that failed: could not be opened, or broke while in use.
    pub server_errors: Counter,
    pub transactions: Counter,
    pub queries: Counter,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    pub servers_opened: Counter,
    pub servers_closed: Counter,
    pub prepared_server_statements: Gauge,
    pub prepared_client_parses: Counter,
    pub prepared_server_parses: Counter,
    pub prepared_evictions: Counter,
    pub prepared_local_answers: Counter,
}

impl PoolMetrics {
    /// Series of a primary pool are labelled `database` and `user`; those of a replica
    /// pool also `replica` (its address).
    pub fn new(database: &str, user: &str, replica: Option<&str>) -> PoolMetrics {
        let mut labels = vec![
            ("database", database.to_string()),
            ("user", user.to_string()),
        ];
        if let Some(replica) = replica {
            labels.push(("replica", replica.to_string()));
        }
        PoolMetrics {
            wait: histogram!(POOL_WAIT, &labels),
            clients: gauge!("pgmux_pool_clients", &labels),
            clients_waiting: gauge!("pgmux_pool_clients_waiting", &labels),
            servers_active: gauge!("pgmux_pool_servers_active", &labels),
            servers_idle: gauge!("pgmux_pool_servers_idle", &labels),
            servers_total: gauge!("pgmux_pool_servers", &labels),
            servers_connecting: gauge!("pgmux_pool_servers_connecting", &labels),
            transaction_duration: histogram!(TRANSACTION_DURATION, &labels),
            query_duration: histogram!(QUERY_DURATION, &labels),
            server_errors: counter!("pgmux_server_errors_total", &labels),
            oldest_wait: gauge!("pgmux_pool_oldest_wait_seconds", &labels),
            transactions: counter!("pgmux_transactions_total", &labels),
            queries: counter!("pgmux_queries_total", &labels),
            bytes_received: counter!("pgmux_client_bytes_received_total", &labels),
            bytes_sent: counter!("pgmux_client_bytes_sent_total", &labels),
            servers_opened: counter!("pgmux_server_connections_opened_total", &labels),
            servers_closed: counter!("pgmux_server_connections_closed_total", &labels),
            prepared_server_statements: gauge!("pgmux_prepared_statements", &labels),
            prepared_client_parses: counter!("pgmux_prepared_client_parses_total", &labels),
            prepared_server_parses: counter!("pgmux_prepared_server_parses_total", &labels),
            prepared_evictions: counter!("pgmux_prepared_evictions_total", &labels),
            prepared_local_answers: counter!("pgmux_prepared_local_answers_total", &labels),
        }
    }

    /// Copies a pool's prepared-statement counts into its series. The counts live in
    /// plain atomics so the relay touches no metrics machinery per message; this runs
    /// with each round of pool upkeep.
    pub fn record_prepared(&self, stats: &crate::prepared::Stats) {
        use std::sync::atomic::Ordering::Relaxed;
        self.prepared_server_statements
            .set(stats.server_statements.load(Relaxed) as f64);
        self.prepared_client_parses
            .absolute(stats.client_parses.load(Relaxed));
        self.prepared_server_parses
            .absolute(stats.server_parses.load(Relaxed));
        self.prepared_evictions
            .absolute(stats.evictions.load(Relaxed));
        self.prepared_local_answers
            .absolute(stats.local_answers.load(Relaxed));
    }
}

/// Counts an error by kind (`pgmux_errors_total{kind=...}`).
pub fn error(kind: &'static str) {
    counter!("pgmux_errors_total", "kind" => kind).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_reach_past_the_timeout() {
        let b = wait_buckets(Duration::from_secs(120));
        assert_eq!(b[0], 0.0001);
        assert_eq!(*b.last().unwrap(), 180.0);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
        let b = wait_buckets(Duration::from_millis(200));
        assert!((b.last().unwrap() - 0.3).abs() < 1e-9);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }
}
