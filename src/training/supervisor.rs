//! Starting workers and following them. A worker appends its events to the task's
//! `worker.jsonl`; the supervisor tails that file (not a pipe) and relays each line into the
//! task's event log with the file offset it reached, so a server that restarts can pick a
//! surviving worker up exactly where it left off. It ends when the worker exits: through
//! `wait` for its own children, through `kill(pid, 0)` and `exit.json` for adopted ones.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};

use super::{Running, Trainer, apply_event, spec::FinetuningType, worker_events_path};
use crate::error::{Error, Result};
use crate::store::{MetricPoint, ModelKind, ModelRecord, Task, TaskStatus, new_id};
use crate::system::{alive, signal_group};
use crate::worker::{EXIT_STOPPED, Job};

/// How often the events file is polled.
const POLL: Duration = Duration::from_millis(50);
/// Seconds between heartbeats the worker writes.
const HEARTBEAT_SECS: f64 = 10.0;

impl Trainer {
    pub(super) async fn start(self: &Arc<Self>, mut task: Task, gpus: Vec<u32>) -> Result<()> {
        let task_dir = PathBuf::from(&task.paths.task_dir);
        tokio::fs::create_dir_all(&task_dir).await?;
        let log_file = task_dir.join("train.log");
        let exit_file = task_dir.join("exit.json");
        let _ = tokio::fs::remove_file(&exit_file).await;
        task.gpu_ids = gpus.clone();
        let env = self.env.env();
        let job = Job {
            task_id: task.task_id.clone(),
            args: self.run_args(&task),
            env_dir: env.dir.clone(),
            site_packages: env.site_packages(),
            events_file: worker_events_path(&task),
            exit_file,
            heartbeat_secs: HEARTBEAT_SECS,
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
            .env("HF_HOME", self.data_dir.join("cache").join("huggingface"))
            .env("RUST_LOG", "warn")
            .process_group(0)
            .kill_on_drop(false);
        if !self.gpus.is_empty() {
            let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
            cmd.env("CUDA_VISIBLE_DEVICES", list.join(","));
        }
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            // Workers share the CPU cores: oversubscribed OpenMP threads spin against each
            // other and can make every step many times slower.
            let cores = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            cmd.env(
                "OMP_NUM_THREADS",
                (cores / self.max_concurrent).max(1).to_string(),
            );
        }

        // Each run's worker writes a file of its own.
        match tokio::fs::remove_file(worker_events_path(&task)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);

        task.status = TaskStatus::Running;
        task.pid = Some(pid);
        task.error = None;
        task.diagnosis = None;
        task.started_at = Some(OffsetDateTime::now_utc());
        task.updated_at = OffsetDateTime::now_utc();
        self.store.tasks().put(&task).await?;
        self.lock_running().insert(
            task.task_id.clone(),
            Running {
                owner: task.owner.clone(),
                pid,
                gpus: gpus.clone(),
                cancel_requested: false,
            },
        );
        tracing::info!(task_id = %task.task_id, pid, ?gpus, "worker started");
        // The log reads the new worker's file from its start.
        self.record_event_at(
            &task,
            json!({"type": "status", "status": "running", "gpus": gpus}),
            Some(0),
        )
        .await;

        let this = self.clone();
        tokio::spawn(async move {
            this.supervise_from(task, pid, Some(child), 0).await;
        });
        Ok(())
    }

    /// Follows an adopted worker from where the task's log stopped reading its file.
    pub(super) async fn supervise(
        self: Arc<Self>,
        task: Task,
        pid: u32,
        child: Option<tokio::process::Child>,
    ) {
        let offset = self
            .events
            .worker_offset(&task.task_id, Path::new(&task.paths.task_dir))
            .await
            .unwrap_or(0);
        self.supervise_from(task, pid, child, offset).await;
    }

    async fn supervise_from(
        self: Arc<Self>,
        task: Task,
        pid: u32,
        mut child: Option<tokio::process::Child>,
        start_offset: u64,
    ) {
        let task_id = task.task_id.clone();
        let path = worker_events_path(&task);
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
                && f.seek(std::io::SeekFrom::Start(start_offset)).await.is_ok()
            {
                reader = Some(BufReader::new(f));
            }
            if let Some(r) = reader.as_mut() {
                while let Ok(n) = r.read_line(&mut partial).await {
                    if n == 0 || !partial.ends_with('\n') {
                        break;
                    }
                    let line = std::mem::take(&mut partial);
                    offset += line.len() as u64;
                    last_activity = Instant::now();
                    self.handle_line(&task, offset, line.trim_end(), &mut progress, &mut state)
                        .await;
                }
            }
            let exited = match child.as_mut() {
                Some(c) => match c.try_wait() {
                    Ok(Some(status)) => Some(status_code(&status)),
                    Ok(None) => None,
                    Err(_) => Some(None),
                },
                None if !alive(pid as i32) => Some(read_exit_file(&task).await),
                None => None,
            };
            if let Some(code) = exited {
                // Lines written just before the exit.
                if let Some(r) = reader.as_mut() {
                    while let Ok(n) = r.read_line(&mut partial).await {
                        if n == 0 {
                            break;
                        }
                        if partial.ends_with('\n') {
                            let line = std::mem::take(&mut partial);
                            offset += line.len() as u64;
                            self.handle_line(
                                &task,
                                offset,
                                line.trim_end(),
                                &mut progress,
                                &mut state,
                            )
                            .await;
                        }
                    }
                }
                break code;
            }
            if last_activity.elapsed() > self.heartbeat_timeout && !stuck {
                stuck = true;
                tracing::warn!(task_id = %task_id, pid, "worker stopped reporting: killing it");
                signal_group(pid, libc::SIGKILL);
            }
            tokio::time::sleep(POLL).await;
        };
        // Nothing of the worker's process group may outlive it.
        signal_group(pid, libc::SIGKILL);

        let cancel_requested = self
            .lock_running()
            .get(&task_id)
            .is_some_and(|r| r.cancel_requested);
        let (status, error, model_id) = if state.done && exit_code == Some(0) {
            match self.register_model(&task_id, &task.owner).await {
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
                    self.heartbeat_timeout.as_secs()
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
        self.wake.notify_one();
    }

    /// Relays one line of the worker's file (ending at `offset`) into the task's log and
    /// applies it to the task's progress.
    async fn handle_line(
        &self,
        task: &Task,
        offset: u64,
        line: &str,
        progress: &mut crate::store::Progress,
        state: &mut RunState,
    ) {
        let event = match serde_json::from_str::<Value>(line) {
            Ok(mut v) if v.is_object() => {
                // The worker's process id is the server's business, not the client's.
                if let Some(obj) = v.as_object_mut() {
                    obj.remove("pid");
                }
                v
            }
            _ => {
                // Not an event: the log still records that the file moved on.
                if !line.trim().is_empty() {
                    tracing::warn!(task_id = %task.task_id, "a worker line that is not a JSON object");
                }
                json!({"type": "worker_output", "text": line})
            }
        };
        if let Err(e) = self
            .events
            .append(
                &task.task_id,
                Path::new(&task.paths.task_dir),
                event.clone(),
                Some(offset),
            )
            .await
        {
            tracing::warn!(task_id = %task.task_id, error = %e, "could not record a worker event");
        }
        match event["type"].as_str().unwrap_or("") {
            "error" => state.last_error = event["message"].as_str().map(str::to_string),
            "done" => state.done = true,
            "stopped" => state.stopped = true,
            _ => {}
        }
        if !apply_event(progress, &event) {
            return;
        }
        if event["type"] == "log" {
            let point = MetricPoint {
                step: progress.current_step,
                loss: progress.loss,
                learning_rate: progress.learning_rate,
                epoch: progress.epoch,
                t: event["t"].as_f64().unwrap_or(0.0),
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

    /// Registers a finished task's output as the owner's model. The files are hard-linked
    /// into `<data_dir>/models/<owner>/<model_id>/`, so the model outlives the task's outputs
    /// (deletion, retention) at no copying cost.
    async fn register_model(&self, task_id: &str, owner: &str) -> Result<String> {
        let task = self
            .store
            .tasks()
            .get(owner, task_id)
            .await?
            .ok_or_else(|| Error::not_found("task"))?;
        let out = PathBuf::from(&task.paths.output_dir);
        let (kind, marker) = match task.spec.finetuning_type {
            FinetuningType::Lora => (ModelKind::Adapter, "adapter_model.safetensors"),
            FinetuningType::Full => (ModelKind::Full, "config.json"),
        };
        if !out.join(marker).is_file() {
            return Err(Error::internal(format!(
                "{marker} is missing from {}",
                out.display()
            )));
        }
        let model_id = new_id();
        let dir = self.data_dir.join("models").join(owner).join(&model_id);
        let size = link_top_files(&out, &dir).await?;
        let record = ModelRecord {
            model_id: model_id.clone(),
            owner: owner.to_string(),
            name: task.spec.name.clone(),
            model_path: dir.to_string_lossy().into_owned(),
            kind,
            base_model: task.spec.model_name.clone(),
            task_id: Some(task_id.to_string()),
            size,
            created_at: OffsetDateTime::now_utc(),
        };
        if let Err(e) = self.store.models().put(&record).await {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e.into());
        }
        Ok(model_id)
    }
}

#[derive(Default)]
struct RunState {
    done: bool,
    stopped: bool,
    last_error: Option<String>,
}

fn status_code(status: &std::process::ExitStatus) -> Option<i32> {
    status.code()
}

async fn read_exit_file(task: &Task) -> Option<i32> {
    let bytes = tokio::fs::read(Path::new(&task.paths.task_dir).join("exit.json"))
        .await
        .ok()?;
    serde_json::from_slice::<Value>(&bytes).ok()?["code"]
        .as_i64()
        .map(|c| c as i32)
}

/// Hard-links (or copies, across file systems) the files directly in `from` into `to`;
/// returns their total size.
async fn link_top_files(from: &Path, to: &Path) -> Result<u64> {
    tokio::fs::create_dir_all(to).await?;
    let mut size = 0;
    let mut entries = tokio::fs::read_dir(from).await?;
    while let Some(e) = entries.next_entry().await? {
        let meta = e.metadata().await?;
        if !meta.is_file() {
            continue;
        }
        let target = to.join(e.file_name());
        if tokio::fs::hard_link(e.path(), &target).await.is_err() {
            tokio::fs::copy(e.path(), &target).await?;
        }
        size += meta.len();
    }
    Ok(size)
}

/// Cancel escalation: the worker had `grace` to stop and save; then SIGTERM to its group,
/// and SIGKILL 5 s later.
pub(super) async fn terminate_after(pid: u32, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive(pid as i32) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if signal_group(pid, libc::SIGTERM) {
        tracing::warn!(pid, "worker did not stop in time: SIGTERM");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    if signal_group(pid, libc::SIGKILL) {
        tracing::warn!(pid, "worker group still alive: SIGKILL");
    }
}

/// Whether `pid` is still this task's worker (pids get reused).
pub(super) fn is_our_worker(pid: u32, task: &Task) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains(&task.task_id)
}
