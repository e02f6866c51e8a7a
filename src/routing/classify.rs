//! Which transactions are read-only, judged from the statement that opens them.
//!
//! The scanner reads words, not grammar: a transaction is read-only only when its first
//! statement says so in one of the forms PostgreSQL accepts (`BEGIN ... READ ONLY`,
//! `START TRANSACTION ... READ ONLY`, `SET TRANSACTION ... READ ONLY` right after a bare
//! `BEGIN`), or when the session itself is read-only. Anything the scanner cannot read
//! is treated as a possible write.

use crate::sql::single_statement_words;

/// What the first statement of a request says about its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// `BEGIN` / `START TRANSACTION` with `READ ONLY` among its modes.
    BeginReadOnly,
    /// A read-only `BEGIN`, `START TRANSACTION` or `SET TRANSACTION` at isolation level
    /// `SERIALIZABLE`, which a hot standby refuses ("cannot use serializable mode in a
    /// hot standby"): read-only, but for the primary.
    SerializableReadOnly,
    /// `BEGIN` / `START TRANSACTION` with `READ WRITE` among its modes.
    BeginReadWrite,
    /// `BEGIN`, `BEGIN WORK`, `START TRANSACTION` with no access mode: the session's
    /// default decides.
    BeginDefault,
    /// `SET TRANSACTION ... READ ONLY` (meaningful as the first statement of a block).
    SetReadOnly,
    /// `SET TRANSACTION ... READ WRITE`.
    SetReadWrite,
    /// Any other statement, or more than one.
    Other,
}

impl Opening {
    /// Whether this is a `BEGIN` with nothing else, which pgmux may answer itself and
    /// send along with the next statement once that statement has chosen the server.
    pub fn is_bare_begin(self) -> bool {
        self == Opening::BeginDefault
    }
}

/// Classifies the SQL text of a Query or Parse message.
pub fn opening(sql: &str) -> Opening {
    let Some((words, _)) = single_statement_words(sql) else {
        return Opening::Other;
    };
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["begin", "transaction" | "work", modes @ ..]
        | ["begin", modes @ ..]
        | ["start", "transaction", modes @ ..] => match access_mode(modes) {
            Some(Access::ReadOnly) if serializable(modes) => Opening::SerializableReadOnly,
            Some(Access::ReadOnly) => Opening::BeginReadOnly,
            Some(Access::ReadWrite) => Opening::BeginReadWrite,
            None if modes_valid(modes) => Opening::BeginDefault,
            None => Opening::Other,
        },
        ["set", "transaction", modes @ ..] => match access_mode(modes) {
            Some(Access::ReadOnly) if serializable(modes) => Opening::SerializableReadOnly,
            Some(Access::ReadOnly) => Opening::SetReadOnly,
            Some(Access::ReadWrite) => Opening::SetReadWrite,
            None => Opening::Other,
        },
        _ => Opening::Other,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadOnly,
    ReadWrite,
}

/// The access mode among transaction modes (`ISOLATION LEVEL ...`, `READ ONLY`,
/// `READ WRITE`, `[NOT] DEFERRABLE`, separated by spaces or commas, in any order).
/// `None` when there is none, or when the list holds anything else: PostgreSQL would
/// refuse such a statement, and where it fails does not matter.
fn access_mode(modes: &[&str]) -> Option<Access> {
    let mut access = None;
    let mut i = 0;
    while i < modes.len() {
        match &modes[i..] {
            [",", ..] => i += 1,
            ["read", "only", ..] => {
                access = Some(Access::ReadOnly);
                i += 2;
            }
            ["read", "write", ..] => {
                access = Some(Access::ReadWrite);
                i += 2;
            }
            ["deferrable", ..] => i += 1,
            ["not", "deferrable", ..] => i += 2,
            ["isolation", "level", "serializable", ..] => i += 3,
            ["isolation", "level", "repeatable" | "read", "read" | "committed" | "uncommitted", ..] => {
                i += 4
            }
            _ => return None,
        }
    }
    access
}

fn serializable(modes: &[&str]) -> bool {
    modes
        .windows(3)
        .any(|w| w == ["isolation", "level", "serializable"])
}

/// Whether the modes list is empty or made of modes only (no access mode needed).
fn modes_valid(modes: &[&str]) -> bool {
    let mut with_access = modes.to_vec();
    with_access.extend(["read", "write"]);
    access_mode(&with_access).is_some()
}

/// Whether a parameter value means "on" the way PostgreSQL reads booleans.
pub fn is_on(value: &str) -> bool {
    let v = value.trim().trim_matches('\'').to_ascii_lowercase();
    matches!(v.as_str(), "on" | "true" | "yes" | "1" | "t" | "y")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_openings_in_every_spelling() {
        for sql in [
            "BEGIN READ ONLY",
            "begin read only;",
            "  BEGIN TRANSACTION READ ONLY ; ",
            "BEGIN WORK ISOLATION LEVEL REPEATABLE READ, READ ONLY, DEFERRABLE",
            "begin isolation level repeatable read read only",
            "BEGIN READ ONLY ISOLATION LEVEL READ COMMITTED",
            "START TRANSACTION READ ONLY",
            "start transaction isolation level repeatable read read only not deferrable",
            "/* app */ BEGIN -- note\n READ ONLY",
            "BeGiN\tReAd\nOnLy",
        ] {
            assert_eq!(opening(sql), Opening::BeginReadOnly, "{sql}");
        }
    }

    #[test]
    fn other_openings() {
        assert_eq!(opening("BEGIN"), Opening::BeginDefault);
        assert_eq!(opening("begin;"), Opening::BeginDefault);
        assert_eq!(opening("BEGIN WORK"), Opening::BeginDefault);
        assert_eq!(opening("START TRANSACTION"), Opening::BeginDefault);
        assert_eq!(
            opening("BEGIN ISOLATION LEVEL SERIALIZABLE"),
            Opening::BeginDefault
        );
        assert_eq!(opening("BEGIN READ WRITE"), Opening::BeginReadWrite);
        assert_eq!(
            opening("START TRANSACTION READ ONLY, READ WRITE"),
            Opening::BeginReadWrite
        );
        assert_eq!(opening("SET TRANSACTION READ ONLY"), Opening::SetReadOnly);
        assert_eq!(
            opening("set transaction isolation level read committed, read only;"),
            Opening::SetReadOnly
        );
        assert_eq!(opening("SET TRANSACTION READ WRITE"), Opening::SetReadWrite);
        assert_eq!(
            opening("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE"),
            Opening::SerializableReadOnly
        );
        assert_eq!(
            opening("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY"),
            Opening::SerializableReadOnly
        );
        for sql in [
            "SELECT 1",
            "BEGIN READ ONLY; INSERT INTO t VALUES (1)",
            "BEGIN; SELECT 1",
            "begin readonly",
            "INSERT INTO t SELECT 'BEGIN READ ONLY'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "",
        ] {
            assert_ne!(opening(sql), Opening::BeginReadOnly, "{sql}");
            assert_ne!(opening(sql), Opening::SetReadOnly, "{sql}");
        }
        assert_eq!(opening("BEGIN; SELECT 1"), Opening::Other);
    }

    #[test]
    fn booleans() {
        assert!(is_on("on") && is_on("TRUE") && is_on("'on'") && is_on("1"));
        assert!(!is_on("off") && !is_on("false") && !is_on("0"));
    }
}
