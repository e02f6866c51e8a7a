//! A small SQL scanner for the few statements pgmux must understand: the session-level
//! `SET`, `RESET` and `DISCARD` that change what a client expects of every later server.
//!
//! It reads words, not grammar. Only a query holding exactly one statement is classified;
//! a multi-statement query string is reported as [`SessionEffect::None`], so a `SET` buried
//! in one is not replayed on later servers (README, "Transaction pooling caveats").

/// What one simple-query string does to session state that pgmux replays.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEffect {
    None,
    /// A session-level assignment; `statement` replays it verbatim.
    Set {
        key: String,
        statement: String,
    },
    Reset {
        key: String,
    },
    /// `RESET ALL` or `DISCARD ALL`: every parameter returns to the server default.
    ResetAll,
}

/// Splits SQL into lower-cased words and punctuation, skipping whitespace and comments.
/// Returns `None` if the text holds more than one statement.
pub(crate) fn single_statement_words(sql: &str) -> Option<(Vec<String>, &str)> {
    let bytes = sql.as_bytes();
    let mut words = Vec::new();
    let mut i = 0;
    let mut end = sql.len();
    let mut ended = false;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if bytes[i..].starts_with(b"--") {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if bytes[i..].starts_with(b"/*") {
            let mut depth = 0usize;
            while i < bytes.len() {
                if bytes[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if bytes[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == b';' {
            if !ended {
                end = i;
            }
            ended = true;
            i += 1;
        } else if ended {
            return None;
        } else if c == b'\'' || c == b'"' {
            let start = i;
            i += 1;
            while i < bytes.len() {
                if bytes[i] == c {
                    if bytes.get(i + 1) == Some(&c) {
                        i += 2;
                        continue;
                    }
                    break;
                }
                i += 1;
            }
            i = (i + 1).min(bytes.len());
            words.push(sql[start..i].to_string());
        } else if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric()
                    || matches!(bytes[i], b'_' | b'.' | b'$')
                    || bytes[i] >= 0x80)
            {
                i += 1;
            }
            words.push(sql[start..i].to_ascii_lowercase());
        } else {
            words.push((c as char).to_string());
            i += 1;
        }
    }
    Some((words, sql[..end].trim()))
}

/// Classifies a simple-query string.
pub fn session_effect(sql: &str) -> SessionEffect {
    let Some((words, statement)) = single_statement_words(sql) else {
        return SessionEffect::None;
    };
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let key = |k: &str| k.trim_matches('"').to_ascii_lowercase();
    match w.as_slice() {
        ["discard", "all"] | ["reset", "all"] => SessionEffect::ResetAll,
        ["reset", "role"] => SessionEffect::Reset { key: "role".into() },
        ["reset", "session", "authorization"] => SessionEffect::Reset {
            key: "session_authorization".into(),
        },
        ["reset", "time", "zone"] => SessionEffect::Reset {
            key: "timezone".into(),
        },
        ["reset", name] => SessionEffect::Reset { key: key(name) },
        ["set", "local", ..] | ["set", "transaction", ..] | ["set", "constraints", ..] => {
            SessionEffect::None
        }
        ["set", rest @ ..] => {
            let rest = match rest {
                ["session", "authorization", ..] => return set("session_authorization", statement),
                ["session", "characteristics", ..] => {
                    return set("session_characteristics", statement)
                }
                ["session", rest @ ..] => rest,
                rest => rest,
            };
            match rest {
                ["role", ..] => set("role", statement),
                ["time", "zone", ..] => set("timezone", statement),
                ["schema", ..] => set("search_path", statement),
                ["names", ..] => set("client_encoding", statement),
                ["xml", "option", ..] => set("xmloption", statement),
                [name, "=" | "to", _, ..] => set(&key(name), statement),
                _ => SessionEffect::None,
            }
        }
        _ => SessionEffect::None,
    }
}

/// Whether a single statement is `DEALLOCATE [PREPARE] ALL` or `DISCARD ALL`, which
/// drop every prepared statement of the session.
pub fn drops_all_statements(sql: &str) -> bool {
    let Some((words, _)) = single_statement_words(sql) else {
        return false;
    };
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    matches!(
        words.as_slice(),
        ["deallocate", "all"] | ["deallocate", "prepare", "all"] | ["discard", "all"]
    )
}

/// How a statement begins, as far as pgmux's own scanners care: they only ever look
/// further at the few statements below. Worked out once per Query or Parse, so that
/// every other statement costs one look at its first word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lead {
    Set,
    Reset,
    Discard,
    Deallocate,
    /// Starts with a comment: it may be any of them.
    Comment,
    Other,
}

impl Lead {
    /// Whether it may be a SET, RESET or DISCARD.
    pub fn may_change_session(self) -> bool {
        matches!(
            self,
            Lead::Set | Lead::Reset | Lead::Discard | Lead::Comment
        )
    }

    /// Whether it may be a DEALLOCATE or a DISCARD (which drop prepared statements).
    pub fn may_drop_statements(self) -> bool {
        matches!(self, Lead::Deallocate | Lead::Discard | Lead::Comment)
    }
}

/// Classifies `text` by its first word, without allocating: leading whitespace is
/// skipped, and text starting with a comment is [`Lead::Comment`].
pub fn lead(text: &[u8]) -> Lead {
    let Some(start) = text.iter().position(|b| !b.is_ascii_whitespace()) else {
        return Lead::Other;
    };
    let rest = &text[start..];
    // The first letter names the one keyword it can be; nearly every statement
    // (SELECT, INSERT, ...) is settled by it or by the next two or three letters.
    let (keyword, lead): (&[u8], Lead) = match rest[0].to_ascii_lowercase() {
        b'/' if rest.starts_with(b"/*") => return Lead::Comment,
        b'-' if rest.starts_with(b"--") => return Lead::Comment,
        b's' => (b"set", Lead::Set),
        b'r' => (b"reset", Lead::Reset),
        b'd' if rest.get(1).is_some_and(|b| b.eq_ignore_ascii_case(&b'i')) => {
            (b"discard", Lead::Discard)
        }
        b'd' => (b"deallocate", Lead::Deallocate),
        _ => return Lead::Other,
    };
    let n = keyword.len();
    let whole_word = rest
        .get(n)
        .is_none_or(|&b| !(b.is_ascii_alphanumeric() || b == b'_'));
    if rest.len() >= n && rest[..n].eq_ignore_ascii_case(keyword) && whole_word {
        lead
    } else {
        Lead::Other
    }
}

/// The statement a single-statement `DEALLOCATE [PREPARE] name` removes, as PostgreSQL
/// looks it up: unquoted names folded to lower case, quoted ones as written. `None` for
/// `DEALLOCATE ALL` and anything else.
pub fn deallocate_name(sql: &str) -> Option<String> {
    let (words, _) = single_statement_words(sql)?;
    let name = match words.as_slice() {
        [d, name] if d == "deallocate" => name,
        [d, p, name] if d == "deallocate" && p == "prepare" => name,
        _ => return None,
    };
    if name == "all" || name == "prepare" {
        return None;
    }
    if let Some(quoted) = name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        return Some(quoted.replace("\"\"", "\""));
    }
    name.chars()
        .all(|c| c.is_alphanumeric() || c == '_' || c == '$')
        .then(|| name.clone())
}

fn set(key: &str, statement: &str) -> SessionEffect {
    SessionEffect::Set {
        key: key.to_string(),
        statement: statement.to_string(),
    }
}

/// How a transaction block opened with no modes: `BEGIN`, `BEGIN WORK`,
/// `BEGIN TRANSACTION` or `START TRANSACTION`, in any case, with an optional `;`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainBegin {
    Begin,
    StartTransaction,
}

impl PlainBegin {
    /// The command tag PostgreSQL answers it with.
    pub fn tag(self) -> &'static str {
        match self {
            PlainBegin::Begin => "BEGIN",
            PlainBegin::StartTransaction => "START TRANSACTION",
        }
    }

    /// PostgreSQL's answer to it as a simple query: its CommandComplete, then
    /// ReadyForQuery inside a block.
    pub fn answer(self) -> &'static [u8] {
        match self {
            PlainBegin::Begin => b"C\0\0\0\x0aBEGIN\0Z\0\0\0\x05T",
            PlainBegin::StartTransaction => b"C\0\0\0\x16START TRANSACTION\0Z\0\0\0\x05T",
        }
    }
}

/// Whether `text` is exactly one plain `BEGIN` (see [`PlainBegin`]): a statement that
/// cannot fail on a server that is idle outside a transaction block. Words only, without
/// allocating; text with comments or modes is not plain, and most statements are ruled
/// out by their first word.
pub fn plain_begin(text: &[u8]) -> Option<PlainBegin> {
    let mut rest = text;
    let first = next_word(&mut rest);
    let begin = if first.eq_ignore_ascii_case(b"begin") {
        let second = next_word(&mut rest);
        if !(second.is_empty()
            || second.eq_ignore_ascii_case(b"work")
            || second.eq_ignore_ascii_case(b"transaction"))
        {
            return None;
        }
        PlainBegin::Begin
    } else if first.eq_ignore_ascii_case(b"start") {
        if !next_word(&mut rest).eq_ignore_ascii_case(b"transaction") {
            return None;
        }
        PlainBegin::StartTransaction
    } else {
        return None;
    };
    // Then at most one `;`, and only whitespace around it.
    let rest = rest.trim_ascii_start();
    let rest = rest.strip_prefix(b";").unwrap_or(rest);
    rest.trim_ascii_start().is_empty().then_some(begin)
}

/// The word at the front of `rest` after whitespace (empty at a `;`, the end or any
/// other character), and `rest` moved past it.
fn next_word<'a>(rest: &mut &'a [u8]) -> &'a [u8] {
    let text = rest.trim_ascii_start();
    let end = text
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(text.len());
    *rest = &text[end..];
    &text[..end]
}

/// Quotes `s` as an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    if s.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn plain_begins_are_told_apart_from_begins_with_modes() {
        for text in [
            &b"BEGIN"[..],
            b"begin;",
            b"  Begin ;  \n",
            b"BEGIN WORK",
            b"begin\ttransaction;",
        ] {
            assert_eq!(plain_begin(text), Some(PlainBegin::Begin), "{text:?}");
        }
        assert_eq!(
            plain_begin(b"start transaction;"),
            Some(PlainBegin::StartTransaction)
        );
        assert_eq!(PlainBegin::StartTransaction.tag(), "START TRANSACTION");
        for begin in [PlainBegin::Begin, PlainBegin::StartTransaction] {
            let mut answer = bytes::BytesMut::new();
            crate::protocol::backend::command_complete(&mut answer, begin.tag());
            crate::protocol::backend::ready_for_query(&mut answer, b'T');
            assert_eq!(begin.answer(), &answer[..]);
        }
        for text in [
            &b""[..],
            b";",
            b"BEGIN ISOLATION LEVEL SERIALIZABLE",
            b"BEGIN READ ONLY",
            b"START TRANSACTION READ WRITE",
            b"BEGIN; SELECT 1",
            b"BEGIN;;",
            b"/* c */ BEGIN",
            b"BEGIN -- c",
            b"BEGINNING",
            b"START",
            b"SELECT 1",
            b"begin work transaction",
            b"BEGIN WORK2",
            b"BEGIN_",
            b"BEGIN; ;",
        ] {
            assert_eq!(plain_begin(text), None, "{text:?}");
        }
    }

    use super::*;

    #[test]
    fn lead_reads_the_first_word_and_allows_comments() {
        assert_eq!(lead(b"  SET x = 1"), Lead::Set);
        assert_eq!(lead(b"set\tx = 1"), Lead::Set);
        assert_eq!(lead(b"Discard all"), Lead::Discard);
        assert_eq!(lead(b"RESET all"), Lead::Reset);
        assert_eq!(lead(b"\nDEALLOCATE p1"), Lead::Deallocate);
        assert_eq!(lead(b"/* c */ set x = 1"), Lead::Comment);
        assert_eq!(lead(b"-- c\nset x = 1"), Lead::Comment);
        assert_eq!(lead(b"set"), Lead::Set);
        assert_eq!(lead(b"DISCARD"), Lead::Discard);
        assert_eq!(lead(b"reset;"), Lead::Reset);
        for other in [
            &b"SELECT 1"[..],
            b"settle",
            b"se",
            b"",
            b" \n\t",
            b"-1",
            b"/1",
            b"set_config('a', 'b', false)",
            b"settings",
            b"discardall",
            b"dealloc p1",
            b"d",
            b"resettable",
        ] {
            assert_eq!(
                lead(other),
                Lead::Other,
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
        assert!(Lead::Set.may_change_session() && !Lead::Set.may_drop_statements());
        assert!(Lead::Discard.may_change_session() && Lead::Discard.may_drop_statements());
        assert!(Lead::Comment.may_change_session() && Lead::Comment.may_drop_statements());
        assert!(!Lead::Other.may_change_session() && !Lead::Other.may_drop_statements());
    }

    #[test]
    fn deallocate_names_fold_like_identifiers() {
        assert_eq!(deallocate_name("DEALLOCATE P_0"), Some("p_0".into()));
        assert_eq!(
            deallocate_name("deallocate prepare \"P_0\";"),
            Some("P_0".into())
        );
        assert_eq!(
            deallocate_name("DEALLOCATE \"a\"\"b\""),
            Some("a\"b".into())
        );
        assert_eq!(deallocate_name("DEALLOCATE ALL"), None);
        assert_eq!(deallocate_name("DEALLOCATE PREPARE ALL"), None);
        assert_eq!(deallocate_name("DEALLOCATE a; SELECT 1"), None);
    }

    fn set_key(sql: &str) -> Option<String> {
        match session_effect(sql) {
            SessionEffect::Set { key, .. } => Some(key),
            _ => None,
        }
    }

    #[test]
    fn recognises_session_assignments() {
        assert_eq!(
            set_key("SET search_path = a, b"),
            Some("search_path".into())
        );
        assert_eq!(
            set_key("  set SESSION statement_timeout TO 5000;"),
            Some("statement_timeout".into())
        );
        assert_eq!(
            set_key("/* c */ SET TIME ZONE 'UTC'"),
            Some("timezone".into())
        );
        assert_eq!(set_key("SET \"TimeZone\" = 'UTC'"), Some("timezone".into()));
        assert_eq!(set_key("SET ROLE admin"), Some("role".into()));
        assert_eq!(set_key("SET myext.knob = 1"), Some("myext.knob".into()));
        assert_eq!(
            set_key("SET SESSION AUTHORIZATION bob"),
            Some("session_authorization".into())
        );
    }

    #[test]
    fn keeps_the_statement_for_replay() {
        assert_eq!(
            session_effect("SET search_path = a, b ; -- trailing"),
            SessionEffect::Set {
                key: "search_path".into(),
                statement: "SET search_path = a, b".into()
            }
        );
    }

    #[test]
    fn ignores_transaction_scoped_and_compound_statements() {
        assert_eq!(
            session_effect("SET LOCAL search_path = a"),
            SessionEffect::None
        );
        assert_eq!(
            session_effect("SET TRANSACTION READ ONLY"),
            SessionEffect::None
        );
        assert_eq!(session_effect("SET a = 1; SET b = 2"), SessionEffect::None);
        assert_eq!(session_effect("SELECT 'SET x = 1'"), SessionEffect::None);
        assert_eq!(
            session_effect("SELECT 1; -- SET a = 1"),
            SessionEffect::None
        );
    }

    #[test]
    fn recognises_resets() {
        assert_eq!(session_effect("DISCARD ALL"), SessionEffect::ResetAll);
        assert_eq!(session_effect("reset all;"), SessionEffect::ResetAll);
        assert_eq!(
            session_effect("RESET statement_timeout"),
            SessionEffect::Reset {
                key: "statement_timeout".into()
            }
        );
    }

    #[test]
    fn quotes_literals() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
    }
}
