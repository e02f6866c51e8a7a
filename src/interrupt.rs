//! How a client task is told to stop: the console's KILL and KILL_CLIENT end it at
//! once, a shutdown ends it at its next transaction boundary.
//!
//! A client checks for these at every wait of every transaction, so the check has to be
//! cheap. A `CancellationToken` per client (and one shared by all clients for
//! shutdown) costs a mutex and a place in a shared waiter list each time a wait
//! begins and ends; here a wait costs an atomic load and a waker registration, and
//! raising walks the list of clients instead, which happens once per KILL or shutdown.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;

/// What has been asked of the client, as bits.
pub type Reason = u8;
/// End the session now, even mid-transaction.
pub const KILL: Reason = 1;
/// End the session once it holds no server.
pub const SHUTDOWN: Reason = 2;

/// The stop requests of one client task. Only that task waits on it: the one waker
/// slot is its.
#[derive(Default)]
pub struct Interrupt {
    raised: AtomicU8,
    waker: AtomicWaker,
}

impl Interrupt {
    /// Asks the client to stop for `reason`, and wakes it if it is waiting.
    pub fn raise(&self, reason: Reason) {
        self.raised.fetch_or(reason, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Whether any of the `mask` reasons has been raised.
    pub fn is_raised(&self, mask: Reason) -> bool {
        self.raised.load(Ordering::SeqCst) & mask != 0
    }

    /// Ready with the raised reasons once one of `mask` is raised. The waker is
    /// registered before the second look, so a raise between the two is not missed.
    pub fn poll_raised(&self, cx: &mut Context<'_>, mask: Reason) -> Poll<Reason> {
        let raised = self.raised.load(Ordering::SeqCst);
        if raised & mask != 0 {
            return Poll::Ready(raised);
        }
        self.waker.register(cx.waker());
        let raised = self.raised.load(Ordering::SeqCst);
        if raised & mask != 0 {
            Poll::Ready(raised)
        } else {
            Poll::Pending
        }
    }

    /// Resolves once one of `mask` is raised.
    pub async fn raised(&self, mask: Reason) -> Reason {
        poll_fn(|cx| self.poll_raised(cx, mask)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_raise_wakes_the_waiting_task_and_only_for_its_mask() {
        let interrupt = Arc::new(Interrupt::default());
        let waiting = tokio::spawn({
            let interrupt = Arc::clone(&interrupt);
            async move { interrupt.raised(KILL).await }
        });
        tokio::task::yield_now().await;
        interrupt.raise(SHUTDOWN);
        assert!(interrupt.is_raised(SHUTDOWN));
        assert!(!interrupt.is_raised(KILL));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "woke for a reason it did not ask for"
        );
        interrupt.raise(KILL);
        assert_eq!(waiting.await.unwrap(), KILL | SHUTDOWN);
    }
}
