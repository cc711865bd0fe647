//! How many generations may run at once: on the whole server and per user. A request beyond
//! either limit is refused at once (429 with `Retry-After`) instead of queueing without bound:
//! the engine shares its compute between every running generation, so admitting more only
//! makes every one of them slower.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Kind, Result};

pub struct GenerationLimits {
    max_total: usize,
    max_per_user: usize,
    running: Mutex<Running>,
}

#[derive(Default)]
struct Running {
    total: usize,
    per_user: HashMap<String, usize>,
}

/// A running generation's place; dropping it (the generation ended, failed, or its client
/// went away) frees the place.
pub struct GenerationPermit {
    limits: Arc<GenerationLimits>,
    user: String,
}

impl GenerationLimits {
    pub fn new(max_total: usize, max_per_user: usize) -> Arc<GenerationLimits> {
        Arc::new(GenerationLimits {
            max_total: max_total.max(1),
            max_per_user: max_per_user.max(1),
            running: Mutex::new(Running::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one more generation of `user`, if both limits allow it.
    pub fn acquire(self: &Arc<Self>, user: &str) -> Result<GenerationPermit> {
        let mut running = self.lock();
        let mine = running.per_user.get(user).copied().unwrap_or(0);
        if mine >= self.max_per_user {
            return Err(Error {
                retry_after: Some(2),
                ..Error::new(
                    Kind::Throttled,
                    "too_many_generations",
                    format!(
                        "you already have {mine} answers being generated (the limit is {}); \
                         wait for one to finish",
                        self.max_per_user
                    ),
                )
            });
        }
        if running.total >= self.max_total {
            return Err(Error {
                retry_after: Some(2),
                ..Error::new(
                    Kind::Throttled,
                    "server_busy",
                    format!(
                        "the server is generating {} answers, its limit; try again shortly",
                        running.total
                    ),
                )
            });
        }
        running.total += 1;
        *running.per_user.entry(user.to_string()).or_default() += 1;
        Ok(GenerationPermit {
            limits: self.clone(),
            user: user.to_string(),
        })
    }

    /// Generations running now.
    pub fn running(&self) -> usize {
        self.lock().total
    }
}

impl Drop for GenerationPermit {
    fn drop(&mut self) {
        let mut running = self.limits.lock();
        running.total = running.total.saturating_sub(1);
        if let Some(n) = running.per_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                running.per_user.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_and_total_limits_and_release_on_drop() {
        let limits = GenerationLimits::new(3, 2);
        let a1 = limits.acquire("a").unwrap();
        let _a2 = limits.acquire("a").unwrap();
        assert_eq!(
            limits.acquire("a").err().unwrap().code,
            "too_many_generations"
        );
        let _b1 = limits.acquire("b").unwrap();
        let busy = limits.acquire("c").err().unwrap();
        assert_eq!(busy.code, "server_busy");
        assert_eq!(busy.retry_after, Some(2));
        drop(a1);
        assert_eq!(limits.running(), 2);
        let _c1 = limits.acquire("c").unwrap();
    }
}
