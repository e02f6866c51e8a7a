//! How a client task is told to stop: the console's KILL and KILL_CLIENT end it at
//! once, a shutdown ends it at its next transaction boundary.
//!
//! A client checks for these at every wait of every transaction, so the check has to be
//! cheap. A `CancellationToken` per client (and one shared by all clients for
//! shutdown) costs a mutex and a place in a shared waiter list each time a wait
//! begins and ends; here a wait costs an atomic load (and a waker registration when
//! the task's waker is not the one registered already), and
//! raising walks the list of clients instead, which happens once per KILL or shutdown.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;

/// What has been asked of the client, as bits.
pub type Reason = u8;
/// End the session now, even mid-transaction.
pub const KILL: Reason = 1;
/// End the session once it holds no server.
pub const SHUTDOWN: Reason = 2;

/// The stop requests of one client task. Only that task waits on it: the one waker
/// slot is its, and so is the record of what it registered.
#[derive(Default)]
pub struct Interrupt {
    raised: AtomicU8,
    waker: AtomicWaker,
    /// Which waker was registered last (its data and vtable addresses). It is polled
    /// at every wake-up of its task, several times per transaction, and the task's
    /// waker stays the same: registering it again each time would cost two atomic
    /// exchanges in the slot.
    registered: [AtomicUsize; 2],
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
        let waker = cx.waker();
        let id = [waker.data() as usize, waker.vtable() as *const _ as usize];
        // Only `raise` takes the waker out of the slot, and it sets a bit first: while
        // none is set, the waker registered last is still there.
        if raised == 0
            && self.registered[0].load(Ordering::Relaxed) == id[0]
            && self.registered[1].load(Ordering::Relaxed) == id[1]
        {
            return Poll::Pending;
        }
        self.waker.register(waker);
        self.registered[0].store(id[0], Ordering::Relaxed);
        self.registered[1].store(id[1], Ordering::Relaxed);
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

    #[tokio::test]
    async fn a_raise_wakes_a_task_polled_again_in_between() {
        let interrupt = Arc::new(Interrupt::default());
        let waiting = tokio::spawn({
            let interrupt = Arc::clone(&interrupt);
            async move {
                let raised = interrupt.raised(KILL);
                tokio::pin!(raised);
                // Timer wake-ups poll it again with the same waker, which is then not
                // registered again.
                for _ in 0..3 {
                    tokio::select! {
                        biased;
                        r = &mut raised => return r,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(5)) => {}
                    }
                }
                raised.await
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        interrupt.raise(KILL);
        let woke = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await;
        assert_eq!(woke.expect("the raise woke the task").unwrap(), KILL);
    }
}
