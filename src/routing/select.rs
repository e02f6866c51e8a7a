//! Whether one autocommit statement is a plain `SELECT` that a replica can answer.
//!
//! This uses a real SQL parser: the statement must parse as exactly one query whose every
//! part (subqueries and `WITH` parts included) is a `SELECT`, `VALUES` or `TABLE`, with no
//! `FOR UPDATE`/`FOR SHARE`, no `SELECT INTO`, and calls only to built-in functions known
//! not to write or take locks. A function pgmux does not know may write (`nextval`, or any
//! user function), so its presence keeps the statement on the primary. A view can still
//! hide a write; for that, a replica's 25006 before any row is answered by running the
//! statement again on the primary.

use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, ObjectName, ObjectNamePart, Query, Select, SetExpr, Statement, TableFactor, Visit,
    Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// Built-in functions that read only: aggregates, string, number, date and JSON helpers,
/// and the recovery-state functions.
const READ_ONLY_FUNCTIONS: &[&str] = &[
    "abs",
    "age",
    "array_agg",
    "array_length",
    "array_to_string",
    "avg",
    "bool_and",
    "bool_or",
    "btrim",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "coalesce",
    "concat",
    "concat_ws",
    "count",
    "current_date",
    "current_setting",
    "current_time",
    "current_timestamp",
    "date_part",
    "date_trunc",
    "every",
    "exp",
    "extract",
    "floor",
    "format",
    "generate_series",
    "greatest",
    "initcap",
    "json_agg",
    "json_build_array",
    "json_build_object",
    "jsonb_agg",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_object_agg",
    "least",
    "left",
    "length",
    "ln",
    "localtime",
    "localtimestamp",
    "log",
    "lower",
    "lpad",
    "ltrim",
    "max",
    "md5",
    "min",
    "mod",
    "now",
    "nullif",
    "pg_is_in_recovery",
    "pg_last_wal_replay_lsn",
    "position",
    "power",
    "regexp_replace",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "rpad",
    "rtrim",
    "sign",
    "split_part",
    "sqrt",
    "statement_timestamp",
    "string_agg",
    "strpos",
    "substr",
    "substring",
    "sum",
    "to_char",
    "to_date",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_timestamp",
    "transaction_timestamp",
    "trim",
    "trunc",
    "unnest",
    "upper",
    "version",
];

/// Whether `sql` is a single plain `SELECT` (see the module docs).
pub fn is_plain_select(sql: &str) -> bool {
    let Ok(statements) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
        return false;
    };
    let [Statement::Query(query)] = statements.as_slice() else {
        return false;
    };
    query.visit(&mut ReadOnlyCheck).is_continue()
}

struct ReadOnlyCheck;

impl Visitor for ReadOnlyCheck {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        let plain = query.locks.is_empty()
            && query.for_clause.is_none()
            && matches!(
                *query.body,
                SetExpr::Select(_)
                    | SetExpr::Query(_)
                    | SetExpr::SetOperation { .. }
                    | SetExpr::Values(_)
                    | SetExpr::Table(_)
            );
        if plain && body_is_plain(&query.body) {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if select.into.is_some() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table { name, args, .. } => {
                if args.is_some() && !known_function(name) {
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            }
            TableFactor::Derived { .. } | TableFactor::NestedJoin { .. } => {
                ControlFlow::Continue(())
            }
            TableFactor::UNNEST { .. } => ControlFlow::Continue(()),
            _ => ControlFlow::Break(()),
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Function(function) if !known_function(&function.name) => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    }
}

/// Set operations nest further bodies; each must be plain too.
fn body_is_plain(body: &SetExpr) -> bool {
    match body {
        SetExpr::SetOperation { left, right, .. } => body_is_plain(left) && body_is_plain(right),
        SetExpr::Select(_) | SetExpr::Query(_) | SetExpr::Values(_) | SetExpr::Table(_) => true,
        _ => false,
    }
}

/// A built-in read-only function, unqualified or in `pg_catalog`.
fn known_function(name: &ObjectName) -> bool {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|part| match part {
            ObjectNamePart::Identifier(ident) => ident.value.to_ascii_lowercase(),
            _ => String::new(),
        })
        .collect();
    match parts.as_slice() {
        [function] => READ_ONLY_FUNCTIONS.contains(&function.as_str()),
        [schema, function] if schema == "pg_catalog" => {
            READ_ONLY_FUNCTIONS.contains(&function.as_str())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_selects() {
        for sql in [
            "SELECT 1",
            "select * from items where id = $1",
            "SELECT count(*), max(v) FROM items GROUP BY v HAVING count(*) > 1",
            "SELECT a.v FROM items a JOIN items b ON a.id = b.id ORDER BY 1 LIMIT 10",
            "WITH x AS (SELECT id FROM items) SELECT * FROM x",
            "SELECT * FROM (SELECT 1) s UNION ALL SELECT 2",
            "SELECT pg_is_in_recovery()",
            "SELECT lower(v), now() FROM public.items;",
            "SELECT * FROM generate_series(1, 3)",
            "VALUES (1), (2)",
        ] {
            assert!(is_plain_select(sql), "{sql}");
        }
    }

    #[test]
    fn anything_that_may_write_or_lock() {
        for sql in [
            "SELECT * FROM items FOR UPDATE",
            "SELECT * FROM items FOR SHARE SKIP LOCKED",
            "SELECT nextval('s')",
            "SELECT my_function(1)",
            "SELECT public.lower('x')",
            "SELECT * FROM my_set_function()",
            "SELECT pg_advisory_lock(1)",
            "SELECT * INTO t2 FROM items",
            "WITH d AS (DELETE FROM items RETURNING *) SELECT * FROM d",
            "INSERT INTO items(v) VALUES ('x')",
            "SELECT 1; SELECT 2",
            "SELECT (SELECT nextval('s'))",
            "BEGIN",
            "not sql at all",
        ] {
            assert!(!is_plain_select(sql), "{sql}");
        }
    }
}
