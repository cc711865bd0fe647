//! Disk used by each user: their datasets' files (the sizes their records keep: always
//! current), their tasks' folders (logs, checkpoints and outputs) and the models of theirs
//! that live outside those folders (uploads, exports). The folders are walked off the async
//! runtime, at most once every half minute (answers in between reuse the last walk), so
//! dashboards polling `/api/system/resources` cost no disk scans.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{Error, Result};
use crate::store::Store;

/// How long one walk's figures are served.
const FRESH_FOR: Duration = Duration::from_secs(30);

/// One user's disk use, in bytes.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct UserDisk {
    pub user_id: String,
    pub username: String,
    /// Uploaded datasets.
    pub datasets_bytes: u64,
    /// Task folders: logs, checkpoints, adapters and other outputs.
    pub tasks_bytes: u64,
    /// Models outside the task folders (uploads, exports).
    pub models_bytes: u64,
    pub total_bytes: u64,
}

/// Per user id: bytes of their task folders, and of their models outside them.
type Walked = BTreeMap<String, (u64, u64)>;

pub struct DiskUsage {
    store: Store,
    last: tokio::sync::Mutex<Option<(Instant, Arc<Walked>)>>,
}

impl DiskUsage {
    pub fn new(store: Store) -> Arc<DiskUsage> {
        Arc::new(DiskUsage {
            store,
            last: tokio::sync::Mutex::new(None),
        })
    }

    /// Every user's use, largest first (folders from a walk at most half a minute old).
    /// Concurrent callers share one walk.
    pub async fn per_user(&self) -> Result<Vec<UserDisk>> {
        let walked = self.walked().await?;
        let mut datasets: BTreeMap<String, u64> = BTreeMap::new();
        for d in self.store.datasets().list_all().await? {
            *datasets.entry(d.owner).or_default() += d.size;
        }
        let mut out: Vec<UserDisk> = self
            .store
            .users()
            .await?
            .into_iter()
            .map(|u| {
                let (tasks_bytes, models_bytes) = walked.get(&u.user_id).copied().unwrap_or((0, 0));
                let datasets_bytes = datasets.get(&u.user_id).copied().unwrap_or(0);
                UserDisk {
                    user_id: u.user_id,
                    username: u.username,
                    datasets_bytes,
                    tasks_bytes,
                    models_bytes,
                    total_bytes: datasets_bytes + tasks_bytes + models_bytes,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            b.total_bytes
                .cmp(&a.total_bytes)
                .then(a.username.cmp(&b.username))
        });
        Ok(out)
    }

    /// Each user's task folders and other models, in bytes, from the last walk (made anew
    /// when older than [`FRESH_FOR`]).
    async fn walked(&self) -> Result<Arc<Walked>> {
        let mut last = self.last.lock().await;
        if let Some((at, figures)) = last.as_ref()
            && at.elapsed() < FRESH_FOR
        {
            return Ok(figures.clone());
        }
        let tasks = self.store.tasks().list_all().await?;
        let models = self.store.models().list_all().await?;
        let mut plan: BTreeMap<String, Plan> = BTreeMap::new();
        for t in tasks {
            if let Some(dir) = t.paths["task_dir"].as_str() {
                plan.entry(t.owner)
                    .or_default()
                    .tasks
                    .push(PathBuf::from(dir));
            }
        }
        for m in models {
            plan.entry(m.owner)
                .or_default()
                .models
                .push(PathBuf::from(&m.model_path));
        }
        let figures = tokio::task::spawn_blocking(move || {
            plan.into_iter()
                .map(|(user_id, p)| (user_id, p.measure()))
                .collect::<BTreeMap<_, _>>()
        })
        .await
        .map_err(Error::internal)?;
        let figures = Arc::new(figures);
        *last = Some((Instant::now(), figures.clone()));
        Ok(figures)
    }
}

#[derive(Default)]
struct Plan {
    tasks: Vec<PathBuf>,
    models: Vec<PathBuf>,
}

impl Plan {
    /// Walks the user's folders (blocking): bytes of the task folders, and of the models
    /// outside them (a model inside a task's folder is the task's, counted once).
    fn measure(self) -> (u64, u64) {
        let task_dirs: BTreeSet<PathBuf> = self.tasks.into_iter().collect();
        let tasks_bytes = task_dirs.iter().map(|p| bytes_under(p)).sum();
        let models: BTreeSet<PathBuf> = self
            .models
            .into_iter()
            .filter(|m| !task_dirs.iter().any(|t| m.starts_with(t)))
            .collect();
        (tasks_bytes, models.iter().map(|p| bytes_under(p)).sum())
    }
}

/// Bytes of a file, or of every file under a folder (links not followed; unreadable parts
/// count as nothing).
pub fn bytes_under(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    if !meta.is_dir() {
        return 0;
    }
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                total += entry.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_summed_once_and_links_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let task = dir.path().join("tasks/t1");
        std::fs::create_dir_all(task.join("output/checkpoint-2")).unwrap();
        std::fs::write(task.join("train.log"), vec![0u8; 100]).unwrap();
        std::fs::write(task.join("output/adapter.safetensors"), vec![0u8; 1000]).unwrap();
        std::fs::write(task.join("output/checkpoint-2/a.bin"), vec![0u8; 10]).unwrap();
        std::os::unix::fs::symlink(dir.path(), task.join("loop")).unwrap();
        let upload = dir.path().join("models/u1/m");
        std::fs::create_dir_all(&upload).unwrap();
        std::fs::write(upload.join("w.safetensors"), vec![0u8; 7]).unwrap();
        let data = dir.path().join("datasets/u1/d.jsonl");
        std::fs::create_dir_all(data.parent().unwrap()).unwrap();
        std::fs::write(&data, vec![0u8; 3]).unwrap();
        assert_eq!(bytes_under(&task), 1110);
        assert_eq!(bytes_under(&data), 3);
        assert_eq!(bytes_under(&dir.path().join("none")), 0);
        let plan = Plan {
            tasks: vec![task.clone(), task.clone()],
            // The task's adapter is counted with the task; the upload on its own.
            models: vec![task.join("output"), upload],
        };
        assert_eq!(plan.measure(), (1110, 7));
    }
}
