//! CancelRequest handling.
//!
//! Clients receive BackendKeyData made up by pgmux, never a server's: a server backend
//! serves many clients over time, and its real key would let one client cancel another's
//! queries. A client's key maps to whichever server is attached to it at the moment; a
//! cancel arriving while nothing runs for that client is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use crate::server::CancelKey;

/// How long pgmux tries to deliver a cancel to a server.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Live clients by their pgmux process id.
#[derive(Default)]
pub struct Registry {
    slots: Mutex<HashMap<i32, Arc<Slot>>>,
}

/// One client's cancel key and the server it is using now.
pub struct Slot {
    pub process_id: i32,
    pub secret_key: i32,
    target: Mutex<Option<Arc<CancelKey>>>,
}

impl Slot {
    /// Records the server attached to the client (or none).
    pub fn set_target(&self, key: Option<Arc<CancelKey>>) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = key;
    }
}

/// Removes the slot from the registry when the client goes away.
pub struct SlotGuard {
    registry: Arc<Registry>,
    pub slot: Arc<Slot>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.registry
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.slot.process_id);
    }
}

impl Registry {
    /// Gives a new client a unique random key.
    pub fn register(self: &Arc<Self>) -> SlotGuard {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let process_id = loop {
            let candidate = crate::random::i32() & 0x7fff_ffff;
            if candidate != 0 && !slots.contains_key(&candidate) {
                break candidate;
            }
        };
        let slot = Arc::new(Slot {
            process_id,
            secret_key: crate::random::i32(),
            target: Mutex::new(None),
        });
        slots.insert(process_id, Arc::clone(&slot));
        SlotGuard {
            registry: Arc::clone(self),
            slot,
        }
    }

    /// Handles a CancelRequest: forwards it if the key matches a client that has a
    /// server attached. Unknown or forged keys are ignored, as PostgreSQL does.
    pub async fn cancel(&self, process_id: i32, secret_key: i32) {
        let target = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let Some(slot) = slots.get(&process_id) else {
                debug!("cancel request for an unknown client ignored");
                return;
            };
            if !bool::from(
                slot.secret_key
                    .to_be_bytes()
                    .ct_eq(&secret_key.to_be_bytes()),
            ) {
                debug!("cancel request with a wrong key ignored");
                return;
            }
            let target = slot
                .target
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            target
        };
        match target {
            Some(key) => send(&key).await,
            None => debug!("cancel request for an idle client dropped"),
        }
    }
}

/// Delivers a CancelRequest to a server backend.
pub async fn send(key: &CancelKey) {
    let attempt = async {
        let tcp = TcpStream::connect(&*key.addr).await?;
        // Over TLS when the server connections use it: the key is then not visible on
        // the network (PostgreSQL takes a CancelRequest after an SSLRequest too).
        let mut stream = crate::tls::connect_server(tcp, &key.host, key.tls.as_deref())
            .await
            .map_err(std::io::Error::other)?;
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(
            key.process_id,
            key.secret_key,
            &mut buf,
        );
        stream.write_all(&buf).await?;
        stream.flush().await?;
        // The server closes the connection once it has read the request.
        let mut sink = [0u8; 1];
        let _ = stream.read(&mut sink).await;
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(CANCEL_TIMEOUT, attempt).await {
        Ok(Ok(())) => debug!(server.pid = key.process_id, "cancel request forwarded"),
        Ok(Err(e)) => debug!(error = %e, "could not forward a cancel request"),
        Err(_) => debug!("forwarding a cancel request timed out"),
    }
}
