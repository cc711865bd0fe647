//! Training as a service: task submission and validation, a scheduler that starts
//! `ferrotune worker` processes when a slot is free and the Python environment is ready, and
//! a supervisor that turns their events into progress, metrics, a final status and — on
//! success — a registered adapter model.

pub mod diagnose;
pub mod spec;

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::config::Config;
use crate::error::{Error, Kind, Result};
use crate::pyenv::EnvTracker;
use crate::store::{
    Dataset, MetricPoint, ModelKind, ModelRecord, Progress, Store, Task, TaskStatus, new_id,
};
use crate::worker::Job;
use spec::{FinetuningType, RunPaths, TaskRequest};

/// Lines of the log returned by default.
pub const DEFAULT_LOG_TAIL: usize = 500;

pub struct Trainer {
    store: Store,
    data_dir: PathBuf,
    models_dir: PathBuf,
    max_concurrent: usize,
    env: EnvTracker,
    wake: tokio::sync::Notify,
    /// task id → worker pid, for the tasks this process supervises.
    running: Mutex<HashMap<String, u32>>,
}

impl Trainer {
    pub fn new(store: Store, config: &Config, env: EnvTracker) -> Arc<Trainer> {
        Arc::new(Trainer {
            store,
            data_dir: config.data_dir.clone(),
            models_dir: config.models_dir.clone(),
            max_concurrent: config.max_concurrent_tasks.max(1),
            env,
            wake: tokio::sync::Notify::new(),
            running: Mutex::new(HashMap::new()),
        })
    }

    pub fn env(&self) -> &EnvTracker {
        &self.env
    }

    fn tasks_dir(&self) -> PathBuf {
        self.data_dir.join("tasks")
    }

    /// Tasks left `running` by a previous server process have no supervisor any more: they
    /// become `failed` (reason `interrupted`).
    pub async fn recover(&self) -> Result<()> {
        for mut task in self.store.tasks().list_all()? {
            if task.status == TaskStatus::Running {
                if let Some(pid) = task.pid {
                    // SAFETY: kill with a pid recorded by this service; signal 0 only probes.
                    // A worker still alive from a crashed server is stopped: its events pipe
                    // is gone, so nobody could supervise it.
                    unsafe {
                        if libc::kill(-(pid as i32), 0) == 0 {
                            libc::kill(-(pid as i32), libc::SIGTERM);
                        }
                    }
                }
                task.status = TaskStatus::Failed;
                task.error = Some("interrupted: the server stopped while this task ran".into());
                task.diagnosis = Some(
                    "The task was interrupted by a server restart; clone it to run it again."
                        .into(),
                );
                task.pid = None;
                task.finished_at = Some(OffsetDateTime::now_utc());
                task.updated_at = OffsetDateTime::now_utc();
                self.store.tasks().put(&task).await?;
                tracing::warn!(task_id = %task.task_id, "task interrupted by a restart marked failed");
            }
        }
        Ok(())
    }

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
        let dataset =
            self.resolve_dataset(owner, dataset_id.as_deref(), dataset_path.as_deref())?;

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
        let output = task_dir.join(output_rel);
        let paths = RunPaths {
            model_dir: model_dir.to_string_lossy().into_owned(),
            dataset_file: dataset.file_path.clone(),
            dataset_format: dataset.format,
            dataset_container: dataset.container,
            dataset_columns: dataset.columns.clone(),
            task_dir: task_dir.to_string_lossy().into_owned(),
            output_dir: output.to_string_lossy().into_owned(),
        };
        tokio::fs::create_dir_all(&task_dir).await?;
        let info =
            serde_json::to_vec_pretty(&spec::dataset_info(&paths)).map_err(Error::internal)?;
        tokio::fs::write(task_dir.join("dataset_info.json"), info).await?;

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
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
        };
        if let Err(e) = self.store.tasks().put(&task).await {
            let _ = tokio::fs::remove_dir_all(&task_dir).await;
            return Err(e.into());
        }
        tracing::info!(task_id = %task.task_id, owner, model = %task.spec.model_name, "task queued");
        self.wake.notify_one();
        Ok(task)
    }

    fn resolve_dataset(
        &self,
        owner: &str,
        id: Option<&str>,
        path: Option<&str>,
    ) -> Result<Dataset> {
        match (id.filter(|s| !s.is_empty()), path.filter(|s| !s.is_empty())) {
            (Some(id), _) => self.store.datasets().get(owner, id)?.ok_or_else(|| {
                Error::new(
                    Kind::Invalid,
                    "dataset_not_found",
                    "dataset_id: no such dataset",
                )
            }),
            (None, Some(path)) => {
                // A path must be the file of one of the caller's datasets: it is then inside
                // the data dir, validated, and theirs.
                let wanted = std::path::absolute(path)
                    .map_err(|_| Error::invalid("dataset_path: not a path"))?;
                self.store
                    .datasets()
                    .list(owner)?
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

    pub fn list(&self, owner: &str) -> Result<Vec<Task>> {
        Ok(self.store.tasks().list(owner)?)
    }

    pub fn get(&self, owner: &str, task_id: &str) -> Result<Task> {
        self.store
            .tasks()
            .get(owner, task_id)?
            .ok_or_else(|| Error::not_found("task"))
    }

    /// The exact LlamaFactory configuration of the task, as YAML.
    pub fn config_yaml(&self, task: &Task) -> String {
        spec::to_yaml(&spec::llamafactory_args(&task.spec, &task.paths, false))
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

    pub fn metrics(&self, task: &Task) -> Result<Vec<MetricPoint>> {
        Ok(self.store.metrics(&task.task_id)?)
    }

    /// Starts the scheduler: it starts queued tasks whenever a slot is free and the
    /// environment is ready.
    pub fn spawn_scheduler(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
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
        })
    }

    async fn start_queued(self: &Arc<Self>) -> Result<()> {
        if !self.env.is_ready() {
            return Ok(());
        }
        let mut queued: Vec<Task> = self
            .store
            .tasks()
            .list_all()?
            .into_iter()
            .filter(|t| t.status == TaskStatus::Queued)
            .collect();
        queued.sort_by(|a, b| {
            b.spec
                .priority
                .cmp(&a.spec.priority)
                .then(a.created_at.cmp(&b.created_at))
        });
        for task in queued {
            let busy = self.running.lock().map(|r| r.len()).unwrap_or(usize::MAX);
            if busy >= self.max_concurrent {
                break;
            }
            let task_id = task.task_id.clone();
            if let Err(e) = self.start(task).await {
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

    async fn start(self: &Arc<Self>, mut task: Task) -> Result<()> {
        let task_dir = PathBuf::from(&task.paths.task_dir);
        tokio::fs::create_dir_all(&task_dir).await?;
        let log_file = task_dir.join("train.log");
        let env = self.env.env();
        let job = Job {
            task_id: task.task_id.clone(),
            args: spec::llamafactory_args(&task.spec, &task.paths, false),
            env_dir: env.dir.clone(),
            site_packages: env.site_packages(),
            log_file: log_file.clone(),
        };
        let job_path = task_dir.join("job.json");
        tokio::fs::write(
            &job_path,
            serde_json::to_vec_pretty(&job).map_err(Error::internal)?,
        )
        .await?;
        let early_log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)?;

        let exe = std::env::current_exe()?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("worker")
            .arg("--job")
            .arg(&job_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(early_log))
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONNOUSERSITE", "1")
            .env("DISABLE_VERSION_CHECK", "1")
            .env("TOKENIZERS_PARALLELISM", "false")
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", self.data_dir.join("cache").join("huggingface"))
            .env("RUST_LOG", "warn")
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::internal("worker stdout missing"))?;

        task.status = TaskStatus::Running;
        task.pid = Some(pid);
        task.started_at = Some(OffsetDateTime::now_utc());
        task.updated_at = OffsetDateTime::now_utc();
        self.store.tasks().put(&task).await?;
        if let Ok(mut r) = self.running.lock() {
            r.insert(task.task_id.clone(), pid);
        }
        tracing::info!(task_id = %task.task_id, pid, "worker started");

        let this = self.clone();
        tokio::spawn(async move {
            this.supervise(task, child, stdout).await;
        });
        Ok(())
    }

    /// Reads the worker's events until it exits, then settles the task.
    async fn supervise(
        self: Arc<Self>,
        task: Task,
        mut child: tokio::process::Child,
        stdout: tokio::process::ChildStdout,
    ) {
        let task_id = task.task_id.clone();
        let owner = task.owner.clone();
        let events_path = Path::new(&task.paths.task_dir).join("events.jsonl");
        let mut events_file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&events_path)
            .await
            .ok();
        let mut lines = BufReader::new(stdout).lines();
        let mut last_error: Option<String> = None;
        let mut done = false;
        let mut progress = task.progress.clone();
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                tracing::debug!(task_id = %task_id, line = %line, "non-event output from the worker");
                continue;
            };
            if let Some(f) = events_file.as_mut() {
                let _ = f.write_all(line.as_bytes()).await;
                let _ = f.write_all(b"\n").await;
            }
            match event["type"].as_str().unwrap_or("") {
                "error" => last_error = event["message"].as_str().map(str::to_string),
                "done" => done = true,
                _ => {}
            }
            if apply_event(&mut progress, &event) {
                if event["type"] == "log" {
                    let point = MetricPoint {
                        step: progress.current_step,
                        loss: progress.loss,
                        learning_rate: progress.learning_rate,
                        epoch: progress.epoch,
                        t: event["t"].as_f64().unwrap_or(0.0),
                    };
                    if let Err(e) = self.store.add_metric(&task_id, &point) {
                        tracing::warn!(task_id = %task_id, error = %e, "could not record a metric");
                    }
                }
                if let Ok(Some(mut current)) = self.store.tasks().get(&owner, &task_id) {
                    current.progress = progress.clone();
                    current.updated_at = OffsetDateTime::now_utc();
                    if let Err(e) = self.store.tasks().put(&current).await {
                        tracing::warn!(task_id = %task_id, error = %e, "could not record progress");
                    }
                }
            }
        }
        let status = child.wait().await;
        let exit = match &status {
            Ok(s) => s.code(),
            Err(_) => None,
        };
        if let Some(f) = events_file.as_mut() {
            let _ = f.flush().await;
        }
        let success = done && exit == Some(0);
        if success {
            match self.register_model(&task_id, &owner).await {
                Ok(model_id) => {
                    self.finish(&task_id, TaskStatus::Completed, None, Some(model_id))
                        .await;
                }
                Err(e) => {
                    self.finish(
                        &task_id,
                        TaskStatus::Failed,
                        Some(format!(
                            "training finished but its output could not be registered: {}",
                            e.message
                        )),
                        None,
                    )
                    .await;
                }
            }
        } else {
            let error = last_error.unwrap_or_else(|| match &status {
                Ok(s) => describe_exit(s),
                Err(e) => format!("could not wait for the worker: {e}"),
            });
            self.finish(&task_id, TaskStatus::Failed, Some(error), None)
                .await;
        }
        if let Ok(mut r) = self.running.lock() {
            r.remove(&task_id);
        }
        self.wake.notify_one();
    }

    /// Records a task's final state (with a diagnosis when it failed).
    async fn finish(
        &self,
        task_id: &str,
        status: TaskStatus,
        error: Option<String>,
        model_id: Option<String>,
    ) {
        let Ok(Some(mut task)) = self.store.tasks().get_any(task_id) else {
            return;
        };
        if status == TaskStatus::Failed {
            let log_tail = self.logs(&task, 200).await.unwrap_or_default();
            task.diagnosis = diagnose::diagnose(error.as_deref().unwrap_or(""), &log_tail);
        }
        task.status = status;
        task.error = error;
        task.model_id = model_id;
        task.pid = None;
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
    }

    /// Registers a finished task's output as the owner's model.
    async fn register_model(&self, task_id: &str, owner: &str) -> Result<String> {
        let task = self
            .store
            .tasks()
            .get(owner, task_id)?
            .ok_or_else(|| Error::not_found("task"))?;
        let out = PathBuf::from(&task.paths.output_dir);
        let (kind, marker) = match task.spec.finetuning_type {
            FinetuningType::Lora => (ModelKind::Adapter, "adapter_model.safetensors"),
            FinetuningType::Full => (ModelKind::Full, "config.json"),
        };
        if !out.join(marker).is_file() {
            return Err(Error::internal(format!(
                "{} is missing from {}",
                marker,
                out.display()
            )));
        }
        let record = ModelRecord {
            model_id: new_id(),
            owner: owner.to_string(),
            name: task.spec.name.clone(),
            model_path: out.to_string_lossy().into_owned(),
            kind,
            base_model: task.spec.model_name.clone(),
            task_id: Some(task_id.to_string()),
            size: dir_size_top(&out),
            created_at: OffsetDateTime::now_utc(),
        };
        self.store.models().put(&record).await?;
        Ok(record.model_id)
    }
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

fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("the worker exited with code {code}"),
        (None, Some(sig)) => format!("the worker was killed by signal {sig}"),
        _ => "the worker ended abnormally".into(),
    }
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

/// Bytes of the files directly in `dir` (an adapter's own files; checkpoints excluded).
fn dir_size_top(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
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
    use serde_json::json;

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
