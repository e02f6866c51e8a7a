//! Replication lag, measured rather than trusted.
//!
//! The primary's WAL position is sampled every `lag_check_interval` and each sample is
//! kept with the moment its query was sent. A replica's replay position is compared with
//! those samples: the byte lag is how far the latest primary position is ahead, and the
//! time lag is how long ago the primary was last at or below the replayed position. A
//! caught-up replica of an idle primary therefore has no lag at all, however long ago the
//! last transaction was, and a replica whose replay stalls falls further behind in real
//! time, from the moment the primary moved past it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Parses an LSN as PostgreSQL prints it (`16/B374D848`).
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u32::MAX as u64 && lo <= u32::MAX as u64).then_some(hi << 32 | lo)
}

/// Recent primary WAL positions, oldest first.
#[derive(Debug)]
pub struct Samples {
    samples: VecDeque<(Instant, u64)>,
    /// Samples older than this are dropped (the latest one is always kept).
    window: Duration,
}

impl Samples {
    pub fn new(window: Duration) -> Samples {
        Samples {
            samples: VecDeque::new(),
            window,
        }
    }

    /// Records that the primary was at `lsn` at the latest at `sent`: the moment the
    /// query that read it was sent.
    pub fn push(&mut self, sent: Instant, lsn: u64) {
        self.samples.push_back((sent, lsn));
        while self.samples.len() > 1
            && self
                .samples
                .front()
                .is_some_and(|(t, _)| sent.duration_since(*t) > self.window)
        {
            self.samples.pop_front();
        }
    }

    pub fn latest(&self) -> Option<u64> {
        self.samples.back().map(|(_, lsn)| *lsn)
    }

    /// Since when a replica that has replayed up to `replay` has been behind the primary:
    /// `None` if it has replayed everything the latest sample shows. A position older
    /// than every sample is dated to the oldest one, which understates the lag but still
    /// puts it beyond any bound shorter than the window.
    pub fn behind_since(&self, replay: u64) -> Option<Instant> {
        let (_, latest) = self.samples.back()?;
        if replay >= *latest {
            return None;
        }
        let at_or_below = self.samples.iter().rev().find(|(_, lsn)| *lsn <= replay);
        let oldest = self.samples.front().expect("not empty");
        Some(at_or_below.unwrap_or(oldest).0)
    }

    /// The primary position of the first sample sent at or after `t`: an LSN at least as
    /// new as any commit that had completed by `t`.
    pub fn position_after(&self, t: Instant) -> Option<u64> {
        self.samples
            .iter()
            .find(|(sent, _)| *sent >= t)
            .map(|(_, lsn)| *lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_parse_as_postgres_prints_them() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn(" 1/0 "), Some(1 << 32));
        assert_eq!(parse_lsn("nonsense"), None);
        assert_eq!(parse_lsn("1/"), None);
    }

    #[test]
    fn an_idle_primary_makes_no_lag() {
        let t0 = Instant::now();
        let mut s = Samples::new(Duration::from_secs(10));
        for i in 0..50 {
            s.push(t0 + Duration::from_millis(100 * i), 1000);
        }
        assert_eq!(s.behind_since(1000), None);
        assert_eq!(s.behind_since(2000), None);
    }

    #[test]
    fn a_stalled_replica_is_behind_since_the_primary_passed_it() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut s = Samples::new(Duration::from_secs(10));
        s.push(ms(0), 100);
        s.push(ms(100), 100);
        s.push(ms(200), 300);
        s.push(ms(300), 500);
        // Replayed 100: the primary was last there at 100 ms.
        assert_eq!(s.behind_since(100), Some(ms(100)));
        assert_eq!(s.behind_since(350), Some(ms(200)));
        assert_eq!(s.behind_since(500), None);
        // Older than every sample: dated to the oldest.
        assert_eq!(s.behind_since(50), Some(ms(0)));
    }

    #[test]
    fn old_samples_leave_the_window() {
        let t0 = Instant::now();
        let mut s = Samples::new(Duration::from_secs(1));
        for i in 0..30 {
            s.push(t0 + Duration::from_millis(100 * i), i);
        }
        assert!(s.samples.len() <= 11, "{}", s.samples.len());
        assert_eq!(s.latest(), Some(29));
    }

    #[test]
    fn a_commit_is_covered_by_the_next_sample() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut s = Samples::new(Duration::from_secs(10));
        s.push(ms(0), 10);
        s.push(ms(100), 20);
        assert_eq!(s.position_after(ms(50)), Some(20));
        assert_eq!(s.position_after(ms(100)), Some(20));
        assert_eq!(s.position_after(ms(101)), None);
    }
}
