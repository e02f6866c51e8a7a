//! The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677), as PostgreSQL runs it.
//!
//! Salting and key derivation reuse `postgres-protocol`'s verifier generation; this module
//! runs the exchange itself, which that crate only implements for clients.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const MECHANISM: &str = "SCRAM-SHA-256";
/// SCRAM with `tls-server-end-point` channel binding, offered on TLS connections.
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Channel binding for one exchange, from the mechanism the client chose.
#[derive(Debug, Clone, Copy)]
pub enum Binding<'a> {
    /// Plain SCRAM-SHA-256. `server_supports` is true on TLS, where the PLUS variant was
    /// offered: a client that says "y" (it could bind but thinks the server cannot) is
    /// then seeing a downgrade, and the exchange fails (RFC 5802 section 6).
    NotUsed { server_supports: bool },
    /// SCRAM-SHA-256-PLUS with this connection's `tls-server-end-point` data.
    TlsServerEndPoint(&'a [u8]),
}

/// Longest client nonce accepted; real clients send 18 to 32 characters.
const MAX_NONCE: usize = 256;

/// What a server keeps of a password: never the password itself.
#[derive(Clone)]
pub struct ScramSecret {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl ScramSecret {
    /// Derives a secret with a fresh random salt.
    pub fn from_password(password: &str) -> ScramSecret {
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        ScramSecret::parse(&verifier).expect("postgres-protocol writes well-formed verifiers")
    }

    /// Reads PostgreSQL's `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` form.
    pub fn parse(verifier: &str) -> Option<ScramSecret> {
        let rest = verifier.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramSecret {
            iterations: iterations.parse().ok()?,
            salt: STANDARD.decode(salt).ok()?,
            stored_key: STANDARD.decode(stored).ok()?.try_into().ok()?,
            server_key: STANDARD.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// A secret nobody's password matches, for running a full exchange with a client
    /// whose user does not exist: it fails at the same step, after the same messages.
    pub fn mock() -> ScramSecret {
        let mut random = [0u8; 80];
        crate::random::fill(&mut random);
        ScramSecret {
            iterations: 4096,
            salt: random[..16].to_vec(),
            stored_key: random[16..48].try_into().expect("32 bytes"),
            server_key: random[48..80].try_into().expect("32 bytes"),
        }
    }
}

/// Why an exchange failed. Malformed messages and wrong proofs are told apart only in logs.
#[derive(Debug, PartialEq, Eq)]
pub enum ScramError {
    Malformed(&'static str),
    ChannelBindingUnsupported,
    /// The client's channel binding choice does not fit the mechanism or connection.
    BindingNegotiation(&'static str),
    WrongProof,
}

/// State between the server-first and client-final messages.
pub struct Exchange {
    secret: ScramSecret,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    /// What the client-final `c=` attribute must decode to: the gs2 header, followed
    /// by the channel binding data when binding is used.
    expected_binding: Vec<u8>,
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Handles the client-first-message (the data of SASLInitialResponse) and returns the
/// server-first-message to send in AuthenticationSASLContinue.
pub fn start(
    secret: ScramSecret,
    client_first: &[u8],
    binding: Binding<'_>,
) -> Result<(Exchange, String), ScramError> {
    let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    // gs2-header: a channel-binding flag, an optional authzid, then the bare message.
    let (flag, rest) = text
        .split_once(',')
        .ok_or(ScramError::Malformed("gs2 header"))?;
    let binding_data: &[u8] = match (flag, binding) {
        ("n", Binding::NotUsed { .. }) => &[],
        ("y", Binding::NotUsed { server_supports }) => {
            if server_supports {
                return Err(ScramError::BindingNegotiation(
                    "client supports channel binding but did not use it",
                ));
            }
            &[]
        }
        ("p=tls-server-end-point", Binding::TlsServerEndPoint(data)) => data,
        (f, Binding::NotUsed { server_supports }) if f.starts_with("p=") => {
            return Err(if server_supports {
                ScramError::BindingNegotiation(
                    "channel binding requested without the PLUS mechanism",
                )
            } else {
                ScramError::ChannelBindingUnsupported
            })
        }
        (f, Binding::TlsServerEndPoint(_)) if f == "n" || f == "y" || f.starts_with("p=") => {
            return Err(ScramError::BindingNegotiation(
                "SCRAM-SHA-256-PLUS needs channel binding type tls-server-end-point",
            ))
        }
        _ => return Err(ScramError::Malformed("channel binding flag")),
    };
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(ScramError::Malformed("gs2 header"))?;
    if !authzid.is_empty() {
        return Err(ScramError::Malformed("authzid is not supported"));
    }
    let mut expected_binding = format!("{flag},{authzid},").into_bytes();
    expected_binding.extend_from_slice(binding_data);
    let mut client_nonce = None;
    for attr in bare.split(',') {
        if let Some(n) = attr.strip_prefix("r=") {
            client_nonce = Some(n);
        } else if attr.starts_with("m=") {
            return Err(ScramError::Malformed("mandatory extension"));
        }
    }
    let client_nonce = client_nonce.ok_or(ScramError::Malformed("missing nonce"))?;
    if client_nonce.is_empty()
        || client_nonce.len() > MAX_NONCE
        || !client_nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
    {
        return Err(ScramError::Malformed("nonce"));
    }

    let mut random = [0u8; 18];
    crate::random::fill(&mut random);
    let nonce = format!("{client_nonce}{}", STANDARD.encode(random));
    let server_first = format!(
        "r={nonce},s={},i={}",
        STANDARD.encode(&secret.salt),
        secret.iterations
    );
    let exchange = Exchange {
        secret,
        client_first_bare: bare.to_string(),
        server_first: server_first.clone(),
        nonce,
        expected_binding,
    };
    Ok((exchange, server_first))
}

impl Exchange {
    /// Checks the client-final-message and returns the server-final-message.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("missing proof"))?;
        let mut binding = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                binding = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        let binding = STANDARD
            .decode(binding.ok_or(ScramError::Malformed("missing channel binding"))?)
            .map_err(|_| ScramError::Malformed("channel binding encoding"))?;
        if !bool::from(binding.as_slice().ct_eq(self.expected_binding.as_slice())) {
            return Err(ScramError::Malformed("channel binding does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] = STANDARD
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("proof"))?;

        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.secret.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        if !bool::from(computed.ct_eq(&self.secret.stored_key)) {
            return Err(ScramError::WrongProof);
        }
        let server_signature = hmac(&self.secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", STANDARD.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs pgmux's server side against postgres-protocol's client side.
    fn exchange(server_password: &str, client_password: &str) -> Result<(), ScramError> {
        let secret = ScramSecret::from_password(server_password);
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let (exchange, server_first) = start(
            secret,
            client.message(),
            Binding::NotUsed {
                server_supports: false,
            },
        )?;
        client.update(server_first.as_bytes()).unwrap();
        let server_final = exchange.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .expect("client accepts the server signature");
        Ok(())
    }

    #[test]
    fn right_password_succeeds_both_ways() {
        assert_eq!(exchange("pa55 wörd", "pa55 wörd"), Ok(()));
    }

    #[test]
    fn wrong_password_fails() {
        assert_eq!(exchange("right", "wrong"), Err(ScramError::WrongProof));
    }

    #[test]
    fn malformed_first_messages_are_refused() {
        let secret = ScramSecret::from_password("x");
        for msg in [
            &b""[..],
            b"n,,",
            b"x,,n=,r=abc",
            b"n,,n=,r=",
            b"n,a=u,n=,r=abc",
            b"\xff",
        ] {
            assert!(start(secret.clone(), msg, NO_TLS).is_err(), "{msg:?}");
        }
        let long = format!("n,,n=,r={}", "a".repeat(MAX_NONCE + 1));
        assert!(start(secret.clone(), long.as_bytes(), NO_TLS).is_err());
        assert_eq!(
            start(secret, b"p=tls-server-end-point,,n=,r=abc", NO_TLS).err(),
            Some(ScramError::ChannelBindingUnsupported)
        );
    }

    const NO_TLS: Binding<'static> = Binding::NotUsed {
        server_supports: false,
    };

    /// SCRAM-SHA-256-PLUS against postgres-protocol's client, with `client_data` as the
    /// client's idea of the end-point hash and `server_data` as pgmux's.
    fn plus_exchange(client_data: &[u8], server_data: &[u8]) -> Result<(), ScramError> {
        let secret = ScramSecret::from_password("pw");
        let mut client = ScramSha256::new(
            b"pw",
            ChannelBinding::tls_server_end_point(client_data.to_vec()),
        );
        let (exchange, server_first) = start(
            secret,
            client.message(),
            Binding::TlsServerEndPoint(server_data),
        )?;
        client.update(server_first.as_bytes()).unwrap();
        let server_final = exchange.finish(client.message())?;
        client.finish(server_final.as_bytes()).unwrap();
        Ok(())
    }

    #[test]
    fn channel_binding_must_match_the_connection() {
        assert_eq!(plus_exchange(b"hash-a", b"hash-a"), Ok(()));
        assert!(matches!(
            plus_exchange(b"hash-a", b"hash-b"),
            Err(ScramError::Malformed(_))
        ));
    }

    #[test]
    fn downgrades_are_refused() {
        let secret = ScramSecret::from_password("x");
        let tls = Binding::NotUsed {
            server_supports: true,
        };
        // "y": the client could bind but believes the server cannot; on TLS it can.
        assert!(matches!(
            start(secret.clone(), b"y,,n=,r=abc", tls),
            Err(ScramError::BindingNegotiation(_))
        ));
        assert!(start(secret.clone(), b"y,,n=,r=abc", NO_TLS).is_ok());
        assert!(start(secret.clone(), b"n,,n=,r=abc", tls).is_ok());
        // The PLUS mechanism without binding data.
        assert!(matches!(
            start(secret, b"n,,n=,r=abc", Binding::TlsServerEndPoint(b"h")),
            Err(ScramError::BindingNegotiation(_))
        ));
    }

    #[test]
    fn verifiers_parse() {
        let v = postgres_protocol::password::scram_sha_256(b"pw");
        let s = ScramSecret::parse(&v).unwrap();
        assert_eq!(s.iterations, 4096);
        assert!(ScramSecret::parse("md5abc").is_none());
    }
}
