//! Reading whole frontend messages where pgmux must see them entire: authentication and
//! the admin console. Forwarded traffic is framed by the relay without this copy.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::{Error, Result};

/// Reads one tagged message and returns its tag and body (without the header).
///
/// The length is checked against `max` before anything is allocated.
pub async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> Result<(u8, BytesMut)> {
    let mut header = [0u8; 5];
    stream
        .read_exact(&mut header)
        .await
        .map_err(Error::ClientIo)?;
    let (tag, len) = match super::header(&header) {
        Some(Ok(h)) => h,
        _ => return Err(Error::ClientProtocol("invalid message length".into())),
    };
    if len > max {
        return Err(Error::ClientProtocol(format!(
            "message of {len} bytes exceeds the limit of {max}"
        )));
    }
    let mut body = BytesMut::zeroed(len - super::HEADER_LEN);
    stream
        .read_exact(&mut body)
        .await
        .map_err(Error::ClientIo)?;
    Ok((tag, body))
}
