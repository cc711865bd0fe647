//! Login throttling: failures are counted per key (an account, a client address) in a sliding
//! window; a key that reaches its limit is refused for one window.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Entry {
    failures: Vec<Instant>,
    locked_until: Option<Instant>,
}

pub struct Throttle {
    window: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

/// Bound on remembered keys; past it, idle entries are pruned.
const MAX_ENTRIES: usize = 100_000;

impl Throttle {
    pub fn new(window: Duration) -> Throttle {
        Throttle {
            window,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds the key must still wait, if it is locked.
    pub fn locked(&self, key: &str) -> Option<u64> {
        let now = Instant::now();
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let until = entries.get(key)?.locked_until?;
        (until > now).then(|| (until - now).as_secs().max(1))
    }

    /// Counts a failure; returns true when this failure locked the key.
    pub fn fail(&self, key: &str, limit: u32) -> bool {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES {
            let window = self.window;
            entries.retain(|_, e| {
                e.locked_until.is_some_and(|t| t > now)
                    || e.failures.last().is_some_and(|t| now - *t < window)
            });
        }
        let entry = entries.entry(key.to_string()).or_default();
        entry.failures.retain(|t| now - *t < self.window);
        entry.failures.push(now);
        if entry.failures.len() >= limit as usize {
            entry.failures.clear();
            entry.locked_until = Some(now + self.window);
            true
        } else {
            false
        }
    }

    pub fn clear(&self, key: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_at_the_limit_and_clears() {
        let t = Throttle::new(Duration::from_secs(60));
        assert!(!t.fail("a", 3));
        assert!(!t.fail("a", 3));
        assert_eq!(t.locked("a"), None);
        assert!(t.fail("a", 3));
        assert!(t.locked("a").is_some_and(|s| s > 0 && s <= 60));
        assert_eq!(t.locked("b"), None, "other keys are not affected");
        t.clear("a");
        assert_eq!(t.locked("a"), None);
    }

    #[test]
    fn failures_expire_with_the_window() {
        let t = Throttle::new(Duration::from_millis(20));
        assert!(!t.fail("a", 2));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!t.fail("a", 2), "the first failure left the window");
    }
}
