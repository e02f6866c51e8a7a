//! Running real client programs (Python drivers in the test virtualenv, pgjdbc, node)
//! as child processes, bounded in time.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a child process did.
pub struct Outcome {
    pub success: bool,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn describe(&self) -> String {
        format!(
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// Panics unless the child exited 0 and printed no prepared-statement error.
    pub fn assert_clean(&self, what: &str) {
        assert!(self.success, "{what} failed: {}", self.describe());
        let all = format!("{}\n{}", self.stdout, self.stderr);
        for line in all.lines() {
            let statement_error = line.contains("prepared statement")
                && (line.contains("does not exist") || line.contains("already exists"));
            let python_class = line.contains("InvalidSQLStatementName")
                || line.contains("DuplicatePreparedStatement");
            assert!(
                !statement_error && !python_class,
                "{what} hit a prepared-statement error: {line}\n{}",
                self.describe()
            );
        }
    }
}

/// Runs `cmd` to completion on a blocking thread (pgmux runs on this runtime), killing
/// it after `limit`. Output is read by threads of its own, so a chatty child never
/// blocks on a full pipe.
pub async fn run_child(mut cmd: Command, limit: Duration) -> Outcome {
    let program = format!("{cmd:?}");
    tokio::task::spawn_blocking(move || {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {program}: {e}"));
        let reader = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                text.push_str(&String::from_utf8_lossy(&bytes));
                text
            })
        };
        let out = reader(Box::new(child.stdout.take().expect("piped")));
        let err = reader(Box::new(child.stderr.take().expect("piped")));
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break format!("{status}");
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break format!("killed after the time limit of {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Outcome {
            success: status == "exit status: 0",
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        }
    })
    .await
    .expect("child runner")
}

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn script(name: &str) -> PathBuf {
    manifest_dir().join("tests/drivers").join(name)
}

/// The virtualenv's python with asyncpg and psycopg, or a clear failure.
pub fn python() -> PathBuf {
    let python = match std::env::var_os("PGMUX_TEST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => manifest_dir().join("target/venv/bin/python"),
    };
    assert!(
        python.exists(),
        "no Python for the driver tests at {}: run scripts/test.sh, which creates the \
         virtualenv target/venv with asyncpg and psycopg and sets PGMUX_TEST_PYTHON",
        python.display()
    );
    python
}

/// Compiles `source` (a file in tests/drivers) once per test run into the target's
/// scratch directory.
pub async fn jdbc_classes(jar: &Path, source: &str) -> PathBuf {
    let classes = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("jdbc-classes");
    std::fs::create_dir_all(&classes).expect("create the class directory");
    let mut javac = Command::new("javac");
    javac
        .arg("-d")
        .arg(&classes)
        .arg("-cp")
        .arg(jar)
        .arg(script(source));
    let out = run_child(javac, Duration::from_secs(120)).await;
    assert!(out.success, "javac JdbcCheck.java: {}", out.describe());
    classes
}

/// Debian's pgjdbc jar (`PGMUX_TEST_JDBC_JAR` overrides), or a clear failure.
pub fn jdbc_jar() -> PathBuf {
    let jar = std::env::var_os("PGMUX_TEST_JDBC_JAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/java/postgresql.jar"));
    assert!(
        jar.exists(),
        "pgjdbc is missing at {}: apt-get install libpostgresql-jdbc-java (see .ci/run)",
        jar.display()
    );
    jar
}
