//! Entry points for fuzzing the code that reads what peers send: each takes arbitrary
//! bytes and must return without panicking, whatever they hold. The `cargo fuzz` targets
//! under `fuzz/` call them, and so does a short seeded run in the test suite
//! (`tests/fuzz.rs`).

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::scram::{self, Binding, ScramSecret};
use crate::params::ParamSet;
use crate::prepared::{ClientStatements, Registry};
use crate::protocol::{header, startup, tag, HEADER_LEN};
use crate::relay::{self, ClientEnd, Flow, Limits, Tracker};
use crate::routing::{classify, request, select};
use crate::server::Server;

/// Longest SQL text handed to the SQL parser per message, so one input stays fast.
const MAX_SQL: usize = 4096;

/// A startup packet body (everything after its length word): SSLRequest,
/// GSSENCRequest, CancelRequest or StartupMessage.
pub fn startup_packet(data: &[u8]) {
    let _ = startup::decode(data);
}

/// A SCRAM-SHA-256 exchange as the server side of client authentication sees it:
/// `data` holds the client-first-message, a 0xff byte, and the client-final-message.
/// The first byte also picks the channel-binding situation.
pub fn scram_exchange(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (first, last) = match rest.iter().position(|&b| b == 0xff) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let end_point = [7u8; 32];
    let binding = match mode % 3 {
        0 => Binding::NotUsed {
            server_supports: false,
        },
        1 => Binding::NotUsed {
            server_supports: true,
        },
        _ => Binding::TlsServerEndPoint(&end_point),
    };
    let secret = ScramSecret::from_password("fuzz-secret");
    if let Ok((exchange, _server_first)) = scram::start(secret, first, binding) {
        let _ = exchange.finish(last);
    }
}

/// A stream of frontend messages, read the way pgmux reads them between transactions:
/// framing, routing classification, session-statement and SQL parsing, and the answers
/// pgmux gives to Parse/Close/Sync requests without a server.
pub fn frontend_messages(data: &[u8]) {
    let _ = request::opening_text(data, None);
    let _ = request::executes_nothing(data);
    let _ = request::lone_autocommit_select(data, None);
    let mut statements = client_statements();
    let mut reply = BytesMut::new();
    let _ = statements.answer_locally(data, b'I', &mut reply);

    let mut rest = data;
    while let Some(Ok((tag, len))) = header(rest) {
        let Some(body) = rest.get(HEADER_LEN..len) else {
            break;
        };
        let text = match tag {
            tag::QUERY => Some(body),
            tag::PARSE => relay::parse_query_text(body),
            _ => None,
        };
        if let Some(text) = text.and_then(|t| std::str::from_utf8(t).ok()) {
            let text = &text[..floor_char_boundary(text, MAX_SQL)];
            let _ = classify::opening(text);
            let _ = crate::sql::session_effect(text);
            let _ = crate::sql::deallocate_name(text);
            let _ = select::is_plain_select(text);
        }
        rest = &rest[len..];
    }
}

/// A whole relay between a client and a server, with the transaction-state tracker and
/// the prepared-statement bookkeeping in the middle: `data` holds what the client sends,
/// a 0xff 0xff pair, and what the server answers. Runs on loopback sockets for at most
/// 100 ms.
pub fn relay_conversation(data: &[u8]) {
    let split = data.windows(2).position(|w| w == [0xff, 0xff]);
    let (client, server) = match split {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let _ = tokio::time::timeout(Duration::from_millis(100), relay_once(client, server)).await;
    });
}

async fn relay_once(client_bytes: &[u8], server_bytes: &[u8]) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let connect = tokio::net::TcpStream::connect(listener.local_addr()?);
    let (ours, accepted) = tokio::join!(connect, listener.accept());
    let (ours, (mut peer, _)) = (ours?, accepted?);
    let mut server = Server::unauthenticated(ours);
    peer.write_all(server_bytes).await?;
    peer.shutdown().await?;

    let (mut client, mut client_peer) = tokio::io::duplex(64 * 1024);
    client_peer.write_all(client_bytes).await?;
    drop(client_peer.shutdown().await);
    // Whatever the relay sends the client is read and thrown away, so it never waits
    // for room to write.
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = client_peer.read_to_end(&mut sink).await;
    });
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = peer.read_to_end(&mut sink).await;
    });

    let metrics = crate::metrics::PoolMetrics::new("fuzz", "fuzz", None);
    let stats = crate::pool::PoolStats::default();
    let limits = Limits {
        max_message_size: 1 << 20,
        stop_at_boundary: true,
        idle_transaction_timeout: Duration::ZERO,
        query_timeout: Duration::ZERO,
        metrics: &metrics,
        stats: &stats,
        hold_for_retry: client_bytes.len() % 2 == 1,
    };
    let mut flow = Flow::default();
    let mut params = Arc::new(ParamSet::default());
    let mut reported = Arc::new(Vec::new());
    let mut statements = client_statements();
    let mut tracker = Tracker::default();
    // Some conversations start as a transaction pgmux opened for the client, with a
    // BEGIN of its own ahead of the client's bytes and the answer to it held back.
    if client_bytes.len() % 3 == 0 {
        relay::begin_ahead(&mut flow, &mut tracker, client_bytes.len() % 2 == 0);
    }
    let mut hooks = NoCancel;
    let run = relay::run(
        ClientEnd {
            stream: &mut client,
            flow: &mut flow,
            params: &mut params,
            reported: &mut reported,
            prepared: Some(&mut statements),
        },
        &mut server,
        &mut tracker,
        &limits,
        &mut hooks,
    );
    let _ = run.await;
    Ok(())
}

struct NoCancel;

impl relay::Hooks for NoCancel {
    fn query_timed_out(&mut self, _server: &Server) {}
}

fn client_statements() -> ClientStatements {
    ClientStatements::new(
        Arc::new(Registry::default()),
        16,
        NonZeroUsize::new(4).expect("not zero"),
    )
}

fn floor_char_boundary(text: &str, max: usize) -> usize {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}
