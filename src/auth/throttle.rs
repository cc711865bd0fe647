//! Throttling of password checks and registrations, in memory.
//!
//! An attempt is counted **before** its password is hashed ([`Throttle::reserve`]), so a
//! burst of parallel attempts cannot all slip in before the first failure is recorded; a
//! success gives its reservation back. Keys name what is limited: one account from one
//! address, one address, one account from everywhere. The last one does not lock: past its
//! threshold it paces attempts ([`Throttle::pace`]), one per interval, so an attacker spread
//! over many addresses is slowed to a trickle while the owner waits seconds, not a window —
//! and an address the owner signed in from recently skips the pacing altogether.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Entry {
    attempts: Vec<Instant>,
    locked_until: Option<Instant>,
    /// Pacing: the earliest time the next attempt may run.
    next_slot: Option<Instant>,
}

pub struct Throttle {
    window: Duration,
    entries: Mutex<HashMap<String, Entry>>,
    /// Account-and-address pairs that signed in successfully, with when.
    known: Mutex<HashMap<String, Instant>>,
}

/// Bound on remembered keys; past it, idle entries are pruned.
const MAX_ENTRIES: usize = 100_000;
/// How long a successful sign-in makes its address known for its account.
const KNOWN_FOR: Duration = Duration::from_secs(30 * 24 * 3600);

fn secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

impl Throttle {
    pub fn new(window: Duration) -> Throttle {
        Throttle {
            window,
            entries: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn prune(&self, entries: &mut HashMap<String, Entry>, now: Instant) {
        if entries.len() >= MAX_ENTRIES {
            let window = self.window;
            entries.retain(|_, e| {
                e.locked_until.is_some_and(|t| t > now)
                    || e.next_slot.is_some_and(|t| t > now)
                    || e.attempts.last().is_some_and(|t| now - *t < window)
            });
        }
    }

    /// Counts an attempt on `key`, allowed while fewer than `limit` are counted in the window.
    /// At the limit the key is refused for one window: `Err(seconds to wait)`.
    pub fn reserve(&self, key: &str, limit: u32) -> Result<(), u64> {
        let now = Instant::now();
        let mut entries = self.entries();
        self.prune(&mut entries, now);
        let entry = entries.entry(key.to_string()).or_default();
        if let Some(until) = entry.locked_until {
            if until > now {
                return Err(secs(until - now));
            }
            entry.locked_until = None;
        }
        entry.attempts.retain(|t| now - *t < self.window);
        if entry.attempts.len() >= limit as usize {
            entry.attempts.clear();
            entry.locked_until = Some(now + self.window);
            return Err(secs(self.window));
        }
        entry.attempts.push(now);
        Ok(())
    }

    /// Seconds `key` must still wait, if it is locked.
    pub fn locked(&self, key: &str) -> Option<u64> {
        let now = Instant::now();
        let entries = self.entries();
        let until = entries.get(key)?.locked_until?;
        (until > now).then(|| secs(until - now))
    }

    /// Counts a failure on `key` after the fact; at `limit` failures in the window the key
    /// is locked for one window. For keys whose concurrent attempts are bounded by other
    /// means (a per-address gate), so a burst cannot outrun the count by much.
    pub fn fail(&self, key: &str, limit: u32) {
        let now = Instant::now();
        let mut entries = self.entries();
        self.prune(&mut entries, now);
        let entry = entries.entry(key.to_string()).or_default();
        entry.attempts.retain(|t| now - *t < self.window);
        entry.attempts.push(now);
        if entry.attempts.len() >= limit as usize {
            entry.attempts.clear();
            entry.locked_until = Some(now + self.window);
        }
    }

    /// Gives back one attempt counted on `key` (it succeeded).
    pub fn refund(&self, key: &str) {
        if let Some(e) = self.entries().get_mut(key) {
            e.attempts.pop();
        }
    }

    /// Forgets `key` (its owner proved who they are).
    pub fn clear(&self, key: &str) {
        self.entries().remove(key);
    }

    /// Counts an attempt on `key` and says how long it must wait: nothing while fewer than
    /// `threshold` attempts are counted in the window, then one attempt per `interval`.
    /// `Err(seconds)` when its turn would come later than `max_wait`.
    pub fn pace(
        &self,
        key: &str,
        threshold: u32,
        interval: Duration,
        max_wait: Duration,
    ) -> Result<Duration, u64> {
        let now = Instant::now();
        let mut entries = self.entries();
        self.prune(&mut entries, now);
        let entry = entries.entry(key.to_string()).or_default();
        entry.attempts.retain(|t| now - *t < self.window);
        if entry.attempts.len() < threshold as usize {
            entry.attempts.push(now);
            return Ok(Duration::ZERO);
        }
        let slot = entry.next_slot.filter(|s| *s > now).unwrap_or(now);
        let wait = slot - now;
        if wait > max_wait {
            return Err(secs(wait));
        }
        entry.next_slot = Some(slot + interval);
        entry.attempts.push(now);
        Ok(wait)
    }

    /// Remembers that `key` (an account and an address) signed in successfully.
    pub fn mark_known(&self, key: &str) {
        let now = Instant::now();
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= MAX_ENTRIES {
            known.retain(|_, t| now - *t < KNOWN_FOR);
        }
        if known.len() < MAX_ENTRIES {
            known.insert(key.to_string(), now);
        }
    }

    pub fn is_known(&self, key: &str) -> bool {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known
            .get(key)
            .is_some_and(|t| Instant::now() - *t < KNOWN_FOR)
    }
}

/// At most `per_key` holders at once per key (a client address): password checks from one
/// address queue behind each other instead of running all at once, so a burst from one
/// address cannot outrun its failure count by more than `per_key` guesses, while a crowd of
/// honest sign-ins behind one address (a NAT, a proxy) waits a moment instead of being
/// refused.
pub struct Gate {
    per_key: usize,
    keys: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Semaphore>>>,
}

/// A place at the gate; released on drop.
pub struct GatePass<'a> {
    gate: &'a Gate,
    key: String,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Gate {
    pub fn new(per_key: usize) -> Gate {
        Gate {
            per_key: per_key.max(1),
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn keys(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, std::sync::Arc<tokio::sync::Semaphore>>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn enter(&self, key: &str) -> GatePass<'_> {
        let semaphore = self
            .keys()
            .entry(key.to_string())
            .or_insert_with(|| std::sync::Arc::new(tokio::sync::Semaphore::new(self.per_key)))
            .clone();
        // The semaphore is never closed, so acquiring fails only if it were.
        let permit = semaphore.acquire_owned().await.ok();
        GatePass {
            gate: self,
            key: key.to_string(),
            permit,
        }
    }

    /// Keys with someone at the gate.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys().len()
    }
}

impl Drop for GatePass<'_> {
    fn drop(&mut self) {
        self.permit.take();
        let mut keys = self.gate.keys();
        // Forget a key nobody holds or waits for (the map only holds it then).
        if keys.get(&self.key).is_some_and(|s| {
            std::sync::Arc::strong_count(s) == 1 && s.available_permits() == self.gate.per_key
        }) {
            keys.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_before_the_outcome_and_refunds_successes() {
        let t = Throttle::new(Duration::from_secs(60));
        assert!(t.reserve("a", 3).is_ok());
        assert!(t.reserve("a", 3).is_ok());
        t.refund("a"); // that one succeeded
        assert!(t.reserve("a", 3).is_ok());
        assert!(t.reserve("a", 3).is_ok());
        let wait = t.reserve("a", 3).unwrap_err();
        assert!(wait > 0 && wait <= 60);
        assert!(t.reserve("a", 3).is_err(), "locked for the window");
        assert!(t.reserve("b", 3).is_ok(), "other keys are not affected");
        t.clear("a");
        assert!(t.reserve("a", 3).is_ok());
    }

    #[test]
    fn failures_counted_after_lock_at_the_limit() {
        let t = Throttle::new(Duration::from_secs(60));
        t.fail("ip", 2);
        assert_eq!(t.locked("ip"), None);
        t.fail("ip", 2);
        assert!(t.locked("ip").is_some_and(|s| s > 0 && s <= 60));
    }

    #[test]
    fn attempts_expire_with_the_window() {
        let t = Throttle::new(Duration::from_millis(30));
        assert!(t.reserve("a", 2).is_ok());
        assert!(t.reserve("a", 2).is_ok());
        assert!(t.reserve("a", 2).is_err());
        std::thread::sleep(Duration::from_millis(40));
        assert!(t.reserve("a", 2).is_ok(), "the lock ended with the window");
    }

    #[test]
    fn pacing_slows_instead_of_refusing() {
        let t = Throttle::new(Duration::from_secs(60));
        let (i, max) = (Duration::from_secs(2), Duration::from_secs(5));
        for _ in 0..3 {
            assert_eq!(t.pace("acct", 3, i, max), Ok(Duration::ZERO));
        }
        // Past the threshold: the next attempts queue one interval apart…
        assert_eq!(t.pace("acct", 3, i, max), Ok(Duration::ZERO));
        let second = t.pace("acct", 3, i, max).unwrap();
        assert!(
            second > Duration::from_millis(1900) && second <= i,
            "{second:?}"
        );
        let third = t.pace("acct", 3, i, max).unwrap();
        assert!(third > Duration::from_millis(3900), "{third:?}");
        // …and one whose turn is too far off is told when to come back.
        assert!(t.pace("acct", 3, i, max).is_err());
    }

    #[tokio::test]
    async fn the_gate_bounds_holders_per_key_and_forgets_idle_keys() {
        let gate = std::sync::Arc::new(Gate::new(2));
        let a1 = gate.enter("a").await;
        let _a2 = gate.enter("a").await;
        let _b = gate.enter("b").await;
        let waiting = {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _a3 = gate.enter("a").await;
            })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiting.is_finished(), "a third holder of `a` waits");
        drop(a1);
        waiting.await.unwrap();
        drop(_b);
        assert_eq!(gate.len(), 1, "`b` is forgotten once nobody holds it");
    }

    #[test]
    fn known_addresses() {
        let t = Throttle::new(Duration::from_secs(60));
        assert!(!t.is_known("alice|1.2.3.4"));
        t.mark_known("alice|1.2.3.4");
        assert!(t.is_known("alice|1.2.3.4"));
        assert!(!t.is_known("alice|5.6.7.8"));
    }
}
