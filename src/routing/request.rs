//! Reading the request a client has waiting, for routing: the statement that opens it,
//! whether it runs any statement at all, and whether it is one lone autocommit SELECT.
//! Only whole messages at the front of the buffer are read.

use crate::prepared::ClientStatements;
use crate::protocol::{cstr, header, tag, HEADER_LEN};
use crate::relay::parse_query_text;

/// The whole messages at the front of `pending`, as (tag, body); stops at the first
/// message that is not complete or not valid.
fn messages(pending: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = pending;
    std::iter::from_fn(move || {
        let (tag, len) = header(rest)?.ok()?;
        let body = rest.get(HEADER_LEN..len)?;
        rest = &rest[len..];
        Some((tag, body))
    })
}

/// Whether `pending` ends exactly after its last whole message.
fn all_whole(pending: &[u8]) -> bool {
    messages(pending)
        .map(|(_, body)| body.len() + HEADER_LEN)
        .sum::<usize>()
        == pending.len()
}

/// The statement named in a Bind body.
fn bound_statement(body: &[u8]) -> Option<&[u8]> {
    let (_portal, rest) = cstr(body)?;
    cstr(rest).map(|(name, _)| name)
}

/// The SQL text of the request's first message: a Query's, a Parse's, or, for a Bind of
/// a statement the client prepared earlier, that statement's.
pub fn opening_text<'a>(
    pending: &'a [u8],
    statements: Option<&'a ClientStatements>,
) -> Option<&'a [u8]> {
    let (tag, body) = messages(pending).next()?;
    match tag {
        tag::QUERY => Some(body.strip_suffix(b"\0").unwrap_or(body)),
        tag::PARSE => parse_query_text(body),
        tag::BIND => {
            let name = bound_statement(body).filter(|n| !n.is_empty())?;
            statements?.query_of(name)
        }
        _ => None,
    }
}

/// Whether the request is made only of whole Parse, Describe, Close, Flush and Sync
/// messages: it runs no statement, so it writes nothing.
pub fn executes_nothing(pending: &[u8]) -> bool {
    !pending.is_empty()
        && all_whole(pending)
        && messages(pending).all(|(tag, _)| {
            matches!(
                tag,
                tag::PARSE | tag::DESCRIBE | tag::CLOSE | tag::FLUSH | tag::SYNC
            )
        })
}

/// Whether the request is exactly one autocommit statement that parses as a plain
/// SELECT: a Query, or an unnamed Parse (or a Bind of a statement prepared earlier)
/// with one Execute and a final Sync. Requests that create named statements are left
/// out, since running them a second time would be visible.
pub fn lone_autocommit_select(pending: &[u8], statements: Option<&ClientStatements>) -> bool {
    if !all_whole(pending) {
        return false;
    }
    let count = messages(pending).count();
    let mut text: Option<&[u8]> = None;
    let mut executes = 0;
    for (i, (tag, body)) in messages(pending).enumerate() {
        let last = i + 1 == count;
        match tag {
            tag::QUERY if count == 1 => text = Some(body.strip_suffix(b"\0").unwrap_or(body)),
            tag::PARSE if text.is_none() => {
                if cstr(body).is_none_or(|(name, _)| !name.is_empty()) {
                    return false;
                }
                text = parse_query_text(body);
            }
            tag::BIND if text.is_none() => {
                let name = bound_statement(body).filter(|n| !n.is_empty());
                text = name.and_then(|n| statements?.query_of(n));
                if text.is_none() {
                    return false;
                }
            }
            tag::BIND | tag::DESCRIBE => {}
            tag::EXECUTE => executes += 1,
            tag::SYNC if last && executes == 1 => {}
            _ => return false,
        }
    }
    let last = messages(pending).last().map(|(tag, _)| tag);
    let complete = last == Some(tag::QUERY) || (last == Some(tag::SYNC) && executes == 1);
    complete
        && text.is_some_and(|t| std::str::from_utf8(t).is_ok_and(super::select::is_plain_select))
}

/// A lone plain `BEGIN` sent with the extended protocol, which pgmux can answer itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtendedBegin {
    pub begin: crate::sql::PlainBegin,
    /// It came with a Parse of the unnamed statement: the client is owed a
    /// ParseComplete, and the server's unnamed statement should become the `BEGIN`.
    pub parsed: bool,
    /// It asked to describe the portal: the client is owed a NoData.
    pub described: bool,
}

/// What [`extended_begin`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeginScan {
    Begin(ExtendedBegin),
    /// Not such a request.
    Other,
    /// Not all here yet, but it may still turn out to be one.
    Incomplete,
}

/// Whether the request is one plain `BEGIN` (see [`crate::sql::plain_begin`]) in the
/// shape drivers send a statement with the extended protocol, and nothing else: an
/// optional Parse of the unnamed statement, a Bind of it (or of a statement the client
/// prepared earlier) to the unnamed portal without parameters, an optional Describe of
/// that portal, an Execute and a Sync.
pub fn extended_begin(pending: &[u8], statements: Option<&ClientStatements>) -> BeginScan {
    let mut found = ExtendedBegin {
        begin: crate::sql::PlainBegin::Begin,
        parsed: false,
        described: false,
    };
    let mut messages = messages(pending);
    let mut next = messages.next();
    let mut text = None;
    if let Some((tag::PARSE, body)) = next {
        let Some((b"", rest)) = cstr(body) else {
            return BeginScan::Other;
        };
        let Some((query, types)) = cstr(rest) else {
            return BeginScan::Other;
        };
        if types != [0, 0] || crate::sql::plain_begin(query).is_none() {
            return BeginScan::Other;
        }
        text = Some(query);
        found.parsed = true;
        next = messages.next();
    }
    let Some((tag::BIND, body)) = next else {
        return match (text, next) {
            (Some(_), None) => BeginScan::Incomplete,
            _ => BeginScan::Other,
        };
    };
    let Some((b"", rest)) = cstr(body) else {
        return BeginScan::Other;
    };
    let Some((statement, rest)) = cstr(rest) else {
        return BeginScan::Other;
    };
    let text = match (text, statement) {
        (Some(query), b"") => query,
        (None, name) if !name.is_empty() => match statements.and_then(|s| s.query_of(name)) {
            Some(query) => query,
            None => return BeginScan::Other,
        },
        _ => return BeginScan::Other,
    };
    let Some(begin) = crate::sql::plain_begin(text) else {
        return BeginScan::Other;
    };
    found.begin = begin;
    // No parameter formats and no parameters; result formats do not matter for a
    // statement that returns no rows.
    if rest.get(..4) != Some(&[0, 0, 0, 0]) {
        return BeginScan::Other;
    }
    next = messages.next();
    if let Some((tag::DESCRIBE, body)) = next {
        if body != b"P\0" {
            return BeginScan::Other;
        }
        found.described = true;
        next = messages.next();
    }
    match next {
        Some((tag::EXECUTE, body)) if body.first() == Some(&0) => {}
        None => return BeginScan::Incomplete,
        Some(_) => return BeginScan::Other,
    }
    match messages.next() {
        Some((tag::SYNC, _)) => {}
        None => return BeginScan::Incomplete,
        Some(_) => return BeginScan::Other,
    }
    if messages.next().is_some() || !all_whole(pending) {
        return BeginScan::Other;
    }
    BeginScan::Begin(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use postgres_protocol::message::frontend;

    fn bind(buf: &mut BytesMut, statement: &str) {
        frontend::bind(
            "",
            statement,
            std::iter::empty::<i16>(),
            std::iter::empty::<i32>(),
            |_: i32, _: &mut BytesMut| -> Result<
                postgres_protocol::IsNull,
                Box<dyn std::error::Error + Sync + Send>,
            > { unreachable!() },
            Some(0),
            buf,
        )
        .map_err(|_| ())
        .unwrap();
    }

    fn query(sql: &str) -> BytesMut {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).unwrap();
        buf
    }

    fn extended(name: &str, sql: &str) -> BytesMut {
        let mut buf = BytesMut::new();
        frontend::parse(name, sql, std::iter::empty(), &mut buf).unwrap();
        bind(&mut buf, name);
        frontend::execute("", 0, &mut buf).unwrap();
        frontend::sync(&mut buf);
        buf
    }

    #[test]
    fn the_opening_statement() {
        assert_eq!(
            opening_text(&query("BEGIN READ ONLY"), None),
            Some(&b"BEGIN READ ONLY"[..])
        );
        assert_eq!(
            opening_text(&extended("", "SELECT 1"), None),
            Some(&b"SELECT 1"[..])
        );
        let mut partial = query("SELECT 1");
        partial.truncate(8);
        assert_eq!(opening_text(&partial, None), None);
    }

    #[test]
    fn requests_that_run_nothing() {
        let mut prepare = BytesMut::new();
        frontend::parse(
            "s1",
            "INSERT INTO t VALUES (1)",
            std::iter::empty(),
            &mut prepare,
        )
        .unwrap();
        frontend::describe(b'S', "s1", &mut prepare).unwrap();
        frontend::sync(&mut prepare);
        assert!(executes_nothing(&prepare));
        assert!(!executes_nothing(&extended("", "SELECT 1")));
        assert!(!executes_nothing(&query("SELECT 1")));
        assert!(!executes_nothing(&[]));
    }

    #[test]
    fn extended_begins() {
        use crate::sql::PlainBegin;
        let begin = |parsed, described| {
            BeginScan::Begin(ExtendedBegin {
                begin: PlainBegin::Begin,
                parsed,
                described,
            })
        };
        assert_eq!(
            extended_begin(&extended("", "BEGIN;"), None),
            begin(true, false)
        );

        // libpq's PQsendQueryParams: Parse, Bind, Describe of the portal, Execute, Sync.
        let mut described = BytesMut::new();
        frontend::parse("", "start transaction", std::iter::empty(), &mut described).unwrap();
        bind(&mut described, "");
        frontend::describe(b'P', "", &mut described).unwrap();
        frontend::execute("", 0, &mut described).unwrap();
        frontend::sync(&mut described);
        let BeginScan::Begin(found) = extended_begin(&described, None) else {
            panic!("libpq's BEGIN not found");
        };
        assert_eq!(found.begin, PlainBegin::StartTransaction);
        assert!(found.parsed && found.described);

        // Not all here yet: it may still be one.
        for cut in [described.len() - 5, described.len() - 1, 30] {
            assert_eq!(
                extended_begin(&described[..cut], None),
                BeginScan::Incomplete,
                "{cut}"
            );
        }

        // Not one: other statements, modes, a named statement pgmux does not know,
        // a named portal, anything after the Sync, a Flush instead of a Sync.
        assert_eq!(
            extended_begin(&extended("", "SELECT 1"), None),
            BeginScan::Other
        );
        assert_eq!(
            extended_begin(&extended("", "BEGIN READ ONLY"), None),
            BeginScan::Other
        );
        assert_eq!(
            extended_begin(&extended("s1", "BEGIN"), None),
            BeginScan::Other
        );
        let mut bound = BytesMut::new();
        bind(&mut bound, "s1");
        frontend::execute("", 0, &mut bound).unwrap();
        frontend::sync(&mut bound);
        assert_eq!(extended_begin(&bound, None), BeginScan::Other);
        let mut portal = BytesMut::new();
        frontend::parse("", "BEGIN", std::iter::empty(), &mut portal).unwrap();
        frontend::bind(
            "p1",
            "",
            std::iter::empty::<i16>(),
            std::iter::empty::<i32>(),
            |_: i32, _: &mut BytesMut| -> Result<
                postgres_protocol::IsNull,
                Box<dyn std::error::Error + Sync + Send>,
            > { unreachable!() },
            Some(0),
            &mut portal,
        )
        .map_err(|_| ())
        .unwrap();
        frontend::execute("p1", 0, &mut portal).unwrap();
        frontend::sync(&mut portal);
        assert_eq!(extended_begin(&portal, None), BeginScan::Other);
        let mut two = extended("", "BEGIN");
        two.extend_from_slice(&query("SELECT 1"));
        assert_eq!(extended_begin(&two, None), BeginScan::Other);
        let mut flushed = extended("", "BEGIN");
        flushed.truncate(flushed.len() - 5);
        frontend::flush(&mut flushed);
        assert_eq!(extended_begin(&flushed, None), BeginScan::Other);
    }

    #[test]
    fn lone_selects() {
        assert!(lone_autocommit_select(&query("SELECT 1"), None));
        assert!(lone_autocommit_select(&extended("", "SELECT 1"), None));
        assert!(!lone_autocommit_select(
            &extended("named", "SELECT 1"),
            None
        ));
        assert!(!lone_autocommit_select(&query("SELECT nextval('s')"), None));
        let mut two = query("SELECT 1");
        two.extend_from_slice(&query("SELECT 2"));
        assert!(!lone_autocommit_select(&two, None));
        let mut unsynced = extended("", "SELECT 1");
        unsynced.truncate(unsynced.len() - 5);
        assert!(!lone_autocommit_select(&unsynced, None));
    }
}
