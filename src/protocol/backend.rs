//! Encoders for the backend messages pgmux itself sends to clients.
//!
//! `postgres-protocol` encodes frontend messages and parses backend ones; the reverse
//! direction is what a server (here, pgmux facing its clients) needs, so it lives here.

use bytes::{BufMut, BytesMut};

/// Writes a tagged message whose body is produced by `body`, patching in the length.
#[inline]
fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let start = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - start) as i32;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

pub fn authentication_ok(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(0));
}

pub fn authentication_cleartext_password(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(3));
}

pub fn authentication_md5_password(buf: &mut BytesMut, salt: [u8; 4]) {
    message(buf, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    message(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m.as_bytes());
        }
        b.put_u8(0);
    });
}

pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, b'S', |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value.as_bytes());
    });
}

pub fn backend_key_data(buf: &mut BytesMut, process_id: i32, secret_key: i32) {
    message(buf, b'K', |b| {
        b.put_i32(process_id);
        b.put_i32(secret_key);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    message(buf, b'Z', |b| b.put_u8(status));
}

/// Tells a client which protocol minor version and `_pq_.` options pgmux accepted.
pub fn negotiate_protocol_version(buf: &mut BytesMut, minor: i32, unrecognized: &[String]) {
    message(buf, b'v', |b| {
        b.put_i32(minor);
        b.put_i32(unrecognized.len() as i32);
        for option in unrecognized {
            put_cstr(b, option.as_bytes());
        }
    });
}

/// Severity of an error or notice pgmux raises itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, text: &str) {
    message(buf, b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity.as_str().as_bytes());
        b.put_u8(b'V');
        put_cstr(b, severity.as_str().as_bytes());
        b.put_u8(b'C');
        put_cstr(b, code.as_bytes());
        b.put_u8(b'M');
        put_cstr(b, text.as_bytes());
        b.put_u8(0);
    });
}

pub fn notice_response(buf: &mut BytesMut, code: &str, text: &str) {
    message(buf, b'N', |b| {
        for (field, value) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', code),
            (b'M', text),
        ] {
            b.put_u8(field);
            put_cstr(b, value.as_bytes());
        }
        b.put_u8(0);
    });
}

pub fn parse_complete(buf: &mut BytesMut) {
    message(buf, b'1', |_| {});
}

pub fn close_complete(buf: &mut BytesMut) {
    message(buf, b'3', |_| {});
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, b'C', |b| put_cstr(b, tag.as_bytes()));
}

pub fn empty_query_response(buf: &mut BytesMut) {
    message(buf, b'I', |_| {});
}

/// A RowDescription of text columns, as the admin console's results use.
pub fn row_description(buf: &mut BytesMut, columns: &[&str]) {
    message(buf, b'T', |b| {
        b.put_i16(columns.len() as i16);
        for name in columns {
            put_cstr(b, name.as_bytes());
            b.put_i32(0); // table oid
            b.put_i16(0); // column number
            b.put_i32(25); // text
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(0); // text format
        }
    });
}

/// A DataRow of text values; `None` is SQL NULL.
pub fn data_row(buf: &mut BytesMut, values: &[Option<&str>]) {
    message(buf, b'D', |b| {
        b.put_i16(values.len() as i16);
        for value in values {
            match value {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::backend::Message;

    #[test]
    fn encoded_messages_parse_back() {
        let mut buf = BytesMut::new();
        error_response(
            &mut buf,
            Severity::Fatal,
            "28P01",
            "password authentication failed",
        );
        parameter_status(&mut buf, "TimeZone", "UTC");
        backend_key_data(&mut buf, 7, -9);
        ready_for_query(&mut buf, b'I');

        match Message::parse(&mut buf).unwrap().unwrap() {
            Message::ErrorResponse(body) => {
                use fallible_iterator::FallibleIterator;
                let fields: Vec<(u8, String)> = body
                    .fields()
                    .map(|f| {
                        Ok((
                            f.type_(),
                            String::from_utf8_lossy(f.value_bytes()).into_owned(),
                        ))
                    })
                    .collect()
                    .unwrap();
                assert!(fields.contains(&(b'C', "28P01".to_string())));
                assert!(fields.contains(&(b'S', "FATAL".to_string())));
            }
            _ => panic!("expected ErrorResponse"),
        }
        match Message::parse(&mut buf).unwrap().unwrap() {
            Message::ParameterStatus(body) => {
                assert_eq!(body.name().unwrap(), "TimeZone");
                assert_eq!(body.value().unwrap(), "UTC");
            }
            _ => panic!("expected ParameterStatus"),
        }
        match Message::parse(&mut buf).unwrap().unwrap() {
            Message::BackendKeyData(body) => {
                assert_eq!((body.process_id(), body.secret_key()), (7, -9));
            }
            _ => panic!("expected BackendKeyData"),
        }
        match Message::parse(&mut buf).unwrap().unwrap() {
            Message::ReadyForQuery(body) => assert_eq!(body.status(), b'I'),
            _ => panic!("expected ReadyForQuery"),
        }
        assert!(buf.is_empty());
    }
}
