//! The supervisor: worker processes. It starts a task's worker (its own process group, its
//! GPUs, its log), follows it through the worker's events file (not a pipe, so a server that
//! restarts picks a surviving worker up where it left off), relays every line into the
//! task's event log, keeps the task's progress, stops it on request or when it falls silent,
//! and records how it ended (registering its model on success).
//!
//! Processes are the boundary to a different executor (DESIGN.md's scale-out plan: a Ray job
//! instead of a local process): everything process-specific is in [`Supervisor::spawn`], the
//! liveness checks and the signals.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};

use super::events::{EventLog, StatusChange, WorkerEvent, worker_path};
use super::queue::{Queue, RunningSlot};
use super::spec::{self, FinetuningType};
use super::task::{MetricPoint, Progress, Task, TaskStatus, apply_event};
use super::{diagnose, read_log_tail};
use crate::error::{Error, Result};
use crate::models::Registry;
use crate::pyenv::EnvTracker;
use crate::store::{ModelKind, Store};
use crate::system::{alive, signal, signal_group};
use crate::worker::{EXIT_STOPPED, Job};

/// How often the worker's events file is polled.
const POLL: Duration = Duration::from_millis(50);
/// Seconds between heartbeats the worker writes.
const HEARTBEAT_SECS: f64 = 10.0;

/// A worker this process supervises.
struct Running {
    owner: String,
    pid: u32,
    gpus: Vec<u32>,
    cancel_requested: bool,
    /// When the worker last wrote an event (or was started or re-attached).
    last_heard: Instant,
}

/// How the supervisor runs workers.
pub struct Settings {
    pub data_dir: PathBuf,
    pub heartbeat_timeout: Duration,
    pub cancel_grace: Duration,
    /// Workers that may run at once (they share the CPU cores: OpenMP threads each).
    pub max_concurrent: usize,
    /// The machine has GPUs to hand out (`CUDA_VISIBLE_DEVICES` is set then).
    pub has_gpus: bool,
    /// Where status changes are announced (webhooks listen).
    pub notices: crate::notify::Notices,
    /// A worker's log (`train.log`) is rotated past this many bytes, keeping this many files.
    pub log_max_bytes: usize,
    pub log_keep: usize,
}

pub struct Supervisor {
    store: Store,
    events: Arc<EventLog>,
    /// Status changes, for webhooks.
    pub(super) notices: crate::notify::Notices,
    models: Arc<Registry>,
    env: EnvTracker,
    queue: Arc<Queue>,
    settings: Settings,
    running: Mutex<HashMap<String, Running>>,
    /// Completed tasks that asked for an evaluation of their result.
    completed: tokio::sync::mpsc::UnboundedSender<String>,
}

#[derive(Default)]
struct RunState {
    done: bool,
    stopped: bool,
    last_error: Option<String>,
}

impl Supervisor {
    pub fn new(
        store: Store,
        events: Arc<EventLog>,
        models: Arc<Registry>,
        env: EnvTracker,
        queue: Arc<Queue>,
        settings: Settings,
        completed: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            completed,
            notices: settings.notices.clone(),
            store,
            events,
            models,
            env,
            queue,
            settings,
            running: Mutex::new(HashMap::new()),
        })
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What runs, for the queue.
    pub fn running_slots(&self) -> Vec<RunningSlot> {
        self.lock_running()
            .values()
            .map(|r| RunningSlot {
                owner: r.owner.clone(),
                gpus: r.gpus.clone(),
            })
            .collect()
    }

    /// The workers this process supervises: (task id, pid, GPUs).
    pub fn running_workers(&self) -> Vec<(String, u32, Vec<u32>)> {
        self.lock_running()
            .iter()
            .filter(|(_, r)| r.pid != 0)
            .map(|(id, r)| (id.clone(), r.pid, r.gpus.clone()))
            .collect()
    }

    /// Running workers that have written nothing for a while: task id, owner, and how long.
    pub fn silent_workers(&self, at_least: Duration) -> Vec<(String, String, Duration)> {
        self.lock_running()
            .iter()
            .filter(|(_, r)| r.pid != 0 && r.last_heard.elapsed() >= at_least)
            .map(|(id, r)| (id.clone(), r.owner.clone(), r.last_heard.elapsed()))
            .collect()
    }

    /// The ids of the tasks whose workers run.
    pub fn running_task_ids(&self) -> Vec<String> {
        self.lock_running().keys().cloned().collect()
    }

    /// Records a server-side event in the task's log (and publishes it).
    pub async fn record(&self, task: &Task, event: WorkerEvent, worker_offset: Option<u64>) {
        self.notify(task, &event);
        if let Err(e) = self
            .events
            .append(&task.task_id, task.task_dir(), &event, worker_offset)
            .await
        {
            tracing::warn!(task_id = %task.task_id, error = %e, "could not record an event");
        }
    }

    /// Publishes a status change as a notice: `task.queued|started|succeeded|failed|
    /// cancelled|paused`, or `evaluation.…` for an evaluation task.
    fn notify(&self, task: &Task, event: &WorkerEvent) {
        let WorkerEvent::Status {
            status,
            error,
            model_id,
            paused,
            ..
        } = event
        else {
            return;
        };
        let what = match status {
            StatusChange::Queued => "queued",
            StatusChange::Running => "started",
            StatusChange::Cancelling => return,
            StatusChange::Cancelled if *paused => "paused",
            StatusChange::Cancelled => "cancelled",
            StatusChange::Completed => "succeeded",
            StatusChange::Failed => "failed",
        };
        let (kind, id_key) = if task.spec.evaluation.is_some() {
            ("evaluation", "evaluation_id")
        } else {
            ("task", "task_id")
        };
        let mut data = serde_json::json!({
            id_key: task.task_id,
            "name": task.spec.name,
            "status": what,
            "model_name": task.spec.model_name,
        });
        if let Some(e) = error {
            data["error"] = e.clone().into();
        }
        if let Some(m) = model_id {
            data["model_id"] = m.clone().into();
        }
        if let Some(job) = &task.job {
            data["fine_tuning_job_id"] = serde_json::to_value(job)
                .ok()
                .and_then(|j| j.get("id").cloned())
                .unwrap_or_default();
        }
        self.notices
            .send(&task.owner, &format!("{kind}.{what}"), data);
    }

    /// Starts a queued task's worker on `gpus`; returns once it runs (or could not start).
    /// A task cancelled meanwhile is left alone.
    pub async fn start(self: &Arc<Self>, task: Task, gpus: Vec<u32>) -> Result<()> {
        // Supervised from before the claim, while its process does not exist yet (pid 0): a
        // cancel that reads it `running` finds it here, is remembered and carried out once it
        // runs (registered after the claim, a cancel falling between the two was a 409).
        self.lock_running().insert(
            task.task_id.clone(),
            Running {
                owner: task.owner.clone(),
                pid: 0,
                gpus: gpus.clone(),
                cancel_requested: false,
                last_heard: Instant::now(),
            },
        );
        // Claim it: queued → running, atomically (a cancel may be writing too).
        let now = OffsetDateTime::now_utc();
        let assigned = gpus.clone();
        let claimed = self
            .store
            .tasks()
            .update_checked(&task.owner, &task.task_id, move |t| {
                if t.status != TaskStatus::Queued {
                    return false;
                }
                t.status = TaskStatus::Running;
                t.gpu_ids = assigned.clone();
                t.pid = None;
                t.error = None;
                t.diagnosis = None;
                t.started_at = Some(now);
                t.updated_at = now;
                true
            })
            .await;
        let mut task = match claimed {
            Ok(Some((record, true))) => match Task::from_record(record) {
                Ok(t) => t,
                Err(e) => {
                    self.lock_running().remove(&task.task_id);
                    return Err(e);
                }
            },
            // Cancelled (or gone) before the claim: nothing to supervise.
            Ok(_) => {
                self.lock_running().remove(&task.task_id);
                return Ok(());
            }
            Err(e) => {
                self.lock_running().remove(&task.task_id);
                return Err(e.into());
            }
        };
        let spawned = self.spawn(&task, &gpus).await;
        let (pid, child) = match spawned {
            Ok(p) => p,
            Err(e) => {
                self.lock_running().remove(&task.task_id);
                return Err(e);
            }
        };
        task.pid = Some(pid);
        let stored = self
            .store
            .tasks()
            .update(&task.owner, &task.task_id, move |t| {
                t.pid = Some(pid);
                true
            })
            .await;
        if let Err(e) = stored {
            tracing::warn!(task_id = %task.task_id, error = %e, "could not record the worker's pid");
        }
        let cancel_now = {
            let mut running = self.lock_running();
            running.get_mut(&task.task_id).is_some_and(|r| {
                r.pid = pid;
                r.cancel_requested
            })
        };
        if cancel_now {
            signal(pid, Signal::SIGUSR1);
            let grace = self.settings.cancel_grace;
            tokio::spawn(async move { terminate_after(pid, grace).await });
        }
        tracing::info!(task_id = %task.task_id, pid, ?gpus, "worker started");
        // The log reads the new worker's file from its start.
        let mut running = WorkerEvent::status(StatusChange::Running);
        if let WorkerEvent::Status { gpus: g, .. } = &mut running {
            *g = Some(gpus);
        }
        self.record(&task, running, Some(0)).await;
        let this = self.clone();
        tokio::spawn(async move {
            this.supervise(task, pid, Some(child), 0).await;
        });
        Ok(())
    }

    /// The process: `ferrotune worker --job` (or torchrun over worker.py for several GPUs),
    /// in its own process group, output to the task's log.
    async fn spawn(&self, task: &Task, gpus: &[u32]) -> Result<(u32, tokio::process::Child)> {
        let task_dir = task.task_dir().to_path_buf();
        tokio::fs::create_dir_all(&task_dir).await?;
        let log_file = task.log_path();
        let exit_file = task_dir.join("exit.json");
        let _ = tokio::fs::remove_file(&exit_file).await;
        let env = self.env.env();
        let mut passes = run_passes(task);
        let first = if passes.is_empty() {
            Default::default()
        } else {
            passes.remove(0)
        };
        let job = Job {
            task_id: task.task_id.clone(),
            args: first,
            then: passes,
            env_dir: env.dir.clone(),
            site_packages: env.site_packages(),
            events_file: worker_path(&task_dir),
            exit_file,
            heartbeat_secs: HEARTBEAT_SECS,
            save_every_s: task.spec.save_minutes.map(|m| m * 60.0),
            log: Some(crate::logs::Rotation {
                path: log_file.clone(),
                max_bytes: self.settings.log_max_bytes,
                keep: self.settings.log_keep,
            }),
        };
        let job_path = task_dir.join("job.json");
        tokio::fs::write(
            &job_path,
            serde_json::to_vec_pretty(&job).map_err(Error::internal)?,
        )
        .await?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)?;
        let log_err = log.try_clone()?;

        let mut cmd = if gpus.len() > 1 {
            // Several GPUs: LlamaFactory needs a distributed launch; torchrun starts one rank
            // per GPU, each running worker.py (rank 0 reports).
            let launcher = task_dir.join("launch.py");
            tokio::fs::write(&launcher, crate::worker::WORKER_PY).await?;
            let mut c = tokio::process::Command::new(env.python());
            c.args(["-m", "torch.distributed.run", "--standalone"])
                .arg(format!("--nproc_per_node={}", gpus.len()))
                .arg(&launcher)
                .arg(&job_path)
                .env("PYTHONPATH", env.site_packages());
            c
        } else {
            let mut c = tokio::process::Command::new(std::env::current_exe()?);
            c.arg("worker").arg("--job").arg(&job_path);
            c
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONNOUSERSITE", "1")
            .env("DISABLE_VERSION_CHECK", "1")
            .env("TOKENIZERS_PARALLELISM", "false")
            .env("HF_HUB_OFFLINE", "1")
            .env(
                "HF_HOME",
                self.settings.data_dir.join("cache").join("huggingface"),
            )
            .env("RUST_LOG", "warn")
            .process_group(0)
            .kill_on_drop(false);
        if self.settings.has_gpus {
            let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
            cmd.env("CUDA_VISIBLE_DEVICES", list.join(","));
        }
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            // Workers share the CPU cores: oversubscribed OpenMP threads spin against each
            // other and can make every step many times slower.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            cmd.env(
                "OMP_NUM_THREADS",
                (cores / self.settings.max_concurrent.max(1))
                    .max(1)
                    .to_string(),
            );
        }
        // Each run's worker writes a file of its own.
        match tokio::fs::remove_file(worker_path(&task_dir)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| Error::internal("the worker exited at once"))?;
        Ok((pid, child))
    }

    /// Follows a worker until it exits: relays its events, keeps the progress, watches the
    /// heartbeat; then records the outcome.
    async fn supervise(
        self: Arc<Self>,
        task: Task,
        pid: u32,
        mut child: Option<tokio::process::Child>,
        start_offset: u64,
    ) {
        let task_id = task.task_id.clone();
        let path = worker_path(task.task_dir());
        let mut state = RunState::default();
        let mut progress = task.progress.clone();
        let mut offset = start_offset;
        let mut reader = None;
        let mut partial = String::new();
        let mut last_activity = Instant::now();
        let mut stuck = false;

        let exit_code: Option<i32> = loop {
            if reader.is_none()
                && let Ok(mut f) = tokio::fs::File::open(&path).await
                && f.seek(std::io::SeekFrom::Start(offset)).await.is_ok()
            {
                reader = Some(BufReader::new(f));
            }
            let exited = match child.as_mut() {
                Some(c) => match c.try_wait() {
                    Ok(Some(status)) => Some(status.code()),
                    Ok(None) => None,
                    Err(_) => Some(None),
                },
                None if !alive(pid) => Some(read_exit_file(&task).await),
                None => None,
            };
            // Every complete line (after an exit: the last ones too).
            if let Some(r) = reader.as_mut() {
                let mut heard = false;
                while let Ok(n) = r.read_line(&mut partial).await {
                    if n == 0 || !partial.ends_with('\n') {
                        break;
                    }
                    let line = std::mem::take(&mut partial);
                    offset += line.len() as u64;
                    last_activity = Instant::now();
                    heard = true;
                    self.handle_line(&task, offset, line.trim_end(), &mut progress, &mut state)
                        .await;
                }
                if heard && let Some(r) = self.lock_running().get_mut(&task_id) {
                    r.last_heard = last_activity;
                }
            }
            if let Some(code) = exited {
                break code;
            }
            if last_activity.elapsed() > self.settings.heartbeat_timeout && !stuck {
                stuck = true;
                tracing::warn!(task_id = %task_id, pid, "worker stopped reporting: killing it");
                signal_group(pid, Signal::SIGKILL);
            }
            tokio::time::sleep(POLL).await;
        };
        // Nothing of the worker's process group may outlive it.
        signal_group(pid, Signal::SIGKILL);

        let cancel_requested = self
            .lock_running()
            .get(&task_id)
            .is_some_and(|r| r.cancel_requested);
        let (status, error, model_id) = if state.done
            && exit_code == Some(0)
            && task.spec.evaluation.is_some()
        {
            match self.record_evaluation(&task).await {
                Ok(()) => (TaskStatus::Completed, None, None),
                Err(e) => (
                    TaskStatus::Failed,
                    Some(format!(
                        "the evaluation finished but its results do not read: {}",
                        e.message
                    )),
                    None,
                ),
            }
        } else if state.done && exit_code == Some(0) && !task.spec.stage.chats() {
            // A reward model scores answers instead of writing them: nothing to chat with.
            // Its adapter and value head stay in the task's output folder.
            (TaskStatus::Completed, None, None)
        } else if state.done && exit_code == Some(0) {
            match self.register_model(&task).await {
                Ok(model_id) => (TaskStatus::Completed, None, Some(model_id)),
                Err(e) => (
                    TaskStatus::Failed,
                    Some(format!(
                        "training finished but its output could not be registered: {}",
                        e.message
                    )),
                    None,
                ),
            }
        } else if cancel_requested || state.stopped || exit_code == Some(EXIT_STOPPED) {
            (TaskStatus::Cancelled, None, None)
        } else if stuck {
            (
                TaskStatus::Failed,
                Some(format!(
                    "the worker stopped reporting for {} s and was stopped",
                    self.settings.heartbeat_timeout.as_secs()
                )),
                None,
            )
        } else {
            let error = state.last_error.unwrap_or_else(|| match exit_code {
                Some(code) => format!("the worker exited with code {code}"),
                None => "the worker was killed (by a signal, e.g. the out-of-memory killer)".into(),
            });
            (TaskStatus::Failed, Some(error), None)
        };
        self.lock_running().remove(&task_id);
        self.finish(&task_id, status, error, model_id).await;
        if status == TaskStatus::Completed
            && (task.spec.eval_dataset_id.is_some() || task.spec.eval_split.is_some())
        {
            // The training service queues the evaluation the task asked for.
            if self.completed.send(task_id.clone()).is_err() {
                tracing::warn!(task_id = %task_id, "the evaluation this task asked for was not queued: the training service is gone");
            }
        }
        self.queue.wake();
    }

    /// Reads a finished evaluation's scores into its record.
    async fn record_evaluation(&self, task: &Task) -> Result<()> {
        let output = task.output_dir().to_path_buf();
        let tokenizer_dir = std::path::PathBuf::from(&task.paths.model_dir);
        let metrics = tokio::task::spawn_blocking(move || {
            super::evaluation::read_results(&output, &tokenizer_dir)
        })
        .await??;
        self.store
            .tasks()
            .update(&task.owner, &task.task_id, move |t| {
                t.eval_metrics = Some(metrics.clone());
                true
            })
            .await?;
        Ok(())
    }

    /// Relays one line of the worker's file (ending at `offset`) into the task's log and
    /// applies it to the task's progress.
    async fn handle_line(
        &self,
        task: &Task,
        offset: u64,
        line: &str,
        progress: &mut Progress,
        state: &mut RunState,
    ) {
        let event = match serde_json::from_str::<WorkerEvent>(line) {
            Ok(WorkerEvent::Checkpoint { step, path, at }) => WorkerEvent::Checkpoint {
                step,
                // Its folder's name in the task's output, not where the server keeps it.
                path: Path::new(&path)
                    .file_name()
                    .map_or(path.clone(), |n| n.to_string_lossy().into_owned()),
                at,
            },
            Ok(WorkerEvent::Status { .. }) => WorkerEvent::WorkerOutput {
                text: line.to_string(),
                at: Default::default(),
            },
            Ok(event) => event,
            Err(e) => {
                if !line.trim().is_empty() {
                    tracing::warn!(task_id = %task.task_id, error = %e, "a worker line that is not an event");
                }
                WorkerEvent::WorkerOutput {
                    text: line.to_string(),
                    at: Default::default(),
                }
            }
        };
        self.record(task, event.clone(), Some(offset)).await;
        match &event {
            WorkerEvent::Error { message, .. } => state.last_error = Some(message.clone()),
            WorkerEvent::Done { .. } => state.done = true,
            WorkerEvent::Stopped { .. } => state.stopped = true,
            _ => {}
        }
        if !apply_event(progress, &event) {
            return;
        }
        if let WorkerEvent::Log { at, metrics, .. } = &event {
            let point = MetricPoint {
                step: progress.current_step,
                loss: progress.loss,
                learning_rate: progress.learning_rate,
                epoch: progress.epoch,
                t: at.t.unwrap_or(0.0),
                extra: metrics
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64().filter(|v| v.is_finite())?)))
                    .take(32)
                    .collect(),
            };
            if let Err(e) = self.store.add_metric(&task.task_id, &point).await {
                tracing::warn!(task_id = %task.task_id, error = %e, "could not record a metric");
            }
        }
        // Only the progress changes: a status written meanwhile (cancelling) stays.
        let progress = progress.clone();
        let updated = self
            .store
            .tasks()
            .update(&task.owner, &task.task_id, move |current| {
                current.progress = progress.clone();
                current.updated_at = OffsetDateTime::now_utc();
                true
            })
            .await;
        if let Err(e) = updated {
            tracing::warn!(task_id = %task.task_id, error = %e, "could not record progress");
        }
    }

    async fn register_model(&self, task: &Task) -> Result<String> {
        let kind = match task.spec.finetuning_type {
            FinetuningType::Lora => ModelKind::Adapter,
            FinetuningType::Full | FinetuningType::Freeze => ModelKind::Full,
        };
        let record = self
            .models
            .register_trained(
                &task.owner,
                &task.spec.name,
                kind,
                &task.spec.model_name,
                // PiSSA trains against a base it changed: the adapter to keep is the one
                // LlamaFactory converted to an ordinary LoRA over the unchanged base.
                &if task.spec.pissa {
                    task.output_dir().join("pissa_converted")
                } else {
                    task.output_dir().to_path_buf()
                },
                crate::models::TrainedWith {
                    task_id: task.task_id.clone(),
                    template: Some(task.spec.template.clone()).filter(|t| !t.is_empty()),
                    system: task.spec.system.clone(),
                },
            )
            .await?;
        Ok(record.model_id)
    }

    /// Asks a running task's worker to stop and save (SIGUSR1: a checkpoint at the next
    /// step end), and terminates its process group if it has not exited after the grace
    /// period (SIGTERM, then SIGKILL 5 s later).
    pub async fn request_stop(&self, task: &Task) -> Result<()> {
        let pid = {
            let mut running = self.lock_running();
            running.get_mut(&task.task_id).map(|r| {
                r.cancel_requested = true;
                r.pid
            })
        };
        let Some(pid) = pid else {
            return Err(Error::conflict(
                "not_supervised",
                "the task's worker is not supervised by this server",
            ));
        };
        self.record(task, WorkerEvent::status(StatusChange::Cancelling), None)
            .await;
        if pid == 0 {
            // Starting: `start` stops it as soon as its process exists.
            tracing::info!(task_id = %task.task_id, "cancel requested while the worker starts");
            return Ok(());
        }
        signal(pid, Signal::SIGUSR1);
        let grace = self.settings.cancel_grace;
        tokio::spawn(async move { terminate_after(pid, grace).await });
        tracing::info!(task_id = %task.task_id, pid, "cancel requested: stop and save");
        Ok(())
    }

    /// Re-attaches to workers a previous server process left running; tasks whose worker is
    /// gone become `failed` (`interrupted`, resumable from their last checkpoint).
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        for record in self.store.tasks().list_all().await? {
            if record.status != TaskStatus::Running {
                continue;
            }
            let task = Task::from_record(record)?;
            match task.pid {
                Some(pid) if is_our_worker(pid, &task) => {
                    tracing::info!(task_id = %task.task_id, pid, "re-attaching to a running worker");
                    self.lock_running().insert(
                        task.task_id.clone(),
                        Running {
                            owner: task.owner.clone(),
                            pid,
                            gpus: task.gpu_ids.clone(),
                            cancel_requested: false,
                            last_heard: Instant::now(),
                        },
                    );
                    let offset = self
                        .events
                        .worker_offset(&task.task_id, task.task_dir())
                        .await
                        .unwrap_or(0);
                    let this = self.clone();
                    tokio::spawn(async move { this.supervise(task, pid, None, offset).await });
                }
                _ => {
                    let probe = task.clone();
                    let has_ckpt =
                        tokio::task::spawn_blocking(move || probe.latest_checkpoint().is_some())
                            .await
                            .unwrap_or(false);
                    let advice = if has_ckpt {
                        "resume it to continue from its last checkpoint"
                    } else {
                        "clone it to run it again"
                    };
                    tracing::warn!(task_id = %task.task_id, "task interrupted by a restart: marked failed");
                    self.finish(
                        &task.task_id,
                        TaskStatus::Failed,
                        Some(format!(
                            "interrupted: the worker stopped while the server was down; {advice}"
                        )),
                        None,
                    )
                    .await;
                }
            }
        }
        Ok(())
    }

    /// Records a task's final state (with a diagnosis when it failed) and announces it.
    pub async fn finish(
        &self,
        task_id: &str,
        status: TaskStatus,
        error: Option<String>,
        model_id: Option<String>,
    ) {
        let task = match self.store.tasks().get_any(task_id).await {
            Ok(Some(record)) => match Task::from_record(record) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(task_id, error = %e, "could not read a finished task");
                    return;
                }
            },
            _ => return,
        };
        let diagnosis = if status == TaskStatus::Failed {
            let log_tail = read_log_tail(&task, 200).await.unwrap_or_default();
            diagnose::diagnose(error.as_deref().unwrap_or(""), &log_tail)
        } else {
            None
        };
        let now = OffsetDateTime::now_utc();
        let (err, diag, model) = (error.clone(), diagnosis.clone(), model_id.clone());
        let stored = self
            .store
            .tasks()
            .update(&task.owner, task_id, move |t| {
                t.status = status;
                t.error = err.clone();
                t.diagnosis = diag.clone();
                if model.is_some() {
                    t.model_id = model.clone();
                }
                t.pid = None;
                t.gpu_ids.clear();
                t.finished_at = Some(now);
                t.updated_at = now;
                if status == TaskStatus::Completed && t.progress.total_steps > 0 {
                    t.progress.current_step = t.progress.total_steps;
                    t.progress.percentage = 100.0;
                    t.progress.eta_s = Some(0.0);
                }
                true
            })
            .await;
        let mut paused_job = false;
        match stored {
            Ok(Some(t)) => {
                paused_job = t.job.as_ref().is_some_and(|j| j.paused);
                tracing::info!(
                    task_id,
                    status = status.as_str(),
                    error = t.error.as_deref().unwrap_or(""),
                    "task finished"
                )
            }
            Ok(None) => return,
            Err(e) => tracing::error!(task_id, error = %e, "could not record a task's end"),
        }
        let mut event = WorkerEvent::status(status.into());
        if let WorkerEvent::Status {
            error: e,
            diagnosis: d,
            model_id: m,
            paused: p,
            ..
        } = &mut event
        {
            *e = error;
            *d = diagnosis;
            *m = model_id;
            *p = paused_job && status == TaskStatus::Cancelled;
        }
        self.record(&task, event, None).await;
    }
}

/// The LlamaFactory arguments of a task's run (an evaluation's: of its last pass).
pub fn run_args(task: &Task) -> serde_json::Map<String, serde_json::Value> {
    run_passes(task).pop().unwrap_or_default()
}

/// The `run_exp` calls of a task's run, in order.
pub fn run_passes(task: &Task) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let device = if task.gpu_ids.is_empty() && task.spec.gpus == 0 {
        spec::Device::Cpu
    } else {
        spec::Device::Gpu {
            bf16: crate::system::bf16_supported(&task.gpu_ids),
        }
    };
    let mut passes = spec::llamafactory_passes(&task.spec, &task.paths, device);
    if let Some(ckpt) = &task.resume_from
        && task.spec.evaluation.is_none()
        && let Some(args) = passes.first_mut()
    {
        args.insert("resume_from_checkpoint".into(), serde_json::json!(ckpt));
    }
    passes
}

async fn read_exit_file(task: &Task) -> Option<i32> {
    let bytes = tokio::fs::read(task.task_dir().join("exit.json"))
        .await
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["code"]
        .as_i64()
        .and_then(|c| i32::try_from(c).ok())
}

/// Cancel escalation: the worker had `grace` to stop and save; then SIGTERM to its group,
/// and SIGKILL 5 s later.
async fn terminate_after(pid: u32, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if signal_group(pid, Signal::SIGTERM) {
        tracing::warn!(pid, "worker did not stop in time: SIGTERM");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    if signal_group(pid, Signal::SIGKILL) {
        tracing::warn!(pid, "worker group still alive: SIGKILL");
    }
}

/// Whether `pid` is still this task's worker (pids get reused).
fn is_our_worker(pid: u32, task: &Task) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    String::from_utf8_lossy(&cmdline).contains(&task.task_id)
}
