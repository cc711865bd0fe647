//! Per-owner locks: operations that must not interleave for one user (a task submitted while
//! its dataset is deleted; a task submitted while its owner's account is deleted) take their
//! owner's lock; different users never wait for each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct OwnerLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while an operation runs; the owner's entry is forgotten when nobody holds or awaits
/// it.
pub struct OwnerGuard<'a> {
    locks: &'a OwnerLocks,
    owner: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl OwnerLocks {
    pub fn new() -> OwnerLocks {
        OwnerLocks::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn lock(&self, owner: &str) -> OwnerGuard<'_> {
        let lock = self.map().entry(owner.to_string()).or_default().clone();
        let guard = lock.lock_owned().await;
        OwnerGuard {
            locks: self,
            owner: owner.to_string(),
            guard: Some(guard),
        }
    }
}

impl Drop for OwnerGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.map();
        if map
            .get(&self.owner)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.owner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_owner_waits_others_do_not() {
        let locks = Arc::new(OwnerLocks::new());
        let a = locks.lock("a").await;
        let _b = locks.lock("b").await;
        let waiting = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _a = locks.lock("a").await;
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(a);
        waiting.await.unwrap();
        assert!(!locks.map().contains_key("a"), "forgotten once free");
    }
}
