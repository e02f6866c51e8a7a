//! The untagged packets a connection opens with: StartupMessage, SSLRequest,
//! GSSENCRequest and CancelRequest.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::cstr;

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
/// Protocol 3.0.
pub const PROTOCOL_3: i32 = 196_608;

/// Startup packets are tiny; PostgreSQL itself refuses anything over 10000 bytes.
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// What a connection's first packet asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { process_id: i32, secret_key: i32 },
    Startup(StartupMessage),
}

/// A protocol 3.x StartupMessage.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StartupMessage {
    /// Minor protocol version the client asked for; pgmux speaks 3.0.
    pub minor_version: i32,
    /// Parameters in the order sent, `user` and `database` included.
    pub params: Vec<(String, String)>,
    /// `_pq_.` protocol options, which pgmux does not implement.
    pub protocol_options: Vec<String>,
}

impl StartupMessage {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a startup packet was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid length of startup packet")]
    BadLength,
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedVersion { major: i32, minor: i32 },
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
}

/// Reads one startup packet. I/O errors (including EOF) come back as `Err` of the outer
/// result; protocol errors as the inner one.
pub async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<Result<StartupPacket, StartupError>> {
    let len = stream.read_i32().await?;
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Ok(Err(StartupError::BadLength));
    }
    let mut body = vec![0u8; len as usize - 4];
    stream.read_exact(&mut body).await?;
    Ok(decode(&body))
}

/// Decodes a startup packet body (everything after the length word).
pub fn decode(body: &[u8]) -> Result<StartupPacket, StartupError> {
    if body.len() < 4 {
        return Err(StartupError::BadLength);
    }
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST | GSSENC_REQUEST if !rest.is_empty() => Err(StartupError::BadLength),
        SSL_REQUEST => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST => {
            if rest.len() != 8 {
                return Err(StartupError::BadLength);
            }
            Ok(StartupPacket::Cancel {
                process_id: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
                secret_key: i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
            })
        }
        _ => {
            let (major, minor) = (code >> 16, code & 0xffff);
            if major != 3 {
                return Err(StartupError::UnsupportedVersion { major, minor });
            }
            decode_params(rest, minor).map(StartupPacket::Startup)
        }
    }
}

fn decode_params(mut rest: &[u8], minor_version: i32) -> Result<StartupMessage, StartupError> {
    let mut message = StartupMessage {
        minor_version,
        ..Default::default()
    };
    loop {
        let (name, after) = cstr(rest).ok_or(StartupError::Malformed("missing terminator"))?;
        if name.is_empty() {
            if !after.is_empty() {
                return Err(StartupError::Malformed("data after the terminator"));
            }
            break;
        }
        let (value, after) = cstr(after).ok_or(StartupError::Malformed("missing value"))?;
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| StartupError::Malformed("parameter name is not UTF-8"))?;
        let value = String::from_utf8(value.to_vec())
            .map_err(|_| StartupError::Malformed("parameter value is not UTF-8"))?;
        if name.starts_with("_pq_.") {
            message.protocol_options.push(name);
        } else {
            message.params.push((name, value));
        }
        rest = after;
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(code: i32, rest: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn recognises_each_packet() {
        assert_eq!(
            decode(&body(SSL_REQUEST, b"")),
            Ok(StartupPacket::SslRequest)
        );
        assert_eq!(
            decode(&body(GSSENC_REQUEST, b"")),
            Ok(StartupPacket::GssEncRequest)
        );
        let cancel = body(CANCEL_REQUEST, &[0, 0, 0, 1, 0, 0, 0, 2]);
        assert_eq!(
            decode(&cancel),
            Ok(StartupPacket::Cancel {
                process_id: 1,
                secret_key: 2
            })
        );
        let startup = body(PROTOCOL_3, b"user\0app\0database\0db\0_pq_.x\0y\0\0");
        let Ok(StartupPacket::Startup(m)) = decode(&startup) else {
            panic!("not a startup message")
        };
        assert_eq!(m.get("user"), Some("app"));
        assert_eq!(m.get("database"), Some("db"));
        assert_eq!(m.protocol_options, vec!["_pq_.x".to_string()]);
    }

    #[test]
    fn refuses_malformed_packets() {
        assert_eq!(
            decode(&body(2 << 16, b"\0")),
            Err(StartupError::UnsupportedVersion { major: 2, minor: 0 })
        );
        assert!(decode(&body(PROTOCOL_3, b"user\0app")).is_err());
        assert!(decode(&body(PROTOCOL_3, b"user\0app\0\0extra")).is_err());
        assert!(decode(&body(CANCEL_REQUEST, &[0, 0])).is_err());
        assert!(decode(&body(SSL_REQUEST, b"x")).is_err());
        assert!(decode(b"ab").is_err());
    }
}
