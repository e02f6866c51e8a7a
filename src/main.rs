//! The pgmux command line.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use pgmux::config::Config;

/// mimalloc rather than glibc's malloc: every transaction allocates and frees a few
/// small blocks (its boxed state, the hand-over from the pool), and with hundreds of
/// clients those frees overflow glibc's per-thread cache. Measured with 500 `pgbench -S`
/// clients, it took pgmux's user CPU per transaction from about 7.5 µs to 6.3 µs. Its
/// version 2 line, not the crate's default version 3: Rust's allocator interface asks
/// for every block with an alignment, and version 3's aligned path cost about 290
/// instructions per transaction where version 2's costs about 145 (callgrind), and an
/// idle client 2,097 bytes where version 2's costs 1,887 (10,000 idle clients).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "pgmux", version, about = "A PostgreSQL connection pooler")]
struct Args {
    /// Path of the TOML configuration file.
    #[arg(short = 'c', long = "config", default_value = "conf/pgmux.toml")]
    config: PathBuf,
    /// Validate the configuration, print what is wrong, and exit.
    #[arg(long)]
    check: bool,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level or filter (e.g. `info`, `pgmux=debug`); overrides RUST_LOG.
    #[arg(long)]
    log_level: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("pgmux: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: configuration is valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    init_logging(&args);

    // One thread by default: with clients and servers on the same thread a transaction's
    // wake-ups, locks and buffers stay on one core. On the 2-core benchmark machine that
    // took about 15% less CPU per transaction than two workers (bench/README.md).
    let mut builder = match config.pgmux.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                builder.worker_threads(n);
            }
            builder
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pgmux: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config, args.config))
}

fn init_logging(args: &Args) {
    let filter = match &args.log_level {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(config: Config, path: PathBuf) -> ExitCode {
    if let Some(addr) = config.pgmux.metrics_listen {
        if let Err(e) = pgmux::metrics::install(addr, config.pgmux.query_wait_timeout).await {
            eprintln!("pgmux: cannot serve metrics on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    }
    // Signal handlers go in before the listener opens: a test or an init system may send
    // SIGHUP as soon as the port answers, and SIGHUP's default action ends the process.
    // A signal that arrives before its task runs is kept by tokio and seen then.
    use tokio::signal::unix::{signal, SignalKind};
    let hup = signal(SignalKind::hangup());
    let mut stop = match StopSignals::install() {
        Ok(stop) => stop,
        Err(e) => {
            eprintln!("pgmux: cannot handle SIGTERM/SIGINT: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown_timeout = config.pgmux.shutdown_timeout;
    let running = match pgmux::start(config).await {
        Ok(running) => running,
        Err(e) => {
            eprintln!("pgmux: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    running.app.set_config_path(&path);
    match hup {
        Ok(hup) => {
            tokio::spawn(reload_on_hangup(hup, std::sync::Arc::clone(&running.app)));
        }
        Err(e) => warn!(error = %e, "cannot handle SIGHUP; reload from the console only"),
    }
    tokio::select! {
        _ = stop.recv() => {}
        // The console's SHUTDOWN.
        _ = running.app.shutdown.cancelled() => {}
    }
    info!("shutting down: no new clients; running transactions may finish");
    tokio::select! {
        _ = running.shutdown(shutdown_timeout) => {}
        _ = stop.recv() => warn!("second stop signal: exiting at once"),
    }
    info!("pgmux stopped");
    ExitCode::SUCCESS
}

/// SIGHUP re-reads the configuration file. A file that fails to load or validate is
/// rejected as a whole (the reload logs why) and the running configuration stays.
async fn reload_on_hangup(mut hup: tokio::signal::unix::Signal, app: std::sync::Arc<pgmux::App>) {
    while hup.recv().await.is_some() {
        info!("SIGHUP received: reloading the configuration");
        let _ = app.reload().await;
    }
}

/// SIGTERM and SIGINT, both of which begin a graceful shutdown (and a second one ends it
/// at once).
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
