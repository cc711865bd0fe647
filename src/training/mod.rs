//! Training as a service: task submission and validation, a persistent priority queue with
//! global and per-user limits and GPU assignment, workers supervised through their events
//! file (so a restarted server re-attaches to workers that outlived it), live fan-out of
//! events, cancel / resume / clone / delete, failure diagnosis, and retention.

pub mod artifacts;
pub mod diagnose;
pub mod events;
pub mod spec;
mod supervisor;

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use crate::config::Config;
use crate::error::{Error, Kind, Result};
use crate::pyenv::EnvTracker;
use crate::store::{Dataset, MetricPoint, Progress, Store, Task, TaskStatus, new_id};
pub use events::TaskEvent;
use spec::{RunPaths, TaskRequest};

/// Lines of the log returned by default.
pub const DEFAULT_LOG_TAIL: usize = 500;

/// A worker this process supervises.
struct Running {
    owner: String,
    pid: u32,
    gpus: Vec<u32>,
    cancel_requested: bool,
}

pub struct Trainer {
    store: Store,
    data_dir: PathBuf,
    models_dir: PathBuf,
    max_concurrent: usize,
    max_per_user: usize,
    gpus: Vec<u32>,
    heartbeat_timeout: Duration,
    cancel_grace: Duration,
    retention: Option<Duration>,
    env: EnvTracker,
    wake: tokio::sync::Notify,
    running: Mutex<HashMap<String, Running>>,
    events: events::EventLog,
}

impl Trainer {
    pub fn new(store: Store, config: &Config, env: EnvTracker) -> Arc<Trainer> {
        let gpus = if config.gpu_ids.is_empty() {
            crate::system::gpus().iter().map(|g| g.index).collect()
        } else {
            config.gpu_ids.clone()
        };
        let max_concurrent = match config.max_concurrent_tasks {
            0 => gpus.len().max(1),
            n => n,
        };
        Arc::new(Trainer {
            store,
            data_dir: config.data_dir.clone(),
            models_dir: config.models_dir.clone(),
            max_concurrent,
            max_per_user: config.max_running_per_user.max(1),
            gpus,
            heartbeat_timeout: Duration::from_secs(config.heartbeat_timeout_secs),
            cancel_grace: Duration::from_secs(config.cancel_grace_secs),
            retention: (config.retention_days > 0)
                .then(|| Duration::from_secs(config.retention_days * 86_400)),
            env,
            wake: tokio::sync::Notify::new(),
            running: Mutex::new(HashMap::new()),
            events: events::EventLog::new(),
        })
    }

    pub fn env(&self) -> &EnvTracker {
        &self.env
    }

    pub fn gpu_ids(&self) -> &[u32] {
        &self.gpus
    }

    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    fn tasks_dir(&self) -> PathBuf {
        self.data_dir.join("tasks")
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pids of the workers this process supervises, by task id.
    pub fn running_workers(&self) -> Vec<(String, u32, Vec<u32>)> {
        self.lock_running()
            .iter()
            .map(|(id, r)| (id.clone(), r.pid, r.gpus.clone()))
            .collect()
    }

    // ---- events -------------------------------------------------------------------------

    /// The task's live events (subscribe before reading the history, then skip ids seen).
    pub fn subscribe(&self, task: &Task) -> broadcast::Receiver<TaskEvent> {
        self.events
            .subscribe(&task.task_id, Path::new(&task.paths.task_dir))
    }

    /// Events recorded after `after`.
    pub async fn events_since(&self, task: &Task, after: u64) -> Result<Vec<TaskEvent>> {
        self.events
            .since(Path::new(&task.paths.task_dir), after)
            .await
    }

    /// The id of the last event recorded.
    pub async fn last_event_id(&self, task: &Task) -> Result<u64> {
        self.events
            .last_id(&task.task_id, Path::new(&task.paths.task_dir))
            .await
    }

    /// Records a server-side event (status changes) in the task's log and publishes it.
    async fn record_event(&self, task: &Task, event: Value) {
        self.record_event_at(task, event, None).await;
    }

    async fn record_event_at(&self, task: &Task, mut event: Value, worker_offset: Option<u64>) {
        let now = OffsetDateTime::now_utc();
        event["ts"] = json!((now.unix_timestamp_nanos() / 1_000_000) as f64 / 1000.0);
        if let Err(e) = self
            .events
            .append(
                &task.task_id,
                Path::new(&task.paths.task_dir),
                event,
                worker_offset,
            )
            .await
        {
            tracing::warn!(task_id = %task.task_id, error = %e, "could not record an event");
        }
    }

    // ---- submission ---------------------------------------------------------------------

    /// Validates a request and queues the task.
    pub async fn submit(&self, owner: &str, request: TaskRequest) -> Result<Task> {
        let dataset_id = request.dataset_id.clone();
        let dataset_path = request.dataset_path.clone();
        let output_dir = request.output_dir.clone();
        let mut spec = request.into_spec()?;
        let output_rel = match output_dir
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            None => PathBuf::from("output"),
            Some(rel) => {
                let rel = Path::new(rel);
                if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_)))
                {
                    return Err(Error::new(
                        Kind::Invalid,
                        "invalid_spec",
                        "output_dir: must be a relative path inside the task's folder (no `..`)",
                    ));
                }
                rel.to_path_buf()
            }
        };
        let dataset = self
            .resolve_dataset(owner, dataset_id.as_deref(), dataset_path.as_deref())
            .await?;
        if spec.gpus as usize > self.gpus.len().max(1) && !self.gpus.is_empty() {
            return Err(Error::new(
                Kind::Invalid,
                "invalid_spec",
                format!("gpus: this machine has {} GPU(s)", self.gpus.len()),
            ));
        }
        if self.gpus.is_empty() {
            // CPU-only machine: the task runs on the CPU.
            spec.gpus = 0;
        }

        let base = crate::models::find_base_model(&self.models_dir, &spec.model_name)?.ok_or_else(
            || {
                let known = crate::models::list_base_models(&self.models_dir)
                    .map(|v| v.into_iter().map(|m| m.name).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                Error::new(
                    Kind::Invalid,
                    "model_not_found",
                    format!(
                        "model_name: no base model named `{}` (available: {known})",
                        spec.model_name
                    ),
                )
            },
        )?;
        let model_dir = base.hf_dir.clone().ok_or_else(|| {
            Error::new(
                Kind::Invalid,
                "model_not_trainable",
                format!(
                    "model_name: `{}` has no Hugging Face weights (config.json) to train",
                    base.name
                ),
            )
        })?;
        if spec.template.is_empty() {
            let has_template = has_chat_template(&model_dir);
            spec.template =
                spec::choose_template(&base.name, base.model_type.as_deref(), has_template).into();
        }

        let task_id = new_id();
        let task_dir = self.tasks_dir().join(&task_id);
        let paths = RunPaths {
            model_dir: model_dir.to_string_lossy().into_owned(),
            dataset_file: dataset.file_path.clone(),
            dataset_format: dataset.format,
            dataset_container: dataset.container,
            dataset_columns: dataset.columns.clone(),
            task_dir: task_dir.to_string_lossy().into_owned(),
            output_dir: task_dir.join(output_rel).to_string_lossy().into_owned(),
        };
        let now = OffsetDateTime::now_utc();
        let task = Task {
            task_id,
            owner: owner.to_string(),
            spec,
            dataset_id: Some(dataset.file_id.clone()),
            paths,
            status: TaskStatus::Queued,
            progress: Progress::default(),
            error: None,
            diagnosis: None,
            model_id: None,
            pid: None,
            gpu_ids: Vec::new(),
            resume_from: None,
            outputs_removed: false,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
        };
        let written = async {
            tokio::fs::create_dir_all(&task_dir).await?;
            let info = serde_json::to_vec_pretty(&spec::dataset_info(&task.paths))
                .map_err(Error::internal)?;
            tokio::fs::write(task_dir.join("dataset_info.json"), info).await?;
            self.store.tasks().put(&task).await?;
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = written {
            // Nothing half-written stays behind.
            let _ = tokio::fs::remove_dir_all(&task_dir).await;
            return Err(e);
        }
        self.record_event(&task, json!({"type": "status", "status": "queued"}))
            .await;
        tracing::info!(task_id = %task.task_id, owner, model = %task.spec.model_name, "task queued");
        self.wake.notify_one();
        Ok(task)
    }

    async fn resolve_dataset(
        &self,
        owner: &str,
        id: Option<&str>,
        path: Option<&str>,
    ) -> Result<Dataset> {
        match (id.filter(|s| !s.is_empty()), path.filter(|s| !s.is_empty())) {
            (Some(id), _) => self.store.datasets().get(owner, id).await?.ok_or_else(|| {
                Error::new(
                    Kind::Invalid,
                    "dataset_not_found",
                    "dataset_id: no such dataset",
                )
            }),
            (None, Some(path)) => {
                // A path must be the file of one of the caller's datasets: it is then inside
                // the data dir, validated, and theirs.
                let wanted =
                    crate::text::resolve_client_path(&self.data_dir, path).ok_or_else(|| {
                        Error::new(
                            Kind::Invalid,
                            "dataset_not_found",
                            "dataset_path: must be the file_path of one of your uploaded datasets",
                        )
                    })?;
                self.store
                    .datasets()
                    .list(owner)
                    .await?
                    .into_iter()
                    .find(|d| Path::new(&d.file_path) == wanted)
                    .ok_or_else(|| {
                        Error::new(
                            Kind::Invalid,
                            "dataset_not_found",
                            "dataset_path: must be the file_path of one of your uploaded datasets",
                        )
                    })
            }
            (None, None) => Err(Error::new(
                Kind::Invalid,
                "invalid_spec",
                "dataset_id or dataset_path is required",
            )),
        }
    }

    pub async fn list(&self, owner: &str) -> Result<Vec<Task>> {
        Ok(self.store.tasks().list(owner).await?)
    }

    pub async fn get(&self, owner: &str, task_id: &str) -> Result<Task> {
        self.store
            .tasks()
            .get(owner, task_id)
            .await?
            .ok_or_else(|| Error::not_found("task"))
    }

    /// Queue positions (1 = next to start) of every queued task, by id.
    pub async fn queue_positions(&self) -> Result<HashMap<String, usize>> {
        Ok(self
            .queued_in_order()
            .await?
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t.task_id, i + 1))
            .collect())
    }

    async fn queued_in_order(&self) -> Result<Vec<Task>> {
        let mut queued: Vec<Task> = self
            .store
            .tasks()
            .list_all()
            .await?
            .into_iter()
            .filter(|t| t.status == TaskStatus::Queued)
            .collect();
        queued.sort_by(|a, b| {
            b.spec
                .priority
                .cmp(&a.spec.priority)
                .then(a.created_at.cmp(&b.created_at))
                .then(a.task_id.cmp(&b.task_id))
        });
        Ok(queued)
    }

    /// Whether a queued or running task of the owner uses the dataset.
    pub async fn dataset_in_use(&self, owner: &str, dataset_id: &str) -> Result<bool> {
        Ok(self
            .store
            .tasks()
            .list(owner)
            .await?
            .iter()
            .any(|t| t.status.is_active() && t.dataset_id.as_deref() == Some(dataset_id)))
    }

    /// The exact LlamaFactory configuration of the task, as YAML.
    pub fn config_yaml(&self, task: &Task) -> String {
        spec::to_yaml(&self.run_args(task))
    }

    fn run_args(&self, task: &Task) -> serde_json::Map<String, Value> {
        let mut args = spec::llamafactory_args(
            &task.spec,
            &task.paths,
            !task.gpu_ids.is_empty() || task.spec.gpus > 0,
        );
        if let Some(ckpt) = &task.resume_from {
            args.insert("resume_from_checkpoint".into(), json!(ckpt));
        }
        args
    }

    /// The last `tail` lines of the task's log (empty before it starts).
    pub async fn logs(&self, task: &Task, tail: usize) -> Result<String> {
        let path = Path::new(&task.paths.task_dir).join("train.log");
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(tail_lines(&String::from_utf8_lossy(&bytes), tail)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn metrics(&self, task: &Task) -> Result<Vec<MetricPoint>> {
        Ok(self.store.metrics(&task.task_id).await?)
    }

    // ---- control ------------------------------------------------------------------------

    /// Cancels a queued task at once; asks a running one to stop and save, then terminates
    /// its process group if it has not exited within the grace period. Returns the status
    /// the task has now (`cancelled`, or still `running` while it stops).
    pub async fn cancel(self: &Arc<Self>, owner: &str, task_id: &str) -> Result<TaskStatus> {
        let mut task = self.get(owner, task_id).await?;
        match task.status {
            TaskStatus::Queued => {
                task.status = TaskStatus::Cancelled;
                task.finished_at = Some(OffsetDateTime::now_utc());
                task.updated_at = OffsetDateTime::now_utc();
                self.store.tasks().put(&task).await?;
                self.record_event(&task, json!({"type": "status", "status": "cancelled"}))
                    .await;
                Ok(TaskStatus::Cancelled)
            }
            TaskStatus::Running => {
                let pid = {
                    let mut running = self.lock_running();
                    match running.get_mut(task_id) {
                        Some(r) => {
                            r.cancel_requested = true;
                            Some(r.pid)
                        }
                        None => None,
                    }
                };
                let Some(pid) = pid else {
                    return Err(Error::conflict(
                        "not_supervised",
                        "the task's worker is not supervised by this server",
                    ));
                };
                self.record_event(&task, json!({"type": "status", "status": "cancelling"}))
                    .await;
                // SAFETY: `pid` is our worker; SIGUSR1 = stop and save at the next step end.
                unsafe {
                    libc::kill(pid as i32, libc::SIGUSR1);
                }
                let grace = self.cancel_grace;
                tokio::spawn(async move {
                    supervisor::terminate_after(pid, grace).await;
                });
                tracing::info!(task_id, pid, "cancel requested: stop and save");
                Ok(TaskStatus::Running)
            }
            other => Err(Error::conflict(
                "not_active",
                format!(
                    "the task is {}; only queued or running tasks can be cancelled",
                    other.as_str()
                ),
            )),
        }
    }

    /// The newest `checkpoint-N` folder of a task's output, if any.
    pub fn latest_checkpoint(task: &Task) -> Option<(u64, PathBuf)> {
        std::fs::read_dir(&task.paths.output_dir)
            .ok()?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let step: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
                e.path()
                    .join("trainer_state.json")
                    .is_file()
                    .then(|| (step, e.path()))
            })
            .max_by_key(|(step, _)| *step)
    }

    /// Queues a failed or cancelled task again, continuing from its latest checkpoint.
    pub async fn resume(&self, owner: &str, task_id: &str) -> Result<Task> {
        let mut task = self.get(owner, task_id).await?;
        if !matches!(task.status, TaskStatus::Failed | TaskStatus::Cancelled) {
            return Err(Error::conflict(
                "not_resumable",
                format!(
                    "the task is {}; only failed or cancelled tasks can be resumed",
                    task.status.as_str()
                ),
            ));
        }
        let (step, ckpt) = Self::latest_checkpoint(&task).ok_or_else(|| {
            Error::conflict(
                "no_checkpoint",
                "the task has no checkpoint to resume from; clone it to start again",
            )
        })?;
        task.status = TaskStatus::Queued;
        task.resume_from = Some(ckpt.to_string_lossy().into_owned());
        task.error = None;
        task.diagnosis = None;
        task.finished_at = None;
        task.updated_at = OffsetDateTime::now_utc();
        self.store.tasks().put(&task).await?;
        self.record_event(
            &task,
            json!({"type": "status", "status": "queued", "resume_from_step": step}),
        )
        .await;
        self.wake.notify_one();
        Ok(task)
    }

    /// A new queued task with the same specification, with `overrides` (any task field)
    /// applied.
    pub async fn clone_task(&self, owner: &str, task_id: &str, overrides: Value) -> Result<Task> {
        let task = self.get(owner, task_id).await?;
        let mut body = serde_json::to_value(&task.spec).map_err(Error::internal)?;
        body["dataset_id"] = json!(task.dataset_id);
        body["name"] = json!(format!("{} (copy)", task.spec.name));
        if let Some(obj) = overrides.as_object() {
            if obj.contains_key("model_name") && !obj.contains_key("template") {
                body["template"] = json!("");
            }
            if obj.contains_key("dataset_path") && !obj.contains_key("dataset_id") {
                body["dataset_id"] = Value::Null;
            }
            for (k, v) in obj {
                body[k] = v.clone();
            }
        } else if !overrides.is_null() {
            return Err(Error::bad_request(
                "the body must be a JSON object of fields to change",
            ));
        }
        let request: TaskRequest = serde_json::from_value(body)
            .map_err(|e| Error::new(Kind::Invalid, "invalid_body", e.to_string()))?;
        self.submit(owner, request).await
    }

    /// Deletes a finished task: its record, metrics and files (a registered model keeps its
    /// own files).
    pub async fn delete(&self, owner: &str, task_id: &str) -> Result<()> {
        let task = self.get(owner, task_id).await?;
        if task.status.is_active() {
            return Err(Error::conflict(
                "task_active",
                "cancel the task before deleting it",
            ));
        }
        self.store.tasks().remove(owner, task_id).await?;
        self.store.remove_metrics(task_id).await?;
        self.store.flush().await?;
        if let Err(e) = tokio::fs::remove_dir_all(&task.paths.task_dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(task_id, error = %e, "could not remove a task's files");
        }
        self.events.forget(task_id);
        Ok(())
    }

    // ---- background ---------------------------------------------------------------------

    /// Starts the scheduler (queued tasks start whenever a slot and GPUs are free and the
    /// environment is ready) and the retention sweep.
    pub fn spawn_background(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let this = self.clone();
        let scheduler = tokio::spawn(async move {
            let ready = this.env.ready_signal();
            loop {
                if let Err(e) = this.start_queued().await {
                    tracing::error!(error = %e, "scheduler");
                }
                tokio::select! {
                    _ = this.wake.notified() => {}
                    _ = ready.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
        let this = self.clone();
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tick.tick().await;
                match this.sweep_outputs().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(tasks = n, "removed expired task outputs"),
                    Err(e) => tracing::warn!(error = %e, "retention sweep failed"),
                }
            }
        });
        vec![scheduler, sweeper]
    }

    async fn start_queued(self: &Arc<Self>) -> Result<()> {
        if !self.env.is_ready() {
            return Ok(());
        }
        for task in self.queued_in_order().await? {
            let gpus = {
                let running = self.lock_running();
                if running.len() >= self.max_concurrent {
                    break;
                }
                let mine = running.values().filter(|r| r.owner == task.owner).count();
                if mine >= self.max_per_user {
                    continue;
                }
                let busy: Vec<u32> = running
                    .values()
                    .flat_map(|r| r.gpus.iter().copied())
                    .collect();
                let free: Vec<u32> = self
                    .gpus
                    .iter()
                    .copied()
                    .filter(|g| !busy.contains(g))
                    .collect();
                let want = task.spec.gpus as usize;
                if want > free.len() {
                    // Strict order: a task waiting for GPUs is not overtaken.
                    break;
                }
                free[..want].to_vec()
            };
            let task_id = task.task_id.clone();
            if let Err(e) = self.start(task, gpus).await {
                tracing::error!(task_id = %task_id, error = %e, "could not start a worker");
                self.finish(
                    &task_id,
                    TaskStatus::Failed,
                    Some(format!("could not start the worker: {}", e.message)),
                    None,
                )
                .await;
            }
        }
        Ok(())
    }

    /// Re-attaches to workers a previous server process left running; tasks whose worker is
    /// gone become `failed` (`interrupted`, resumable from their last checkpoint).
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        for task in self.store.tasks().list_all().await? {
            if task.status != TaskStatus::Running {
                continue;
            }
            match task.pid {
                Some(pid) if supervisor::is_our_worker(pid, &task) => {
                    tracing::info!(task_id = %task.task_id, pid, "re-attaching to a running worker");
                    self.lock_running().insert(
                        task.task_id.clone(),
                        Running {
                            owner: task.owner.clone(),
                            pid,
                            gpus: task.gpu_ids.clone(),
                            cancel_requested: false,
                        },
                    );
                    let this = self.clone();
                    tokio::spawn(async move { this.supervise(task, pid, None).await });
                }
                _ => {
                    let has_ckpt = Self::latest_checkpoint(&task).is_some();
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

    /// Removes outputs of tasks finished longer ago than the retention period.
    pub async fn sweep_outputs(&self) -> Result<usize> {
        let Some(retention) = self.retention else {
            return Ok(0);
        };
        let cutoff = OffsetDateTime::now_utc() - retention;
        let mut n = 0;
        for mut task in self.store.tasks().list_all().await? {
            let expired = !task.status.is_active()
                && !task.outputs_removed
                && task.finished_at.is_some_and(|t| t < cutoff);
            if !expired {
                continue;
            }
            if let Err(e) = tokio::fs::remove_dir_all(&task.paths.output_dir).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(task_id = %task.task_id, error = %e, "could not remove outputs");
                continue;
            }
            task.outputs_removed = true;
            task.updated_at = OffsetDateTime::now_utc();
            self.store.tasks().put(&task).await?;
            n += 1;
        }
        Ok(n)
    }

    /// Records a task's final state (with a diagnosis when it failed) and announces it.
    async fn finish(
        &self,
        task_id: &str,
        status: TaskStatus,
        error: Option<String>,
        model_id: Option<String>,
    ) {
        let Ok(Some(mut task)) = self.store.tasks().get_any(task_id).await else {
            return;
        };
        if status == TaskStatus::Failed {
            let log_tail = self.logs(&task, 200).await.unwrap_or_default();
            task.diagnosis = diagnose::diagnose(error.as_deref().unwrap_or(""), &log_tail);
        }
        task.status = status;
        task.error = error;
        if model_id.is_some() {
            task.model_id = model_id;
        }
        task.pid = None;
        task.gpu_ids.clear();
        let now = OffsetDateTime::now_utc();
        task.finished_at = Some(now);
        task.updated_at = now;
        if status == TaskStatus::Completed && task.progress.total_steps > 0 {
            task.progress.current_step = task.progress.total_steps;
            task.progress.percentage = 100.0;
            task.progress.eta_s = Some(0.0);
        }
        match self.store.tasks().put(&task).await {
            Ok(()) => tracing::info!(
                task_id,
                status = status.as_str(),
                error = task.error.as_deref().unwrap_or(""),
                "task finished"
            ),
            Err(e) => tracing::error!(task_id, error = %e, "could not record a task's end"),
        }
        self.record_event(
            &task,
            json!({"type": "status", "status": status, "error": task.error, "diagnosis": task.diagnosis, "model_id": task.model_id}),
        )
        .await;
    }
}

/// Where the task's worker writes its events.
fn worker_events_path(task: &Task) -> PathBuf {
    events::worker_path(Path::new(&task.paths.task_dir))
}

/// Updates `progress` from one worker event; true when it changed.
pub fn apply_event(progress: &mut Progress, event: &Value) -> bool {
    let t = event["t"].as_f64();
    let step = event["step"].as_u64();
    let total = event["total_steps"].as_u64();
    let mut changed = false;
    if let Some(total) = total.filter(|t| *t > 0) {
        progress.total_steps = total;
        changed = true;
    }
    if let Some(step) = step {
        progress.current_step = step;
        changed = true;
    }
    if let Some(epoch) = event["epoch"].as_f64() {
        progress.epoch = epoch;
    }
    if event["type"] == "log" {
        progress.loss = event["loss"].as_f64().or(progress.loss);
        progress.learning_rate = event["learning_rate"].as_f64().or(progress.learning_rate);
        changed = true;
    }
    if let Some(t) = t {
        progress.elapsed_s = t;
    }
    if changed && progress.total_steps > 0 {
        progress.percentage =
            (progress.current_step as f64 / progress.total_steps as f64 * 100.0).min(100.0);
        progress.percentage = (progress.percentage * 10.0).round() / 10.0;
        progress.eta_s = (progress.current_step > 0).then(|| {
            let per_step = progress.elapsed_s / progress.current_step as f64;
            (per_step * progress.total_steps.saturating_sub(progress.current_step) as f64 * 10.0)
                .round()
                / 10.0
        });
    }
    changed
}

fn has_chat_template(model_dir: &Path) -> bool {
    if model_dir.join("chat_template.jinja").is_file() {
        return true;
    }
    std::fs::read(model_dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| v.get("chat_template").is_some_and(|t| !t.is_null()))
}

/// The last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = lines[start..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_follows_events() {
        let mut p = Progress::default();
        assert!(apply_event(
            &mut p,
            &json!({"type": "train_begin", "total_steps": 8, "t": 1.0})
        ));
        assert_eq!(p.total_steps, 8);
        apply_event(
            &mut p,
            &json!({"type": "step", "step": 2, "total_steps": 8, "epoch": 0.5, "t": 3.0}),
        );
        assert_eq!(p.current_step, 2);
        assert_eq!(p.percentage, 25.0);
        assert_eq!(p.elapsed_s, 3.0);
        assert_eq!(p.eta_s, Some(9.0));
        apply_event(
            &mut p,
            &json!({"type": "log", "step": 2, "loss": 1.5, "learning_rate": 1e-4, "epoch": 0.5, "t": 3.1}),
        );
        assert_eq!(p.loss, Some(1.5));
        assert_eq!(p.learning_rate, Some(1e-4));
        assert!(!apply_event(&mut p, &json!({"type": "starting", "pid": 1})));
    }

    #[test]
    fn tails() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail_lines("", 2), "");
        assert_eq!(tail_lines("a", 5), "a\n");
    }
}
