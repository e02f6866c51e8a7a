//! pgmux's error type, and the single place that decides what a client is told.

use std::io;
use std::time::Duration;

use bytes::BytesMut;

use crate::protocol::backend::{self, Severity};

/// Something that ended or failed a piece of work on behalf of a client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client's socket failed or was closed: there is nobody left to tell.
    #[error("client connection lost: {0}")]
    ClientIo(io::Error),
    /// The client sent bytes that break the protocol.
    #[error("protocol violation: {0}")]
    ClientProtocol(String),
    /// The client asked for something pgmux does not offer (an old protocol version,
    /// replication connections).
    #[error("{0}")]
    Unsupported(String),
    /// Authentication failed; the reason is logged, never shown to the client.
    #[error("authentication failed for user \"{user}\": {reason}")]
    Auth { user: String, reason: &'static str },
    /// A plaintext client while `client_tls_mode = "require"`; the text is the message.
    #[error("{0}")]
    TlsRequired(String),
    /// auth_type "cert" refused the client; the text is what it is told.
    #[error("{0}")]
    CertAuth(String),
    #[error("no such database: \"{0}\"")]
    UnknownDatabase(String),
    #[error("too many clients already (max_client_conn)")]
    TooManyClients,
    #[error("query_wait_timeout ({}) expired while waiting for a server connection", humantime::format_duration(*.0))]
    PoolTimeout(Duration),
    #[error("client idle in transaction longer than idle_transaction_timeout ({})", humantime::format_duration(*.0))]
    IdleTransactionTimeout(Duration),
    #[error("could not connect to server {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The server refused pgmux's login; its own error fields are kept.
    #[error("server login failed: {message}")]
    ServerLogin { code: String, message: String },
    /// The server's socket failed while in use.
    #[error("server connection lost: {0}")]
    ServerIo(io::Error),
    /// The server sent something that breaks the protocol.
    #[error("server protocol violation: {0}")]
    ServerProtocol(String),
    /// A read-only transaction found no replica eligible within query_wait_timeout,
    /// and `replica_fallback = "wait"` forbids the primary.
    #[error("no replica within max_replica_lag became available within query_wait_timeout ({})", humantime::format_duration(*.0))]
    NoReplica(Duration),
    #[error("pgmux is shutting down")]
    Shutdown,
    /// KILL or KILL_CLIENT from the console.
    #[error("terminated by the pgmux console")]
    Killed,
    /// A user outside admin_users and stats_users asked for the console.
    #[error("user \"{0}\" is not allowed to use the pgmux console")]
    ConsoleDenied(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The SQLSTATE and message a client receives, or `None` when it cannot be told.
    ///
    /// Authentication failures all read the same whatever the cause, so a client cannot
    /// learn which user names exist.
    pub fn client_message(&self) -> Option<(Severity, &str, String)> {
        use Error::*;
        let fatal = |code, text: String| Some((Severity::Fatal, code, text));
        match self {
            ClientIo(_) => None,
            ClientProtocol(m) => fatal("08P01", format!("protocol violation: {m}")),
            Unsupported(m) => fatal("0A000", m.clone()),
            Auth { user, .. } => fatal(
                "28P01",
                format!("password authentication failed for user \"{user}\""),
            ),
            TlsRequired(m) | CertAuth(m) => fatal("28000", m.clone()),
            UnknownDatabase(db) => fatal("3D000", format!("database \"{db}\" does not exist")),
            TooManyClients => fatal("53300", "sorry, too many clients already".to_string()),
            Killed => fatal("57P01", self.to_string()),
            ConsoleDenied(_) => fatal("28000", self.to_string()),
            PoolTimeout(_) | NoReplica(_) | IdleTransactionTimeout(_) | Shutdown => {
                let code = match self {
                    PoolTimeout(_) | NoReplica(_) => "57014",
                    IdleTransactionTimeout(_) => "25P03",
                    _ => "57P01",
                };
                fatal(code, self.to_string())
            }
            Connect { .. } => fatal("08006", self.to_string()),
            ServerLogin { code, message } => Some((
                Severity::Fatal,
                code.as_str(),
                format!("server login failed: {message}"),
            )),
            ServerIo(_) => fatal("08006", "server connection lost".to_string()),
            ServerProtocol(_) => fatal("08P01", self.to_string()),
        }
    }

    /// Appends the client's ErrorResponse, if there is one to send, to `buf`.
    pub fn write_response(&self, buf: &mut BytesMut) {
        if let Some((severity, code, text)) = self.client_message() {
            backend::error_response(buf, severity, code, &text);
        }
    }

    /// A label for the `pgmux_errors_total` counter.
    pub fn kind(&self) -> &'static str {
        use Error::*;
        match self {
            ClientIo(_) => "client_io",
            ClientProtocol(_) => "client_protocol",
            Unsupported(_) => "unsupported",
            Auth { .. } => "auth",
            TlsRequired(_) => "tls_required",
            CertAuth(_) => "auth",
            UnknownDatabase(_) => "unknown_database",
            TooManyClients => "too_many_clients",
            PoolTimeout(_) => "query_wait_timeout",
            NoReplica(_) => "no_replica",
            IdleTransactionTimeout(_) => "idle_transaction_timeout",
            Connect { .. } => "server_connect",
            ServerLogin { .. } => "server_login",
            ServerIo(_) => "server_io",
            ServerProtocol(_) => "server_protocol",
            Shutdown => "shutdown",
            Killed => "killed",
            ConsoleDenied(_) => "console_denied",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_failures_read_the_same_for_every_reason() {
        let a = Error::Auth {
            user: "x".into(),
            reason: "unknown user",
        };
        let b = Error::Auth {
            user: "x".into(),
            reason: "wrong password",
        };
        assert_eq!(a.client_message(), b.client_message());
        assert_eq!(a.client_message().unwrap().1, "28P01");
    }

    #[test]
    fn pool_timeout_names_the_setting() {
        let error = Error::PoolTimeout(Duration::from_millis(500));
        let (_, code, text) = error.client_message().unwrap();
        assert_eq!(code, "57014");
        assert!(text.contains("query_wait_timeout (500ms)"), "{text}");
    }
}
