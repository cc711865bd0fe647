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
//!
//! # The worker's protocol
//!
//! `ferrotune worker` (and `worker.py` under torchrun, rank 0 only) writes one JSON object per
//! line to `worker.jsonl`, with one `write` per line, each with `type`, `t` (seconds since the
//! worker started) and `ts` (Unix time). The types are the variants of [`WorkerEvent`]:
//! `starting`, `train_begin`, `step` (every optimizer step), `log` (every `logging_steps`:
//! loss, learning rate, gradient norm), `eval`, `train_end`, `checkpoint`, `heartbeat` (every
//! 10 s, so a silent worker is told from a busy one), then `done`, `stopped` (after SIGUSR1:
//! stop and save) or `error`. Non-finite numbers are written as strings (`"nan"`). The
//! server adds `status` events (`queued`, `running`, `cancelling`, and the final status).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast;

use crate::error::Result;

/// Events kept in memory per task for subscribers that lag behind.
const CHANNEL_CAPACITY: usize = 1024;

/// When an event happened: `t`, seconds since the worker started (worker events), and `ts`,
/// Unix time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stamp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<f64>,
}

impl Stamp {
    pub fn now() -> Stamp {
        let now = time::OffsetDateTime::now_utc();
        Stamp {
            t: None,
            ts: Some((now.unix_timestamp_nanos() / 1_000_000) as f64 / 1000.0),
        }
    }
}

/// A number the worker may have written as a string (`"nan"`, `"inf"`): those read as none.
fn lenient_f64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Number(n)) => n.as_f64(),
        _ => None,
    })
}

/// The statuses a task's log records (its `status` events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusChange {
    Queued,
    Running,
    /// A cancel was asked of a running task: it saves and stops.
    Cancelling,
    Cancelled,
    Completed,
    Failed,
}

impl From<crate::store::TaskStatus> for StatusChange {
    fn from(s: crate::store::TaskStatus) -> Self {
        use crate::store::TaskStatus;
        match s {
            TaskStatus::Queued => StatusChange::Queued,
            TaskStatus::Running => StatusChange::Running,
            TaskStatus::Completed => StatusChange::Completed,
            TaskStatus::Failed => StatusChange::Failed,
            TaskStatus::Cancelled => StatusChange::Cancelled,
        }
    }
}

/// One event of a task: what the worker reports, and the server's `status` changes. The JSON
/// form (`{"type": "step", …}`) is what the worker writes, the log keeps and clients receive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerEvent {
    /// The worker process is up (its Python version; its pid stays on the server).
    Starting {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        python: Option<String>,
        #[serde(flatten)]
        at: Stamp,
    },
    TrainBegin {
        #[serde(default)]
        total_steps: Option<u64>,
        #[serde(default)]
        start_step: Option<u64>,
        #[serde(default, deserialize_with = "lenient_f64")]
        num_epochs: Option<f64>,
        #[serde(flatten)]
        at: Stamp,
    },
    Step {
        step: u64,
        #[serde(default)]
        total_steps: Option<u64>,
        #[serde(default, deserialize_with = "lenient_f64")]
        epoch: Option<f64>,
        #[serde(flatten)]
        at: Stamp,
    },
    Log {
        #[serde(default)]
        step: Option<u64>,
        #[serde(default)]
        total_steps: Option<u64>,
        #[serde(default, deserialize_with = "lenient_f64")]
        epoch: Option<f64>,
        #[serde(default, deserialize_with = "lenient_f64")]
        loss: Option<f64>,
        #[serde(default, deserialize_with = "lenient_f64")]
        learning_rate: Option<f64>,
        #[serde(default, deserialize_with = "lenient_f64")]
        grad_norm: Option<f64>,
        /// A stage's own figures: DPO's and KTO's `rewards/chosen`, `rewards/rejected`,
        /// `rewards/accuracies`, `rewards/margins`, `logps/*`, KTO's `kl`...
        #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
        metrics: serde_json::Map<String, Value>,
        #[serde(flatten)]
        at: Stamp,
    },
    Eval {
        #[serde(default)]
        metrics: serde_json::Map<String, Value>,
        #[serde(default)]
        step: Option<u64>,
        #[serde(default)]
        total_steps: Option<u64>,
        #[serde(default, deserialize_with = "lenient_f64")]
        epoch: Option<f64>,
        #[serde(flatten)]
        at: Stamp,
    },
    TrainEnd {
        #[serde(default)]
        metrics: serde_json::Map<String, Value>,
        #[serde(default)]
        step: Option<u64>,
        #[serde(default)]
        total_steps: Option<u64>,
        #[serde(default, deserialize_with = "lenient_f64")]
        epoch: Option<f64>,
        #[serde(flatten)]
        at: Stamp,
    },
    /// A checkpoint was saved; `path` is its folder's name in the task's output.
    Checkpoint {
        step: u64,
        #[serde(default)]
        path: String,
        #[serde(flatten)]
        at: Stamp,
    },
    Heartbeat {
        #[serde(flatten)]
        at: Stamp,
    },
    Done {
        #[serde(flatten)]
        at: Stamp,
    },
    Stopped {
        #[serde(flatten)]
        at: Stamp,
    },
    Error {
        #[serde(default)]
        stage: String,
        #[serde(default)]
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceback: Option<String>,
        #[serde(flatten)]
        at: Stamp,
    },
    /// A line in the worker's file that is not an event (kept, so nothing is lost).
    WorkerOutput {
        text: String,
        #[serde(flatten)]
        at: Stamp,
    },
    /// The server's record of a status change.
    Status {
        status: StatusChange,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        diagnosis: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gpus: Option<Vec<u32>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_from_step: Option<u64>,
        /// A `cancelled` that is a pause of a fine-tuning job (`/v1/fine_tuning/jobs/…/pause`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        paused: bool,
        #[serde(flatten)]
        at: Stamp,
    },
}

impl WorkerEvent {
    /// A status event stamped now.
    pub fn status(status: StatusChange) -> WorkerEvent {
        WorkerEvent::Status {
            status,
            error: None,
            diagnosis: None,
            model_id: None,
            gpus: None,
            resume_from_step: None,
            paused: false,
            at: Stamp::now(),
        }
    }

    /// The event's `type` as it is written.
    pub fn kind(&self) -> &'static str {
        match self {
            WorkerEvent::Starting { .. } => "starting",
            WorkerEvent::TrainBegin { .. } => "train_begin",
            WorkerEvent::Step { .. } => "step",
            WorkerEvent::Log { .. } => "log",
            WorkerEvent::Eval { .. } => "eval",
            WorkerEvent::TrainEnd { .. } => "train_end",
            WorkerEvent::Checkpoint { .. } => "checkpoint",
            WorkerEvent::Heartbeat { .. } => "heartbeat",
            WorkerEvent::Done { .. } => "done",
            WorkerEvent::Stopped { .. } => "stopped",
            WorkerEvent::Error { .. } => "error",
            WorkerEvent::WorkerOutput { .. } => "worker_output",
            WorkerEvent::Status { .. } => "status",
        }
    }

    /// Where training is, as far as the event says: (step, total steps, epoch, seconds since
    /// the worker started).
    pub fn position(&self) -> (Option<u64>, Option<u64>, Option<f64>, Option<f64>) {
        match self {
            WorkerEvent::TrainBegin {
                total_steps, at, ..
            } => (None, *total_steps, None, at.t),
            WorkerEvent::Step {
                step,
                total_steps,
                epoch,
                at,
            } => (Some(*step), *total_steps, *epoch, at.t),
            WorkerEvent::Log {
                step,
                total_steps,
                epoch,
                at,
                ..
            }
            | WorkerEvent::Eval {
                step,
                total_steps,
                epoch,
                at,
                ..
            }
            | WorkerEvent::TrainEnd {
                step,
                total_steps,
                epoch,
                at,
                ..
            } => (*step, *total_steps, *epoch, at.t),
            WorkerEvent::Checkpoint { step, at, .. } => (Some(*step), None, None, at.t),
            WorkerEvent::Starting { at, .. }
            | WorkerEvent::Heartbeat { at }
            | WorkerEvent::Done { at }
            | WorkerEvent::Stopped { at }
            | WorkerEvent::Error { at, .. }
            | WorkerEvent::WorkerOutput { at, .. }
            | WorkerEvent::Status { at, .. } => (None, None, None, at.t),
        }
    }
}

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
        event: &WorkerEvent,
        worker_offset: Option<u64>,
    ) -> Result<u64> {
        let event = serde_json::to_value(event).map_err(crate::error::Error::internal)?;
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
                    // Writer 0 is the server's status events; the others relay worker steps
                    // (their step number says which writer and in what order).
                    let event = if w == 0 {
                        WorkerEvent::status(StatusChange::Running)
                    } else {
                        WorkerEvent::Step {
                            step: w * 100_000 + n,
                            total_steps: None,
                            epoch: None,
                            at: Stamp::default(),
                        }
                    };
                    let offset = (w != 0).then_some(n);
                    log.append("t", &dir, &event, offset).await.unwrap();
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
        let steps: Vec<u64> = log
            .since(&task_dir, 0)
            .await
            .unwrap()
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok()?["step"].as_u64())
            .collect();
        assert_eq!(steps.len() as u64, (WRITERS - 1) * EACH);
        for w in 1..WRITERS {
            let mine: Vec<u64> = steps.iter().copied().filter(|s| s / 100_000 == w).collect();
            assert!(mine.windows(2).all(|p| p[0] < p[1]), "writer {w} in order");
        }
        let distinct: BTreeSet<u64> = steps.iter().copied().collect();
        assert_eq!(distinct.len(), steps.len(), "no event twice");
    }

    #[tokio::test]
    async fn ids_and_the_worker_offset_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::new();
        let status = WorkerEvent::status(StatusChange::Running);
        let step = WorkerEvent::Step {
            step: 1,
            total_steps: None,
            epoch: None,
            at: Stamp::default(),
        };
        log.append("t", dir.path(), &status, Some(0)).await.unwrap();
        log.append("t", dir.path(), &step, Some(120)).await.unwrap();
        log.append("t", dir.path(), &status, None).await.unwrap();
        // A new process: a fresh EventLog over the same files.
        let log = EventLog::new();
        assert_eq!(log.last_id("t", dir.path()).await.unwrap(), 3);
        assert_eq!(log.worker_offset("t", dir.path()).await.unwrap(), 120);
        let id = log.append("t", dir.path(), &step, Some(200)).await.unwrap();
        assert_eq!(id, 4);
        let after = log.since(dir.path(), 2).await.unwrap();
        assert_eq!(after.iter().map(|e| e.id).collect::<Vec<_>>(), vec![3, 4]);
    }

    #[test]
    fn the_worker_protocol_reads_as_typed_events() {
        let lines = [
            r#"{"type": "starting", "pid": 42, "python": "3.11.7", "t": 0.1, "ts": 1.5}"#,
            r#"{"type": "log", "loss": "nan", "learning_rate": 0.001, "step": 3, "epoch": 0.5, "t": 2.0, "ts": 3.0}"#,
            r#"{"type": "checkpoint", "step": 4, "path": "checkpoint-4", "t": 2.0}"#,
            r#"{"type": "error", "stage": "train", "message": "boom"}"#,
        ];
        let events: Vec<WorkerEvent> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(events[0].kind(), "starting");
        let written = serde_json::to_string(&events[0]).unwrap();
        assert!(
            !written.contains("pid"),
            "the pid stays on the server: {written}"
        );
        assert!(matches!(
            events[1],
            WorkerEvent::Log {
                loss: None,
                learning_rate: Some(_),
                step: Some(3),
                ..
            }
        ));
        assert_eq!(events[2].position().0, Some(4));
        assert_eq!(events[3].kind(), "error");
        let status = serde_json::to_value(WorkerEvent::status(StatusChange::Cancelling)).unwrap();
        assert_eq!(status["type"], "status");
        assert_eq!(status["status"], "cancelling");
        assert!(status["ts"].is_number());
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
