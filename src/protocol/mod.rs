//! PostgreSQL wire protocol pieces pgmux needs beyond what `postgres-protocol` provides:
//! message framing for forwarding, encoders for the backend messages pgmux writes itself,
//! and the untagged startup packets.

pub mod backend;
pub mod frontend;
pub mod startup;

/// Frontend (client to server) message tags.
pub mod tag {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const FLUSH: u8 = b'H';
    pub const SYNC: u8 = b'S';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const TERMINATE: u8 = b'X';
    pub const PASSWORD: u8 = b'p';
}

/// Backend (server to client) message tags.
pub mod btag {
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const DATA_ROW: u8 = b'D';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
}

/// Length of a tagged message header: one tag byte and a four-byte length.
pub const HEADER_LEN: usize = 5;

/// The header of a tagged message at the start of `buf`, if five bytes are there.
///
/// Returns the tag and the whole message length including the tag byte. A length field
/// below 4 cannot describe any message and is reported as `Err` so the caller can close
/// the connection before trusting it.
#[inline]
pub fn header(buf: &[u8]) -> Option<Result<(u8, usize), i32>> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Some(Err(len));
    }
    Some(Ok((buf[0], len as usize + 1)))
}

/// Reads a NUL-terminated string from the front of `buf`, returning it and the rest.
pub fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    // The unnamed statement and portal are the empty string, and drivers use them for
    // most statements: that is settled by the first byte, without memchr's set-up.
    if buf.first() == Some(&0) {
        return Some((&buf[..0], &buf[1..]));
    }
    // memchr rather than a byte loop: a Parse's query text is scanned for its end
    // several times per message on the hot path.
    let end = memchr::memchr(0, buf)?;
    Some((&buf[..end], &buf[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_needs_five_bytes_and_a_sane_length() {
        assert_eq!(header(b"Q\0\0\0"), None);
        assert_eq!(header(b"Q\0\0\0\x05x"), Some(Ok((b'Q', 6))));
        assert_eq!(header(b"Q\0\0\0\x03"), Some(Err(3)));
        assert_eq!(header(b"Q\xff\xff\xff\xff"), Some(Err(-1)));
    }

    #[test]
    fn cstr_splits_at_nul() {
        assert_eq!(cstr(b"abc\0def"), Some((&b"abc"[..], &b"def"[..])));
        assert_eq!(cstr(b"abc"), None);
        assert_eq!(cstr(b"\0\0x"), Some((&b""[..], &b"\0x"[..])));
        assert_eq!(cstr(b"\0"), Some((&b""[..], &b""[..])));
        assert_eq!(cstr(b""), None);
    }
}
