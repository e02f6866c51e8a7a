//! Session parameters that belong to a client rather than to the server connection that
//! happens to serve it.
//!
//! A client's [`ParamSet`] holds what it asked for at startup and what it changed since.
//! A server connection remembers the set last applied to it. When the two differ at
//! attach time, pgmux runs the statements from [`sync_query`] first; the common case of
//! many clients with identical settings costs one fingerprint comparison.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::sql::quote_literal;

/// How a parameter gets its value back on another server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ParamValue {
    /// A value as given in a startup packet or reported by ParameterStatus, set with
    /// `set_config` so list-valued parameters parse as they do at startup.
    Value(String),
    /// A `SET` statement replayed verbatim.
    Statement(String),
}

/// One client's session parameters, keyed by lower-cased name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamSet {
    entries: Vec<(String, ParamValue)>,
    fingerprint: u64,
}

/// Parameter names pgmux will put into SQL: letters, digits, `_` and `.` only.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// Parameters a server reports but nobody can SET; they are never replayed.
pub fn is_read_only(name: &str) -> bool {
    const READ_ONLY: [&str; 6] = [
        "server_version",
        "server_encoding",
        "integer_datetimes",
        "is_superuser",
        "in_hot_standby",
        "session_authorization",
    ];
    READ_ONLY.iter().any(|n| n.eq_ignore_ascii_case(name))
}

impl ParamSet {
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&ParamValue> {
        self.entries
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.entries[i].1)
    }

    /// Sets `key` (any case) and reports whether anything changed.
    pub fn set(&mut self, key: &str, value: ParamValue) -> bool {
        let key = key.to_ascii_lowercase();
        let changed = match self.entries.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) if self.entries[i].1 == value => false,
            Ok(i) => {
                self.entries[i].1 = value;
                true
            }
            Err(i) => {
                self.entries.insert(i, (key, value));
                true
            }
        };
        if changed {
            self.refresh();
        }
        changed
    }

    pub fn remove(&mut self, key: &str) {
        let key = key.to_ascii_lowercase();
        if let Ok(i) = self.entries.binary_search_by(|(k, _)| k.cmp(&key)) {
            self.entries.remove(i);
            self.refresh();
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.refresh();
    }

    fn refresh(&mut self) {
        let mut h = DefaultHasher::new();
        self.entries.hash(&mut h);
        self.fingerprint = h.finish();
    }
}

/// The query that turns a server whose parameters are `applied` into one matching
/// `wanted`, or `None` if they already match.
pub fn sync_query(wanted: &ParamSet, applied: &ParamSet) -> Option<String> {
    if std::ptr::eq(wanted, applied)
        || (wanted.fingerprint == applied.fingerprint && wanted == applied)
    {
        return None;
    }
    let mut sql = String::new();
    for (key, _) in &applied.entries {
        if wanted.get(key).is_none() {
            reset_statement(key, &mut sql);
        }
    }
    // Identity first: SESSION AUTHORIZATION resets ROLE, and both decide what later SETs
    // are allowed to do.
    let order = |k: &str| match k {
        "session_authorization" => 0,
        "role" => 1,
        _ => 2,
    };
    let mut changed: Vec<&(String, ParamValue)> = wanted
        .entries
        .iter()
        .filter(|(k, v)| applied.get(k) != Some(v))
        .collect();
    changed.sort_by_key(|(k, _)| order(k));
    for (key, value) in changed {
        match value {
            ParamValue::Statement(stmt) => sql.push_str(stmt),
            ParamValue::Value(v) => {
                sql.push_str("SELECT pg_catalog.set_config(");
                sql.push_str(&quote_literal(key));
                sql.push_str(", ");
                sql.push_str(&quote_literal(v));
                sql.push_str(", false)");
            }
        }
        sql.push_str(";\n");
    }
    Some(sql)
}

fn reset_statement(key: &str, sql: &mut String) {
    match key {
        "session_authorization" => sql.push_str("RESET SESSION AUTHORIZATION;\n"),
        "session_characteristics" => sql.push_str(
            "RESET default_transaction_isolation;\nRESET default_transaction_read_only;\n\
             RESET default_transaction_deferrable;\n",
        ),
        key if valid_name(key) => {
            sql.push_str("RESET ");
            sql.push_str(key);
            sql.push_str(";\n");
        }
        // Names are checked before they enter a set; nothing else can arrive here.
        _ => {}
    }
}

/// A shared, copy-on-write parameter set: servers keep the one last applied to them.
pub type SharedParams = Arc<ParamSet>;

#[cfg(test)]
mod tests {
    use super::*;

    fn value(s: &str) -> ParamValue {
        ParamValue::Value(s.to_string())
    }

    #[test]
    fn equal_sets_need_no_query() {
        let mut a = ParamSet::default();
        a.set("TimeZone", value("UTC"));
        let b = a.clone();
        assert_eq!(sync_query(&a, &b), None);
        assert_eq!(sync_query(&ParamSet::default(), &ParamSet::default()), None);
    }

    #[test]
    fn differences_become_resets_and_sets() {
        let mut wanted = ParamSet::default();
        wanted.set("search_path", value("a, b"));
        wanted.set("role", ParamValue::Statement("SET ROLE x".into()));
        let mut applied = ParamSet::default();
        applied.set("statement_timeout", value("5s"));
        let sql = sync_query(&wanted, &applied).unwrap();
        assert!(sql.contains("RESET statement_timeout;"), "{sql}");
        assert!(
            sql.contains("set_config('search_path', 'a, b', false)"),
            "{sql}"
        );
        let role = sql.find("SET ROLE x").unwrap();
        let path = sql.find("search_path").unwrap();
        assert!(role < path, "identity is set first: {sql}");
    }

    #[test]
    fn keys_are_case_insensitive() {
        let mut a = ParamSet::default();
        a.set("DateStyle", value("ISO"));
        assert_eq!(a.get("datestyle"), Some(&value("ISO")));
        assert!(!a.set("DATESTYLE", value("ISO")));
        a.remove("DateStyle");
        assert!(a.is_empty());
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("myext.knob_1"));
        assert!(!valid_name("x; DROP TABLE t"));
        assert!(!valid_name(""));
    }
}
