//! Prometheus metrics: names, labels, and the endpoint that serves them.
//!
//! Every pool registers its handles once at creation. A pool's gauges and its
//! per-transaction counters (transactions, queries, bytes) are copied from the pool's
//! own atomic counts by its upkeep, every `maintenance_interval`: the relay does not
//! touch the metrics registry per message. The three duration histograms are recorded
//! as things happen, up to three times per transaction, so they are [`Timing`]s of
//! pgmux's own: a fixed set of bucket counters, where the exporter's histograms keep
//! every sample until a scrape or upkeep sorts them into buckets. Counters and gauges
//! go through the `metrics` crate and its Prometheus exporter as usual; the endpoint
//! serves the exporter's text followed by the timings'.
//! Metric names follow Prometheus conventions: base units, `_total` for counters.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, Counter, Gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

/// Bucket bounds of [`POOL_WAIT`], fixed by the `query_wait_timeout` in force when the
/// endpoint started (the default's, if it never did). A reload does not change them:
/// series whose buckets moved would not add up across a scrape.
static WAIT_BOUNDS: OnceLock<Vec<f64>> = OnceLock::new();

fn wait_bounds() -> &'static [f64] {
    WAIT_BOUNDS.get_or_init(|| wait_buckets(Duration::from_secs(120)))
}

/// Installs the global recorder and serves the metrics over HTTP on `addr`: any path
/// but `/health` (which answers `OK`) gets the whole exposition.
pub async fn install(addr: SocketAddr, query_wait_timeout: Duration) -> Result<(), String> {
    let listener = TcpListener::bind(addr).await.map_err(|e| e.to_string())?;
    WAIT_BOUNDS
        .set(wait_buckets(query_wait_timeout))
        .map_err(|_| "the metrics endpoint is already installed".to_string())?;
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| e.to_string())?;
    tokio::spawn(serve(listener, handle));
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
    pub wait: Arc<Timing>,
    pub clients: Gauge,
    pub clients_waiting: Gauge,
    pub servers_active: Gauge,
    pub servers_idle: Gauge,
    pub servers_total: Gauge,
    pub servers_connecting: Gauge,
    pub oldest_wait: Gauge,
    pub transaction_duration: Arc<Timing>,
    pub query_duration: Arc<Timing>,
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
            wait: timing(POOL_WAIT, &labels, wait_bounds()),
            clients: gauge!("pgmux_pool_clients", &labels),
            clients_waiting: gauge!("pgmux_pool_clients_waiting", &labels),
            servers_active: gauge!("pgmux_pool_servers_active", &labels),
            servers_idle: gauge!("pgmux_pool_servers_idle", &labels),
            servers_total: gauge!("pgmux_pool_servers", &labels),
            servers_connecting: gauge!("pgmux_pool_servers_connecting", &labels),
            transaction_duration: timing(TRANSACTION_DURATION, &labels, DURATION_BUCKETS),
            query_duration: timing(QUERY_DURATION, &labels, DURATION_BUCKETS),
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

/// A duration histogram with fixed buckets, in the Prometheus sense: a count per bucket,
/// the sum and the count of all samples. Recording one is a search among the bounds and
/// two relaxed atomic additions; nothing is allocated and no clock is read.
#[derive(Debug)]
pub struct Timing {
    /// Upper bounds of the finite buckets in nanoseconds, ascending.
    bounds_ns: Box<[u64]>,
    /// The same bounds in seconds, as the `le` label shows them.
    bounds: Box<[f64]>,
    /// Samples per bucket, not cumulative; the last one holds those above every bound.
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl Timing {
    pub fn new(bounds: &[f64]) -> Timing {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "ascending bounds");
        Timing {
            bounds_ns: bounds.iter().map(|b| (b * 1e9).round() as u64).collect(),
            bounds: bounds.into(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    #[inline]
    pub fn record(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        // A sample on a bound belongs to that bound's bucket (`le`: less or equal).
        let bucket = self.bounds_ns.partition_point(|&bound| bound < ns);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Cumulative counts per bound, then that of `+Inf` (the count of all samples), and
    /// the sum in seconds.
    fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut total = 0;
        let cumulative = self
            .counts
            .iter()
            .map(|c| {
                total += c.load(Ordering::Relaxed);
                total
            })
            .collect();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (cumulative, sum)
    }
}

/// A registered timing series: its metric name, its labels as rendered, and its counts.
struct Series {
    name: &'static str,
    labels: String,
    timing: Arc<Timing>,
}

/// Every timing series registered, in order of registration. A pool made again by a
/// reload, with the same labels, gets the same series back, so its counts go on.
static TIMINGS: Mutex<Vec<Series>> = Mutex::new(Vec::new());

/// The timing series `name` with `labels`, registered on first use with `bounds`.
pub fn timing(name: &'static str, labels: &[(&str, String)], bounds: &[f64]) -> Arc<Timing> {
    let mut rendered = String::new();
    for (i, (key, value)) in labels.iter().enumerate() {
        if i > 0 {
            rendered.push(',');
        }
        rendered.push_str(key);
        rendered.push_str("=\"");
        escape_label_value(&mut rendered, value);
        rendered.push('"');
    }
    let mut all = TIMINGS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(series) = all.iter().find(|s| s.name == name && s.labels == rendered) {
        return Arc::clone(&series.timing);
    }
    let timing = Arc::new(Timing::new(bounds));
    all.push(Series {
        name,
        labels: rendered,
        timing: Arc::clone(&timing),
    });
    timing
}

/// Label values escape backslash, double quote and line feed, and nothing else.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The timing series in the Prometheus text format, one family per metric name.
fn render_timings(out: &mut String) {
    let all = TIMINGS.lock().unwrap_or_else(|e| e.into_inner());
    for name in [POOL_WAIT, TRANSACTION_DURATION, QUERY_DURATION] {
        let mut family = all.iter().filter(|s| s.name == name).peekable();
        if family.peek().is_none() {
            continue;
        }
        let _ = writeln!(out, "# TYPE {name} histogram");
        for series in family {
            let labels = &series.labels;
            let sep = if labels.is_empty() { "" } else { "," };
            let (cumulative, sum) = series.timing.snapshot();
            let count = *cumulative.last().expect("the +Inf bucket");
            for (bound, n) in series.timing.bounds.iter().zip(&cumulative) {
                let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
            let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
        }
        out.push('\n');
    }
}

/// The whole exposition: the exporter's counters and gauges, then the timings.
fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    render_timings(&mut text);
    text
}

/// Longest request head read from a scraper, and how long it may take to send it and
/// read the answer.
const REQUEST_MAX: usize = 16 * 1024;
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves scrapes, one task per connection, until the process ends.
async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    let handle = Arc::new(handle);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handle = Arc::clone(&handle);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(SCRAPE_TIMEOUT, scrape(stream, &handle)).await;
                });
            }
            Err(e) => {
                // Out of descriptors, most likely: the clients' work goes on, and the
                // next scrape tries again.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Answers one HTTP/1.x request and closes the connection (scrapers open a new one, or
/// reuse none, either way).
async fn scrape(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > REQUEST_MAX {
            return respond(&mut stream, "431 Request Header Fields Too Large", "").await;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, path) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    match method {
        b"GET" | b"HEAD" => {
            let body = if path == b"/health" {
                "OK".to_string()
            } else {
                handle.run_upkeep();
                render(handle)
            };
            let body = if method == b"HEAD" { "" } else { &body };
            respond(&mut stream, "200 OK", body).await
        }
        _ => respond(&mut stream, "405 Method Not Allowed", "").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_count_samples_into_le_buckets() {
        let t = Timing::new(&[0.001, 0.01]);
        t.record(Duration::from_micros(500));
        t.record(Duration::from_millis(1)); // on the bound: its bucket
        t.record(Duration::from_millis(5));
        t.record(Duration::from_secs(3));
        let (cumulative, sum) = t.snapshot();
        assert_eq!(cumulative, [2, 3, 4]);
        assert!((sum - 3.0065).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn timings_render_as_prometheus_histograms() {
        let labels = [
            ("database", "a\"b\\c\nd".to_string()),
            ("user", "u".to_string()),
        ];
        let t = timing(QUERY_DURATION, &labels, &[0.5, 1.0]);
        let again = timing(QUERY_DURATION, &labels, &[0.5, 1.0]);
        assert!(Arc::ptr_eq(&t, &again), "the same series comes back");
        t.record(Duration::from_millis(250));
        t.record(Duration::from_secs(2));
        let mut text = String::new();
        render_timings(&mut text);
        let l = r#"database="a\"b\\c\nd",user="u""#;
        for line in [
            format!("# TYPE {QUERY_DURATION} histogram"),
            format!("{QUERY_DURATION}_bucket{{{l},le=\"0.5\"}} 1"),
            format!("{QUERY_DURATION}_bucket{{{l},le=\"1\"}} 1"),
            format!("{QUERY_DURATION}_bucket{{{l},le=\"+Inf\"}} 2"),
            format!("{QUERY_DURATION}_sum{{{l}}} 2.25"),
            format!("{QUERY_DURATION}_count{{{l}}} 2"),
        ] {
            assert!(
                text.lines().any(|x| x == line),
                "{line} missing from:\n{text}"
            );
        }
    }

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

    /// Sends `request` to the endpoint at `addr` and returns what it answered before it
    /// closed. A connection reset ends the answer too: the endpoint closes a socket
    /// whose request it did not read to the end, and the kernel then resets it.
    async fn ask(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        let read_all = async {
            while let Ok(n @ 1..) = stream.read(&mut chunk).await {
                answer.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read_all)
            .await
            .expect("the endpoint answers and closes");
        String::from_utf8(answer).unwrap()
    }

    #[tokio::test]
    async fn the_endpoint_answers_scrapes_health_checks_and_nothing_else() {
        // A recorder of the test's own: the global one is not installed here.
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, handle));
        timing(
            TRANSACTION_DURATION,
            &[("database", "endpoint".to_string())],
            &[0.001],
        )
        .record(Duration::from_micros(10));

        let metrics = ask(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (head, body) = metrics.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(
            body.contains(&format!(
                "{TRANSACTION_DURATION}_bucket{{database=\"endpoint\",le=\"0.001\"}} 1\n"
            )),
            "{body}"
        );

        let health = ask(addr, b"GET /health HTTP/1.0\r\n\r\n").await;
        assert!(health.starts_with("HTTP/1.1 200 OK\r\n") && health.ends_with("\r\n\r\nOK"));

        let post = ask(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");

        // A request head that never ends is cut off, not buffered without bound.
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'x', REQUEST_MAX + 2048));
        let refused = ask(addr, &huge).await;
        assert!(refused.starts_with("HTTP/1.1 431 "), "{refused}");
    }
}
