//! Training as a service: task submission and validation, the persistent queue and its
//! scheduler, workers supervised through their events files (a restarted server re-attaches
//! to workers that outlived it), each task's event log with live fan-out, cancel / resume /
//! clone / delete, failure diagnosis, and retention.
//!
//! - [`Training`] (this file): the service handlers and the command line call.
//! - [`queue`]: which queued task starts next, on which GPUs, under which limits.
//! - [`supervisor`]: worker processes, from spawn to their final status.
//! - [`events`]: each task's event log (the one id assigner) and the typed worker protocol.
//! - [`task`]: the task itself; [`spec`]: what a request may ask and what LlamaFactory gets.

pub mod artifacts;
pub mod compare;
pub mod diagnose;
pub mod evaluation;
pub mod events;
pub mod lf_args;
pub mod queue;
pub mod spec;
mod supervisor;
pub mod task;
mod templates;

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use crate::config::Config;
use crate::datasets::{Dataset, Datasets};
use crate::error::{Error, Kind, Result};
use crate::locks::OwnerLocks;
use crate::models::Registry;
use crate::pyenv::EnvTracker;
use crate::store::{Store, new_id};
use events::EventLog;
pub use events::{StatusChange, TaskEvent, WorkerEvent};
use queue::{Limits, Queue};
use spec::{RunPaths, TaskRequest};
use supervisor::{Settings, Supervisor};
pub use task::{MetricPoint, Progress, Task, TaskStatus};

/// Lines of the log returned by default.
pub const DEFAULT_LOG_TAIL: usize = 500;

/// The training service.
pub struct Training {
    store: Store,
    data_dir: PathBuf,
    datasets: Datasets,
    models: Arc<Registry>,
    env: EnvTracker,
    queue: Arc<Queue>,
    supervisor: Arc<Supervisor>,
    events: Arc<EventLog>,
    /// Submissions, dataset deletions and account deletions of one user do not interleave.
    owners: Arc<OwnerLocks>,
    retention: Option<Duration>,
    /// Completed tasks that asked for an evaluation (from the supervisor).
    completed: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
    /// LlamaFactory's parser fields, for `extra_args`.
    lf_args: lf_args::ArgCache,
}

impl Training {
    pub fn new(
        store: Store,
        config: &Config,
        env: EnvTracker,
        datasets: Datasets,
        models: Arc<Registry>,
        owners: Arc<OwnerLocks>,
        notices: crate::notify::Notices,
    ) -> Arc<Training> {
        let gpus = if config.gpu_ids.is_empty() {
            crate::system::gpus().iter().map(|g| g.index).collect()
        } else {
            config.gpu_ids.clone()
        };
        let max_concurrent = match config.max_concurrent_tasks {
            0 => gpus.len().max(1),
            n => n,
        };
        let has_gpus = !gpus.is_empty();
        if has_gpus {
            // Asked once here, at start, where blocking is allowed; cached for the runs.
            let caps = crate::system::compute_capabilities();
            tracing::info!(
                ?caps,
                "GPU compute capabilities (precision `auto` uses bf16 from 8.0)"
            );
        }
        let queue = Arc::new(Queue::new(
            store.clone(),
            Limits {
                max_concurrent,
                max_per_user: config.max_running_per_user.max(1),
                gpus,
            },
        ));
        let events = Arc::new(EventLog::new());
        let (completed_tx, completed_rx) = tokio::sync::mpsc::unbounded_channel();
        let supervisor = Supervisor::new(
            store.clone(),
            events.clone(),
            models.clone(),
            env.clone(),
            queue.clone(),
            Settings {
                data_dir: config.data_dir.clone(),
                heartbeat_timeout: Duration::from_secs(config.heartbeat_timeout_secs),
                cancel_grace: Duration::from_secs(config.cancel_grace_secs),
                max_concurrent,
                has_gpus,
                notices,
                log_max_bytes: config.log_max_bytes(),
                log_keep: config.log_file_count,
            },
            completed_tx,
        );
        Arc::new(Training {
            store,
            data_dir: config.data_dir.clone(),
            datasets,
            models,
            env,
            queue,
            supervisor,
            events,
            owners,
            retention: (config.retention_days > 0)
                .then(|| Duration::from_secs(config.retention_days * 86_400)),
            completed: std::sync::Mutex::new(Some(completed_rx)),
            lf_args: lf_args::ArgCache::default(),
        })
    }

    pub fn env(&self) -> &EnvTracker {
        &self.env
    }

    pub fn gpu_ids(&self) -> &[u32] {
        &self.queue.limits().gpus
    }

    pub fn max_concurrent(&self) -> usize {
        self.queue.limits().max_concurrent
    }

    /// The workers this process supervises: (task id, pid, GPUs).
    pub fn running_workers(&self) -> Vec<(String, u32, Vec<u32>)> {
        self.supervisor.running_workers()
    }

    /// Running workers silent for `at_least` or more: task id, owner, how long.
    pub fn silent_workers(&self, at_least: Duration) -> Vec<(String, String, Duration)> {
        self.supervisor.silent_workers(at_least)
    }

    /// The ids of the tasks whose workers run.
    pub fn running_task_ids(&self) -> Vec<String> {
        self.supervisor.running_task_ids()
    }

    fn tasks_dir(&self) -> PathBuf {
        self.data_dir.join("tasks")
    }

    // ---- events -------------------------------------------------------------------------

    /// The status changes of every task, as notices (for webhooks).
    pub fn notices(&self) -> crate::notify::Notices {
        self.supervisor.notices.clone()
    }

    /// The task's live events (subscribe before reading the history, then skip ids seen).
    pub fn subscribe(&self, task: &Task) -> broadcast::Receiver<TaskEvent> {
        self.events.subscribe(&task.task_id, task.task_dir())
    }

    /// Events recorded after `after`.
    pub async fn events_since(&self, task: &Task, after: u64) -> Result<Vec<TaskEvent>> {
        self.events.since(task.task_dir(), after).await
    }

    /// The id of the last event recorded.
    pub async fn last_event_id(&self, task: &Task) -> Result<u64> {
        self.events.last_id(&task.task_id, task.task_dir()).await
    }

    // ---- tasks --------------------------------------------------------------------------

    /// Validates a request and queues the task.
    pub async fn submit(&self, owner: &str, request: TaskRequest) -> Result<Task> {
        self.submit_job(owner, request, None).await
    }

    /// [`Training::submit`] for a job of OpenAI's fine-tuning API: the task carries `job`.
    pub async fn submit_job(
        &self,
        owner: &str,
        request: TaskRequest,
        job: Option<crate::store::FineTuningJob>,
    ) -> Result<Task> {
        let dataset_id = request.dataset_id.clone();
        let dataset_path = request.dataset_path.clone();
        let output_dir = request.output_dir.clone();
        let stage_given = request.stage.is_some();
        let mut spec = request.into_spec()?;
        let output_rel = output_folder(output_dir.as_deref())?;
        // The dataset is looked up and the task recorded under the owner's lock, so a
        // dataset deletion cannot fall between the two.
        let _owner = self.owners.lock(owner).await;
        let dataset = self
            .resolve_dataset(owner, dataset_id.as_deref(), dataset_path.as_deref())
            .await?;
        spec::fit_stage(&mut spec, stage_given, dataset.kind)?;
        if !spec.extra_args.is_empty() {
            if !self.env.is_ready() {
                return Err(Error::new(
                    Kind::Unavailable,
                    "environment_not_ready",
                    "extra_args: checked against LlamaFactory's argument parser once the \
                     training environment is ready (GET /api/system/status); retry then",
                ));
            }
            let types = self.lf_args.get(self.env.env().python()).await?;
            lf_args::check(&spec.extra_args, &types)?;
        }
        if let Some(eval_id) = &spec.eval_dataset_id {
            let eval = self
                .resolve_dataset(owner, Some(eval_id), None)
                .await
                .map_err(|e| {
                    Error::new(e.kind, e.code, format!("eval_dataset_id: {}", e.message))
                })?;
            evaluation::require_answers(&eval, "eval_dataset_id")?;
        }
        let validation = match &spec.validation_dataset_id {
            None => None,
            Some(id) => {
                let v = self
                    .resolve_dataset(owner, Some(id), None)
                    .await
                    .map_err(|e| {
                        Error::new(
                            e.kind,
                            e.code,
                            format!("validation_dataset_id: {}", e.message),
                        )
                    })?;
                if v.kind != dataset.kind {
                    return Err(Error::new(
                        Kind::Invalid,
                        "invalid_spec",
                        format!(
                            "validation_dataset_id: `{}` holds {} data, the training data {}",
                            v.filename,
                            v.kind.as_str(),
                            dataset.kind.as_str()
                        ),
                    ));
                }
                Some(spec::DataFile {
                    file: v.file_path.to_string_lossy().into_owned(),
                    format: v.format,
                    kind: v.kind,
                    container: v.container,
                    columns: v.columns.clone(),
                })
            }
        };
        let gpus = self.gpu_ids().len();
        if let Some(missing) = spec.gpu_ids.iter().find(|i| !self.gpu_ids().contains(i)) {
            let known: Vec<String> = self.gpu_ids().iter().map(u32::to_string).collect();
            return Err(Error::new(
                Kind::Invalid,
                "invalid_spec",
                if known.is_empty() {
                    "gpu_ids: this machine has no GPU to hand out; leave gpu_ids empty".to_string()
                } else {
                    format!(
                        "gpu_ids: GPU {missing} is not one this server hands out ({})",
                        known.join(", ")
                    )
                },
            ));
        }
        if spec.gpus as usize > gpus.max(1) && gpus > 0 {
            return Err(Error::new(
                Kind::Invalid,
                "invalid_spec",
                format!("gpus: this machine has {gpus} GPU(s)"),
            ));
        }
        if spec.deepspeed.is_some() && gpus < 2 {
            return Err(Error::new(
                Kind::Invalid,
                "invalid_spec",
                format!(
                    "deepspeed: ZeRO shards a task across 2 or more GPUs; this machine hands out \
                     {gpus}"
                ),
            ));
        }
        if gpus == 0 {
            // CPU-only machine: the task runs on the CPU.
            spec.gpus = 0;
        }
        let base = match self.models.find_base(&spec.model_name).await? {
            Some(b) => b,
            None => {
                let known: Vec<String> = self
                    .models
                    .base_models()
                    .await?
                    .iter()
                    .map(|m| m.name.clone())
                    .collect();
                return Err(Error::new(
                    Kind::Invalid,
                    "model_not_found",
                    format!(
                        "model_name: no base model named `{}` (available: {})",
                        spec.model_name,
                        known.join(", ")
                    ),
                ));
            }
        };
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
            let dir = model_dir.clone();
            let has_template = tokio::task::spawn_blocking(move || has_chat_template(&dir)).await?;
            spec.template =
                spec::choose_template(&base.name, base.model_type.as_deref(), has_template).into();
        }

        let task_id = new_id();
        let task_dir = self.tasks_dir().join(&task_id);
        let paths = RunPaths {
            model_dir: model_dir.to_string_lossy().into_owned(),
            dataset_file: dataset.file_path.to_string_lossy().into_owned(),
            dataset_format: dataset.format,
            dataset_kind: dataset.kind,
            dataset_container: dataset.container,
            dataset_columns: dataset.columns.clone(),
            task_dir: task_dir.to_string_lossy().into_owned(),
            output_dir: task_dir.join(output_rel).to_string_lossy().into_owned(),
            validation,
        };
        let mut task = Task::queued(task_id, owner, spec, Some(dataset.file_id.clone()), paths);
        task.job = job;
        self.enqueue(task).await
    }

    /// Writes a new task's folder and record and wakes the scheduler. Nothing half-written
    /// stays behind on failure.
    async fn enqueue(&self, task: Task) -> Result<Task> {
        let task_dir = task.task_dir().to_path_buf();
        let written = async {
            tokio::fs::create_dir_all(&task_dir).await?;
            let info = serde_json::to_vec_pretty(&spec::dataset_info(&task.paths))
                .map_err(Error::internal)?;
            tokio::fs::write(task_dir.join("dataset_info.json"), info).await?;
            if let Some(stage) = task.spec.deepspeed {
                let config = serde_json::to_vec_pretty(&spec::deepspeed_config(stage))
                    .map_err(Error::internal)?;
                tokio::fs::write(task_dir.join(spec::deepspeed_config_name(stage)), config).await?;
            }
            self.store.tasks().put(&task.to_record()?).await?;
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = written {
            // Nothing half-written stays behind.
            let _ = tokio::fs::remove_dir_all(&task_dir).await;
            return Err(e);
        }
        self.supervisor
            .record(&task, WorkerEvent::status(StatusChange::Queued), None)
            .await;
        tracing::info!(task_id = %task.task_id, owner = %task.owner, evaluation = task.spec.evaluation.is_some(), model = %task.spec.model_name, "task queued");
        self.queue.wake();
        Ok(task)
    }

    async fn resolve_dataset(
        &self,
        owner: &str,
        id: Option<&str>,
        path: Option<&str>,
    ) -> Result<Dataset> {
        let not_found = |what: &'static str| Error::new(Kind::Invalid, "dataset_not_found", what);
        match (id.filter(|s| !s.is_empty()), path.filter(|s| !s.is_empty())) {
            (Some(id), _) => match self.datasets.get(owner, id).await {
                Ok(d) => Ok(d),
                Err(e) if e.kind == Kind::NotFound => Err(not_found("dataset_id: no such dataset")),
                Err(e) => Err(e),
            },
            // A path must be the file of one of the caller's datasets: it is then inside the
            // data dir, validated, and theirs.
            (None, Some(path)) => self
                .datasets
                .by_path(owner, &self.data_dir, path)
                .await?
                .ok_or_else(|| {
                    not_found(
                        "dataset_path: must be the file_path of one of your uploaded datasets",
                    )
                }),
            (None, None) => Err(Error::new(
                Kind::Invalid,
                "invalid_spec",
                "dataset_id or dataset_path is required",
            )),
        }
    }

    /// The owner's tasks, newest first.
    pub async fn list(&self, owner: &str) -> Result<Vec<Task>> {
        self.store
            .tasks()
            .list(owner)
            .await?
            .into_iter()
            .map(Task::from_record)
            .collect()
    }

    /// Every user's tasks (administrators).
    pub async fn list_all(&self) -> Result<Vec<Task>> {
        self.store
            .tasks()
            .list_all()
            .await?
            .into_iter()
            .map(Task::from_record)
            .collect()
    }

    /// The owner's task; another user's is "not found".
    pub async fn get(&self, owner: &str, task_id: &str) -> Result<Task> {
        let record = self
            .store
            .tasks()
            .get(owner, task_id)
            .await?
            .ok_or_else(|| Error::not_found("task"))?;
        Task::from_record(record)
    }

    /// The task `task_id` as `viewer` may see it: their own; any, for an administrator.
    pub async fn get_as(&self, viewer: &str, is_admin: bool, task_id: &str) -> Result<Task> {
        if is_admin && let Some(record) = self.store.tasks().get_any(task_id).await? {
            return Task::from_record(record);
        }
        self.get(viewer, task_id).await
    }

    /// Queue positions (1 = next to start) of every queued task, by id.
    pub async fn queue_positions(&self) -> Result<HashMap<String, usize>> {
        self.queue.positions().await
    }

    /// Deletes one of the owner's datasets unless a queued or running task uses it (checked
    /// under the owner's lock: no task can be submitted with it meanwhile).
    pub async fn delete_dataset(&self, owner: &str, dataset_id: &str) -> Result<Dataset> {
        let _owner = self.owners.lock(owner).await;
        let in_use = self.list(owner).await?.iter().any(|t| {
            t.status.is_active()
                && (t.dataset_id.as_deref() == Some(dataset_id)
                    || t.spec.validation_dataset_id.as_deref() == Some(dataset_id))
        });
        if in_use {
            return Err(Error::conflict(
                "dataset_in_use",
                "a queued or running task uses this dataset; cancel it first",
            ));
        }
        self.datasets.delete(owner, dataset_id).await
    }

    /// One of the task's outputs as a streamed `.tar.gz`: its file name and bytes.
    pub async fn artifact(
        &self,
        task: &Task,
        name: &str,
    ) -> Result<(String, artifacts::ArchiveStream)> {
        let artifact = artifacts::Artifact::parse(name).ok_or_else(|| {
            Error::not_found("artifact (use adapter, logs, bundle or checkpoint-N)")
        })?;
        let task = task.clone();
        tokio::task::spawn_blocking(move || artifacts::archive(&task, &artifact)).await?
    }

    /// The exact LlamaFactory configuration of the task, as YAML.
    pub fn config_yaml(&self, task: &Task) -> String {
        spec::to_yaml(&supervisor::run_args(task))
    }

    /// The last `tail` lines of the task's log (empty before it starts).
    pub async fn logs(&self, task: &Task, tail: usize) -> Result<String> {
        read_log_tail(task, tail).await
    }

    pub async fn metrics(&self, task: &Task) -> Result<Vec<MetricPoint>> {
        Ok(self.store.metrics(&task.task_id).await?)
    }

    // ---- control ------------------------------------------------------------------------

    /// Moves a queued task in the queue: its new priority (higher runs first, -100..=100).
    /// A task no longer queued is a 409 (it started or ended meanwhile).
    pub async fn set_priority(&self, task: &Task, priority: i32) -> Result<Task> {
        if !(-100..=100).contains(&priority) {
            return Err(Error::new(
                Kind::Invalid,
                "invalid_spec",
                "priority: must be between -100 and 100",
            ));
        }
        let not_queued = || {
            Error::conflict(
                "not_queued",
                "only a queued task's priority can change (it has started or ended)",
            )
        };
        if task.status != TaskStatus::Queued {
            return Err(not_queued());
        }
        let now = OffsetDateTime::now_utc();
        let updated = self
            .store
            .tasks()
            .update(&task.owner, &task.task_id, move |t| {
                if t.status != TaskStatus::Queued {
                    return false;
                }
                t.spec["priority"] = serde_json::json!(priority);
                t.updated_at = now;
                true
            })
            .await?
            .ok_or_else(|| Error::not_found("task"))?;
        if updated.status != TaskStatus::Queued {
            return Err(not_queued());
        }
        tracing::info!(task_id = %task.task_id, priority, "task priority changed");
        self.queue.wake();
        Task::from_record(updated)
    }

    /// Cancels a queued task at once; asks a running one to stop and save, then terminates
    /// its process group if it has not exited within the grace period. Returns the status
    /// the task has now (`cancelled`, or still `running` while it stops).
    pub async fn cancel(&self, task: &Task) -> Result<TaskStatus> {
        match task.status {
            TaskStatus::Queued => {
                let now = OffsetDateTime::now_utc();
                // Only if it is still queued (the scheduler may be starting it right now).
                let updated = self
                    .store
                    .tasks()
                    .update(&task.owner, &task.task_id, move |t| {
                        if t.status != TaskStatus::Queued {
                            return false;
                        }
                        t.status = TaskStatus::Cancelled;
                        t.finished_at = Some(now);
                        t.updated_at = now;
                        true
                    })
                    .await?
                    .ok_or_else(|| Error::not_found("task"))?;
                if updated.status == TaskStatus::Cancelled {
                    let mut event = WorkerEvent::status(StatusChange::Cancelled);
                    if let WorkerEvent::Status { paused, .. } = &mut event {
                        *paused = updated.job.as_ref().is_some_and(|j| j.paused);
                    }
                    self.supervisor.record(task, event, None).await;
                    return Ok(TaskStatus::Cancelled);
                }
                // It started meanwhile: stop it like a running one.
                let task = Task::from_record(updated)?;
                self.supervisor.request_stop(&task).await?;
                Ok(TaskStatus::Running)
            }
            TaskStatus::Running => {
                self.supervisor.request_stop(task).await?;
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

    /// Queues a failed or cancelled task again, continuing from its latest checkpoint.
    pub async fn resume(&self, task: &Task) -> Result<Task> {
        self.requeue(task, false).await
    }

    /// Pauses a queued or running task of the fine-tuning API: it stops like a cancelled
    /// one (a running one saves a checkpoint first) and its job reads `paused` until
    /// [`Training::unpause`]. Returns the task as it is now.
    pub async fn pause(&self, task: &Task) -> Result<Task> {
        if task.job.is_none() {
            return Err(Error::conflict(
                "not_a_job",
                "only tasks created through /v1/fine_tuning/jobs can be paused",
            ));
        }
        if !matches!(task.status, TaskStatus::Queued | TaskStatus::Running) {
            return Err(Error::conflict(
                "not_active",
                format!(
                    "the job is {}; only queued or running jobs can be paused",
                    task.status.as_str()
                ),
            ));
        }
        self.set_paused(task, true).await?;
        if let Err(e) = self.cancel(task).await {
            self.set_paused(task, false).await?;
            return Err(e);
        }
        self.get(&task.owner, &task.task_id).await
    }

    /// Queues a paused job again: from its latest checkpoint, or from the start when it was
    /// paused before saving one.
    pub async fn unpause(&self, task: &Task) -> Result<Task> {
        let paused = task.job.as_ref().is_some_and(|j| j.paused);
        if !paused || task.status != TaskStatus::Cancelled {
            return Err(Error::conflict(
                "not_paused",
                format!(
                    "the job is not paused (the task is {})",
                    task.status.as_str()
                ),
            ));
        }
        self.requeue(task, true).await
    }

    pub async fn set_paused(&self, task: &Task, paused: bool) -> Result<()> {
        self.store
            .tasks()
            .update(&task.owner, &task.task_id, move |t| match t.job.as_mut() {
                Some(job) if job.paused != paused => {
                    job.paused = paused;
                    true
                }
                _ => false,
            })
            .await?
            .ok_or_else(|| Error::not_found("task"))?;
        Ok(())
    }

    /// Queues a failed or cancelled task again from its latest checkpoint; with no
    /// checkpoint, from the start when `restart` (else a 409).
    async fn requeue(&self, task: &Task, restart: bool) -> Result<Task> {
        if !matches!(task.status, TaskStatus::Failed | TaskStatus::Cancelled) {
            return Err(Error::conflict(
                "not_resumable",
                format!(
                    "the task is {}; only failed or cancelled tasks can be resumed",
                    task.status.as_str()
                ),
            ));
        }
        let probe = task.clone();
        let latest = tokio::task::spawn_blocking(move || probe.latest_checkpoint()).await?;
        if latest.is_none() && !restart {
            return Err(Error::conflict(
                "no_checkpoint",
                "the task has no checkpoint to resume from; clone it to start again",
            ));
        }
        let step = latest.as_ref().map(|(step, _)| *step);
        let ckpt = latest.map(|(_, path)| path.to_string_lossy().into_owned());
        let now = OffsetDateTime::now_utc();
        let updated = self
            .store
            .tasks()
            .update(&task.owner, &task.task_id, move |t| {
                if !matches!(t.status, TaskStatus::Failed | TaskStatus::Cancelled) {
                    return false;
                }
                t.status = TaskStatus::Queued;
                t.resume_from = ckpt.clone();
                // Resumed from the web UI or the API alike: no longer paused.
                if let Some(job) = t.job.as_mut() {
                    job.paused = false;
                }
                t.error = None;
                t.diagnosis = None;
                t.finished_at = None;
                t.updated_at = now;
                true
            })
            .await?
            .ok_or_else(|| Error::not_found("task"))?;
        let task = Task::from_record(updated)?;
        if task.status != TaskStatus::Queued {
            return Err(Error::conflict(
                "not_resumable",
                format!("the task is {}", task.status.as_str()),
            ));
        }
        let mut event = WorkerEvent::status(StatusChange::Queued);
        if let WorkerEvent::Status {
            resume_from_step, ..
        } = &mut event
        {
            *resume_from_step = step;
        }
        self.supervisor.record(&task, event, None).await;
        self.queue.wake();
        Ok(task)
    }

    /// A new queued task with the same specification, with `overrides` (any task field)
    /// applied.
    pub async fn clone_task(&self, task: &Task, overrides: Value) -> Result<Task> {
        if task.spec.evaluation.is_some() {
            return Err(Error::new(
                Kind::Invalid,
                "not_a_training_task",
                "this is an evaluation: run another with POST /api/evaluations",
            ));
        }
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
        self.submit(&task.owner, request).await
    }

    /// Deletes a finished task: its record, metrics and files (a registered model keeps its
    /// own files).
    pub async fn delete(&self, task: &Task) -> Result<()> {
        if task.status.is_active() {
            return Err(Error::conflict(
                "task_active",
                "cancel the task before deleting it",
            ));
        }
        self.store
            .tasks()
            .remove(&task.owner, &task.task_id)
            .await?;
        self.store.remove_metrics(&task.task_id).await?;
        if let Err(e) = tokio::fs::remove_dir_all(task.task_dir()).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(task_id = %task.task_id, error = %e, "could not remove a task's files");
        }
        self.events.forget(&task.task_id);
        Ok(())
    }

    /// Deletes every task of a user (account deletion), refusing while any is queued or
    /// running. The caller holds the owner's lock.
    pub(crate) async fn delete_all_of(&self, owner: &str) -> Result<()> {
        let tasks = self.list(owner).await?;
        if tasks.iter().any(|t| t.status.is_active()) {
            return Err(Error::conflict(
                "user_has_active_tasks",
                "the user has queued or running tasks; cancel them first",
            ));
        }
        for t in &tasks {
            self.delete(t).await?;
        }
        Ok(())
    }

    /// The owner's lock (account deletion takes it around its whole cascade).
    pub(crate) fn owners(&self) -> &OwnerLocks {
        &self.owners
    }

    // ---- background ---------------------------------------------------------------------

    /// Re-attaches to (or fails) the tasks a previous server left running.
    pub async fn recover(&self) -> Result<()> {
        self.supervisor.recover().await
    }

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
                    _ = this.queue.woken() => {}
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
        let mut handles = vec![scheduler, sweeper];
        let completed = self
            .completed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut completed) = completed {
            let this = self.clone();
            handles.push(tokio::spawn(async move {
                while let Some(task_id) = completed.recv().await {
                    this.evaluate_after(&task_id).await;
                }
            }));
        }
        handles
    }

    async fn start_queued(&self) -> Result<()> {
        if !self.env.is_ready() {
            return Ok(());
        }
        let queued = self.queue.queued_in_order().await?;
        let running = self.supervisor.running_slots();
        for (task, gpus) in queue::admit(self.queue.limits(), &queued, &running) {
            let task_id = task.task_id.clone();
            if let Err(e) = self.supervisor.start(task.clone(), gpus).await {
                tracing::error!(task_id = %task_id, error = %e, "could not start a worker");
                self.supervisor
                    .finish(
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

    /// Removes outputs of tasks finished longer ago than the retention period.
    pub async fn sweep_outputs(&self) -> Result<usize> {
        let Some(retention) = self.retention else {
            return Ok(0);
        };
        let cutoff = OffsetDateTime::now_utc() - retention;
        let mut n = 0;
        for task in self.list_all().await? {
            let expired = !task.status.is_active()
                && !task.outputs_removed
                && task.finished_at.is_some_and(|t| t < cutoff);
            if !expired {
                continue;
            }
            if let Err(e) = tokio::fs::remove_dir_all(task.output_dir()).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(task_id = %task.task_id, error = %e, "could not remove outputs");
                continue;
            }
            self.store
                .tasks()
                .update(&task.owner, &task.task_id, |t| {
                    t.outputs_removed = true;
                    t.updated_at = OffsetDateTime::now_utc();
                    true
                })
                .await?;
            n += 1;
        }
        Ok(n)
    }
}

/// The task's output folder, relative to its own folder: `output`, or what the request
/// named — a relative path inside the task's folder. Seed 000's documented default
/// (`./saves/{user_id}/{model_name}/lora/sft`) is accepted: a leading `./` is dropped.
fn output_folder(requested: Option<&str>) -> Result<PathBuf> {
    let Some(rel) = requested.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(PathBuf::from("output"));
    };
    let invalid = || {
        Error::new(
            Kind::Invalid,
            "invalid_spec",
            "output_dir: must be a relative path inside the task's folder (no `..`)",
        )
    };
    let rel = Path::new(rel);
    if rel.is_absolute() {
        return Err(invalid());
    }
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return Err(invalid()),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(invalid());
    }
    Ok(out)
}

/// The last `n` lines of a task's log (empty before it starts), reaching into its rotated
/// files when the current one holds fewer.
pub async fn read_log_tail(task: &Task, n: usize) -> Result<String> {
    let path = task.log_path();
    Ok(
        tokio::task::spawn_blocking(move || crate::logs::tail(&path, n))
            .await
            .map_err(Error::internal)??,
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_folders_stay_inside_the_task() {
        assert_eq!(output_folder(None).unwrap(), PathBuf::from("output"));
        assert_eq!(
            output_folder(Some("./saves/u1/SmolLM2/lora/sft")).unwrap(),
            PathBuf::from("saves/u1/SmolLM2/lora/sft"),
            "seed 000's default"
        );
        for bad in ["../x", "/abs", "a/../../b", "."] {
            assert!(output_folder(Some(bad)).is_err(), "{bad}");
        }
    }
}
