//! TLS on both sides of pgmux: psql (libpq) as the client, the harness's PostgreSQL
//! (with `ssl = on`) as the server, and raw sockets for the protocol edge cases.
//! Certificates are made at test time with rcgen.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// PEM files for one test run.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn ca(&self) -> String {
        self.path("ca.crt").display().to_string()
    }
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A CA, a second unrelated CA, and certificates signed by the first:
/// * `server.crt` for pgmux: SAN localhost and 127.0.0.1
/// * `pg.crt` for PostgreSQL: SAN localhost only (so 127.0.0.1 fails verify-full)
/// * `app.crt`: a client certificate with CN=app
/// * `other-app.crt`: CN=app, signed by the other CA
fn certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(|| {
        let base = std::env::temp_dir();
        // Statics are never dropped: each run removes what earlier, finished runs left.
        for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("pgmux-tls-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = base.join(format!("pgmux-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let make_ca = |name: &str| {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let cert = params.self_signed(&key).unwrap();
            (cert, key)
        };
        let (ca, ca_key) = make_ca("pgmux test CA");
        let (other_ca, other_key) = make_ca("unrelated CA");
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        std::fs::write(dir.join("other-ca.crt"), other_ca.pem()).unwrap();
        let leaf = |file: &str,
                    sans: &[&str],
                    cn: &str,
                    issuer: &rcgen::Certificate,
                    issuer_key: &KeyPair| {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, issuer, issuer_key).unwrap();
            std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).unwrap();
            write_private(&dir.join(format!("{file}.key")), &key.serialize_pem());
        };
        leaf("server", &["localhost", "127.0.0.1"], "pgmux", &ca, &ca_key);
        leaf("pg", &["localhost"], "postgres", &ca, &ca_key);
        leaf("app", &[], "app", &ca, &ca_key);
        leaf("app_md5", &[], "app_md5", &ca, &ca_key);
        leaf("other-app", &[], "app", &other_ca, &other_key);
        Certs { dir }
    })
}

/// `[pgmux]` lines for client TLS with pgmux's certificate.
fn client_tls(mode: &str) -> String {
    let c = certs();
    format!(
        "client_tls_mode = \"{mode}\"\nclient_tls_cert = \"{}\"\nclient_tls_key = \"{}\"",
        c.path("server.crt").display(),
        c.path("server.key").display()
    )
}

/// The outcome of one psql run: stdout, or stderr on failure.
fn psql(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
    extra: &str,
    env: &[(&str, String)],
) -> Result<String, String> {
    let conninfo = format!(
        "host={} port={} user={user} dbname={db} connect_timeout=10 {extra}",
        addr.ip(),
        addr.port()
    );
    let mut cmd = Command::new(cluster::pg_bin("psql"));
    cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-c", "\\conninfo", "-c", "SELECT 40 + 2", conninfo.as_str()])
        .env("PGPASSWORD", password)
        // Nothing from the environment may pick the TLS settings.
        .env("PGSSLROOTCERT", "/nonexistent")
        .env("PGSSLCERT", "/nonexistent")
        .env("PGSSLKEY", "/nonexistent")
        .env_remove("PGSSLMODE")
        .env_remove("PGCHANNELBINDING")
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

async fn psql_async(
    addr: SocketAddr,
    user: &'static str,
    password: &'static str,
    db: String,
    extra: String,
    env: Vec<(&'static str, String)>,
) -> Result<String, String> {
    tokio::task::spawn_blocking(move || psql(addr, user, password, &db, &extra, &env))
        .await
        .unwrap()
}

fn is_tls(conninfo: &str) -> bool {
    conninfo.contains("SSL connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_sslmodes_against_each_client_tls_mode() {
    let primary = &cluster::shared().primary;
    let db = fresh_db(primary, "tlsmodes");
    let roots = vec![("PGSSLROOTCERT", certs().ca())];
    for mode in ["disable", "allow", "prefer", "require"] {
        let general = if mode == "disable" {
            String::new()
        } else {
            client_tls(mode)
        };
        let mux = start_pgmux(&config_text(primary, &db, &general, "")).await;
        for sslmode in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            let env = if sslmode.starts_with("verify") {
                roots.clone()
            } else {
                vec![]
            };
            let got = psql_async(
                mux.addr,
                "app",
                "app-secret",
                db.clone(),
                format!("sslmode={sslmode}"),
                env,
            )
            .await;
            let tls_expected = mode != "disable" && sslmode != "disable";
            let refused = (mode == "disable"
                && matches!(sslmode, "require" | "verify-ca" | "verify-full"))
                || (mode == "require" && sslmode == "disable");
            match got {
                Ok(out) => {
                    assert!(!refused, "{mode}/{sslmode}: should be refused, got {out}");
                    assert!(out.ends_with("42"), "{mode}/{sslmode}: {out}");
                    assert_eq!(is_tls(&out), tls_expected, "{mode}/{sslmode}: {out}");
                }
                Err(e) => {
                    assert!(refused, "{mode}/{sslmode}: refused: {e}");
                    if mode == "require" {
                        assert!(e.contains("client_tls_mode = \"require\""), "{e}");
                    } else {
                        assert!(e.contains("server does not support SSL"), "{e}");
                    }
                }
            }
        }
        mux.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_fails_with_an_unrelated_ca() {
    let primary = &cluster::shared().primary;
    let db = fresh_db(primary, "tlsca");
    let mux = start_pgmux(&config_text(primary, &db, &client_tls("require"), "")).await;
    let env = vec![(
        "PGSSLROOTCERT",
        certs().path("other-ca.crt").display().to_string(),
    )];
    let err = psql_async(
        mux.addr,
        "app",
        "app-secret",
        db.clone(),
        "sslmode=verify-full".into(),
        env,
    )
    .await
    .unwrap_err();
    assert!(err.contains("certificate verify failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_channel_binding_with_psql() {
    let primary = &cluster::shared().primary;
    let db = fresh_db(primary, "tlscb");
    let mux = start_pgmux(&config_text(primary, &db, &client_tls("prefer"), "")).await;
    let out = psql_async(
        mux.addr,
        "app",
        "app-secret",
        db.clone(),
        "sslmode=require channel_binding=require".into(),
        vec![],
    )
    .await
    .unwrap();
    assert!(is_tls(&out) && out.ends_with("42"), "{out}");
    let err = psql_async(
        mux.addr,
        "app",
        "wrong",
        db.clone(),
        "sslmode=require channel_binding=require".into(),
        vec![],
    )
    .await
    .unwrap_err();
    assert!(err.contains("password authentication failed"), "{err}");
    // Without TLS there is nothing to bind to: libpq refuses by itself.
    let err = psql_async(
        mux.addr,
        "app",
        "app-secret",
        db.clone(),
        "sslmode=disable channel_binding=require".into(),
        vec![],
    )
    .await
    .unwrap_err();
    assert!(err.contains("channel binding"), "{err}");
    // md5 offers no SCRAM at all, so channel_binding=require cannot be met.
    let general = format!("{}\nauth_type = \"md5\"", client_tls("prefer"));
    let md5 = start_pgmux(&config_text(primary, &db, &general, "")).await;
    let err = psql_async(
        md5.addr,
        "app",
        "app-secret",
        db.clone(),
        "sslmode=require channel_binding=require".into(),
        vec![],
    )
    .await
    .unwrap_err();
    assert!(err.contains("channel binding"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_authentication_with_psql() {
    let primary = &cluster::shared().primary;
    let db = fresh_db(primary, "tlscert");
    let c = certs();
    let general = format!(
        "{}\nauth_type = \"cert\"\nclient_tls_ca = \"{}\"",
        client_tls("require"),
        c.ca()
    );
    let mux = start_pgmux(&config_text(primary, &db, &general, "")).await;
    let with_cert = |name: &str| {
        vec![
            (
                "PGSSLCERT",
                c.path(&format!("{name}.crt")).display().to_string(),
            ),
            (
                "PGSSLKEY",
                c.path(&format!("{name}.key")).display().to_string(),
            ),
        ]
    };
    // No password is asked for: the certificate is the proof.
    let out = psql_async(
        mux.addr,
        "app",
        "not-used",
        db.clone(),
        "sslmode=require".into(),
        with_cert("app"),
    )
    .await
    .unwrap();
    assert!(is_tls(&out) && out.ends_with("42"), "{out}");

    // A certificate for another user.
    let err = psql_async(
        mux.addr,
        "app_md5",
        "",
        db.clone(),
        "sslmode=require".into(),
        with_cert("app"),
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("certificate authentication failed for user \"app_md5\""),
        "{err}"
    );
    // The right certificate for that user works too (its server login uses the password).
    let out = psql_async(
        mux.addr,
        "app_md5",
        "",
        db.clone(),
        "sslmode=require".into(),
        with_cert("app_md5"),
    )
    .await
    .unwrap();
    assert!(out.ends_with("42"), "{out}");

    // No certificate at all.
    let err = psql_async(
        mux.addr,
        "app",
        "app-secret",
        db.clone(),
        "sslmode=require".into(),
        vec![],
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("connection requires a valid client certificate"),
        "{err}"
    );

    // CN=app, but from a CA pgmux does not trust: the handshake fails.
    let err = psql_async(
        mux.addr,
        "app",
        "",
        db.clone(),
        "sslmode=require".into(),
        with_cert("other-app"),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_lowercase().contains("ssl") || err.contains("certificate"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_tokio_postgres_still_works_with_tls_on() {
    let primary = &cluster::shared().primary;
    let db = fresh_db(primary, "tlsplain");
    let mux = start_pgmux(&config_text(primary, &db, &client_tls("prefer"), "")).await;
    // tokio-postgres with NoTls sends no SSLRequest (sslmode=prefer falls back to plain).
    for extra in ["", "sslmode=disable", "sslmode=prefer"] {
        let client = connect_with(mux.addr, "app", "app-secret", &db, extra)
            .await
            .unwrap();
        let v: i32 = client
            .query_one("SELECT $1::int + 1", &[&41])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 42, "{extra}");
    }
    // With client_tls_mode = "require", the same plaintext client is refused.
    let strict = start_pgmux(&config_text(primary, &db, &client_tls("require"), "")).await;
    let err = connect(strict.addr, "app", "app-secret", &db)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"), "{err}");
    assert!(message(&err).contains("without TLS"), "{}", message(&err));
    // A CancelRequest needs no TLS (libpq before 17 sends it in plaintext): it is taken
    // and the connection closed without an error.
    let mut cancel = TcpStream::connect(strict.addr).await.unwrap();
    let mut packet = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    packet.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2]);
    cancel.write_all(&packet).await.unwrap();
    assert!(read_to_close(&mut cancel).await.is_empty());
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Everything the peer sends until it closes (or 5 s pass).
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut all)).await;
    all
}

fn table_exists(primary: &cluster::Cluster, db: &str, table: &str) -> bool {
    primary.psql_db(
        db,
        &format!("SELECT count(*) FROM pg_class WHERE relname = '{table}'"),
    ) == "1"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_after_ssl_request_is_refused_and_not_run() {
    let primary = &cluster::shared().primary;
    let db = fresh_db(primary, "tlsinject");
    for mode in ["disable", "prefer", "require"] {
        let general = if mode == "disable" {
            "auth_type = \"trust\"".to_string()
        } else {
            format!("{}\nauth_type = \"trust\"", client_tls(mode))
        };
        let mux = start_pgmux(&config_text(primary, &db, &general, "")).await;
        let table = format!("injected_{mode}");
        // SSLRequest, then (in the same segment) a plaintext login and a query: a man in
        // the middle's injection, CVE-2021-23214 style.
        let mut bytes = SSL_REQUEST.to_vec();
        bytes.extend(startup_packet(
            3 << 16,
            &[("user", "app"), ("database", &db)],
        ));
        bytes.extend(query_packet(&format!("CREATE TABLE {table}()")));
        let mut stream = TcpStream::connect(mux.addr).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        let reply = read_to_close(&mut stream).await;
        assert_ne!(reply.first(), Some(&b'S'), "{mode}: TLS was offered");
        assert_ne!(reply.first(), Some(&b'N'), "{mode}: negotiation went on");
        assert_eq!(reply.first(), Some(&b'E'), "{mode}: {reply:?}");
        let text = String::from_utf8_lossy(&reply);
        assert!(
            text.contains("08P01") && text.contains("unencrypted data after SSL request"),
            "{text}"
        );
        assert!(
            !table_exists(primary, &db, &table),
            "{mode}: the injected query ran"
        );

        if mode != "disable" {
            // Plaintext after the `S`: the TLS handshake fails, nothing runs.
            let mut stream = TcpStream::connect(mux.addr).await.unwrap();
            stream.write_all(&SSL_REQUEST).await.unwrap();
            let mut s = [0u8; 1];
            stream.read_exact(&mut s).await.unwrap();
            assert_eq!(&s, b"S");
            let mut bytes = startup_packet(3 << 16, &[("user", "app"), ("database", &db)]);
            bytes.extend(query_packet(&format!("CREATE TABLE {table}()")));
            stream.write_all(&bytes).await.unwrap();
            let reply = read_to_close(&mut stream).await;
            assert!(
                !reply.contains(&b'Z'),
                "{mode}: a session started: {reply:?}"
            );
            assert!(!table_exists(primary, &db, &table), "{mode}: the query ran");
        }

        // A normal client still gets in.
        if mode == "require" {
            let out = psql_async(
                mux.addr,
                "app",
                "x",
                db.clone(),
                "sslmode=require".into(),
                vec![],
            )
            .await
            .unwrap();
            assert!(is_tls(&out) && out.ends_with("42"), "{out}");
        } else {
            let client = connect(mux.addr, "app", "x", &db).await.unwrap();
            assert_eq!(
                simple_value(&client, "SELECT 7").await.as_deref(),
                Some("7")
            );
        }
    }
}

/// A rustls client config that trusts the test CA, with `alpn` if given.
fn tls_client(alpn: Option<&[u8]>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(certs().path("ca.crt")).unwrap();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    if let Some(alpn) = alpn {
        config.alpn_protocols = vec![alpn.to_vec()];
    }
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_like_postgres_17() {
    let primary = &cluster::shared().primary;
    let db = fresh_db(primary, "tlsdirect");
    let general = format!("{}\nauth_type = \"trust\"", client_tls("require"));
    let mux = start_pgmux(&config_text(primary, &db, &general, "")).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // The handshake first, ALPN "postgresql", then the startup packet inside TLS.
    let tcp = TcpStream::connect(mux.addr).await.unwrap();
    let mut tls = tls_client(Some(b"postgresql"))
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    tls.write_all(&startup_packet(
        3 << 16,
        &[("user", "app"), ("database", &db)],
    ))
    .await
    .unwrap();
    tls.write_all(&query_packet("SELECT 6 * 7")).await.unwrap();
    tls.flush().await.unwrap();
    let mut seen = Vec::new();
    let mut zs = 0;
    while zs < 2 {
        let mut head = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut head))
            .await
            .unwrap()
            .unwrap();
        let len = i32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut body = vec![0; len - 4];
        tls.read_exact(&mut body).await.unwrap();
        if head[0] == b'Z' {
            zs += 1;
        }
        if head[0] == b'D' {
            seen.extend_from_slice(&body);
        }
        assert_ne!(head[0], b'E', "{}", String::from_utf8_lossy(&body));
    }
    assert!(seen.ends_with(b"42"), "{seen:?}");

    // Direct TLS without ALPN: refused after the handshake, with an error.
    let tcp = TcpStream::connect(mux.addr).await.unwrap();
    let mut tls = tls_client(None).connect(name.clone(), tcp).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut reply)).await;
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("ALPN"), "{text}");

    // Another application protocol only: the handshake itself fails.
    let tcp = TcpStream::connect(mux.addr).await.unwrap();
    assert!(tls_client(Some(b"http/1.1"))
        .connect(name.clone(), tcp)
        .await
        .is_err());

    // With TLS off, a direct TLS client is just closed.
    let plain = start_pgmux(&config_text(primary, &db, "auth_type = \"trust\"", "")).await;
    let tcp = TcpStream::connect(plain.addr).await.unwrap();
    assert!(tls_client(Some(b"postgresql"))
        .connect(name, tcp)
        .await
        .is_err());
    let client = connect(plain.addr, "app", "x", &db).await.unwrap();
    assert_eq!(
        simple_value(&client, "SELECT 1").await.as_deref(),
        Some("1")
    );
}

/// Turns on TLS on the shared primary, once: pg.crt (SAN localhost only) and the test
/// CA for client certificates. Plain connections keep working (pg_hba has `host`).
fn server_ssl_on() -> &'static cluster::Cluster {
    static DONE: OnceLock<()> = OnceLock::new();
    let primary = &cluster::shared().primary;
    DONE.get_or_init(|| {
        use std::os::unix::fs::MetadataExt;
        let data = primary.data_dir();
        let meta = std::fs::metadata(data).unwrap();
        for name in ["pg.crt", "pg.key", "ca.crt"] {
            let to = data.join(format!("test-{name}"));
            std::fs::copy(certs().path(name), &to).unwrap();
            std::os::unix::fs::chown(&to, Some(meta.uid()), Some(meta.gid())).unwrap();
        }
        primary.append_conf("ssl = on");
        primary.append_conf("ssl_cert_file = 'test-pg.crt'");
        primary.append_conf("ssl_key_file = 'test-pg.key'");
        primary.append_conf("ssl_ca_file = 'test-ca.crt'");
        primary.reload();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while primary.psql("SHOW ssl") != "on" {
            assert!(std::time::Instant::now() < deadline, "ssl did not turn on");
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    primary
}

const SSL_OF_BACKEND: &str =
    "SELECT ssl::text || ',' || coalesce(client_dn, '') FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_modes_against_postgres() {
    let primary = server_ssl_on();
    let db = fresh_db(primary, "srvtls");
    let c = certs();
    let cases: [(&str, &str, &str, Option<&str>); 8] = [
        // (server_tls_mode, host, CA file, expected ssl,client_dn or None for failure)
        ("disable", "127.0.0.1", "", Some("false,")),
        ("prefer", "127.0.0.1", "", Some("true,")),
        ("require", "127.0.0.1", "", Some("true,")),
        ("require", "127.0.0.1", "other-ca.crt", None),
        ("verify-ca", "127.0.0.1", "ca.crt", Some("true,")),
        ("verify-ca", "127.0.0.1", "other-ca.crt", None),
        // pg.crt names localhost only.
        ("verify-full", "127.0.0.1", "ca.crt", None),
        ("verify-full", "localhost", "ca.crt", Some("true,")),
    ];
    for (mode, host, ca, expected) in cases {
        let mut general = format!("server_tls_mode = \"{mode}\"");
        if !ca.is_empty() {
            general += &format!("\nserver_tls_ca = \"{}\"", c.path(ca).display());
        }
        let text = config_text(primary, &db, &general, "")
            .replace("host = \"127.0.0.1\"", &format!("host = \"{host}\""));
        let mux = start_pgmux(&text).await;
        let got = connect(mux.addr, "app", "app-secret", &db).await;
        match (got, expected) {
            (Ok(client), Some(want)) => {
                let ssl = simple_value(&client, SSL_OF_BACKEND).await;
                assert_eq!(ssl.as_deref(), Some(want), "{mode} {host} {ca}");
            }
            (Err(e), None) => {
                let m = message(&e);
                assert!(
                    m.contains("TLS handshake failed") || m.contains("certificate"),
                    "{mode} {host} {ca}: {m}"
                );
            }
            (Ok(_), None) => panic!("{mode} {host} {ca}: connected"),
            (Err(e), Some(_)) => panic!("{mode} {host} {ca}: {}", message(&e)),
        }
        mux.shutdown(Duration::from_secs(1)).await;
    }

    // A client certificate towards the server (PostgreSQL has ssl_ca_file set, so it
    // asks for one and verifies it).
    let general = format!(
        "server_tls_mode = \"verify-full\"\nserver_tls_ca = \"{}\"\nserver_tls_cert = \"{}\"\nserver_tls_key = \"{}\"",
        c.ca(),
        c.path("app.crt").display(),
        c.path("app.key").display()
    );
    let text = config_text(primary, &db, &general, "")
        .replace("host = \"127.0.0.1\"", "host = \"localhost\"");
    let mux = start_pgmux(&text).await;
    let client = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    assert_eq!(
        simple_value(&client, SSL_OF_BACKEND).await.as_deref(),
        Some("true,/CN=app")
    );

    // Both sides at once, with psql and channel binding on the client side.
    let general = format!(
        "{}\nserver_tls_mode = \"verify-full\"\nserver_tls_ca = \"{}\"",
        client_tls("require"),
        c.ca()
    );
    let text = config_text(primary, &db, &general, "")
        .replace("host = \"127.0.0.1\"", "host = \"localhost\"");
    let mux = start_pgmux(&text).await;
    let out = psql_async(
        mux.addr,
        "app",
        "app-secret",
        db.clone(),
        "sslmode=verify-full channel_binding=require".into(),
        vec![("PGSSLROOTCERT", c.ca())],
    )
    .await
    .unwrap();
    assert!(is_tls(&out) && out.ends_with("42"), "{out}");
}

/// A fake server that answers an SSLRequest with `answer`, then waits for the peer to go.
async fn fake_server(answer: &'static [u8]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = [0u8; 8];
                if s.read_exact(&mut req).await.is_ok() && req == SSL_REQUEST {
                    let _ = s.write_all(answer).await;
                    let mut rest = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
                        .await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_answers_are_checked() {
    // `S` followed at once by plaintext AuthenticationOk + ReadyForQuery: what a man in
    // the middle would inject (CVE-2021-23222).
    let injected: &'static [u8] = b"SR\0\0\0\x08\0\0\0\0Z\0\0\0\x05I";
    let cases: [(&str, &'static [u8], &str); 3] = [
        ("require", injected, "unencrypted data"),
        (
            "require",
            b"N",
            "server does not support TLS, but server_tls_mode = \"require\"",
        ),
        ("prefer", b"E", "unexpected response"),
    ];
    for (mode, answer, expect) in cases {
        let server = fake_server(answer).await;
        let config = format!(
            "[pgmux]\nlisten = \"127.0.0.1:0\"\nauth_type = \"trust\"\nserver_tls_mode = \"{mode}\"\n\
             [users.app]\npassword = \"x\"\n[databases.db]\nhost = \"127.0.0.1\"\nport = {}\n",
            server.port()
        );
        let mux = start_pgmux(&config).await;
        let err = connect(mux.addr, "app", "x", "db").await.unwrap_err();
        assert!(message(&err).contains(expect), "{mode}: {}", message(&err));
        assert_eq!(sqlstate(&err).as_deref(), Some("08006"));
    }
}

#[test]
fn tls_config_errors_name_the_key() {
    let c = certs();
    let base = "[pgmux]\nlisten = \"127.0.0.1:0\"\n";
    let cases = [
        ("client_tls_mode = \"require\"".to_string(), "pgmux.client_tls_cert"),
        (
            format!("client_tls_mode = \"prefer\"\nclient_tls_cert = \"{}\"", c.path("server.crt").display()),
            "pgmux.client_tls_key",
        ),
        (
            "client_tls_mode = \"prefer\"\nclient_tls_cert = \"/nonexistent.crt\"\nclient_tls_key = \"/nonexistent.key\"".to_string(),
            "pgmux.client_tls_cert",
        ),
        (
            format!(
                "client_tls_mode = \"prefer\"\nclient_tls_cert = \"{}\"\nclient_tls_key = \"{}\"",
                c.path("server.key").display(),
                c.path("server.key").display()
            ),
            "pgmux.client_tls_cert",
        ),
        (
            format!(
                "client_tls_mode = \"prefer\"\nclient_tls_cert = \"{}\"\nclient_tls_key = \"{}\"",
                c.path("server.crt").display(),
                c.path("server.crt").display()
            ),
            "pgmux.client_tls_key",
        ),
        (
            // A key that does not belong to the certificate.
            format!(
                "client_tls_mode = \"prefer\"\nclient_tls_cert = \"{}\"\nclient_tls_key = \"{}\"",
                c.path("server.crt").display(),
                c.path("app.key").display()
            ),
            "pgmux.client_tls_key",
        ),
        (format!("{}\nauth_type = \"cert\"", client_tls("require")), "pgmux.client_tls_ca"),
        ("auth_type = \"cert\"".to_string(), "pgmux.auth_type"),
        ("server_tls_mode = \"verify-full\"".to_string(), "pgmux.server_tls_ca"),
        ("server_tls_mode = \"verify-ca\"\nserver_tls_ca = \"/nonexistent\"".to_string(), "pgmux.server_tls_ca"),
        (
            format!("server_tls_mode = \"require\"\nserver_tls_cert = \"{}\"", c.path("app.crt").display()),
            "pgmux.server_tls_key",
        ),
        ("client_tls_mode = \"sometimes\"".to_string(), "client_tls_mode"),
    ];
    for (lines, key) in cases {
        let err = pgmux::config::Config::parse(&format!("{base}{lines}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{lines}: {err}");
    }
    let ok = format!(
        "{base}{}\nclient_tls_ca = \"{}\"\nauth_type = \"cert\"\n",
        client_tls("require"),
        c.ca()
    );
    pgmux::config::Config::parse(&ok).unwrap();
}

/// psql with `-f -`: runs `sql` from stdin (or feeds `stdin` to a COPY given by -c).
fn psql_stdin(addr: SocketAddr, db: &str, args: &[&str], stdin: Vec<u8>) -> Result<String, String> {
    use std::io::Write;
    let conninfo = format!(
        "host={} port={} user=app dbname={db} sslmode=require connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    let mut child = Command::new(cluster::pg_bin("psql"))
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .arg(conninfo)
        .env("PGPASSWORD", "app-secret")
        .env_remove("PGSSLMODE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut input = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    writer.join().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_traffic_and_many_clients_over_tls() {
    let primary = &cluster::shared().primary;
    let db = fresh_db(primary, "tlsbulk");
    let general = format!("{}\ndefault_pool_size = 2", client_tls("require"));
    let mux = start_pgmux(&config_text(primary, &db, &general, "")).await;
    let addr = mux.addr;

    // 20 MB of results towards the client, in large DataRows.
    let d = db.clone();
    let out = tokio::task::spawn_blocking(move || {
        psql_stdin(
            addr,
            &d,
            &[
                "-c",
                "SELECT repeat('x', 1000000) FROM generate_series(1, 20)",
            ],
            vec![],
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(out.len(), 20 * 1_000_000 + 19, "rows and newlines");

    // 8 MB of COPY data towards the server.
    let mut data = Vec::new();
    for i in 0..80_000 {
        data.extend_from_slice(format!("{}\n", "y".repeat(99 + i % 2)).as_bytes());
    }
    let d = db.clone();
    tokio::task::spawn_blocking(move || {
        psql_stdin(addr, &d, &["-c", "COPY items(v) FROM STDIN"], data)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        primary.psql_db(&db, "SELECT count(*), sum(length(v)) FROM items"),
        "80000|7960000"
    );

    // 12 clients sharing 2 servers, 30 transactions each, over TLS.
    let script: String = (0..30)
        .map(|i| format!("BEGIN; INSERT INTO items(v) VALUES ('t{i}'); COMMIT;\n"))
        .collect();
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let d = db.clone();
        let s = script.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            psql_stdin(addr, &d, &["-f", "-"], s.into_bytes())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        primary.psql_db(&db, "SELECT count(*) FROM items WHERE v LIKE 't%'"),
        "360"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_tls_server() {
    let primary = server_ssl_on();
    let db = fresh_db(primary, "srvcancel");
    let general = format!(
        "server_tls_mode = \"verify-full\"\nserver_tls_ca = \"{}\"",
        certs().ca()
    );
    let text = config_text(primary, &db, &general, "")
        .replace("host = \"127.0.0.1\"", "host = \"localhost\"");
    let mux = start_pgmux(&text).await;
    let client = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = std::time::Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = sleeper.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_over_tls_with_channel_binding() {
    let primary = &cluster::shared().primary;
    let db = fresh_db(primary, "tlsconsole");
    let general = format!("{}\nadmin_users = [\"app\"]", client_tls("require"));
    let mux = start_pgmux(&config_text(primary, &db, &general, "")).await;
    let addr = mux.addr;
    let out = tokio::task::spawn_blocking(move || {
        let conninfo = format!(
            "host={} port={} user=app dbname=pgmux connect_timeout=10 sslmode=require channel_binding=require",
            addr.ip(),
            addr.port()
        );
        Command::new(cluster::pg_bin("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-c", "\\conninfo", "-c", "SHOW VERSION", conninfo.as_str()])
            .env("PGPASSWORD", "app-secret")
            .env("PGSSLROOTCERT", "/nonexistent")
            .env("PGSSLCERT", "/nonexistent")
            .env("PGSSLKEY", "/nonexistent")
            .env_remove("PGSSLMODE")
            .env_remove("PGCHANNELBINDING")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_tls(&stdout), "{stdout}");
    assert!(
        stdout.contains(&format!("pgmux {}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
}

/// The certificate pgmux presents in a direct-TLS handshake.
async fn presented_certificate(addr: SocketAddr) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tls_client(Some(b"postgresql"))
        .connect(name, tcp)
        .await
        .expect("handshake");
    let certs = tls.get_ref().1.peer_certificates().expect("a certificate");
    certs[0].as_ref().to_vec()
}

fn der_of(pem_path: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(pem_path).unwrap();
    rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .unwrap()
        .unwrap()
        .as_ref()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_picks_up_new_certificates_and_refuses_broken_ones() {
    let c = certs();
    let primary = &cluster::shared().primary;
    let db = fresh_db(primary, "tlsreload");
    // Files of this test's own, replaced while pgmux runs.
    let dir = c.dir.join(format!("reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("live.crt"), dir.join("live.key"));
    std::fs::copy(c.path("server.crt"), &cert).unwrap();
    std::fs::copy(c.path("server.key"), &key).unwrap();
    let general = format!(
        "client_tls_mode = \"prefer\"\nclient_tls_cert = \"{}\"\nclient_tls_key = \"{}\"\nauth_type = \"trust\"",
        cert.display(),
        key.display()
    );
    let text = config_text(primary, &db, &general, "");
    let path = dir.join("pgmux.toml");
    std::fs::write(&path, &text).unwrap();
    let mux = start_pgmux(&text).await;
    mux.app.set_config_path(&path);
    assert_eq!(
        presented_certificate(mux.addr).await,
        der_of(&c.path("server.crt"))
    );

    // Renewed files at the same paths: new handshakes present the new certificate.
    std::fs::copy(c.path("pg.crt"), &cert).unwrap();
    std::fs::copy(c.path("pg.key"), &key).unwrap();
    mux.app
        .reload()
        .await
        .expect("reload with renewed certificates");
    assert_eq!(
        presented_certificate(mux.addr).await,
        der_of(&c.path("pg.crt"))
    );

    // A broken key fails the whole reload; the material in use stays.
    std::fs::write(&key, "not a key").unwrap();
    let err = mux.app.reload().await.expect_err("a broken key is refused");
    assert!(err.contains("client_tls_key"), "{err}");
    assert_eq!(
        presented_certificate(mux.addr).await,
        der_of(&c.path("pg.crt"))
    );
    // And TLS clients still log in.
    let out = psql_async(
        mux.addr,
        "app",
        "unused",
        db.clone(),
        "sslmode=require".into(),
        vec![],
    )
    .await
    .expect("psql over TLS after the refused reload");
    assert!(out.contains("SSL connection"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_sslmodes_against_each_client_tls_mode() {
    let python = common::drivers::python();
    let primary = &cluster::shared().primary;
    let db = fresh_db(primary, "tlspsycopg");
    for mode in ["disable", "prefer", "require"] {
        let general = if mode == "disable" {
            String::new()
        } else {
            client_tls(mode)
        };
        let mux = start_pgmux(&config_text(primary, &db, &general, "")).await;
        let mut cmd = Command::new(&python);
        cmd.arg(common::drivers::script("psycopg_tls.py"))
            .arg(mux.addr.port().to_string())
            .arg(&db)
            .arg(certs().ca())
            .arg(mode)
            .env_remove("PGSSLMODE");
        let out = common::drivers::run_child(cmd, Duration::from_secs(60)).await;
        assert!(out.success, "{}", out.describe());
        for sslmode in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            let line = out
                .stdout
                .lines()
                .find(|l| l.starts_with(&format!("sslmode={sslmode} ")))
                .unwrap_or_else(|| panic!("{mode}/{sslmode} missing: {}", out.describe()));
            let refused = (mode == "disable"
                && matches!(sslmode, "require" | "verify-ca" | "verify-full"))
                || (mode == "require" && sslmode == "disable");
            // allow tries plaintext first, and only a refusal makes it use TLS.
            let tls = mode != "disable"
                && sslmode != "disable"
                && !(sslmode == "allow" && mode != "require");
            let expected = if refused {
                "refused=".to_string()
            } else {
                format!("tls={}", if tls { "yes" } else { "no" })
            };
            assert!(
                line.contains(&expected),
                "{mode}/{sslmode}: expected {expected}, got {line}"
            );
        }
        mux.shutdown(Duration::from_secs(1)).await;
    }
}
