//! Notices: what happened to a user's work (a task queued, started, finished; an evaluation;
//! an export), published once by the service that made it happen, for whoever listens (the
//! webhooks' deliverer). A broadcast channel: a listener that falls far behind is told how many
//! it missed (and logs it); nobody blocks the publisher.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::broadcast;

/// One notice: the owner of the object, the event (`task.succeeded`, …) and its data.
#[derive(Debug, Clone)]
pub struct Notice {
    pub owner: String,
    pub event: String,
    pub data: Value,
}

/// The process's notices (cheap to clone).
#[derive(Clone)]
pub struct Notices(broadcast::Sender<Arc<Notice>>);

impl Default for Notices {
    fn default() -> Self {
        Notices(broadcast::channel(4096).0)
    }
}

impl Notices {
    pub fn send(&self, owner: &str, event: &str, data: Value) {
        // No listener: nothing to do.
        let _ = self.0.send(Arc::new(Notice {
            owner: owner.to_string(),
            event: event.to_string(),
            data,
        }));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Notice>> {
        self.0.subscribe()
    }
}
