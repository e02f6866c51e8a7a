//! Client authentication: proving a client is one of the configured users.
//!
//! Failures for an unknown user and for a wrong password take the same messages and end
//! in the same 28P01 error, so the exchange reveals nothing about which users exist.

pub mod scram;

use bytes::BytesMut;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::config::AuthType;
use crate::error::{Error, Result};
use crate::protocol::{backend, frontend, tag};
use scram::{ScramError, ScramSecret};

/// Authentication messages are small; anything larger is an attack or a bug.
const MAX_AUTH_MESSAGE: usize = 16 * 1024;

/// What pgmux knows of one configured user.
#[derive(Clone)]
pub struct Credentials {
    /// Also what pgmux presents to the server.
    pub password: String,
    scram: ScramSecret,
}

impl Credentials {
    pub fn new(password: &str) -> Credentials {
        Credentials {
            password: password.to_string(),
            scram: ScramSecret::from_password(password),
        }
    }
}

/// What the connection itself tells about the client: whether it is encrypted, and the
/// certificate it presented.
#[derive(Debug, Default, Clone)]
pub struct Transport {
    /// `tls-server-end-point` channel binding data, on a TLS connection.
    pub end_point: Option<std::sync::Arc<[u8]>>,
    /// The client's certificate, already verified against `client_tls_ca`.
    pub peer_cert: Option<rustls::pki_types::CertificateDer<'static>>,
}

/// Runs the configured exchange. `creds` is `None` for a user pgmux does not know.
pub async fn authenticate<S>(
    stream: &mut S,
    auth_type: AuthType,
    user: &str,
    creds: Option<&Credentials>,
    transport: &Transport,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let failed = |reason| Error::Auth {
        user: user.to_string(),
        reason,
    };
    match auth_type {
        AuthType::Trust => creds.map(|_| ()).ok_or_else(|| failed("unknown user")),
        AuthType::Plain => {
            let mut out = BytesMut::new();
            backend::authentication_cleartext_password(&mut out);
            let body = exchange(stream, &mut out).await?;
            let given = body.strip_suffix(b"\0").unwrap_or(&body);
            let creds = creds.ok_or_else(|| failed("unknown user"))?;
            check(given, creds.password.as_bytes()).ok_or_else(|| failed("wrong password"))
        }
        AuthType::Md5 => {
            let mut salt = [0u8; 4];
            crate::random::fill(&mut salt);
            let mut out = BytesMut::new();
            backend::authentication_md5_password(&mut out, salt);
            let body = exchange(stream, &mut out).await?;
            let given = body.strip_suffix(b"\0").unwrap_or(&body);
            let creds = creds.ok_or_else(|| failed("unknown user"))?;
            let expected = postgres_protocol::authentication::md5_hash(
                user.as_bytes(),
                creds.password.as_bytes(),
                salt,
            );
            check(given, expected.as_bytes()).ok_or_else(|| failed("wrong password"))
        }
        AuthType::ScramSha256 => {
            scram_exchange(stream, user, creds, transport.end_point.as_deref()).await
        }
        AuthType::Cert => {
            let cert = transport.peer_cert.as_ref().ok_or_else(|| {
                Error::CertAuth("connection requires a valid client certificate".into())
            })?;
            let name = crate::tls::common_name(cert);
            if name.as_deref() == Some(user) && creds.is_some() {
                Ok(())
            } else {
                Err(Error::CertAuth(format!(
                    "certificate authentication failed for user \"{user}\""
                )))
            }
        }
    }
}

fn check(given: &[u8], expected: &[u8]) -> Option<()> {
    bool::from(given.ct_eq(expected)).then_some(())
}

/// SCRAM-SHA-256, and SCRAM-SHA-256-PLUS when `end_point` (a TLS connection) is given.
async fn scram_exchange<S>(
    stream: &mut S,
    user: &str,
    creds: Option<&Credentials>,
    end_point: Option<&[u8]>,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let failed = |reason| Error::Auth {
        user: user.to_string(),
        reason,
    };
    let mut out = BytesMut::new();
    if end_point.is_some() {
        backend::authentication_sasl(&mut out, &[scram::MECHANISM_PLUS, scram::MECHANISM]);
    } else {
        backend::authentication_sasl(&mut out, &[scram::MECHANISM]);
    }
    let initial = exchange(stream, &mut out).await?;

    // SASLInitialResponse: mechanism name, then an Int32 length and the client-first data.
    let (mechanism, rest) = crate::protocol::cstr(&initial)
        .ok_or_else(|| Error::ClientProtocol("malformed SASLInitialResponse".into()))?;
    let binding = if mechanism == scram::MECHANISM.as_bytes() {
        scram::Binding::NotUsed {
            server_supports: end_point.is_some(),
        }
    } else if let (true, Some(data)) = (mechanism == scram::MECHANISM_PLUS.as_bytes(), end_point) {
        scram::Binding::TlsServerEndPoint(data)
    } else {
        return Err(Error::ClientProtocol(
            "unsupported SASL mechanism requested".into(),
        ));
    };
    if rest.len() < 4 {
        return Err(Error::ClientProtocol(
            "malformed SASLInitialResponse".into(),
        ));
    }
    let data = &rest[4..];

    let secret = creds.map_or_else(ScramSecret::mock, |c| c.scram.clone());
    let (state, server_first) =
        scram::start(secret, data, binding).map_err(|e| scram_failure(user, e))?;
    backend::authentication_sasl_continue(&mut out, server_first.as_bytes());
    let client_final = exchange(stream, &mut out).await?;

    let server_final = state
        .finish(&client_final)
        .map_err(|e| scram_failure(user, e))?;
    if creds.is_none() {
        return Err(failed("unknown user"));
    }
    backend::authentication_sasl_final(&mut out, server_final.as_bytes());
    stream.write_all(&out).await.map_err(Error::ClientIo)?;
    stream.flush().await.map_err(Error::ClientIo)?;
    Ok(())
}

fn scram_failure(user: &str, e: ScramError) -> Error {
    match e {
        ScramError::WrongProof => Error::Auth {
            user: user.to_string(),
            reason: "wrong password",
        },
        ScramError::ChannelBindingUnsupported => Error::ClientProtocol(
            "SCRAM channel binding is not supported on this connection".into(),
        ),
        ScramError::BindingNegotiation(what) => {
            Error::ClientProtocol(format!("SCRAM channel binding negotiation error ({what})"))
        }
        ScramError::Malformed(what) => {
            Error::ClientProtocol(format!("malformed SCRAM message ({what})"))
        }
    }
}

/// Sends `out` (then clears it) and reads the client's password-class reply.
async fn exchange<S>(stream: &mut S, out: &mut BytesMut) -> Result<BytesMut>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(out).await.map_err(Error::ClientIo)?;
    stream.flush().await.map_err(Error::ClientIo)?;
    out.clear();
    let (tag, body) = frontend::read_message(stream, MAX_AUTH_MESSAGE).await?;
    if tag != tag::PASSWORD {
        return Err(Error::ClientProtocol(format!(
            "expected a password message, got message type {:?}",
            tag as char
        )));
    }
    Ok(body)
}
