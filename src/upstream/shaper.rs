//! Per-identity send rate shaping.
//!
//! Exchange Online accepts 30 messages a minute per mailbox; beyond that it throttles the
//! sender for a while. Many printers share one identity, so the relay counts its own sends in
//! a sliding 60-second window and holds the excess in the queue until the window has room,
//! instead of feeding the provider's throttle.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::locks::MutexExt;

/// Sliding-window counters, one per identity.
#[derive(Default)]
pub struct Shaper {
    windows: Mutex<HashMap<String, VecDeque<i64>>>,
}

const WINDOW_MS: i64 = 60_000;

impl Shaper {
    /// Takes a send slot for `identity` at `now` (unix ms) if fewer than `per_minute` sends
    /// happened in the last minute; otherwise returns when the next slot frees up.
    pub fn try_acquire(&self, identity: &str, per_minute: Option<u32>, now: i64) -> Result<(), i64> {
        let Some(limit) = per_minute else { return Ok(()) };
        let mut map = self.windows.locked();
        let w = map.entry(identity.to_string()).or_default();
        while w.front().is_some_and(|&t| t <= now - WINDOW_MS) {
            w.pop_front();
        }
        if w.len() < limit as usize {
            w.push_back(now);
            Ok(())
        } else {
            Err(w.front().copied().unwrap_or(now) + WINDOW_MS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_a_minute() {
        let s = Shaper::default();
        for i in 0..30 {
            assert!(s.try_acquire("scans", Some(30), 1000 + i).is_ok());
        }
        assert_eq!(s.try_acquire("scans", Some(30), 2000), Err(61_000));
        assert!(s.try_acquire("other", Some(30), 2000).is_ok(), "per identity");
        assert!(s.try_acquire("scans", None, 2000).is_ok(), "unlimited");
        assert!(s.try_acquire("scans", Some(30), 61_000).is_ok(), "window moved on");
        assert!(s.try_acquire("scans", Some(30), 61_000).is_err());
    }
}
