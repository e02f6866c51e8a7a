//! Protocol-level prepared statements in transaction mode.
//!
//! Drivers prepare named statements once per connection and use them in later round
//! trips, but in transaction mode those round trips may land on different servers. pgmux
//! therefore keeps the statements a client prepared by the client's own names, and gives
//! each distinct statement (query text plus parameter types) one server-side name of its
//! own, shared by every client of the pool that prepared the same text. Each server
//! remembers which server-side names it holds, in an LRU bounded by
//! `max_prepared_statements`.
//!
//! Client messages naming a statement are rewritten on their way to the server: a Parse
//! the server already holds is not sent at all, and a Bind or Describe of a statement the
//! server lacks is preceded by a Parse made by pgmux. The server's answers then no longer
//! match what the client sent, so every message sent carries an expectation in a queue,
//! in order: the answers to pgmux's own messages are dropped, and the ParseComplete or
//! CloseComplete the client expects for a message that was not sent is written into the
//! answer stream at its place.
//!
//! Errors follow PostgreSQL: after an ErrorResponse in an extended-protocol batch, the
//! server skips everything up to Sync, so every statement that batch would have created
//! is forgotten again, on the client's side and the server's.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use lru::LruCache;

use crate::protocol::{backend, btag, cstr, tag, HEADER_LEN};

/// Largest message considered for an answer without a server.
const LOCAL_MESSAGE_MAX: usize = 1 << 20;

/// Server-side statement names pgmux makes all start with this.
pub const NAME_PREFIX: &str = "__pgmux_";

/// A name no server-side statement ever has: client names that would look like pgmux's
/// own, and that the client never prepared, are sent as this one.
const UNKNOWN_NAME: &[u8] = b"__pgmux_unknown";

/// An empty statement pgmux prepares only for a client's extended-protocol DEALLOCATE
/// to remove, so that the client's DEALLOCATE runs and answers as it would have.
const DEALLOCATED_NAME: &str = "__pgmux_deallocated";

/// One distinct statement of a pool: its server-side name and the Parse that creates it.
#[derive(Debug)]
pub struct Statement {
    pub name: Arc<str>,
    /// A complete Parse message under the server-side name.
    parse: Bytes,
    /// Some server accepted this Parse: the text is valid SQL with those parameter types,
    /// so a client preparing it while no server is attached can be answered at once.
    validated: AtomicBool,
}

/// Counters of one pool, read by metrics and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Named Parse messages clients sent.
    pub client_parses: AtomicU64,
    /// Parse messages that reached a server (the client's own or made by pgmux).
    pub server_parses: AtomicU64,
    /// Statements closed on a server to stay within max_prepared_statements.
    pub evictions: AtomicU64,
    /// Parse messages answered without any server.
    pub local_answers: AtomicU64,
    /// Statements held on the pool's servers right now.
    pub server_statements: AtomicI64,
}

/// The distinct statements of one pool, by query text and parameter types.
#[derive(Debug, Default)]
pub struct Registry {
    statements: Mutex<HashMap<Box<[u8]>, Weak<Statement>>>,
    /// Map size at which dead entries are next swept out.
    sweep_at: AtomicU64,
    pub stats: Stats,
}

static NEXT_STATEMENT: AtomicU64 = AtomicU64::new(1);

impl Registry {
    /// The statement for a Parse body's text and types (`spec`: everything after the
    /// statement name), created if no client holds one.
    fn statement(&self, spec: &[u8]) -> Arc<Statement> {
        let mut map = self.statements.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stmt) = map.get(spec).and_then(Weak::upgrade) {
            return stmt;
        }
        let n = NEXT_STATEMENT.fetch_add(1, Ordering::Relaxed);
        let name: Arc<str> = format!("{NAME_PREFIX}{n}").into();
        let mut parse = BytesMut::with_capacity(spec.len() + name.len() + 6);
        parse.put_u8(tag::PARSE);
        parse.put_i32((4 + name.len() + 1 + spec.len()) as i32);
        parse.put_slice(name.as_bytes());
        parse.put_u8(0);
        parse.put_slice(spec);
        let stmt = Arc::new(Statement {
            name,
            parse: parse.freeze(),
            validated: AtomicBool::new(false),
        });
        map.insert(spec.into(), Arc::downgrade(&stmt));
        // Entries die with the last client holding them; sweep when the map has doubled.
        let len = map.len() as u64;
        if len >= self.sweep_at.load(Ordering::Relaxed) {
            map.retain(|_, w| w.strong_count() > 0);
            self.sweep_at
                .store((map.len() as u64 * 2).max(1024), Ordering::Relaxed);
        }
        stmt
    }

    /// Stops handing out `stmt` for its text: the next Parse of that text gets a new
    /// server-side name. Clients holding `stmt` keep it.
    fn retire(&self, stmt: &Statement) {
        let name_end = 5 + stmt.name.len() + 1;
        let spec = &stmt.parse[name_end..];
        let mut map = self.statements.lock().unwrap_or_else(|e| e.into_inner());
        if map
            .get(spec)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), stmt))
        {
            map.remove(spec);
        }
    }

    /// The statement for `spec` if some server has accepted it.
    fn validated(&self, spec: &[u8]) -> Option<Arc<Statement>> {
        let map = self.statements.lock().unwrap_or_else(|e| e.into_inner());
        map.get(spec)
            .and_then(Weak::upgrade)
            .filter(|s| s.validated.load(Ordering::Relaxed))
    }
}

/// The statements one server connection holds, least recently used first out.
#[derive(Debug)]
pub struct ServerStatements {
    lru: LruCache<Arc<str>, ()>,
}

impl ServerStatements {
    pub fn new(cap: NonZeroUsize) -> ServerStatements {
        ServerStatements {
            lru: LruCache::new(cap),
        }
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }

    /// Whether the server holds `name`; marks it used.
    fn touch(&mut self, name: &str) -> bool {
        self.lru.get(name).is_some()
    }
}

/// How the answer to one message sent to the server is handled.
#[derive(Debug)]
enum Expect {
    /// The client sent this message and sees the answer.
    Relay(Kind, Undo),
    /// pgmux sent this message; its answer is dropped, but an error still reaches the
    /// client, since the client's own next message fails because of it.
    Hidden(Kind, Undo),
    /// Sent in place of a client message pgmux refuses; the server's ErrorResponse is
    /// replaced by this one.
    Refused(Bytes),
    /// Not sent: the client gets these bytes in its place.
    Synthetic(Synthetic, Undo),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Parse,
    Bind,
    Close,
    Describe,
    Execute,
    /// Sync: answered by ReadyForQuery, errors or not; ends the skipping after an error.
    Sync,
    /// Query and FunctionCall: answered by ReadyForQuery, errors or not.
    Ready,
}

impl Kind {
    /// Whether a server message of type `tag` is the last of the answer.
    fn ends_with(self, tag: u8) -> bool {
        match self {
            Kind::Parse => tag == b'1',
            Kind::Bind => tag == b'2',
            Kind::Close => tag == b'3',
            Kind::Describe => tag == b'T' || tag == b'n',
            Kind::Execute => matches!(tag, b'C' | b'I' | b's'),
            Kind::Sync | Kind::Ready => tag == btag::READY_FOR_QUERY,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Synthetic {
    ParseComplete,
    CloseComplete,
    /// CommandComplete `DEALLOCATE` and ReadyForQuery, for a simple-query DEALLOCATE.
    Deallocated,
}

/// What to take back if a message turns out not to have taken effect.
#[derive(Debug)]
enum Undo {
    None,
    /// A client's Parse: forget the client's name, and the server's copy if this Parse
    /// was to create it.
    ClientParse {
        name: Box<[u8]>,
        stmt: Arc<Statement>,
        on_server: bool,
    },
    /// A Parse pgmux made: the server does not hold the statement after all.
    ServerParse(Arc<Statement>),
    /// A client's Close: the statement still exists.
    ClientClose {
        name: Box<[u8]>,
        stmt: Arc<Statement>,
    },
    /// A Bind or Describe of this statement: nothing to take back, but an error saying
    /// its plan went stale retires it.
    Uses(Arc<Statement>),
    /// A DEALLOCATE ALL or DISCARD ALL: the client's names it dropped when sent, given
    /// back if it fails.
    Reset(HashMap<Box<[u8]>, Arc<Statement>>),
}

/// What the relay does with a client message after [`ClientStatements::on_client`].
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Forward it unchanged.
    Forward,
    /// Send the bytes in [`ClientStatements::out`] in its place (possibly none).
    Replace,
    /// It was a request answered entirely by pgmux; send nothing and owe nothing.
    Answered,
}

/// What the relay does with a server message after [`ClientStatements::on_server`].
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    Keep,
    Drop,
    /// Give the client the bytes in [`ClientStatements::out`] instead.
    Replace,
}

/// The statements one client has prepared, by the client's names, and the bookkeeping
/// of the request in flight.
#[derive(Debug)]
pub struct ClientStatements {
    map: HashMap<Box<[u8]>, Arc<Statement>>,
    registry: Arc<Registry>,
    /// Most statements the client may hold at once.
    max: usize,
    /// Capacity of each server's LRU.
    server_cap: NonZeroUsize,
    expect: VecDeque<Expect>,
    /// An error arrived and the client has not sent its Sync yet: the server ignores
    /// everything until then, and so does the bookkeeping.
    skipping: bool,
    /// DEALLOCATEs of [`DEALLOCATED_NAME`] sent for the client and not yet completed:
    /// their CommandComplete says nothing about pgmux's statements on the server.
    own_deallocates: u32,
    /// The client's names an unnamed Parse of DEALLOCATE ALL or DISCARD ALL dropped,
    /// until the Execute that runs it (or the Sync, when none does).
    pending_reset: Option<HashMap<Box<[u8]>, Arc<Statement>>>,
    /// Scratch space for rewritten messages; reused, so steady state allocates nothing.
    pub out: BytesMut,
}

impl ClientStatements {
    pub fn new(registry: Arc<Registry>, max: usize, server_cap: NonZeroUsize) -> Self {
        ClientStatements {
            map: HashMap::new(),
            registry,
            max,
            server_cap,
            expect: VecDeque::new(),
            skipping: false,
            own_deallocates: 0,
            pending_reset: None,
            out: BytesMut::new(),
        }
    }

    /// Statements the client holds.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The query text of the client's statement `name`.
    pub fn query_of(&self, name: &[u8]) -> Option<&[u8]> {
        let stmt = self.map.get(name)?;
        crate::relay::parse_query_text(stmt.parse.get(5..)?)
    }

    /// Nothing is owed by the server and nothing waits to be given to the client.
    pub fn settled(&self) -> bool {
        self.expect.is_empty()
    }

    /// Forgets the request in flight: the server was released or abandoned.
    pub fn reset_request(&mut self) {
        self.expect.clear();
        self.skipping = false;
        self.own_deallocates = 0;
        self.pending_reset = None;
    }

    fn stats(&self) -> &Stats {
        &self.registry.stats
    }

    /// Looks at a client message bound for `server`. `copy_in` says a COPY FROM STDIN
    /// is running, when the server ignores Sync.
    pub fn on_client(
        &mut self,
        tag: u8,
        body: &[u8],
        lead: crate::sql::Lead,
        server: &mut Option<ServerStatements>,
        copy_in: bool,
    ) -> Action {
        if self.skipping && tag != tag::SYNC {
            // The server ignores it; so does the bookkeeping.
            return Action::Forward;
        }
        let drops = self.drops_server_statements(tag, body, lead);
        if drops != Drops::Nothing {
            // Whatever the client sends behind this runs after the server has dropped
            // its statements, so what pgmux prepared there must be forgotten now, not
            // when the answer comes. Should it fail, pgmux prepares again what the
            // server still holds, which is safe (a Close goes first).
            self.forget_server(server);
        }
        if drops == Drops::All {
            // Likewise the client's names: statements it prepares right behind may
            // reuse them, and must survive the answer.
            let names = std::mem::take(&mut self.map);
            if tag == tag::QUERY {
                self.expect
                    .push_back(Expect::Relay(Kind::Ready, Undo::Reset(names)));
                return Action::Forward;
            }
            self.pending_reset = Some(names);
        }
        let server = server.get_or_insert_with(|| ServerStatements::new(self.server_cap));
        match tag {
            tag::PARSE => self.parse(body, lead, server),
            tag::BIND => self.bind(body, server),
            tag::DESCRIBE => self.describe(body, server),
            tag::CLOSE => self.close(body),
            tag::EXECUTE => {
                let undo = self.pending_reset.take().map_or(Undo::None, Undo::Reset);
                self.expect.push_back(Expect::Relay(Kind::Execute, undo));
                Action::Forward
            }
            tag::SYNC if copy_in => Action::Forward,
            tag::SYNC => {
                if let Some(names) = self.pending_reset.take() {
                    // Prepared but never executed: nothing was dropped.
                    self.restore(names);
                }
                self.skipping = false;
                self.expect.push_back(Expect::Relay(Kind::Sync, Undo::None));
                Action::Forward
            }
            tag::QUERY => self.query(body, lead),
            tag::FUNCTION_CALL => {
                self.expect
                    .push_back(Expect::Relay(Kind::Ready, Undo::None));
                Action::Forward
            }
            _ => Action::Forward,
        }
    }

    /// Whether a simple query, or an unnamed Parse, is a DEALLOCATE ALL or DISCARD ALL,
    /// or a DEALLOCATE of a name the client does not hold (possibly one of pgmux's).
    fn drops_server_statements(&self, tag: u8, body: &[u8], lead: crate::sql::Lead) -> Drops {
        // Nearly every query is neither; skip the scan for those.
        if !lead.may_drop_statements() {
            return Drops::Nothing;
        }
        let text = match tag {
            tag::QUERY => body.strip_suffix(b"\0").unwrap_or(body),
            tag::PARSE => match cstr(body) {
                Some((b"", spec)) => match cstr(spec) {
                    Some((text, _)) => text,
                    None => return Drops::Nothing,
                },
                _ => return Drops::Nothing,
            },
            _ => return Drops::Nothing,
        };
        let Ok(text) = std::str::from_utf8(text) else {
            return Drops::Nothing;
        };
        if crate::sql::drops_all_statements(text) {
            Drops::All
        } else if crate::sql::deallocate_name(text)
            .is_some_and(|name| !self.map.contains_key(name.as_bytes()))
        {
            Drops::Unknown
        } else {
            Drops::Nothing
        }
    }

    /// Gives back names a reset dropped, except those the client has prepared anew.
    fn restore(&mut self, names: HashMap<Box<[u8]>, Arc<Statement>>) {
        for (name, stmt) in names {
            self.map.entry(name).or_insert(stmt);
        }
    }

    /// `lead` is [`crate::sql::lead`] of the statement's text.
    fn parse(
        &mut self,
        body: &[u8],
        lead: crate::sql::Lead,
        server: &mut ServerStatements,
    ) -> Action {
        let Some((name, spec)) = cstr(body) else {
            return Action::Forward;
        };
        if name.is_empty() {
            if lead.may_drop_statements() {
                if let Some(action) = self.extended_deallocate(spec) {
                    return action;
                }
            }
            self.expect
                .push_back(Expect::Relay(Kind::Parse, Undo::None));
            return Action::Forward;
        }
        self.stats().client_parses.fetch_add(1, Ordering::Relaxed);
        if self.map.contains_key(name) {
            let message = format!(
                "prepared statement \"{}\" already exists",
                String::from_utf8_lossy(name)
            );
            return self.refuse("42P05", &message);
        }
        if self.map.len() >= self.max {
            let message = format!(
                "too many prepared statements on this connection (max_client_prepared_statements = {})",
                self.max
            );
            return self.refuse("53400", &message);
        }
        let stmt = self.registry.statement(spec);
        self.map.insert(name.into(), Arc::clone(&stmt));
        self.out.clear();
        if server.touch(&stmt.name) {
            let undo = Undo::ClientParse {
                name: name.into(),
                stmt,
                on_server: false,
            };
            self.expect
                .push_back(Expect::Synthetic(Synthetic::ParseComplete, undo));
            return Action::Replace;
        }
        self.prepare_on_server(&stmt, server, false);
        let undo = Undo::ClientParse {
            name: name.into(),
            stmt,
            on_server: true,
        };
        self.expect.push_back(Expect::Relay(Kind::Parse, undo));
        Action::Replace
    }

    /// An unnamed Parse of `DEALLOCATE name` for a statement the client holds, as
    /// drivers send in pipeline mode, where the simple query protocol is not allowed
    /// (psycopg past prepared_max with libpq before 17). The server knows the statement
    /// by another name, so the client's name is dropped here, and the DEALLOCATE is
    /// pointed at an empty statement made for it: Bind and Execute then answer as they
    /// would have, with CommandComplete `DEALLOCATE`.
    fn extended_deallocate(&mut self, spec: &[u8]) -> Option<Action> {
        let (text, _) = cstr(spec)?;
        let target = deallocate_target(text)?;
        let (name, stmt) = self.map.remove_entry(target.as_bytes())?;
        self.out.clear();
        close_statement(&mut self.out, DEALLOCATED_NAME);
        self.expect
            .push_back(Expect::Hidden(Kind::Close, Undo::None));
        put_parse(&mut self.out, DEALLOCATED_NAME, "");
        self.expect
            .push_back(Expect::Hidden(Kind::Parse, Undo::None));
        put_parse(&mut self.out, "", &format!("DEALLOCATE {DEALLOCATED_NAME}"));
        self.expect
            .push_back(Expect::Relay(Kind::Parse, Undo::ClientClose { name, stmt }));
        self.own_deallocates += 1;
        Some(Action::Replace)
    }

    /// Appends to `out` what creates `stmt` on the server: Closes of statements evicted
    /// to make room, a Close of the name itself (so a server that holds it after all does
    /// not fail), and the Parse. With `hidden`, the Parse's answer is dropped; otherwise
    /// the caller queues the expectation for it.
    fn prepare_on_server(
        &mut self,
        stmt: &Arc<Statement>,
        server: &mut ServerStatements,
        hidden: bool,
    ) {
        let stats = &self.registry.stats;
        if let Some((evicted, ())) = server.lru.push(Arc::clone(&stmt.name), ()) {
            if evicted != stmt.name {
                stats.evictions.fetch_add(1, Ordering::Relaxed);
                stats.server_statements.fetch_sub(1, Ordering::Relaxed);
                close_statement(&mut self.out, &evicted);
                self.expect
                    .push_back(Expect::Hidden(Kind::Close, Undo::None));
            }
        }
        stats.server_statements.fetch_add(1, Ordering::Relaxed);
        stats.server_parses.fetch_add(1, Ordering::Relaxed);
        close_statement(&mut self.out, &stmt.name);
        self.expect
            .push_back(Expect::Hidden(Kind::Close, Undo::None));
        self.out.extend_from_slice(&stmt.parse);
        if hidden {
            self.expect.push_back(Expect::Hidden(
                Kind::Parse,
                Undo::ServerParse(Arc::clone(stmt)),
            ));
        }
    }

    /// Sends the server a Parse that fails at once, so it enters the same error state as
    /// for the refused message, and gives the client `message` as the error.
    fn refuse(&mut self, code: &str, message: &str) -> Action {
        let mut error = BytesMut::new();
        backend::error_response(&mut error, backend::Severity::Error, code, message);
        self.out.clear();
        let text = b"pgmux refused this statement\0";
        let name = b"__pgmux_refused\0";
        self.out.put_u8(tag::PARSE);
        self.out.put_i32((4 + name.len() + text.len() + 2) as i32);
        self.out.put_slice(name);
        self.out.put_slice(text);
        self.out.put_i16(0);
        self.expect.push_back(Expect::Refused(error.freeze()));
        Action::Replace
    }

    fn bind(&mut self, body: &[u8], server: &mut ServerStatements) -> Action {
        let Some((portal, rest)) = cstr(body) else {
            return Action::Forward;
        };
        let Some((name, params)) = cstr(rest) else {
            return Action::Forward;
        };
        self.expect.push_back(Expect::Relay(Kind::Bind, Undo::None));
        if name.is_empty() {
            return Action::Forward;
        }
        self.out.clear();
        let Some(server_name) = self.server_name_for(Kind::Bind, name, server) else {
            return Action::Forward;
        };
        self.out.put_u8(tag::BIND);
        self.out
            .put_i32((4 + portal.len() + 1 + server_name.len() + 1 + params.len()) as i32);
        self.out.put_slice(portal);
        self.out.put_u8(0);
        self.out.put_slice(server_name.as_bytes());
        self.out.put_u8(0);
        self.out.put_slice(params);
        Action::Replace
    }

    /// The server-side name a Bind or Describe (`kind`) of the client's statement `name`
    /// goes out with, after what prepares the statement on `server` if it lacks it (in
    /// `out`); `None` when the message is forwarded unchanged. The message's own
    /// expectation, queued by the caller, moves behind those of what is sent first.
    fn server_name_for(
        &mut self,
        kind: Kind,
        name: &[u8],
        server: &mut ServerStatements,
    ) -> Option<Arc<str>> {
        match self.map.get(name) {
            Some(stmt) => {
                let stmt = Arc::clone(stmt);
                self.expect.pop_back();
                if !server.touch(&stmt.name) {
                    self.prepare_on_server(&stmt, server, true);
                }
                let server_name = stmt.name.clone();
                self.expect.push_back(Expect::Relay(kind, Undo::Uses(stmt)));
                Some(server_name)
            }
            None if name.starts_with(NAME_PREFIX.as_bytes()) => {
                Some(Arc::from(std::str::from_utf8(UNKNOWN_NAME).expect("ascii")))
            }
            None => None,
        }
    }

    fn describe(&mut self, body: &[u8], server: &mut ServerStatements) -> Action {
        self.expect
            .push_back(Expect::Relay(Kind::Describe, Undo::None));
        let (Some(&b'S'), Some((name, _))) = (body.first(), cstr(&body[1.min(body.len())..]))
        else {
            return Action::Forward;
        };
        if name.is_empty() {
            return Action::Forward;
        }
        self.out.clear();
        let Some(server_name) = self.server_name_for(Kind::Describe, name, server) else {
            return Action::Forward;
        };
        self.out.put_u8(tag::DESCRIBE);
        self.out.put_i32((4 + 1 + server_name.len() + 1) as i32);
        self.out.put_u8(b'S');
        self.out.put_slice(server_name.as_bytes());
        self.out.put_u8(0);
        Action::Replace
    }

    fn close(&mut self, body: &[u8]) -> Action {
        let (Some(&b'S'), Some((name, _))) = (body.first(), cstr(&body[1.min(body.len())..]))
        else {
            self.expect
                .push_back(Expect::Relay(Kind::Close, Undo::None));
            return Action::Forward;
        };
        if name.is_empty() {
            self.expect
                .push_back(Expect::Relay(Kind::Close, Undo::None));
            return Action::Forward;
        }
        // The server-side statement stays for other clients; only the name goes. Closing
        // a name that does not exist is no error in PostgreSQL either.
        let undo = match self.map.remove_entry(name) {
            Some((name, stmt)) => Undo::ClientClose { name, stmt },
            None => Undo::None,
        };
        self.expect
            .push_back(Expect::Synthetic(Synthetic::CloseComplete, undo));
        self.out.clear();
        Action::Replace
    }

    fn query(&mut self, body: &[u8], lead: crate::sql::Lead) -> Action {
        let text = body.strip_suffix(b"\0").unwrap_or(body);
        let target = match lead {
            crate::sql::Lead::Deallocate => deallocate_target(text),
            _ => None,
        };
        if let Some(name) = target {
            if let Some((_, _)) = self.map.remove_entry(name.as_bytes()) {
                // DEALLOCATE is not transactional, and the server-side statement stays
                // for others: nothing for the server to do.
                self.expect
                    .push_back(Expect::Synthetic(Synthetic::Deallocated, Undo::None));
                return Action::Answered;
            }
        }
        self.expect
            .push_back(Expect::Relay(Kind::Ready, Undo::None));
        Action::Forward
    }

    /// Looks at a server message (`body` given for CommandComplete and ErrorResponse
    /// only, empty otherwise) and says what the client gets of it.
    pub fn on_server(
        &mut self,
        tag: u8,
        body: &[u8],
        server: &mut Option<ServerStatements>,
    ) -> Disposition {
        match tag {
            btag::NOTICE_RESPONSE | btag::PARAMETER_STATUS | btag::NOTIFICATION_RESPONSE => {
                return Disposition::Keep
            }
            btag::ERROR_RESPONSE => return self.on_error(body, server),
            btag::COMMAND_COMPLETE => self.command_complete(body, server),
            btag::COPY_IN_RESPONSE | btag::COPY_BOTH_RESPONSE => {
                // Syncs sent behind the Execute that started COPY FROM STDIN are ignored
                // by the server; the client sends another after CopyDone.
                let mut i = 1;
                while i < self.expect.len() {
                    if matches!(self.expect[i], Expect::Relay(Kind::Sync, _)) {
                        self.expect.remove(i);
                    } else {
                        i += 1;
                    }
                }
            }
            _ => {}
        }
        let Some(front) = self.expect.front() else {
            return Disposition::Keep;
        };
        let (kind, hidden) = match front {
            Expect::Relay(kind, _) => (*kind, false),
            Expect::Hidden(kind, _) => (*kind, true),
            Expect::Refused(_) => (Kind::Parse, false),
            Expect::Synthetic(..) => return Disposition::Keep,
        };
        if tag == btag::READY_FOR_QUERY && !matches!(kind, Kind::Ready | Kind::Sync) {
            // Answers went missing: take back everything up to the Sync this belongs to.
            while let Some(entry) = self.expect.pop_front() {
                let ready = matches!(entry, Expect::Relay(Kind::Ready | Kind::Sync, _));
                self.undo(entry, server);
                if ready {
                    break;
                }
            }
            return Disposition::Keep;
        }
        if !kind.ends_with(tag) {
            return if hidden {
                Disposition::Drop
            } else {
                Disposition::Keep
            };
        }
        match self.expect.pop_front().expect("front exists") {
            Expect::Relay(_, undo) | Expect::Hidden(_, undo) => {
                if let Undo::ClientParse { stmt, .. } | Undo::ServerParse(stmt) = &undo {
                    stmt.validated.store(true, Ordering::Relaxed);
                }
            }
            Expect::Refused(_) | Expect::Synthetic(..) => {}
        }
        if hidden {
            Disposition::Drop
        } else {
            Disposition::Keep
        }
    }

    fn command_complete(&mut self, body: &[u8], server: &mut Option<ServerStatements>) {
        let tag = body.strip_suffix(b"\0").unwrap_or(body);
        match tag {
            b"DISCARD ALL" | b"DEALLOCATE ALL" => {
                if let Some(Expect::Relay(_, undo @ Undo::Reset(_))) = self.expect.front_mut() {
                    // Done when it was sent; it succeeded, so nothing is given back.
                    *undo = Undo::None;
                    return;
                }
                // Not seen when sent (one statement of several in a query string).
                self.map.clear();
                self.forget_server(server);
            }
            b"DEALLOCATE" if self.own_deallocates > 0 => self.own_deallocates -= 1,
            // The client deallocated something by a name it never prepared through
            // the protocol: it may have been one of pgmux's.
            b"DEALLOCATE" => self.forget_server(server),
            _ => {}
        }
    }

    /// Forgets what the server holds. Always safe: pgmux closes a name before preparing
    /// it, so a statement the server holds after all is no obstacle.
    pub fn forget_server(&self, server: &mut Option<ServerStatements>) {
        if let Some(s) = server.take() {
            self.registry
                .stats
                .server_statements
                .fetch_sub(s.len() as i64, Ordering::Relaxed);
        }
    }

    fn on_error(&mut self, body: &[u8], server: &mut Option<ServerStatements>) -> Disposition {
        if let Some(Expect::Relay(Kind::Ready, undo @ Undo::Reset(_))) = self.expect.front_mut() {
            let Undo::Reset(names) = std::mem::replace(undo, Undo::None) else {
                unreachable!("matched above")
            };
            self.restore(names);
        }
        let Some(front) = self.expect.front() else {
            return Disposition::Keep;
        };
        if matches!(
            front,
            Expect::Relay(Kind::Ready | Kind::Sync, _) | Expect::Synthetic(..)
        ) {
            return Disposition::Keep;
        }
        let failed = self.expect.pop_front().expect("front exists");
        if let Expect::Relay(_, Undo::Uses(stmt)) = &failed {
            if is_stale_plan(body) {
                // The schema changed under the statement (PostgreSQL: "cached plan must
                // not change result type"). A driver answers by preparing the text
                // again, under a new name; were that mapped to this server-side
                // statement, it would fail the same way on every server that holds it.
                self.registry.retire(stmt);
            }
        }
        let disposition = match &failed {
            Expect::Refused(error) => {
                self.out.clear();
                self.out.extend_from_slice(error);
                Disposition::Replace
            }
            _ => Disposition::Keep,
        };
        self.undo(failed, server);
        // The server skips everything up to the next Sync.
        while let Some(entry) = self.expect.front() {
            if matches!(entry, Expect::Relay(Kind::Sync, _)) {
                break;
            }
            let entry = self.expect.pop_front().expect("front exists");
            self.undo(entry, server);
        }
        if self.expect.is_empty() {
            self.skipping = true;
        }
        disposition
    }

    fn undo(&mut self, entry: Expect, server: &mut Option<ServerStatements>) {
        let undo = match entry {
            Expect::Relay(_, undo) | Expect::Hidden(_, undo) | Expect::Synthetic(_, undo) => undo,
            Expect::Refused(_) => Undo::None,
        };
        let mut forget_on_server = |name: &str| {
            if let Some(s) = server.as_mut() {
                if s.lru.pop(name).is_some() {
                    self.registry
                        .stats
                        .server_statements
                        .fetch_sub(1, Ordering::Relaxed);
                }
            }
        };
        match undo {
            Undo::None => {}
            Undo::ClientParse {
                name,
                stmt,
                on_server,
            } => {
                if on_server {
                    forget_on_server(&stmt.name);
                }
                if self.map.get(&name).is_some_and(|s| Arc::ptr_eq(s, &stmt)) {
                    self.map.remove(&name);
                }
            }
            Undo::ServerParse(stmt) => forget_on_server(&stmt.name),
            Undo::Uses(_) => {}
            Undo::Reset(names) => self.restore(names),
            Undo::ClientClose { name, stmt } => {
                self.map.entry(name).or_insert(stmt);
            }
        }
    }

    /// Appends to `out` the answers pgmux owes the client at this point of the stream:
    /// those of messages not sent, once every message before them has been answered.
    /// `status` is the transaction status to report in a ReadyForQuery.
    pub fn drain_synthetic(&mut self, status: u8, out: &mut BytesMut) {
        while let Some(Expect::Synthetic(kind, _)) = self.expect.front() {
            match kind {
                Synthetic::ParseComplete => backend::parse_complete(out),
                Synthetic::CloseComplete => backend::close_complete(out),
                Synthetic::Deallocated => {
                    backend::command_complete(out, "DEALLOCATE");
                    backend::ready_for_query(out, status);
                }
            }
            self.expect.pop_front();
        }
    }

    /// Whether the next answer owed to the client is one of pgmux's own.
    #[inline]
    pub fn synthetic_due(&self) -> bool {
        matches!(self.expect.front(), Some(Expect::Synthetic(..)))
    }

    /// Answers, without a server, a request made only of named Parses of statements
    /// some server already accepted, Closes of statements, and Syncs, or a lone
    /// simple-query DEALLOCATE of a statement the client holds; the answers are appended
    /// to `reply`. `status` is the client's transaction status for their ReadyForQuery:
    /// `T` inside a block pgmux opened for it and holds no server for yet.
    pub fn answer_locally(&mut self, pending: &[u8], status: u8, reply: &mut BytesMut) -> Local {
        // Nearly every request a client sends between transactions is neither, and its
        // first bytes say so before the scan below: a simple query whose first letter
        // cannot start a DEALLOCATE, or a Parse of the unnamed statement.
        let body = pending.get(HEADER_LEN..).unwrap_or_default();
        match pending.first() {
            Some(&tag::QUERY)
                if body
                    .iter()
                    .find(|b| !b.is_ascii_whitespace())
                    .is_some_and(|b| !b.eq_ignore_ascii_case(&b'd')) =>
            {
                return Local::NeedsServer
            }
            Some(&tag::PARSE) if body.first() == Some(&0) => return Local::NeedsServer,
            _ => {}
        }
        // First pass: how much of it, up to a Sync, is answerable? Whatever follows that
        // Sync is a request of its own, left for a server.
        let mut at = 0;
        let mut answerable = 0;
        let mut new_names: Vec<&[u8]> = Vec::new();
        loop {
            let (tag, len) = match crate::protocol::header(&pending[at..]) {
                None => break,
                Some(Ok(h)) => h,
                Some(Err(_)) => return Local::NeedsServer,
            };
            if len > LOCAL_MESSAGE_MAX {
                // Not worth holding back; the relay applies max_message_size.
                if answerable == 0 {
                    return Local::NeedsServer;
                }
                break;
            }
            if pending.len() < at + len {
                break;
            }
            let body = &pending[at + 5..at + len];
            let ok = match tag {
                tag::PARSE => match cstr(body) {
                    Some((name, spec)) => {
                        let fits = !name.is_empty()
                            && !self.map.contains_key(name)
                            && !new_names.contains(&name)
                            && self.map.len() + new_names.len() < self.max
                            && self.registry.validated(spec).is_some();
                        if fits {
                            new_names.push(name);
                        }
                        fits
                    }
                    None => false,
                },
                tag::CLOSE => {
                    body.first() == Some(&b'S')
                        && cstr(&body[1..]).is_some_and(|(n, _)| !n.is_empty())
                }
                tag::SYNC => {
                    answerable = at + len;
                    true
                }
                tag::QUERY if at == 0 => {
                    let text = body.strip_suffix(b"\0").unwrap_or(body);
                    let Some(name) = deallocate_target(text) else {
                        return Local::NeedsServer;
                    };
                    if self.map.remove(name.as_bytes()).is_none() {
                        return Local::NeedsServer;
                    }
                    backend::command_complete(reply, "DEALLOCATE");
                    backend::ready_for_query(reply, status);
                    return Local::Answered(len);
                }
                _ => false,
            };
            if !ok {
                if answerable == 0 {
                    return Local::NeedsServer;
                }
                break;
            }
            at += len;
        }
        if answerable == 0 {
            // More of the request is on its way; the client waits for nothing before
            // its Sync.
            return Local::Incomplete;
        }
        let pending = &pending[..answerable];
        // Second pass: do it.
        let mut at = 0;
        while let Some(Ok((tag, len))) = crate::protocol::header(&pending[at..]) {
            let body = &pending[at + 5..at + len];
            match tag {
                tag::PARSE => {
                    let (name, spec) = cstr(body).expect("checked");
                    let stmt = self.registry.validated(spec);
                    let stmt = stmt.unwrap_or_else(|| self.registry.statement(spec));
                    self.map.insert(name.into(), stmt);
                    self.stats().client_parses.fetch_add(1, Ordering::Relaxed);
                    self.stats().local_answers.fetch_add(1, Ordering::Relaxed);
                    backend::parse_complete(reply);
                }
                tag::CLOSE => {
                    let (name, _) = cstr(&body[1..]).expect("checked");
                    self.map.remove(name);
                    backend::close_complete(reply);
                }
                _ => backend::ready_for_query(reply, status),
            }
            at += len;
        }
        Local::Answered(at)
    }
}

/// What a client message does to the statements a server holds.
#[derive(Debug, PartialEq, Eq)]
enum Drops {
    Nothing,
    /// A DEALLOCATE of a name the client does not hold.
    Unknown,
    /// DEALLOCATE ALL or DISCARD ALL.
    All,
}

/// The outcome of [`ClientStatements::answer_locally`].
#[derive(Debug, PartialEq, Eq)]
pub enum Local {
    /// Answered: this many bytes of the request were consumed.
    Answered(usize),
    /// Answerable so far, but not complete: read more first.
    Incomplete,
    NeedsServer,
}

/// Whether an ErrorResponse body is PostgreSQL's refusal to run a prepared statement
/// whose result type changed since it was prepared. The routine name is checked as well
/// as the message, which lc_messages may translate.
fn is_stale_plan(body: &[u8]) -> bool {
    let mut code = false;
    let mut stale = false;
    for field in body.split(|b| *b == 0) {
        match field.split_first() {
            Some((b'C', value)) => code = value == b"0A000",
            Some((b'R', value)) => stale |= value == b"RevalidateCachedQuery",
            Some((b'M', value)) => stale |= value == b"cached plan must not change result type",
            _ => {}
        }
    }
    code && stale
}

/// Appends a Parse of `query`, without parameter types, as statement `name`.
fn put_parse(out: &mut BytesMut, name: &str, query: &str) {
    out.put_u8(tag::PARSE);
    out.put_i32((4 + name.len() + 1 + query.len() + 1 + 2) as i32);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    out.put_slice(query.as_bytes());
    out.put_u8(0);
    out.put_i16(0);
}

fn close_statement(out: &mut BytesMut, name: &str) {
    out.put_u8(tag::CLOSE);
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(b'S');
    out.put_slice(name.as_bytes());
    out.put_u8(0);
}

/// The statement name of a simple-query `DEALLOCATE [PREPARE] name`, as PostgreSQL
/// would look it up (unquoted names folded to lower case). `ALL` is not a name.
fn deallocate_target(text: &[u8]) -> Option<String> {
    if crate::sql::lead(text) != crate::sql::Lead::Deallocate {
        return None;
    }
    crate::sql::deallocate_name(std::str::from_utf8(text).ok()?)
}

#[cfg(test)]
mod tests {
    use super::is_stale_plan;

    fn body(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (t, v) in fields {
            b.push(*t);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    #[test]
    fn stale_plans_are_told_by_code_and_routine_or_message() {
        let english = body(&[
            (b'S', "ERROR"),
            (b'C', "0A000"),
            (b'M', "cached plan must not change result type"),
            (b'F', "plancache.c"),
            (b'R', "RevalidateCachedQuery"),
        ]);
        assert!(is_stale_plan(&english));
        // lc_messages translates the message, not the routine name.
        let german = body(&[
            (b'C', "0A000"),
            (b'M', "gecachter Plan darf den Ergebnistyp nicht ändern"),
            (b'R', "RevalidateCachedQuery"),
        ]);
        assert!(is_stale_plan(&german));
        let other = body(&[
            (b'C', "0A000"),
            (b'M', "cannot insert into view"),
            (b'R', "ExecInitModifyTable"),
        ]);
        assert!(!is_stale_plan(&other));
        let wrong_code = body(&[(b'C', "42P01"), (b'R', "RevalidateCachedQuery")]);
        assert!(!is_stale_plan(&wrong_code));
    }
}
