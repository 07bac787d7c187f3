//! [`WorkBudget`]: a token bucket of transformer positions per second, so that a peer (or all
//! peers together) cannot keep a server's CPU busy with model work faster than it allows.
//!
//! Each received part coded with a transformer takes the positions its model runs (the same
//! charge as `SessionConfig::max_message_model_tokens`) from every budget that applies — the
//! session's own ([`SessionConfig::session_model_rate`](crate::SessionConfig)) and the one all
//! sessions of a server share ([`SessionConfig::shared_model_budget`](crate::SessionConfig)) —
//! before any decoding. A part that finds too little left is refused with `BUSY` (retry later);
//! nothing is taken from any budget then. Budgets refill continuously at their rate, up to their
//! burst.
//!
//! ```
//! use std::time::Duration;
//! use unimic_transport::WorkBudget;
//! let b = WorkBudget::new(1_000, 4_096);
//! assert!(b.try_take(4_096).is_ok()); // a full burst
//! assert!(b.try_take(1).is_err()); // empty until it refills
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket of model positions (see the [module docs](self)).
#[derive(Debug)]
pub struct WorkBudget {
    rate: u64,
    burst: u64,
    state: Mutex<(f64, Instant)>,
}

impl WorkBudget {
    /// A budget refilled at `rate` positions per second up to `burst` (at least 1), starting
    /// full.
    pub fn new(rate: u64, burst: u64) -> Self {
        let burst = burst.max(1);
        Self {
            rate,
            burst,
            state: Mutex::new((burst as f64, Instant::now())),
        }
    }

    /// Positions per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Most positions available at once.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    fn refill(&self, s: &mut (f64, Instant)) {
        let now = Instant::now();
        let dt = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + dt * self.rate as f64).min(self.burst as f64);
        s.1 = now;
    }

    /// Takes `n` positions if that many are available; otherwise takes nothing and says how
    /// long until they would be (`Duration::MAX` when `n` is above the burst or the rate is 0).
    pub fn try_take(&self, n: u64) -> Result<(), Duration> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut s);
        if s.0 >= n as f64 {
            s.0 -= n as f64;
            return Ok(());
        }
        if n > self.burst || self.rate == 0 {
            return Err(Duration::MAX);
        }
        Err(Duration::from_secs_f64((n as f64 - s.0) / self.rate as f64))
    }

    /// Gives back `n` positions (a part refused by another budget after this one took them).
    pub fn give_back(&self, n: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = (s.0 + n as f64).min(self.burst as f64);
    }
}

/// The rate and burst of a per-session budget ([`WorkBudget`] made for each session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Positions per second.
    pub per_second: u64,
    /// Most positions available at once.
    pub burst: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_refills_and_refuses_without_taking() {
        let b = WorkBudget::new(1_000_000, 100);
        assert!(b.try_take(60).is_ok());
        // 40 left: 60 more is refused and takes nothing.
        assert!(b.try_take(60).is_err());
        assert!(b.try_take(40).is_ok());
        std::thread::sleep(Duration::from_millis(5));
        // 5 ms at a million per second refills to the burst of 100.
        assert!(b.try_take(100).is_ok());
        assert_eq!(b.try_take(101), Err(Duration::MAX));
        let stalled = WorkBudget::new(0, 10);
        assert!(stalled.try_take(10).is_ok());
        assert_eq!(stalled.try_take(1), Err(Duration::MAX));
        stalled.give_back(3);
        assert!(stalled.try_take(3).is_ok());
    }
}
