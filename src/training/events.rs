//! Each task's event log: one numbered, append-only file per task, written by this process
//! alone, and a live channel that publishes every line in the order it was written.
//!
//! The worker writes its own events to `worker.jsonl` (JSON lines, see `worker.py`); the
//! supervisor relays each line into the task's log, and the server's own status events go
//! into the same log. [`EventLog::append`] is the one place that assigns ids: under the
//! task's lock it takes the next id, appends the line to `events.jsonl` and publishes it, so
//! the file and the live channel always agree and ids never shift. Lines are envelopes,
//! `{"id": N, "event": {...}, "worker_offset": B}`; `worker_offset` (on relayed lines and on
//! the `running` status line) says how far into `worker.jsonl` the log has read, so a server
//! that restarts and re-attaches to a running worker continues exactly where it stopped.
//! Ids are read back from the file at first use, so they stay stable across restarts.
//!
//! Subscribers first subscribe, then read the history ([`EventLog::since`]), then follow the
//! channel skipping ids they have seen: every event once, in order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast;

use crate::error::Result;

/// Events kept in memory per task for subscribers that lag behind.
const CHANNEL_CAPACITY: usize = 1024;

/// One event of a task's log.
#[derive(Debug, Clone)]
pub struct TaskEvent {
    /// Position in the task's log, from 1 (the SSE event id).
    pub id: u64,
    /// The event as JSON (an object with a `type`).
    pub data: Arc<str>,
}

impl TaskEvent {
    /// The event's `type` (`status`, `step`, `log`…), or `message`.
    pub fn kind(&self) -> String {
        serde_json::from_str::<Value>(&self.data)
            .ok()
            .and_then(|v| v["type"].as_str().map(str::to_string))
            .unwrap_or_else(|| "message".into())
    }
}

struct TaskLog {
    path: PathBuf,
    state: tokio::sync::Mutex<Option<LogState>>,
    tx: broadcast::Sender<TaskEvent>,
}

#[derive(Clone, Copy)]
struct LogState {
    last_id: u64,
    worker_offset: u64,
}

/// The event logs of every task (one per process).
#[derive(Default)]
pub struct EventLog {
    logs: Mutex<HashMap<String, Arc<TaskLog>>>,
}

/// The path of a task's log in its folder.
pub fn log_path(task_dir: &Path) -> PathBuf {
    task_dir.join("events.jsonl")
}

/// The path the worker writes its events to.
pub fn worker_path(task_dir: &Path) -> PathBuf {
    task_dir.join("worker.jsonl")
}

/// One parsed line of a log file. Lines written before the envelope format (plain events,
/// numbered by their line) still read.
struct Line {
    id: u64,
    event: Value,
    worker_offset: Option<u64>,
}

fn parse_lines(text: &str) -> Vec<Line> {
    let mut out = Vec::new();
    for (index, raw) in text.split_inclusive('\n').enumerate() {
        if !raw.ends_with('\n') {
            break; // a line still being written
        }
        let line_no = index as u64 + 1;
        let Ok(v) = serde_json::from_str::<Value>(raw.trim_end()) else {
            continue;
        };
        match (v["id"].as_u64(), v.get("event")) {
            (Some(id), Some(event)) if event.is_object() => out.push(Line {
                id,
                event: event.clone(),
                worker_offset: v["worker_offset"].as_u64(),
            }),
            _ => out.push(Line {
                id: line_no,
                event: v,
                worker_offset: None,
            }),
        }
    }
    out
}

async fn read_lines(path: &Path) -> Result<Vec<Line>> {
    match tokio::fs::read(path).await {
        Ok(bytes) => Ok(parse_lines(&String::from_utf8_lossy(&bytes))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

impl EventLog {
    pub fn new() -> EventLog {
        EventLog::default()
    }

    fn log(&self, task_id: &str, task_dir: &Path) -> Arc<TaskLog> {
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        logs.entry(task_id.to_string())
            .or_insert_with(|| {
                Arc::new(TaskLog {
                    path: log_path(task_dir),
                    state: tokio::sync::Mutex::new(None),
                    tx: broadcast::channel(CHANNEL_CAPACITY).0,
                })
            })
            .clone()
    }

    async fn loaded(log: &TaskLog) -> Result<tokio::sync::MutexGuard<'_, Option<LogState>>> {
        let mut state = log.state.lock().await;
        if state.is_none() {
            let lines = read_lines(&log.path).await?;
            *state = Some(LogState {
                last_id: lines.last().map_or(0, |l| l.id),
                worker_offset: lines
                    .iter()
                    .rev()
                    .find_map(|l| l.worker_offset)
                    .unwrap_or(0),
            });
        }
        Ok(state)
    }

    /// Appends `event` to the task's log and publishes it; returns its id. `worker_offset`:
    /// how far into the worker's file the log has read once this line is in.
    pub async fn append(
        &self,
        task_id: &str,
        task_dir: &Path,
        event: Value,
        worker_offset: Option<u64>,
    ) -> Result<u64> {
        let log = self.log(task_id, task_dir);
        let mut guard = Self::loaded(&log).await?;
        let Some(state) = guard.as_mut() else {
            return Err(crate::error::Error::internal("event log state missing"));
        };
        let id = state.last_id + 1;
        let mut envelope = json!({"id": id, "event": event});
        if let Some(offset) = worker_offset {
            envelope["worker_offset"] = json!(offset);
        }
        let mut line = envelope.to_string();
        line.push('\n');
        if let Some(parent) = log.path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log.path)
            .await?;
        f.write_all(line.as_bytes()).await?;
        f.flush().await?;
        state.last_id = id;
        if let Some(offset) = worker_offset {
            state.worker_offset = offset;
        }
        let _ = log.tx.send(TaskEvent {
            id,
            data: Arc::from(event.to_string().as_str()),
        });
        Ok(id)
    }

    /// Live events of a task (subscribe before reading the history, then skip ids seen).
    pub fn subscribe(&self, task_id: &str, task_dir: &Path) -> broadcast::Receiver<TaskEvent> {
        self.log(task_id, task_dir).tx.subscribe()
    }

    /// Events recorded after `after`, from the task's file.
    pub async fn since(&self, task_dir: &Path, after: u64) -> Result<Vec<TaskEvent>> {
        Ok(read_lines(&log_path(task_dir))
            .await?
            .into_iter()
            .filter(|l| l.id > after)
            .map(|l| TaskEvent {
                id: l.id,
                data: Arc::from(l.event.to_string().as_str()),
            })
            .collect())
    }

    /// The id of the last event recorded (0 when none).
    pub async fn last_id(&self, task_id: &str, task_dir: &Path) -> Result<u64> {
        let log = self.log(task_id, task_dir);
        let guard = Self::loaded(&log).await?;
        Ok(guard.as_ref().map_or(0, |s| s.last_id))
    }

    /// How far into the worker's file the log has read.
    pub async fn worker_offset(&self, task_id: &str, task_dir: &Path) -> Result<u64> {
        let log = self.log(task_id, task_dir);
        let guard = Self::loaded(&log).await?;
        Ok(guard.as_ref().map_or(0, |s| s.worker_offset))
    }

    /// Drops the in-memory part of a deleted task's log (live subscribers see it close).
    pub fn forget(&self, task_id: &str) {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(task_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Worker lines and server status events appended from many tasks at once, while one
    /// subscriber follows live from the start and others join midway (subscribe, read the
    /// history, follow): every one of them sees every event exactly once, in id order, and
    /// the ids are 1..=N without gaps, in the file as on the channel.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_subscriber_sees_every_event_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let task_dir = dir.path().to_path_buf();
        let log = Arc::new(EventLog::new());
        const WRITERS: u64 = 4;
        const EACH: u64 = 150;
        let total = WRITERS * EACH;

        let follow = |log: Arc<EventLog>, dir: PathBuf, replay: bool| {
            tokio::spawn(async move {
                let mut live = log.subscribe("t", &dir);
                let mut seen: Vec<u64> = Vec::new();
                if replay {
                    for e in log.since(&dir, 0).await.unwrap() {
                        seen.push(e.id);
                    }
                }
                let mut last = seen.last().copied().unwrap_or(0);
                while last < total {
                    let e = live.recv().await.expect("no lag at this rate");
                    if e.id <= last {
                        continue;
                    }
                    seen.push(e.id);
                    last = e.id;
                }
                seen
            })
        };
        let first = follow(log.clone(), task_dir.clone(), false);
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let (log, dir) = (log.clone(), task_dir.clone());
            writers.push(tokio::spawn(async move {
                for n in 0..EACH {
                    let event = if w == 0 {
                        json!({"type": "status", "status": format!("s{n}")})
                    } else {
                        json!({"type": "step", "writer": w, "step": n})
                    };
                    let offset = (w != 0).then_some(n);
                    log.append("t", &dir, event, offset).await.unwrap();
                    if n % 37 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let late = follow(log.clone(), task_dir.clone(), true);
        for w in writers {
            w.await.unwrap();
        }
        let later = follow(log.clone(), task_dir.clone(), true);
        let expected: Vec<u64> = (1..=total).collect();
        for (name, h) in [("live", first), ("late", late), ("after", later)] {
            let seen = tokio::time::timeout(std::time::Duration::from_secs(30), h)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(seen, expected, "{name} subscriber");
        }
        let file: Vec<u64> = log
            .since(&task_dir, 0)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(file, expected);
        // Each writer's events kept their own order.
        let steps: BTreeSet<(u64, u64)> = log
            .since(&task_dir, 0)
            .await
            .unwrap()
            .iter()
            .filter_map(|e| {
                let v: Value = serde_json::from_str(&e.data).ok()?;
                Some((v["writer"].as_u64()?, v["step"].as_u64()?))
            })
            .collect();
        assert_eq!(steps.len() as u64, (WRITERS - 1) * EACH);
    }

    #[tokio::test]
    async fn ids_and_the_worker_offset_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::new();
        log.append("t", dir.path(), json!({"type": "status"}), Some(0))
            .await
            .unwrap();
        log.append("t", dir.path(), json!({"type": "step"}), Some(120))
            .await
            .unwrap();
        log.append("t", dir.path(), json!({"type": "status"}), None)
            .await
            .unwrap();
        // A new process: a fresh EventLog over the same files.
        let log = EventLog::new();
        assert_eq!(log.last_id("t", dir.path()).await.unwrap(), 3);
        assert_eq!(log.worker_offset("t", dir.path()).await.unwrap(), 120);
        let id = log
            .append("t", dir.path(), json!({"type": "step"}), Some(200))
            .await
            .unwrap();
        assert_eq!(id, 4);
        let after = log.since(dir.path(), 2).await.unwrap();
        assert_eq!(after.iter().map(|e| e.id).collect::<Vec<_>>(), vec![3, 4]);
    }

    #[test]
    fn older_plain_lines_are_numbered_by_line() {
        let text = "{\"type\":\"status\"}\n\n{\"type\":\"step\"}\n{\"id\":9,\"event\":{\"type\":\"x\"}}\n{\"partial";
        let lines = parse_lines(text);
        assert_eq!(
            lines.iter().map(|l| l.id).collect::<Vec<_>>(),
            vec![1, 3, 9]
        );
    }
}
