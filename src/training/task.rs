//! A training task: its specification, the files its run uses, and its state.

use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use super::events::WorkerEvent;
use super::spec::{RunPaths, TaskSpec};
use crate::error::{Error, Result};
use crate::store::TaskRecord;
pub use crate::store::{MetricPoint, Progress, TaskStatus};

/// A task as the training service sees it (the store keeps it as a [`TaskRecord`]).
#[derive(Debug, Clone)]
pub struct Task {
    pub task_id: String,
    pub owner: String,
    pub spec: TaskSpec,
    pub dataset_id: Option<String>,
    pub paths: RunPaths,
    pub status: TaskStatus,
    pub progress: Progress,
    pub error: Option<String>,
    pub diagnosis: Option<String>,
    pub model_id: Option<String>,
    /// The worker's process id while it runs (never shown to clients).
    pub pid: Option<u32>,
    /// GPUs handed to the running worker.
    pub gpu_ids: Vec<u32>,
    /// The checkpoint the next run resumes from.
    pub resume_from: Option<String>,
    /// The retention sweep removed the outputs.
    pub outputs_removed: bool,
    /// An evaluation's scores, once it completed.
    pub eval_metrics: Option<crate::store::EvalMetrics>,
    /// Its face in OpenAI's fine-tuning API, for a task created there.
    pub job: Option<crate::store::FineTuningJob>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub started_at: Option<OffsetDateTime>,
    pub finished_at: Option<OffsetDateTime>,
}

impl Task {
    /// A new task, queued now.
    pub fn queued(
        task_id: String,
        owner: &str,
        spec: TaskSpec,
        dataset_id: Option<String>,
        paths: RunPaths,
    ) -> Task {
        let now = OffsetDateTime::now_utc();
        Task {
            task_id,
            owner: owner.to_string(),
            spec,
            dataset_id,
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
            eval_metrics: None,
            job: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
        }
    }

    /// The typed form of a stored record.
    pub fn from_record(r: TaskRecord) -> Result<Task> {
        let corrupt = |what: &str, e: serde_json::Error| {
            Error::internal(format!(
                "task {}: its stored {what} does not read: {e}",
                r.task_id
            ))
        };
        Ok(Task {
            spec: serde_json::from_value(r.spec.clone()).map_err(|e| corrupt("spec", e))?,
            paths: serde_json::from_value(r.paths.clone()).map_err(|e| corrupt("paths", e))?,
            task_id: r.task_id,
            owner: r.owner,
            dataset_id: r.dataset_id,
            status: r.status,
            progress: r.progress,
            error: r.error,
            diagnosis: r.diagnosis,
            model_id: r.model_id,
            pid: r.pid,
            gpu_ids: r.gpu_ids,
            resume_from: r.resume_from,
            outputs_removed: r.outputs_removed,
            eval_metrics: r.eval_metrics,
            job: r.job,
            created_at: r.created_at,
            updated_at: r.updated_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
        })
    }

    pub fn to_record(&self) -> Result<TaskRecord> {
        Ok(TaskRecord {
            task_id: self.task_id.clone(),
            owner: self.owner.clone(),
            spec: serde_json::to_value(&self.spec).map_err(Error::internal)?,
            dataset_id: self.dataset_id.clone(),
            paths: serde_json::to_value(&self.paths).map_err(Error::internal)?,
            status: self.status,
            progress: self.progress.clone(),
            error: self.error.clone(),
            diagnosis: self.diagnosis.clone(),
            model_id: self.model_id.clone(),
            pid: self.pid,
            gpu_ids: self.gpu_ids.clone(),
            resume_from: self.resume_from.clone(),
            outputs_removed: self.outputs_removed,
            eval_metrics: self.eval_metrics.clone(),
            job: self.job.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
        })
    }

    pub fn task_dir(&self) -> &Path {
        Path::new(&self.paths.task_dir)
    }

    pub fn output_dir(&self) -> &Path {
        Path::new(&self.paths.output_dir)
    }

    /// The run's log (what the worker and Python print).
    pub fn log_path(&self) -> PathBuf {
        self.task_dir().join("train.log")
    }

    /// The newest `checkpoint-N` folder of the task's output, if any (blocking: reads a
    /// folder).
    pub fn latest_checkpoint(&self) -> Option<(u64, PathBuf)> {
        self.checkpoints().into_iter().next_back()
    }

    /// Every complete checkpoint in the output folder (`checkpoint-N` with its trainer
    /// state), by step, oldest first. Blocking (reads the folder).
    pub fn checkpoints(&self) -> Vec<(u64, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(self.output_dir()) else {
            return Vec::new();
        };
        let mut found: Vec<(u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let step: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
                e.path()
                    .join("trainer_state.json")
                    .is_file()
                    .then(|| (step, e.path()))
            })
            .collect();
        found.sort_by_key(|(step, _)| *step);
        found
    }
}

/// Updates `progress` from one worker event; true when it changed.
pub fn apply_event(progress: &mut Progress, event: &WorkerEvent) -> bool {
    let mut changed = false;
    let (step, total, epoch, t) = event.position();
    if let Some(total) = total.filter(|t| *t > 0) {
        progress.total_steps = total;
        changed = true;
    }
    if let Some(step) = step {
        progress.current_step = step;
        changed = true;
    }
    if let Some(epoch) = epoch {
        progress.epoch = epoch;
    }
    if let WorkerEvent::Log {
        loss,
        learning_rate,
        ..
    } = event
    {
        progress.loss = loss.or(progress.loss);
        progress.learning_rate = learning_rate.or(progress.learning_rate);
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(v: serde_json::Value) -> WorkerEvent {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn progress_follows_events() {
        let mut p = Progress::default();
        assert!(apply_event(
            &mut p,
            &event(json!({"type": "train_begin", "total_steps": 8, "t": 1.0}))
        ));
        assert_eq!(p.total_steps, 8);
        apply_event(
            &mut p,
            &event(json!({"type": "step", "step": 2, "total_steps": 8, "epoch": 0.5, "t": 3.0})),
        );
        assert_eq!(p.current_step, 2);
        assert_eq!(p.percentage, 25.0);
        assert_eq!(p.elapsed_s, 3.0);
        assert_eq!(p.eta_s, Some(9.0));
        apply_event(
            &mut p,
            &event(
                json!({"type": "log", "step": 2, "loss": 1.5, "learning_rate": 1e-4, "epoch": 0.5, "t": 3.1}),
            ),
        );
        assert_eq!(p.loss, Some(1.5));
        assert_eq!(p.learning_rate, Some(1e-4));
        assert!(!apply_event(
            &mut p,
            &event(json!({"type": "starting", "pid": 1, "t": 0.1}))
        ));
    }
}
