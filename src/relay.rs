//! Moving bytes between an attached client and server, and knowing when to stop.
//!
//! Both directions are driven from one future, the way PostgreSQL's own clients must
//! be: the client may keep sending (pipelining, COPY) while the server answers, so
//! neither side's writes ever wait on the other's reads. Each direction is a [`Flow`]: a
//! buffer whose front part is framed and ready to write out. Messages are forwarded
//! byte-exact and in batches; only the few message types pgmux must read (ReadyForQuery,
//! ParameterStatus, ErrorResponse, Query) are held until complete. Everything else,
//! including huge DataRows and CopyData, streams through as it arrives, so results are
//! never buffered whole.
//!
//! A transaction boundary is the server's ReadyForQuery `I` when the client has no Query,
//! Sync or FunctionCall unanswered and has sent no extended-protocol message since its
//! last Sync. Flush is never a boundary: a client that sent Parse/Describe/Flush is
//! waiting on this very server for the rest of its batch.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_util::io::poll_read_buf;

use crate::error::{Error, Result};
use crate::params::{ParamSet, ParamValue};
use crate::prepared::{Action, ClientStatements, Disposition};
use crate::protocol::{btag, header, tag, HEADER_LEN};
use crate::server::Server;
use crate::sql::{self, SessionEffect};

/// Ready bytes a flow may hold before reading from its source pauses: the backpressure
/// that keeps a client which stops reading from making pgmux buffer without bound.
const HIGH_WATER: usize = 256 * 1024;

/// Read at least this much at a time.
const MIN_READ: usize = 4 * 1024;

/// Bytes flowing in one direction.
#[derive(Debug, Default)]
pub struct Flow {
    pub buf: BytesMut,
    /// Bytes at the front of `buf` that are framed and may be written out.
    ready: usize,
    /// Bytes of the current message that will pass through without inspection.
    skip: usize,
}

/// A message at the framing point.
#[derive(Debug, Clone, Copy)]
struct Frame {
    tag: u8,
    len: usize,
    /// The whole message is in the buffer.
    whole: bool,
}

impl Flow {
    pub fn with_capacity(capacity: usize) -> Flow {
        Flow {
            buf: BytesMut::with_capacity(capacity),
            ready: 0,
            skip: 0,
        }
    }

    /// No bytes held at all, framed or not.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.skip == 0
    }

    /// Framed bytes waiting to be written.
    pub fn ready(&self) -> &[u8] {
        &self.buf[..self.ready]
    }

    /// Unframed bytes: the start of a message not yet complete or not yet looked at.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.ready..]
    }

    pub fn consume(&mut self, n: usize) {
        self.buf.advance(n);
        self.ready -= n;
    }

    /// Appends bytes pgmux made itself, ready to write out.
    pub fn push_ready(&mut self, bytes: &[u8]) {
        debug_assert_eq!(self.ready, self.buf.len(), "only between messages");
        self.buf.extend_from_slice(bytes);
        self.ready = self.buf.len();
    }

    /// Part of a message has been framed and the rest has not arrived: whoever received
    /// the first part is waiting for the rest.
    pub fn mid_message(&self) -> bool {
        self.skip > 0
    }

    fn wants_read(&self) -> bool {
        self.ready < HIGH_WATER
    }

    /// The next message to decide on, if its header (or, for `whole` tags, all of it) is
    /// here. Bytes of a message already being streamed are passed first.
    fn peek(&mut self, max: usize, whole: impl Fn(u8) -> bool) -> Result<Option<Frame>, String> {
        if self.skip > 0 {
            let n = self.skip.min(self.buf.len() - self.ready);
            self.ready += n;
            self.skip -= n;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        let rest = &self.buf[self.ready..];
        let (tag, len) = match header(rest) {
            None => return Ok(None),
            Some(Err(len)) => return Err(format!("invalid message length {len}")),
            Some(Ok(h)) => h,
        };
        if len > max {
            return Err(format!(
                "message of {len} bytes exceeds max_message_size ({max})"
            ));
        }
        if !whole(tag) {
            return Ok(Some(Frame {
                tag,
                len,
                whole: false,
            }));
        }
        if rest.len() < len {
            let missing = len - rest.len();
            self.buf.reserve(missing);
            return Ok(None);
        }
        Ok(Some(Frame {
            tag,
            len,
            whole: true,
        }))
    }

    /// The body of a whole message at the framing point.
    fn body(&self, frame: Frame) -> &[u8] {
        &self.buf[self.ready + HEADER_LEN..self.ready + frame.len]
    }

    /// Marks the message at the framing point as ready to write out.
    fn accept(&mut self, frame: Frame) {
        let here = (self.buf.len() - self.ready).min(frame.len);
        self.ready += here;
        self.skip = frame.len - here;
    }

    fn reserve_for_read(&mut self) {
        if self.buf.capacity() - self.buf.len() < MIN_READ {
            self.buf.reserve(MIN_READ);
        }
    }

    /// Replaces the `remove` unframed bytes at the framing point with `insert`, which is
    /// framed at once. Only between messages.
    fn splice_ready(&mut self, remove: usize, insert: &[u8]) {
        debug_assert_eq!(self.skip, 0, "only between messages");
        let at = self.ready;
        let end = self.buf.len();
        if insert.len() <= remove {
            self.buf[at..at + insert.len()].copy_from_slice(insert);
            self.buf.copy_within(at + remove..end, at + insert.len());
            self.buf.truncate(end - (remove - insert.len()));
        } else {
            self.buf.resize(end + insert.len() - remove, 0);
            self.buf.copy_within(at + remove..end, at + insert.len());
            self.buf[at..at + insert.len()].copy_from_slice(insert);
        }
        self.ready += insert.len();
    }

    /// Gives the read buffer back once it is empty, so idle clients stay small.
    pub fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            crate::buffers::give(std::mem::take(&mut self.buf));
        }
    }
}

/// A simple Query holding `BEGIN`.
const BEGIN_QUERY: &[u8] = b"Q\0\0\0\x0aBEGIN\0";

/// `BEGIN` as the extended protocol sends it, through the unnamed statement and portal:
/// Parse, Bind, Execute, Sync.
const BEGIN_EXTENDED: &[u8] = b"P\0\0\0\x0d\0BEGIN\0\0\0\
    B\0\0\0\x0c\0\0\0\0\0\0\0\0\
    E\0\0\0\x09\0\0\0\0\0\
    S\0\0\0\x04";

/// Puts a `BEGIN` in front of the client's request, to go to the server in the same
/// write. pgmux has already told the client its block is open (it answered a plain
/// `BEGIN` itself while the client held no server), so the server's answer to it is
/// checked and never forwarded. This saves the server a round trip per transaction, and
/// spares pgmux the reads and writes of one.
///
/// A plain `BEGIN` on a server that is idle outside a block does not fail. Should it
/// anyway, the client's request has already reached the server, outside any block:
/// the relay ends with an error and the client is disconnected, as for a server that
/// broke mid-transaction. With `unnamed`, the `BEGIN` goes through the unnamed
/// statement, which the client had it parsed into.
///
/// Returns `false`, doing nothing, if part of the client's stream is already framed,
/// and the `BEGIN` cannot go in front.
pub fn begin_ahead(flow: &mut Flow, tracker: &mut Tracker, unnamed: bool) -> bool {
    if flow.ready > 0 || flow.skip > 0 {
        return false;
    }
    flow.splice_ready(0, if unnamed { BEGIN_EXTENDED } else { BEGIN_QUERY });
    tracker.pending += 1;
    tracker.owed_seq += 1;
    tracker.begin_ahead = true;
    tracker.began();
    true
}

/// What a client has asked of its server that is not answered yet.
#[derive(Debug, Default)]
pub struct Tracker {
    /// ReadyForQuery messages still owed for Query, Sync and FunctionCall messages sent.
    pending: u32,
    /// Extended-protocol messages were sent since the last Sync.
    unsynced: bool,
    /// Status byte of the last ReadyForQuery.
    status: u8,
    /// The server reported an error since the last ReadyForQuery.
    failed: bool,
    /// A COPY FROM STDIN is in progress: the server waits for the client's data, and
    /// ignores any Sync or Flush until CopyDone or CopyFail.
    copy_in: bool,
    /// Syncs counted since the last Execute or Query. If that Execute turns out to start
    /// a COPY FROM STDIN, the server ignores them, and they are taken back.
    syncs_since_execute: u32,
    /// Count of ReadyForQuery messages owed in total, and received in total.
    owed_seq: u64,
    seen_seq: u64,
    /// Session-parameter changes taking effect when their ReadyForQuery arrives cleanly.
    effects: VecDeque<(u64, SessionEffect)>,
    /// Changes made inside the open transaction block: they last only if it commits.
    uncommitted: Vec<SessionEffect>,
    /// The last CommandComplete was COMMIT (a failed block's COMMIT reports ROLLBACK).
    committed: bool,
    /// When the oldest request still unanswered was framed, and when the open
    /// transaction's first request was: for the duration histograms and SHOW STATS.
    query_started: Option<Instant>,
    xact_started: Option<Instant>,
    /// When the last ReadyForQuery came: the end of the transaction, for SHOW CLIENTS,
    /// without reading the clock again.
    last_ready: Option<Instant>,
    /// A statement ran whose completion does not rule out a write: anything but the
    /// session and transaction-control commands that never touch data.
    wrote: bool,
    /// A `BEGIN` pgmux sent ahead of the client's request (see [`begin_ahead`]) is
    /// not answered yet: that answer is checked, and kept from the client.
    begin_ahead: bool,
}

impl Tracker {
    /// When the last ReadyForQuery came, if one has.
    pub fn last_ready(&self) -> Option<std::time::Instant> {
        self.last_ready.map(Instant::into_std)
    }

    /// No request outstanding and no extended batch half sent.
    pub fn quiet(&self) -> bool {
        self.pending == 0 && !self.unsynced
    }

    /// Whether a statement ran that may have written (see [`writes_nothing`]).
    pub fn wrote(&self) -> bool {
        self.wrote
    }

    /// ReadyForQuery messages the server still owes.
    pub fn owed(&self) -> u32 {
        self.pending
    }

    /// Last transaction status reported: `I` idle, `T` in a transaction, `E` failed one.
    pub fn status(&self) -> u8 {
        if self.status == 0 {
            b'I'
        } else {
            self.status
        }
    }

    /// pgmux itself opened a transaction block on the server (a `BEGIN` it answered for
    /// the client earlier): until the server says otherwise, the block is open.
    pub fn began(&mut self) {
        self.status = b'T';
    }

    pub fn copy_in(&self) -> bool {
        self.copy_in
    }

    /// Whether the attached server is at a point where it may be given to someone else.
    pub fn at_boundary(&self) -> bool {
        self.quiet() && self.status() == b'I'
    }
}

/// Why a relay stopped without error.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Transaction boundary reached; the server may be released.
    Boundary,
    /// The client sent Terminate.
    Terminate,
    /// The client closed its socket.
    ClientClosed,
    /// A replica refused a statement as a write (25006) before any of its answer reached
    /// the client: the caller runs the request again on the primary. The server still
    /// owes its ReadyForQuery.
    RetryOnPrimary,
}

/// A stream the relay reads from, with what it knows of the task's waker there:
/// `armed` says a read came back Pending since the stream last had data, so the task's
/// waker is registered for it and still in place.
///
/// Each wake-up of a relay comes from one of its two sockets, and the other one,
/// armed, has nothing to read. A plain TCP socket is then only checked for readiness,
/// without registering the waker again (a mutex and a waker comparison per check);
/// other streams (TLS, test streams) are polled as usual.
pub trait RelayRead: AsyncRead + Unpin {
    fn poll_read_relay(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        _armed: &mut bool,
    ) -> Poll<io::Result<usize>> {
        poll_read_buf(Pin::new(self), cx, buf)
    }
}

impl RelayRead for tokio::io::DuplexStream {}

impl RelayRead for crate::tls::ClientStream {
    fn poll_read_relay(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        armed: &mut bool,
    ) -> Poll<io::Result<usize>> {
        match self {
            crate::tls::ClientStream::Plain(tcp) => poll_read_tcp(tcp, cx, buf, armed),
            other => poll_read_buf(Pin::new(other), cx, buf),
        }
    }
}

impl RelayRead for crate::tls::ServerStream {
    fn poll_read_relay(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        armed: &mut bool,
    ) -> Poll<io::Result<usize>> {
        match self {
            crate::tls::ServerStream::Plain(tcp) => poll_read_tcp(tcp, cx, buf, armed),
            other => poll_read_buf(Pin::new(other), cx, buf),
        }
    }
}

/// Reads a plain TCP socket into `buf`'s spare room, registering the task's waker only
/// where it is not registered already (see [`RelayRead`]).
fn poll_read_tcp(
    tcp: &tokio::net::TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    armed: &mut bool,
) -> Poll<io::Result<usize>> {
    loop {
        // `try_io` runs the read only if the socket is marked ready, and clears the
        // mark when the read says WouldBlock. The closure says WouldBlock after a short
        // read too, as tokio's own `poll_read` clears the mark then: the socket is
        // drained, and the next look needs no system call.
        let mut looked = false;
        let mut got = None;
        let tried = tcp.try_io(tokio::io::Interest::READABLE, || {
            looked = true;
            let n = tcp.try_read_buf(&mut *buf)?;
            got = Some(n);
            if n > 0 && buf.capacity() > buf.len() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        if let Some(n) = got {
            *armed = false;
            return Poll::Ready(Ok(n));
        }
        match tried {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
            Ok(()) => unreachable!("a read that ran reported its count"),
        }
        // Not marked ready: if the waker is registered, it still is (only readiness
        // takes it out). A read that ran and found nothing after all used up the
        // readiness that took it, so it must be registered again.
        if *armed && !looked {
            return Poll::Pending;
        }
        match tcp.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => continue,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                *armed = true;
                return Poll::Pending;
            }
        }
    }
}

/// Limits and per-pool counters the relay needs.
pub struct Limits<'a> {
    pub max_message_size: usize,
    /// Stop at transaction boundaries (transaction mode) or not (session mode).
    pub stop_at_boundary: bool,
    pub idle_transaction_timeout: Duration,
    pub query_timeout: Duration,
    pub metrics: &'a crate::metrics::PoolMetrics,
    /// The pool's own totals, read by the console.
    pub stats: &'a crate::pool::PoolStats,
    /// Hold the server's answer back from the client, and stop reading the client,
    /// until the first message that is not a preliminary one (ParseComplete,
    /// BindComplete, CloseComplete, descriptions, notices, ParameterStatus); a 25006
    /// before that ends
    /// the relay with [`End::RetryOnPrimary`].
    pub hold_for_retry: bool,
}

/// The client end of a relay.
pub struct ClientEnd<'a, S> {
    pub stream: &'a mut S,
    pub flow: &'a mut Flow,
    pub params: &'a mut Arc<ParamSet>,
    /// ParameterStatus values the client has been told, by name.
    pub reported: &'a mut Arc<Vec<(String, String)>>,
    /// The client's prepared statements, when pgmux keeps them (transaction mode).
    pub prepared: Option<&'a mut ClientStatements>,
}

/// Things the relay wants done by the caller while it keeps running.
pub trait Hooks {
    /// The query on the server ran past query_timeout; the caller cancels it.
    fn query_timed_out(&mut self, server: &Server);
}

/// Runs until a transaction boundary (when asked), a Terminate, or an error. Messages the
/// client had already sent before the call are in `client.flow` and are framed first.
pub async fn run<S, H>(
    client: ClientEnd<'_, S>,
    server: &mut Server,
    tracker: &mut Tracker,
    limits: &Limits<'_>,
    hooks: &mut H,
) -> Result<End>
where
    S: RelayRead + AsyncWrite + Unpin,
    H: Hooks,
{
    let mut relay = Relay {
        client,
        server,
        tracker,
        limits,
        client_eof: false,
        terminate: false,
        boundary: false,
        holding: limits.hold_for_retry,
        retry: false,
        timer: None,
        timer_kind: TimerKind::None,
        client_armed: false,
        server_armed: false,
    };
    relay.frame_client()?;
    poll_fn(|cx| relay.poll(cx, hooks)).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerKind {
    None,
    Idle,
    Query,
}

struct Relay<'r, 'a, S> {
    client: ClientEnd<'a, S>,
    server: &'r mut Server,
    tracker: &'r mut Tracker,
    limits: &'r Limits<'a>,
    client_eof: bool,
    terminate: bool,
    boundary: bool,
    /// See [`Limits::hold_for_retry`].
    holding: bool,
    retry: bool,
    timer: Option<Pin<Box<Sleep>>>,
    timer_kind: TimerKind,
    /// See [`RelayRead`].
    client_armed: bool,
    server_armed: bool,
}

impl<S: RelayRead + AsyncWrite + Unpin> Relay<'_, '_, S> {
    fn poll<H: Hooks>(&mut self, cx: &mut Context<'_>, hooks: &mut H) -> Poll<Result<End>> {
        // A side whose read came back Pending in this call is not read again before the
        // call returns: its waker is registered already, and each read that finds
        // nothing still costs a readiness check and a waker registration.
        let mut client_idle = false;
        let mut server_idle = false;
        loop {
            let mut progress = false;

            if self.retry {
                return Poll::Ready(Ok(End::RetryOnPrimary));
            }
            if !self.holding {
                progress |= self.write_to_client(cx)?;
            }
            if self.server.flow.ready().is_empty() {
                if self.boundary {
                    // Framed client bytes not yet written can only be Flushes (and
                    // stray copy messages), which a server outside any request ignores:
                    // dropped, so the next request starts with a clean buffer.
                    let framed = self.client.flow.ready().len();
                    self.client.flow.consume(framed);
                    return Poll::Ready(Ok(End::Boundary));
                }
                if self.terminate && self.tracker.quiet() {
                    return Poll::Ready(Ok(End::Terminate));
                }
            }
            progress |= self.write_to_server(cx)?;

            if !client_idle
                && !self.client_eof
                && !self.terminate
                && !self.holding
                && self.client.flow.wants_read()
            {
                let read = self.read_client(cx)?;
                client_idle = !read;
                progress |= read;
            }
            if self.client_eof && self.server.flow.ready().is_empty() {
                return Poll::Ready(Ok(End::ClientClosed));
            }
            if !server_idle && !self.boundary && self.server.flow.wants_read() {
                let read = self.read_server(cx)?;
                server_idle = !read;
                progress |= read;
            }

            if !progress {
                return self.poll_timer(cx, hooks);
            }
        }
    }

    fn write_to_client(&mut self, cx: &mut Context<'_>) -> Result<bool> {
        let ready = self.server.flow.ready();
        if ready.is_empty() {
            // A TLS stream may still hold written bytes; plain TCP returns at once.
            flush(&mut *self.client.stream, cx).map_err(Error::ClientIo)?;
            return Ok(false);
        }
        match Pin::new(&mut *self.client.stream).poll_write(cx, ready) {
            Poll::Ready(Ok(0)) => Err(Error::ClientIo(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                self.server.flow.consume(n);
                if self.server.flow.ready().is_empty() {
                    flush(&mut *self.client.stream, cx).map_err(Error::ClientIo)?;
                }
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(Error::ClientIo(e)),
            Poll::Pending => Ok(false),
        }
    }

    fn write_to_server(&mut self, cx: &mut Context<'_>) -> Result<bool> {
        let ready = self.client.flow.ready();
        if ready.is_empty() {
            // As for the client: TLS may hold bytes until flushed.
            if let Err(e) = flush(&mut self.server.stream, cx) {
                return Err(self.server_failed(e));
            }
            return Ok(false);
        }
        match Pin::new(&mut self.server.stream).poll_write(cx, ready) {
            Poll::Ready(Ok(0)) => Err(self.server_failed(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                self.client.flow.consume(n);
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(self.server_failed(e)),
            Poll::Pending => Ok(false),
        }
    }

    fn read_client(&mut self, cx: &mut Context<'_>) -> Result<bool> {
        self.client.flow.reserve_for_read();
        match self.client.stream.poll_read_relay(
            cx,
            &mut self.client.flow.buf,
            &mut self.client_armed,
        ) {
            Poll::Ready(Ok(0)) => {
                self.client_eof = true;
                Ok(true)
            }
            Poll::Ready(Ok(n)) => {
                self.limits
                    .stats
                    .received
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                self.frame_client()?;
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(Error::ClientIo(e)),
            Poll::Pending => Ok(false),
        }
    }

    fn read_server(&mut self, cx: &mut Context<'_>) -> Result<bool> {
        self.server.flow.reserve_for_read();
        match self.server.stream.poll_read_relay(
            cx,
            &mut self.server.flow.buf,
            &mut self.server_armed,
        ) {
            Poll::Ready(Ok(0)) => Err(self.server_failed(io::ErrorKind::UnexpectedEof.into())),
            Poll::Ready(Ok(n)) => {
                self.limits
                    .stats
                    .sent
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                self.frame_server()?;
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(self.server_failed(e)),
            Poll::Pending => Ok(false),
        }
    }

    fn server_failed(&mut self, e: io::Error) -> Error {
        self.server.broken = true;
        Error::ServerIo(e)
    }

    /// Frames client messages, updating what is owed by the server.
    fn frame_client(&mut self) -> Result<()> {
        let max = self.limits.max_message_size;
        let tracking = self.client.prepared.is_some();
        let whole = |tag| {
            tag == tag::QUERY
                || tag == tag::PARSE
                || (tracking && matches!(tag, tag::BIND | tag::DESCRIBE | tag::CLOSE))
        };
        while let Some(frame) = self
            .client
            .flow
            .peek(max, whole)
            .map_err(Error::ClientProtocol)?
        {
            // The statement text of a Query or Parse, and its first word, are looked
            // at once here for every scanner below.
            let text = match frame.tag {
                tag::QUERY => {
                    let body = self.client.flow.body(frame);
                    Some(body.strip_suffix(b"\0").unwrap_or(body))
                }
                tag::PARSE => parse_query_text(self.client.flow.body(frame)),
                _ => None,
            };
            let lead = text.map_or(sql::Lead::Other, sql::lead);
            let action = match self.client.prepared.as_deref_mut() {
                Some(statements) => {
                    let body = if frame.whole {
                        self.client.flow.body(frame)
                    } else {
                        &[]
                    };
                    statements.on_client(
                        frame.tag,
                        body,
                        lead,
                        &mut self.server.prepared,
                        self.tracker.copy_in,
                    )
                }
                None => Action::Forward,
            };
            if action == Action::Answered {
                self.client.flow.splice_ready(frame.len, &[]);
                continue;
            }
            let t = &mut *self.tracker;
            if t.query_started.is_none() {
                let now = Instant::now();
                t.query_started = Some(now);
                t.xact_started.get_or_insert(now);
            }
            match frame.tag {
                tag::QUERY => {
                    t.syncs_since_execute = 0;
                    t.pending += 1;
                    t.owed_seq += 1;
                    if let Some(effect) = text.and_then(|text| session_effect_of(text, lead)) {
                        t.effects.push_back((t.owed_seq, effect));
                    }
                }
                tag::SYNC if t.copy_in => {}
                tag::SYNC | tag::FUNCTION_CALL => {
                    t.pending += 1;
                    t.owed_seq += 1;
                    if frame.tag == tag::SYNC {
                        t.unsynced = false;
                        t.syncs_since_execute += 1;
                    } else {
                        t.wrote = true;
                    }
                }
                tag::PARSE => {
                    t.unsynced = true;
                    // A SET prepared in an extended batch takes effect at the next Sync.
                    if let Some(effect) = text.and_then(|text| session_effect_of(text, lead)) {
                        t.effects.push_back((t.owed_seq + 1, effect));
                    }
                }
                tag::EXECUTE => {
                    t.unsynced = true;
                    t.syncs_since_execute = 0;
                }
                // A Flush starts nothing the server must finish: drivers in pipeline
                // mode send one right behind their Sync (to read the results at once),
                // and that must not keep the server from being released after it.
                tag::FLUSH => {}
                tag::BIND | tag::DESCRIBE | tag::CLOSE => t.unsynced = true,
                tag::COPY_DATA => {}
                tag::COPY_DONE | tag::COPY_FAIL => t.copy_in = false,
                tag::TERMINATE => {
                    // Not forwarded: the server stays with the pool.
                    self.terminate = true;
                    self.emit_synthetic();
                    return Ok(());
                }
                other => {
                    return Err(Error::ClientProtocol(format!(
                        "unexpected message type {:?}",
                        other as char
                    )))
                }
            }
            match (action, self.client.prepared.as_deref()) {
                (Action::Replace, Some(statements)) => {
                    self.client.flow.splice_ready(frame.len, &statements.out);
                }
                _ => self.client.flow.accept(frame),
            }
        }
        // Once for all the frames: no server message is framed in between, so the
        // answers owed come out at the same place in the stream as if emitted after
        // each frame.
        self.emit_synthetic();
        Ok(())
    }

    /// Writes the answers pgmux owes the client in place of messages it did not send,
    /// once everything before them has been answered.
    /// Inlined: it runs after every server message, and nearly always finds nothing due.
    #[inline]
    fn emit_synthetic(&mut self) {
        let due = self
            .client
            .prepared
            .as_deref()
            .is_some_and(ClientStatements::synthetic_due);
        if due && !self.server.flow.mid_message() {
            self.emit_synthetic_now();
        }
    }

    // Kept out of line: inlined, its buffer made `emit_synthetic` set up a large frame
    // at each of its calls, several per message.
    #[cold]
    #[inline(never)]
    fn emit_synthetic_now(&mut self) {
        let Some(statements) = self.client.prepared.as_deref_mut() else {
            return;
        };
        let mut answers = BytesMut::new();
        statements.drain_synthetic(self.tracker.status(), &mut answers);
        self.server.flow.splice_ready(0, &answers);
    }

    /// Frames server messages, noting ReadyForQuery, ParameterStatus and errors.
    fn frame_server(&mut self) -> Result<()> {
        let tracking = self.client.prepared.is_some();
        let whole = |tag| {
            if tracking {
                // Answers may be dropped, replaced or have pgmux's own put next to them,
                // which needs them whole; rows and copy data still stream.
                return !matches!(tag, btag::DATA_ROW | btag::COPY_DATA | b'V');
            }
            matches!(
                tag,
                btag::READY_FOR_QUERY
                    | btag::COMMAND_COMPLETE
                    | btag::PARAMETER_STATUS
                    | btag::ERROR_RESPONSE
                    | btag::AUTHENTICATION
                    | btag::BACKEND_KEY_DATA
            )
        };
        while !self.boundary {
            let hiding = self.tracker.begin_ahead;
            let frame = match self
                .server
                .flow
                .peek(usize::MAX, |tag| hiding || whole(tag))
            {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    self.server.broken = true;
                    return Err(Error::ServerProtocol(e));
                }
            };
            if hiding {
                self.hidden_answer(frame)?;
                continue;
            }
            if self.holding {
                if frame.tag == btag::ERROR_RESPONSE
                    && error_code(self.server.flow.body(frame)) == Some(b"25006")
                {
                    self.retry = true;
                    return Ok(());
                }
                if !matches!(
                    frame.tag,
                    b'1' | b'2'
                        | b'3'
                        | b't'
                        | b'T'
                        | b'n'
                        | btag::PARAMETER_STATUS
                        | btag::NOTICE_RESPONSE
                ) {
                    self.holding = false;
                }
            }
            let disposition = match self.client.prepared.as_deref_mut() {
                Some(statements) => {
                    let body = if matches!(frame.tag, btag::COMMAND_COMPLETE | btag::ERROR_RESPONSE)
                    {
                        self.server.flow.body(frame)
                    } else {
                        &[]
                    };
                    statements.on_server(frame.tag, body, &mut self.server.prepared)
                }
                None => Disposition::Keep,
            };
            match frame.tag {
                btag::READY_FOR_QUERY => self.ready_for_query(frame)?,
                btag::COMMAND_COMPLETE => {
                    let tag = self.server.flow.body(frame);
                    self.tracker.committed = tag == b"COMMIT\0";
                    if !writes_nothing(tag) {
                        self.tracker.wrote = true;
                    }
                }
                btag::PARAMETER_STATUS => self.parameter_status(frame),
                btag::ERROR_RESPONSE => {
                    self.tracker.failed = true;
                    self.tracker.copy_in = false;
                    if is_fatal(self.server.flow.body(frame)) {
                        self.server.broken = true;
                    }
                }
                btag::COPY_IN_RESPONSE | btag::COPY_BOTH_RESPONSE => {
                    let t = &mut *self.tracker;
                    t.copy_in = true;
                    // Syncs sent right behind the Execute are swallowed by copy-in mode;
                    // the client sends another after CopyDone.
                    t.pending -= t.syncs_since_execute.min(t.pending);
                    t.owed_seq -= u64::from(t.syncs_since_execute);
                    if t.syncs_since_execute > 0 {
                        t.unsynced = true;
                    }
                    t.syncs_since_execute = 0;
                }
                btag::AUTHENTICATION | btag::BACKEND_KEY_DATA => {
                    self.server.broken = true;
                    return Err(Error::ServerProtocol(format!(
                        "unexpected message type {:?} after login",
                        frame.tag as char
                    )));
                }
                _ => {}
            }
            match (disposition, self.client.prepared.as_deref()) {
                (Disposition::Drop, _) if frame.whole => {
                    self.server.flow.splice_ready(frame.len, &[])
                }
                (Disposition::Replace, Some(statements)) if frame.whole => {
                    self.server.flow.splice_ready(frame.len, &statements.out);
                }
                _ => self.server.flow.accept(frame),
            }
            self.emit_synthetic();
        }
        Ok(())
    }

    /// A message answering the `BEGIN` of [`begin_ahead`]: the client never sees it,
    /// but for a ParameterStatus or a notification, which are the session's whatever
    /// came before them.
    fn hidden_answer(&mut self, frame: Frame) -> Result<()> {
        let t = &mut *self.tracker;
        match frame.tag {
            btag::READY_FOR_QUERY => {
                let status = self.server.flow.body(frame).first().copied();
                t.pending -= 1;
                t.seen_seq += 1;
                t.begin_ahead = false;
                if status != Some(b'T') || t.failed {
                    self.server.broken = true;
                    return Err(Error::ServerProtocol(
                        "the server refused a BEGIN pgmux had already confirmed".into(),
                    ));
                }
            }
            btag::ERROR_RESPONSE => t.failed = true,
            btag::PARAMETER_STATUS | btag::NOTIFICATION_RESPONSE => {
                if frame.tag == btag::PARAMETER_STATUS {
                    self.parameter_status(frame);
                }
                self.server.flow.accept(frame);
                return Ok(());
            }
            btag::PARSE_COMPLETE
            | btag::BIND_COMPLETE
            | btag::COMMAND_COMPLETE
            | btag::NOTICE_RESPONSE => {}
            other => {
                self.server.broken = true;
                return Err(Error::ServerProtocol(format!(
                    "unexpected message type {:?} in answer to BEGIN",
                    other as char
                )));
            }
        }
        self.server.flow.splice_ready(frame.len, &[]);
        Ok(())
    }

    fn ready_for_query(&mut self, frame: Frame) -> Result<()> {
        let status = self.server.flow.body(frame).first().copied().unwrap_or(0);
        let t = &mut *self.tracker;
        if t.pending == 0 || !matches!(status, b'I' | b'T' | b'E') {
            self.server.broken = true;
            return Err(Error::ServerProtocol(
                "ReadyForQuery that nobody asked for".into(),
            ));
        }
        t.pending -= 1;
        t.seen_seq += 1;
        t.status = status;
        t.copy_in = false;
        while t.effects.front().is_some_and(|(seq, _)| *seq <= t.seen_seq) {
            let (seq, effect) = t.effects.pop_front().expect("checked");
            if seq == t.seen_seq && !t.failed {
                if status == b'I' {
                    apply_effect(Arc::make_mut(self.client.params), effect);
                } else {
                    t.uncommitted.push(effect);
                }
            }
        }
        if status == b'I' && !t.uncommitted.is_empty() {
            // The block ended: its SETs stand if it committed, and vanish otherwise.
            // ROLLBACK TO SAVEPOINT is not followed: a SET undone that way is still
            // replayed on the client's later servers.
            let effects = std::mem::take(&mut t.uncommitted);
            if t.committed {
                let params = Arc::make_mut(self.client.params);
                effects.into_iter().for_each(|e| apply_effect(params, e));
            }
        }
        t.failed = false;

        use std::sync::atomic::Ordering::Relaxed;
        let m = self.limits.metrics;
        let stats = self.limits.stats;
        let now = Instant::now();
        stats.queries.fetch_add(1, Relaxed);
        let query_took = t.query_started.map(|started| {
            let took = now.saturating_duration_since(started);
            m.query_duration.record(took);
            stats.query_us.fetch_add(took.as_micros() as u64, Relaxed);
            (started, took)
        });
        // Pipelined requests: the next one's time runs from this answer on.
        t.query_started = (t.pending > 0).then_some(now);
        t.last_ready = Some(now);
        if status == b'I' {
            stats.transactions.fetch_add(1, Relaxed);
            if let Some(started) = t.xact_started.take() {
                // Most transactions are one autocommit statement: its duration is the
                // query's, already worked out.
                let took = match query_took {
                    Some((query_started, took)) if query_started == started => took,
                    _ => now.saturating_duration_since(started),
                };
                m.transaction_duration.record(took);
                stats
                    .transaction_us
                    .fetch_add(took.as_micros() as u64, Relaxed);
            }
        }
        let settled = self
            .client
            .prepared
            .as_deref()
            .is_none_or(ClientStatements::settled);
        if self.limits.stop_at_boundary && t.at_boundary() && !self.terminate && settled {
            self.boundary = true;
        }
        Ok(())
    }

    fn parameter_status(&mut self, frame: Frame) {
        let body = self.server.flow.body(frame);
        let Some((name, rest)) = crate::protocol::cstr(body) else {
            return;
        };
        let Some((value, _)) = crate::protocol::cstr(rest) else {
            return;
        };
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            return;
        };
        remember_reported(self.client.reported, name, value);
        let value = ParamValue::Value(value.to_string());
        if crate::params::valid_name(name)
            && !crate::params::is_read_only(name)
            && self.client.params.get(&name.to_ascii_lowercase()) != Some(&value)
        {
            Arc::make_mut(self.client.params).set(name, value);
        }
    }

    /// Arms, fires or disarms the idle-in-transaction and query timers.
    fn poll_timer<H: Hooks>(&mut self, cx: &mut Context<'_>, hooks: &mut H) -> Poll<Result<End>> {
        let t = &*self.tracker;
        let (kind, limit) = if t.pending > 0 && !self.limits.query_timeout.is_zero() {
            (TimerKind::Query, self.limits.query_timeout)
        } else if t.pending == 0
            && t.status() != b'I'
            && !self.limits.idle_transaction_timeout.is_zero()
        {
            (TimerKind::Idle, self.limits.idle_transaction_timeout)
        } else {
            (TimerKind::None, Duration::ZERO)
        };
        if kind != self.timer_kind {
            self.timer_kind = kind;
            self.timer = (kind != TimerKind::None)
                .then(|| Box::pin(tokio::time::sleep_until(Instant::now() + limit)));
        }
        let Some(timer) = self.timer.as_mut() else {
            return Poll::Pending;
        };
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.timer = None;
        match kind {
            TimerKind::Idle => Poll::Ready(Err(Error::IdleTransactionTimeout(limit))),
            TimerKind::Query => {
                hooks.query_timed_out(self.server);
                // Fires once per wait; the server answers the cancel with an error.
                self.timer_kind = TimerKind::Query;
                Poll::Pending
            }
            TimerKind::None => Poll::Pending,
        }
    }
}

/// The query string of a Parse message body (statement name, query, parameter types).
pub fn parse_query_text(body: &[u8]) -> Option<&[u8]> {
    let (_name, rest) = crate::protocol::cstr(body)?;
    let (query, _) = crate::protocol::cstr(rest)?;
    Some(query)
}

/// Brings a server whose client left mid-request back to idle: sends what the client had
/// fully sent, ends an unfinished COPY or extended batch, cancels whatever runs, and
/// reads until every owed ReadyForQuery has arrived. Returns `false` if that could not
/// be done within `limit`; the server must then be closed.
pub async fn settle(
    server: &mut Server,
    client_flow: &mut Flow,
    tracker: &mut Tracker,
    limit: Duration,
) -> bool {
    use postgres_protocol::message::frontend;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    if server.broken || client_flow.mid_message() || server.flow.mid_message() {
        return false;
    }
    let work = async {
        let mut out = BytesMut::from(client_flow.ready());
        client_flow.consume(client_flow.ready().len());
        if tracker.copy_in {
            frontend::copy_fail("client disconnected", &mut out).ok()?;
        }
        if tracker.unsynced {
            frontend::sync(&mut out);
            tracker.pending += 1;
            tracker.unsynced = false;
        }
        server.stream.write_all(&out).await.ok()?;
        server.stream.flush().await.ok()?;
        if tracker.pending > 0 {
            crate::cancel::send(&server.cancel_key).await;
        }
        while tracker.pending > 0 {
            while let Some(frame) = server
                .flow
                .peek(usize::MAX, |t| t == btag::READY_FOR_QUERY)
                .ok()?
            {
                if frame.tag == btag::READY_FOR_QUERY {
                    tracker.pending -= 1;
                    tracker.status = server.flow.body(frame)[0];
                }
                server.flow.accept(frame);
                let done = server.flow.ready().len();
                server.flow.consume(done);
            }
            let done = server.flow.ready().len();
            server.flow.consume(done);
            if tracker.pending == 0 {
                break;
            }
            server.flow.reserve_for_read();
            if server.stream.read_buf(&mut server.flow.buf).await.ok()? == 0 {
                return None;
            }
        }
        Some(())
    };
    let settled = matches!(tokio::time::timeout(limit, work).await, Ok(Some(())));
    settled && server.flow.is_empty()
}

fn flush<S: AsyncWrite + Unpin>(stream: &mut S, cx: &mut Context<'_>) -> io::Result<()> {
    match Pin::new(stream).poll_flush(cx) {
        Poll::Ready(result) => result,
        // A buffering stream will finish on a later poll; nothing is lost.
        Poll::Pending => Ok(()),
    }
}

/// What a query string does to session parameters, if anything.
/// `lead` is [`sql::lead`] of `text`.
fn session_effect_of(text: &[u8], lead: sql::Lead) -> Option<SessionEffect> {
    // Only SET/RESET/DISCARD concern pgmux; skip the scan for anything else.
    if !lead.may_change_session() {
        return None;
    }
    let effect = sql::session_effect(std::str::from_utf8(text).ok()?);
    (effect != SessionEffect::None).then_some(effect)
}

fn apply_effect(params: &mut ParamSet, effect: SessionEffect) {
    match effect {
        SessionEffect::None => {}
        SessionEffect::Set { key, statement } => {
            params.set(&key, ParamValue::Statement(statement));
        }
        SessionEffect::Reset { key } => params.remove(&key),
        SessionEffect::ResetAll => params.clear(),
    }
}

/// Records a ParameterStatus value the client has been sent.
/// Clients with the same values share one list; it is copied only when it changes.
pub fn remember_reported(reported: &mut Arc<Vec<(String, String)>>, name: &str, value: &str) {
    match reported.iter().position(|(n, _)| n == name) {
        Some(i) if reported[i].1 == value => {}
        Some(i) => Arc::make_mut(reported)[i].1 = value.to_string(),
        None => Arc::make_mut(reported).push((name.to_string(), value.to_string())),
    }
}

/// Whether an ErrorResponse body has severity FATAL or PANIC.
/// Whether a CommandComplete tag (NUL included) is one of the commands that cannot
/// write data: session settings and transaction control. Everything else, SELECT
/// included (it may call a function that writes), may have written.
fn writes_nothing(tag: &[u8]) -> bool {
    matches!(
        tag,
        b"SET\0"
            | b"RESET\0"
            | b"SHOW\0"
            | b"BEGIN\0"
            | b"START TRANSACTION\0"
            | b"COMMIT\0"
            | b"ROLLBACK\0"
            | b"SAVEPOINT\0"
            | b"RELEASE\0"
            | b"DISCARD ALL\0"
            | b"DEALLOCATE\0"
            | b"DEALLOCATE ALL\0"
    )
}

/// The SQLSTATE field of an ErrorResponse body.
fn error_code(body: &[u8]) -> Option<&[u8]> {
    let mut rest = body;
    while let Some((&field, after)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let (value, after) = crate::protocol::cstr(after)?;
        if field == b'C' {
            return Some(value);
        }
        rest = after;
    }
    None
}

fn is_fatal(body: &[u8]) -> bool {
    let mut rest = body;
    while let Some((&field, after)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let Some((value, after)) = crate::protocol::cstr(after) else {
            break;
        };
        if field == b'V' || field == b'S' {
            return value == b"FATAL" || value == b"PANIC";
        }
        rest = after;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn the_begin_sent_ahead_is_what_frontend_encoders_write() {
        use postgres_protocol::message::frontend;
        let mut query = BytesMut::new();
        frontend::query("BEGIN", &mut query).unwrap();
        assert_eq!(&query[..], BEGIN_QUERY);
        let mut extended = BytesMut::new();
        frontend::parse("", "BEGIN", std::iter::empty(), &mut extended).unwrap();
        frontend::bind(
            "",
            "",
            std::iter::empty::<i16>(),
            std::iter::empty::<i32>(),
            |_: i32,
             _: &mut BytesMut|
             -> std::result::Result<
                postgres_protocol::IsNull,
                Box<dyn std::error::Error + Sync + Send>,
            > { unreachable!() },
            std::iter::empty::<i16>(),
            &mut extended,
        )
        .map_err(|_| ())
        .unwrap();
        frontend::execute("", 0, &mut extended).unwrap();
        frontend::sync(&mut extended);
        assert_eq!(&extended[..], BEGIN_EXTENDED);
    }

    /// Runs one relay: the client's bytes are already in its flow, `ahead` puts
    /// pgmux's BEGIN in front of them, and a peer plays the server with `answers`.
    /// Returns how the relay ended, what reached the client, what reached the server,
    /// and whether the server was marked broken.
    async fn relay_with_begin_ahead(
        client_bytes: &[u8],
        ahead: Option<bool>,
        answers: &[u8],
    ) -> (Result<End>, Vec<u8>, Vec<u8>, bool) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (ours, accepted) = tokio::join!(connect, listener.accept());
        let (mut peer, _) = accepted.unwrap();
        let mut server = Server::unauthenticated(ours.unwrap());
        let (mut client, mut client_peer) = tokio::io::duplex(64 * 1024);

        let metrics = crate::metrics::PoolMetrics::new("test", "test", None);
        let stats = crate::pool::PoolStats::default();
        let limits = Limits {
            max_message_size: 1 << 20,
            stop_at_boundary: true,
            idle_transaction_timeout: Duration::ZERO,
            query_timeout: Duration::ZERO,
            metrics: &metrics,
            stats: &stats,
            hold_for_retry: false,
        };
        let mut flow = Flow::default();
        flow.buf.extend_from_slice(client_bytes);
        let mut tracker = Tracker::default();
        if let Some(unnamed) = ahead {
            assert!(begin_ahead(&mut flow, &mut tracker, unnamed));
        }
        let mut params = Arc::new(ParamSet::default());
        let mut reported = Arc::new(Vec::new());
        struct NoCancel;
        impl Hooks for NoCancel {
            fn query_timed_out(&mut self, _server: &Server) {}
        }
        let expected = client_bytes.len()
            + ahead.map_or(0, |unnamed| {
                if unnamed {
                    BEGIN_EXTENDED.len()
                } else {
                    BEGIN_QUERY.len()
                }
            });
        let play_server = async {
            let mut got = vec![0; expected];
            peer.read_exact(&mut got).await.unwrap();
            peer.write_all(answers).await.unwrap();
            got
        };
        let relay = async {
            let end = run(
                ClientEnd {
                    stream: &mut client,
                    flow: &mut flow,
                    params: &mut params,
                    reported: &mut reported,
                    prepared: None,
                },
                &mut server,
                &mut tracker,
                &limits,
                &mut NoCancel,
            )
            .await;
            drop(client);
            end
        };
        let (end, got) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(relay, play_server)
        })
        .await
        .expect("the relay ends");
        let mut to_client = Vec::new();
        client_peer.read_to_end(&mut to_client).await.unwrap();
        (end, to_client, got, server.broken)
    }

    #[tokio::test]
    async fn the_answer_to_a_begin_sent_ahead_is_kept_from_the_client() {
        let update = msg(b'Q', b"UPDATE t SET x = 1\0");
        let commit = msg(b'Q', b"COMMIT\0");
        let mut client_bytes = update.clone();
        client_bytes.extend_from_slice(&commit);
        let answers = [
            msg(b'C', b"BEGIN\0"),
            msg(b'Z', b"T"),
            msg(b'C', b"UPDATE 1\0"),
            msg(b'Z', b"T"),
            msg(b'C', b"COMMIT\0"),
            msg(b'Z', b"I"),
        ]
        .concat();
        let (end, to_client, to_server, broken) =
            relay_with_begin_ahead(&client_bytes, Some(false), &answers).await;
        assert_eq!(end.unwrap(), End::Boundary);
        assert!(!broken);
        assert_eq!(to_server, [BEGIN_QUERY, &client_bytes].concat());
        assert_eq!(to_client, answers[msg(b'C', b"BEGIN\0").len() + 6..]);

        // Through the unnamed statement: its ParseComplete and BindComplete go too.
        let answers = [
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'C', b"BEGIN\0"),
            msg(b'Z', b"T"),
            msg(b'C', b"COMMIT\0"),
            msg(b'Z', b"I"),
        ]
        .concat();
        let (end, to_client, to_server, _) =
            relay_with_begin_ahead(&commit, Some(true), &answers).await;
        assert_eq!(end.unwrap(), End::Boundary);
        assert_eq!(to_server, [BEGIN_EXTENDED, &commit].concat());
        assert_eq!(
            to_client,
            [msg(b'C', b"COMMIT\0"), msg(b'Z', b"I")].concat()
        );
    }

    #[tokio::test]
    async fn a_refused_begin_sent_ahead_ends_the_relay_and_the_server() {
        let update = msg(b'Q', b"UPDATE t SET x = 1\0");
        let answers = [
            msg(b'E', b"SERROR\0VERROR\0C25001\0Mno\0\0"),
            msg(b'Z', b"I"),
            msg(b'C', b"UPDATE 1\0"),
            msg(b'Z', b"I"),
        ]
        .concat();
        let (end, to_client, _, broken) =
            relay_with_begin_ahead(&update, Some(false), &answers).await;
        assert!(matches!(end, Err(Error::ServerProtocol(_))), "{end:?}");
        assert!(broken);
        assert!(to_client.is_empty(), "{to_client:?}");
    }

    #[test]
    fn whole_messages_wait_for_their_last_byte() {
        let mut flow = Flow::default();
        let m = msg(b'Q', b"SELECT 1\0");
        flow.buf.extend_from_slice(&m[..7]);
        assert!(flow.peek(1 << 20, |_| true).unwrap().is_none());
        flow.buf.extend_from_slice(&m[7..]);
        let frame = flow.peek(1 << 20, |_| true).unwrap().unwrap();
        assert!(frame.whole);
        assert_eq!(flow.body(frame), b"SELECT 1\0");
        flow.accept(frame);
        assert_eq!(flow.ready(), &m[..]);
    }

    #[test]
    fn streamed_messages_pass_in_pieces() {
        let mut flow = Flow::default();
        let m = msg(b'D', &[7u8; 100]);
        flow.buf.extend_from_slice(&m[..10]);
        let frame = flow.peek(1 << 20, |_| false).unwrap().unwrap();
        assert!(!frame.whole);
        flow.accept(frame);
        assert_eq!(flow.ready().len(), 10);
        flow.consume(10);
        flow.buf.extend_from_slice(&m[10..]);
        flow.buf.extend_from_slice(&msg(b'Z', b"I"));
        let next = flow.peek(1 << 20, |_| false).unwrap().unwrap();
        assert_eq!(next.tag, b'Z');
        assert_eq!(flow.ready().len(), m.len() - 10);
    }

    #[test]
    fn bad_lengths_are_refused_before_allocation() {
        let mut flow = Flow::default();
        flow.buf.extend_from_slice(&[b'Q', 0, 0, 0, 2]);
        assert!(flow.peek(1 << 20, |_| true).is_err());
        let mut flow = Flow::default();
        flow.buf.extend_from_slice(&[b'Q', 0x7f, 0xff, 0xff, 0xff]);
        assert!(flow.peek(1 << 20, |_| true).is_err());
        assert!(flow.buf.capacity() < 1 << 20);
    }

    #[test]
    fn fatal_errors_are_recognised() {
        assert!(is_fatal(b"SFATAL\0VFATAL\0C57P01\0Mbye\0\0"));
        assert!(!is_fatal(b"SERROR\0VERROR\0C42601\0Moops\0\0"));
        assert!(!is_fatal(b""));
    }

    #[test]
    fn parse_bodies_give_their_query() {
        assert_eq!(
            parse_query_text(b"s1\0SET x = 1\0\0\0"),
            Some(&b"SET x = 1"[..])
        );
        assert_eq!(parse_query_text(b"s1"), None);
    }

    #[test]
    fn session_effects_only_of_session_statements() {
        let of = |text: &[u8]| session_effect_of(text, sql::lead(text));
        assert!(matches!(
            of(b"  SET x = 1"),
            Some(SessionEffect::Set { .. })
        ));
        assert_eq!(of(b"discard all"), Some(SessionEffect::ResetAll));
        assert!(matches!(
            of(b"/* c */ SET x TO 2"),
            Some(SessionEffect::Set { .. })
        ));
        assert_eq!(of(b"SELECT 1"), None);
        assert_eq!(of(b""), None);
        assert_eq!(of(b"SET LOCAL x = 1"), None);
    }
}
