//! Spare client read buffers, kept per worker thread.
//!
//! A client holds a read buffer only while it has something to read or a transaction
//! runs, so that thousands of idle clients cost no buffer memory. That means one buffer
//! taken and given back per transaction; a few kilobytes is past the sizes the system
//! allocator serves from its fast per-thread caches, so the buffers are recycled here
//! instead. A thread keeps at most [`SPARES`] of them.

use std::cell::RefCell;

use bytes::BytesMut;

/// The size of a client read buffer.
pub const CHUNK: usize = 4 * 1024;
/// Spare buffers kept per thread: enough for the transactions that end on a worker
/// between two that begin, small next to the memory of the clients themselves.
const SPARES: usize = 64;

thread_local! {
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for at least [`CHUNK`] bytes.
pub fn take() -> BytesMut {
    SPARE
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(CHUNK))
}

/// Takes back an emptied buffer. It is kept only if it is a whole [`CHUNK`] again with
/// nothing else pointing into it; anything else is simply dropped.
pub fn give(mut buf: BytesMut) {
    buf.clear();
    if buf.capacity() > 2 * CHUNK || !buf.try_reclaim(CHUNK) {
        return;
    }
    SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARES {
            spare.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spares() -> usize {
        SPARE.with(|spare| spare.borrow().len())
    }

    #[test]
    fn buffers_come_back_whole_and_shared_ones_are_dropped() {
        let mut buf = take();
        assert!(buf.capacity() >= CHUNK);
        buf.extend_from_slice(&[1; 100]);
        drop(buf.split_to(60));
        let before = spares();
        give(buf);
        assert_eq!(spares(), before + 1);
        let mut again = take();
        assert_eq!(spares(), before);
        assert!(again.is_empty() && again.capacity() >= CHUNK);

        // A frozen part still alive: the memory is not the buffer's alone.
        again.extend_from_slice(&[2; 10]);
        let frozen = again.split().freeze();
        give(again);
        assert_eq!(spares(), before);
        drop(frozen);

        // Grown far past a chunk: not kept either.
        let mut big = take();
        big.reserve(64 * CHUNK);
        give(big);
        assert_eq!(spares(), before);
    }
}
