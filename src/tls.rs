//! TLS on both sides: towards clients (pgmux as the TLS server) and towards PostgreSQL
//! servers (pgmux as the TLS client), with rustls and the `ring` provider.
//!
//! Everything here is built from the [`Config`] by [`acceptor`] and [`connector`], so a
//! future configuration reload can rebuild both and swap them in for new connections.
//!
//! The streams are enums rather than trait objects: a plaintext connection pays one
//! `match` per poll, nothing else.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Deserialize;
use sha2::{Digest, Sha256, Sha384, Sha512};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{AuthType, Config, ConfigError};

/// The ALPN protocol name PostgreSQL 17 clients send, and require for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The first byte of a TLS handshake record: how a direct-TLS client (PostgreSQL 17
/// `sslnegotiation=direct`) opens instead of a startup packet's length.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// `client_tls_mode`: what pgmux accepts from clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    /// SSLRequest is answered `N`; direct TLS is refused.
    #[default]
    Disable,
    /// TLS and plaintext are both accepted (on the listening side, `allow` and `prefer`
    /// behave the same: the client chooses).
    Allow,
    /// Same as `allow`.
    Prefer,
    /// Only TLS; a plaintext StartupMessage gets FATAL 28000.
    Require,
}

/// `server_tls_mode`: how pgmux connects to PostgreSQL, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    #[default]
    Disable,
    /// TLS if the server offers it, without certificate checks; plaintext otherwise.
    Prefer,
    /// TLS or fail. The certificate is checked against `server_tls_ca` if that is set
    /// (as libpq does with a root certificate), and not checked otherwise.
    Require,
    /// TLS, with a certificate chain to `server_tls_ca`; the host name is not checked.
    VerifyCa,
    /// TLS, certificate chain to `server_tls_ca`, and the certificate names the host.
    VerifyFull,
}

impl ServerTlsMode {
    /// The name as written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerTlsMode::Disable => "disable",
            ServerTlsMode::Prefer => "prefer",
            ServerTlsMode::Require => "require",
            ServerTlsMode::VerifyCa => "verify-ca",
            ServerTlsMode::VerifyFull => "verify-full",
        }
    }
}

fn invalid(key: &str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(
            key,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

fn load_key(path: &Path, key: &str) -> Result<PrivateKeyDer<'static>, ConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        invalid(
            key,
            format!("cannot read a PEM private key from {}: {e}", path.display()),
        )
    })
}

fn load_roots(path: &Path, key: &str) -> Result<Arc<RootCertStore>, ConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, key)? {
        roots
            .add(cert)
            .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
    }
    Ok(Arc::new(roots))
}

/// What accepting TLS clients needs: the acceptor, and the channel-binding data of the
/// certificate it presents.
#[derive(Clone)]
pub struct Acceptor {
    pub acceptor: TlsAcceptor,
    /// `tls-server-end-point` channel binding data (RFC 5929): the hash of pgmux's own
    /// certificate, for SCRAM-SHA-256-PLUS.
    pub end_point: Arc<[u8]>,
    pub mode: ClientTlsMode,
}

/// Builds the client-side TLS acceptor from `[pgmux]` `client_tls_*`; `None` when
/// `client_tls_mode = "disable"`. Errors name the key at fault.
pub fn acceptor(config: &Config) -> Result<Option<Acceptor>, ConfigError> {
    let g = &config.pgmux;
    if g.client_tls_mode == ClientTlsMode::Disable {
        if g.auth_type == AuthType::Cert {
            return Err(invalid(
                "pgmux.auth_type",
                "\"cert\" needs client_tls_mode other than \"disable\"",
            ));
        }
        return Ok(None);
    }
    let cert_path = g.client_tls_cert.as_deref().ok_or_else(|| {
        invalid(
            "pgmux.client_tls_cert",
            "is required when client_tls_mode is not \"disable\"",
        )
    })?;
    let key_path = g.client_tls_key.as_deref().ok_or_else(|| {
        invalid(
            "pgmux.client_tls_key",
            "is required when client_tls_mode is not \"disable\"",
        )
    })?;
    let certs = load_certs(cert_path, "pgmux.client_tls_cert")?;
    let key = load_key(key_path, "pgmux.client_tls_key")?;
    let end_point = end_point_hash(&certs[0]).into();
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("pgmux.client_tls_mode", e))?;
    let builder = match &g.client_tls_ca {
        Some(ca) => {
            let roots = load_roots(ca, "pgmux.client_tls_ca")?;
            // A client without a certificate may still log in by password; auth_type
            // "cert" refuses it after the handshake, with an error it can read.
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| invalid("pgmux.client_tls_ca", e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None if g.auth_type == AuthType::Cert => {
            return Err(invalid(
                "pgmux.client_tls_ca",
                "is required when auth_type = \"cert\"",
            ))
        }
        None => builder.with_no_client_auth(),
    };
    let mut server_config = builder
        .with_single_cert(certs, key)
        .map_err(|e| invalid("pgmux.client_tls_key", e))?;
    server_config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Some(Acceptor {
        acceptor: TlsAcceptor::from(Arc::new(server_config)),
        end_point,
        mode: g.client_tls_mode,
    }))
}

/// What connecting to servers over TLS needs.
#[derive(Clone)]
pub struct Connector {
    pub mode: ServerTlsMode,
    connector: TlsConnector,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("mode", &self.mode)
            .finish()
    }
}

/// Builds the server-side TLS connector from `[pgmux]` `server_tls_*`; `None` when
/// `server_tls_mode = "disable"`.
pub fn connector(config: &Config) -> Result<Option<Arc<Connector>>, ConfigError> {
    let g = &config.pgmux;
    let mode = g.server_tls_mode;
    if mode == ServerTlsMode::Disable {
        return Ok(None);
    }
    let roots = match &g.server_tls_ca {
        Some(ca) => Some(load_roots(ca, "pgmux.server_tls_ca")?),
        None if matches!(mode, ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull) => {
            return Err(invalid(
                "pgmux.server_tls_ca",
                "is required when server_tls_mode is \"verify-ca\" or \"verify-full\"",
            ))
        }
        None => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (ServerTlsMode::Prefer, _) | (ServerTlsMode::Require, None) => {
            Arc::new(NoCertificateCheck(provider()))
        }
        (ServerTlsMode::Require | ServerTlsMode::VerifyCa, Some(roots)) => {
            Arc::new(ChainOnly(web_pki(roots)?))
        }
        (_, Some(roots)) => web_pki(roots)?,
        (_, None) => unreachable!("verify modes have roots"),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("pgmux.server_tls_mode", e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut client_config = match (&g.server_tls_cert, &g.server_tls_key) {
        (Some(cert), Some(key)) => {
            let certs = load_certs(cert, "pgmux.server_tls_cert")?;
            let key = load_key(key, "pgmux.server_tls_key")?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| invalid("pgmux.server_tls_key", e))?
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err(invalid(
                "pgmux.server_tls_key",
                "is required when server_tls_cert is set",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                "pgmux.server_tls_cert",
                "is required when server_tls_key is set",
            ))
        }
    };
    client_config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Some(Arc::new(Connector {
        mode,
        connector: TlsConnector::from(Arc::new(client_config)),
    })))
}

fn web_pki(roots: Arc<RootCertStore>) -> Result<Arc<WebPkiServerVerifier>, ConfigError> {
    WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| invalid("pgmux.server_tls_ca", e))
}

/// `prefer`, and `require` without a CA: encryption without authentication of the
/// server, as libpq does. Handshake signatures are still verified.
#[derive(Debug)]
struct NoCertificateCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the CA; the name in the certificate is not
/// compared with the host.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the name only after the chain and revocation checks passed.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Fails if bytes are already waiting on `tcp` (without waiting for any). Used right
/// after an SSLRequest and right after a server's answer to one: nothing may arrive
/// before the TLS handshake, and anything that did was not encrypted and may have been
/// injected by a man in the middle (CVE-2021-23214, CVE-2021-23222).
pub fn ensure_nothing_buffered(tcp: &TcpStream) -> io::Result<()> {
    let mut probe = [0u8; 1];
    match tcp.try_read(&mut probe) {
        Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "received unencrypted data after SSL request",
        )),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

/// The 8-byte SSLRequest packet.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Asks the server for TLS as `connector` says, and returns the stream to log in on.
/// Errors are reasons for an [`crate::error::Error::Connect`].
pub async fn connect_server(
    mut tcp: TcpStream,
    host: &str,
    connector: Option<&Connector>,
) -> Result<ServerStream, String> {
    let Some(connector) = connector else {
        return Ok(ServerStream::Plain(tcp));
    };
    tcp.write_all(&SSL_REQUEST)
        .await
        .map_err(|e| e.to_string())?;
    let answer = tcp.read_u8().await.map_err(|e| e.to_string())?;
    match answer {
        b'S' | b'N' => {}
        // A pre-7.0 server, or an error: either way not something to log in to.
        other => {
            return Err(format!(
                "unexpected response {:?} to SSLRequest",
                other as char
            ))
        }
    }
    ensure_nothing_buffered(&tcp).map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData => {
            "server sent unencrypted data after its SSL response (possible man-in-the-middle)"
                .to_string()
        }
        _ => e.to_string(),
    })?;
    if answer == b'N' {
        return if connector.mode == ServerTlsMode::Prefer {
            Ok(ServerStream::Plain(tcp))
        } else {
            Err(format!(
                "server does not support TLS, but server_tls_mode = \"{}\"",
                connector.mode.as_str()
            ))
        };
    }
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("invalid server name {host:?} for TLS: {e}"))?;
    let tls = connector
        .connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    Ok(ServerStream::Tls(Box::new(tls)))
}

/// A client connection: plaintext or TLS.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Only while a handshake owns the socket; I/O on it fails.
    Detached,
}

/// A server connection: plaintext or TLS.
pub enum ServerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl ClientStream {
    /// Reads what the client sends next into `buf`, taking a buffer only
    /// once the socket has data: a plaintext client that sends nothing holds no buffer
    /// at all. (A TLS stream reads through its own buffers and gets one at once.)
    pub async fn read_idle(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        let reserve = |buf: &mut BytesMut| {
            if buf.capacity() == 0 {
                *buf = crate::buffers::take();
            } else if buf.capacity() - buf.len() < 512 {
                buf.reserve(crate::buffers::CHUNK);
            }
        };
        match self {
            ClientStream::Plain(tcp) => loop {
                // `poll_read_ready` uses the socket's one reader slot; `readable()`
                // would put a node in its list of waiters, locked twice per wait, and
                // make every idle client's state larger by that node.
                std::future::poll_fn(|cx| tcp.poll_read_ready(cx)).await?;
                reserve(buf);
                // One poll of an ordinary read rather than `try_read_buf`: a short read
                // through `poll_read` also clears the socket's readiness, which spares
                // the relay a read that would only return EAGAIN.
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                match tokio_util::io::poll_read_buf(Pin::new(&mut *tcp), &mut cx, buf) {
                    std::task::Poll::Ready(result) => return result,
                    std::task::Poll::Pending => {
                        // Readiness was stale (left over from login): give the buffer
                        // back while waiting for real data.
                        if buf.is_empty() {
                            crate::buffers::give(std::mem::take(buf));
                        }
                    }
                }
            },
            _ => {
                reserve(buf);
                self.read_buf(buf).await
            }
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// The client's verified certificate, if it sent one.
    pub fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        match self {
            ClientStream::Tls(tls) => tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned()),
            _ => None,
        }
    }

    /// Runs the TLS handshake on a plaintext stream. `direct` is a PostgreSQL 17
    /// direct-TLS connection, which must have negotiated ALPN `postgresql`. If the
    /// handshake fails the stream stays detached.
    pub async fn upgrade(&mut self, acceptor: &Acceptor, direct: bool) -> io::Result<()> {
        let ClientStream::Plain(tcp) = std::mem::replace(self, ClientStream::Detached) else {
            return Err(io::Error::other("TLS requested twice"));
        };
        let tls = acceptor.acceptor.accept(tcp).await?;
        let alpn_ok = tls.get_ref().1.alpn_protocol() == Some(ALPN_POSTGRESQL);
        *self = ClientStream::Tls(Box::new(tls));
        if direct && !alpn_ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "direct TLS connection without ALPN \"postgresql\"",
            ));
        }
        Ok(())
    }
}

impl ServerStream {
    /// The `tls-server-end-point` data of the server's certificate, on TLS.
    pub fn server_end_point(&self) -> Option<Vec<u8>> {
        match self {
            ServerStream::Tls(tls) => tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| end_point_hash(c)),
            ServerStream::Plain(_) => None,
        }
    }
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection is detached")
}

macro_rules! delegate_io {
    ($ty:ident $(, $detached:ident)?) => {
        impl AsyncRead for $ty {
            #[inline]
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
                    $($ty::$detached => Poll::Ready(Err(detached())),)?
                }
            }
        }

        impl AsyncWrite for $ty {
            #[inline]
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
                    $($ty::$detached => Poll::Ready(Err(detached())),)?
                }
            }

            #[inline]
            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
                    $($ty::$detached => Poll::Ready(Err(detached())),)?
                }
            }

            #[inline]
            fn is_write_vectored(&self) -> bool {
                match self {
                    $ty::Plain(s) => s.is_write_vectored(),
                    $ty::Tls(s) => s.is_write_vectored(),
                    $($ty::$detached => false,)?
                }
            }

            #[inline]
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_flush(cx),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
                    $($ty::$detached => Poll::Ready(Err(detached())),)?
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
                    $($ty::$detached => Poll::Ready(Err(detached())),)?
                }
            }
        }
    };
}

delegate_io!(ClientStream, Detached);
delegate_io!(ServerStream);

// ---------------------------------------------------------------------------
// A little DER, for the two facts pgmux needs from a certificate
// ---------------------------------------------------------------------------

/// One DER element: tag, contents, and what follows it.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// tbsCertificate and signatureAlgorithm of a certificate.
fn der_certificate(cert: &[u8]) -> Option<(&[u8], &[u8])> {
    let (tag, body, _) = der_next(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, rest) = der_next(body)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, algorithm, _) = der_next(rest)?;
    (tag == SEQUENCE).then_some((tbs, algorithm))
}

/// The tls-server-end-point hash of a certificate (RFC 5929 section 4.1): the hash of
/// its signature algorithm, SHA-256 for MD5, SHA-1 and anything unrecognised.
pub fn end_point_hash(cert: &[u8]) -> Vec<u8> {
    // DER contents of the signature algorithm OIDs that name SHA-384 and SHA-512.
    const SHA384: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    let oid = der_certificate(cert)
        .and_then(|(_, algorithm)| der_next(algorithm))
        .filter(|(tag, _, _)| *tag == OID)
        .map(|(_, oid, _)| oid);
    match oid {
        Some(oid) if SHA384.contains(&oid) => Sha384::digest(cert).to_vec(),
        Some(oid) if SHA512.contains(&oid) => Sha512::digest(cert).to_vec(),
        _ => Sha256::digest(cert).to_vec(),
    }
}

/// The subject's common name (the last CN attribute, as PostgreSQL reads it).
pub fn common_name(cert: &[u8]) -> Option<String> {
    const CN: [u8; 3] = [0x55, 0x04, 0x03];
    let (mut tbs, _) = der_certificate(cert)?;
    // [0] version (optional), serialNumber, signature, issuer, validity, subject.
    if tbs.first() == Some(&0xa0) {
        tbs = der_next(tbs)?.2;
    }
    for _ in 0..4 {
        tbs = der_next(tbs)?.2;
    }
    let (tag, mut subject, _) = der_next(tbs)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut found = None;
    while !subject.is_empty() {
        let (tag, mut rdn, rest) = der_next(subject)?;
        subject = rest;
        if tag != SET {
            return None;
        }
        while !rdn.is_empty() {
            let (_, attribute, rest) = der_next(rdn)?;
            rdn = rest;
            let (tag, oid, value) = der_next(attribute)?;
            if tag == OID && oid == CN {
                let (tag, text, _) = der_next(value)?;
                // UTF8String, PrintableString, IA5String, TeletexString (as Latin-1-ish
                // ASCII; PostgreSQL also takes the raw bytes).
                if matches!(tag, 0x0c | 0x13 | 0x16 | 0x14) {
                    found = Some(String::from_utf8(text.to_vec()).ok()?);
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_for(cn: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "pgmux tests");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn common_name_is_read_from_the_subject() {
        assert_eq!(common_name(&cert_for("app")).as_deref(), Some("app"));
        assert_eq!(common_name(&cert_for("ü-user")).as_deref(), Some("ü-user"));
        assert_eq!(common_name(b"\x30\x03\x02\x01\x01"), None);
        assert_eq!(common_name(b""), None);
    }

    #[test]
    fn end_point_uses_the_signature_hash() {
        // rcgen signs with ECDSA P-256 and SHA-256 by default.
        let cert = cert_for("x");
        assert_eq!(end_point_hash(&cert), Sha256::digest(&cert).to_vec());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(end_point_hash(&cert), Sha384::digest(&cert).to_vec());
    }

    #[test]
    fn der_reader_refuses_truncated_input() {
        assert!(der_next(&[0x30, 0x05, 1, 2]).is_none());
        assert!(der_next(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_none());
        assert!(der_next(&[0x30]).is_none());
    }
}
