//! Alerts for operators: thresholds from the configuration checked every
//! `alert_check_secs` — free space of the data and models directories, host memory, GPU
//! temperature and memory, and training workers silent for too long. An alert is raised when a value crosses its line and resolved when
//! it is back; each change is logged, kept for the dashboard (`GET /api/system/alerts`) and
//! sent to every administrator's webhooks that ask for `alert.*` (as `alert.raised` /
//! `alert.resolved`, with the value and the line it crossed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use crate::notify::Notices;
use crate::store::{Role, Store};

/// The lines, from the configuration (0 turns one off).
#[derive(Debug, Clone)]
pub struct Thresholds {
    /// Raise when a directory's free space falls below this share of its disk (%).
    pub disk_free_percent: f64,
    /// Raise when the host's memory in use exceeds this share (%).
    pub memory_percent: f64,
    /// Raise when a GPU is hotter than this (°C).
    pub gpu_temperature_c: f64,
    /// Raise when a GPU's memory in use exceeds this share (%).
    pub gpu_memory_percent: f64,
    /// Raise when a running training worker has written nothing (not even its heartbeat) for
    /// this long (s).
    pub worker_silent_secs: u64,
    pub every: Duration,
    /// The directories whose disks are watched, by name.
    pub dirs: Vec<(String, PathBuf)>,
}

/// One alert that is on.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Alert {
    /// What it is about: `disk:data`, `memory`, `gpu0:temperature`, `worker:<task id>`, …
    pub key: String,
    /// `disk_free`, `host_memory`, `gpu_temperature`, `gpu_memory` or `worker_silent`.
    pub kind: String,
    pub message: String,
    pub value: f64,
    pub threshold: f64,
    /// `%`, `°C` or `s`.
    pub unit: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub since: OffsetDateTime,
}

/// A reading that crossed its line.
struct Crossing {
    key: String,
    kind: &'static str,
    message: String,
    value: f64,
    threshold: f64,
    unit: &'static str,
}

pub struct Alerts {
    thresholds: Thresholds,
    /// Whose workers are watched for silence.
    training: Option<Arc<crate::training::Training>>,
    store: Store,
    notices: Notices,
    active: Mutex<BTreeMap<String, Alert>>,
}

impl Alerts {
    pub fn new(
        thresholds: Thresholds,
        training: Option<Arc<crate::training::Training>>,
        store: Store,
        notices: Notices,
    ) -> Arc<Alerts> {
        Arc::new(Alerts {
            thresholds,
            training,
            store,
            notices,
            active: Mutex::new(BTreeMap::new()),
        })
    }

    /// The alerts that are on, oldest first.
    pub fn active(&self) -> Vec<Alert> {
        let mut v: Vec<Alert> = self.lock().values().cloned().collect();
        v.sort_by_key(|a| a.since);
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Alert>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks every `every` until the process ends.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.thresholds.every.max(Duration::from_secs(1)));
            loop {
                tick.tick().await;
                let t = this.thresholds.clone();
                // statvfs, /proc and nvidia-smi block: off the runtime.
                match tokio::task::spawn_blocking(move || readings(&t)).await {
                    Ok((mut crossings, mut read)) => {
                        this.watch_workers(&mut crossings, &mut read);
                        this.apply(crossings, &read).await
                    }
                    Err(e) => tracing::warn!(error = %e, "alert check failed"),
                }
            }
        })
    }

    /// Adds the silent workers' crossings. Every worker alert counts as read: one whose task
    /// no longer runs is resolved.
    fn watch_workers(&self, crossings: &mut Vec<Crossing>, read: &mut Vec<String>) {
        let secs = self.thresholds.worker_silent_secs;
        let Some(training) = self.training.as_ref().filter(|_| secs > 0) else {
            return;
        };
        read.extend(
            self.lock()
                .keys()
                .filter(|k| k.starts_with("worker:"))
                .cloned(),
        );
        read.extend(
            training
                .running_task_ids()
                .into_iter()
                .map(|id| format!("worker:{id}")),
        );
        for (task_id, owner, silent) in training.silent_workers(Duration::from_secs(secs)) {
            let s = silent.as_secs();
            crossings.push(Crossing {
                key: format!("worker:{task_id}"),
                kind: "worker_silent",
                message: format!(
                    "the training worker of task {task_id} (user {owner}) has written nothing for {s} s, over {secs} s"
                ),
                value: s as f64,
                threshold: secs as f64,
                unit: "s",
            });
        }
    }

    /// Raises the new crossings, resolves the alerts no longer crossed (among the keys that
    /// could be read this time: a reading that failed leaves its alert as it was).
    async fn apply(&self, crossings: Vec<Crossing>, read: &[String]) {
        let now = OffsetDateTime::now_utc();
        let (raised, resolved) = {
            let mut active = self.lock();
            let mut raised = Vec::new();
            for c in &crossings {
                match active.get_mut(&c.key) {
                    // Still on: the latest value and message.
                    Some(a) => {
                        a.value = c.value;
                        a.message = c.message.clone();
                    }
                    None => {
                        let a = Alert {
                            key: c.key.clone(),
                            kind: c.kind.to_string(),
                            message: c.message.clone(),
                            value: c.value,
                            threshold: c.threshold,
                            unit: c.unit.to_string(),
                            since: now,
                        };
                        active.insert(c.key.clone(), a.clone());
                        raised.push(a);
                    }
                }
            }
            let gone: Vec<String> = active
                .keys()
                .filter(|k| read.contains(k) && !crossings.iter().any(|c| &c.key == *k))
                .cloned()
                .collect();
            let resolved: Vec<Alert> = gone.iter().filter_map(|k| active.remove(k)).collect();
            (raised, resolved)
        };
        if raised.is_empty() && resolved.is_empty() {
            return;
        }
        let admins: Vec<String> = match self.store.users().await {
            Ok(users) => users
                .into_iter()
                .filter(|u| u.role == Role::Admin && !u.disabled)
                .map(|u| u.user_id)
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "could not list the administrators for an alert");
                Vec::new()
            }
        };
        for (event, list) in [("alert.raised", &raised), ("alert.resolved", &resolved)] {
            for a in list.iter() {
                if event == "alert.raised" {
                    tracing::warn!(key = %a.key, value = a.value, threshold = a.threshold, "{}", a.message);
                } else {
                    tracing::info!(key = %a.key, value = a.value, "resolved: {}", a.message);
                }
                let data = serde_json::to_value(a).unwrap_or_default();
                for admin in &admins {
                    self.notices.send(admin, event, data.clone());
                }
            }
        }
    }
}

/// Free space of the disk holding `dir`, as a share of it (%), and in bytes.
fn disk_free_percent(dir: &Path) -> Option<(f64, u64)> {
    let d = crate::system::disk_space(dir)?;
    Some((
        d.free_bytes as f64 / d.total_bytes as f64 * 100.0,
        d.free_bytes,
    ))
}

/// Every reading past its line, and the keys that could be read.
fn readings(t: &Thresholds) -> (Vec<Crossing>, Vec<String>) {
    let mut out = Vec::new();
    let mut read = Vec::new();
    if t.disk_free_percent > 0.0 {
        for (name, dir) in &t.dirs {
            let reading = disk_free_percent(dir);
            if reading.is_some() {
                read.push(format!("disk:{name}"));
            }
            if let Some((free, bytes)) = reading
                && free < t.disk_free_percent
            {
                out.push(Crossing {
                    key: format!("disk:{name}"),
                    kind: "disk_free",
                    message: format!(
                        "the disk of the {name} directory ({}) has {free:.1} % free ({:.1} GiB), below {} %",
                        dir.display(),
                        bytes as f64 / (1u64 << 30) as f64,
                        t.disk_free_percent
                    ),
                    value: (free * 10.0).round() / 10.0,
                    threshold: t.disk_free_percent,
                    unit: "%",
                });
            }
        }
    }
    if t.memory_percent > 0.0
        && let Some(m) = crate::system::memory()
        && m.total_bytes > 0
    {
        let used = m.used_bytes as f64 / m.total_bytes as f64 * 100.0;
        read.push("memory".into());
        if used > t.memory_percent {
            out.push(Crossing {
                key: "memory".into(),
                kind: "host_memory",
                message: format!(
                    "the host's memory is {used:.1} % in use, above {} %",
                    t.memory_percent
                ),
                value: (used * 10.0).round() / 10.0,
                threshold: t.memory_percent,
                unit: "%",
            });
        }
    }
    if t.gpu_temperature_c > 0.0 || t.gpu_memory_percent > 0.0 {
        for g in crate::system::gpus() {
            if g.temperature_c.is_some() {
                read.push(format!("gpu{}:temperature", g.index));
            }
            if g.memory_used_mib.is_some() && g.memory_total_mib.is_some() {
                read.push(format!("gpu{}:memory", g.index));
            }
            if t.gpu_temperature_c > 0.0
                && let Some(c) = g.temperature_c
                && c > t.gpu_temperature_c
            {
                out.push(Crossing {
                    key: format!("gpu{}:temperature", g.index),
                    kind: "gpu_temperature",
                    message: format!(
                        "GPU {} ({}) is at {c:.0} °C, above {} °C",
                        g.index, g.name, t.gpu_temperature_c
                    ),
                    value: c,
                    threshold: t.gpu_temperature_c,
                    unit: "°C",
                });
            }
            if t.gpu_memory_percent > 0.0
                && let (Some(u), Some(total)) = (g.memory_used_mib, g.memory_total_mib)
                && total > 0.0
                && u / total * 100.0 > t.gpu_memory_percent
            {
                let pct = u / total * 100.0;
                out.push(Crossing {
                    key: format!("gpu{}:memory", g.index),
                    kind: "gpu_memory",
                    message: format!(
                        "GPU {} ({}) memory is {pct:.1} % in use, above {} %",
                        g.index, g.name, t.gpu_memory_percent
                    ),
                    value: (pct * 10.0).round() / 10.0,
                    threshold: t.gpu_memory_percent,
                    unit: "%",
                });
            }
        }
    }
    (out, read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_space_is_read() {
        let (free, bytes) = disk_free_percent(Path::new("/")).unwrap_or_default();
        assert!((0.0..=100.0).contains(&free) && bytes > 0);
        assert!(disk_free_percent(Path::new("/no/such/dir")).is_none());
    }

    #[test]
    fn a_line_at_100_percent_is_crossed_and_zero_turns_it_off() {
        let mut t = Thresholds {
            disk_free_percent: 100.0,
            memory_percent: 0.0,
            gpu_temperature_c: 0.0,
            gpu_memory_percent: 0.0,
            worker_silent_secs: 0,
            every: Duration::from_secs(1),
            dirs: vec![("data".into(), PathBuf::from("/"))],
        };
        let (c, read) = readings(&t);
        assert_eq!(read, ["disk:data"]);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].key, "disk:data");
        assert!(c[0].message.contains("below 100 %"), "{}", c[0].message);
        t.disk_free_percent = 0.0;
        t.memory_percent = 0.001;
        let (c, _) = readings(&t);
        assert!(c.iter().all(|c| c.kind == "host_memory"));
        t.memory_percent = 0.0;
        assert!(readings(&t).0.is_empty());
        // A directory that cannot be read is not read: its alert would stay as it was.
        t.disk_free_percent = 100.0;
        t.dirs = vec![("models".into(), PathBuf::from("/no/such/dir"))];
        let (c, read) = readings(&t);
        assert!(c.is_empty() && !read.contains(&"disk:models".to_string()));
    }
}
