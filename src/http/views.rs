//! What clients see: typed answers (each a schema in the OpenAPI document), built from the
//! services' types. Paths are shown relative (to the data dir, the models dir, the task's
//! folder) and no process id appears.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::AppState;
use crate::datasets::Dataset;
use crate::datasets::format::{Container, DatasetFormat, DatasetKind};
use crate::models::BaseModel;
use crate::store::{ApiKey, ModelKind, ModelRecord, User};
use crate::text::relative_path;
use crate::training::spec::TaskSpec;
use crate::training::{Progress, Task, TaskStatus};

/// A plain acknowledgement.
#[derive(Debug, Serialize, ToSchema)]
pub struct Message {
    pub message: String,
}

impl Message {
    pub fn new(message: impl Into<String>) -> Message {
        Message {
            message: message.into(),
        }
    }
}

/// What clients see of a user.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    pub user_id: String,
    pub username: String,
    pub email: String,
    /// The name shown for the account; absent: the username.
    pub display_name: Option<String>,
    /// `admin` or `user`.
    pub role: String,
    pub disabled: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl From<&User> for UserView {
    fn from(u: &User) -> Self {
        UserView {
            user_id: u.user_id.clone(),
            username: u.username.clone(),
            email: u.email.clone(),
            display_name: u.display_name.clone(),
            role: u.role.as_str().to_string(),
            disabled: u.disabled,
            created_at: u.created_at,
        }
    }
}

/// An API key, without its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub key_id: String,
    pub name: String,
    /// The secret's first characters, to recognise it.
    pub prefix: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl From<&ApiKey> for KeyView {
    fn from(k: &ApiKey) -> Self {
        KeyView {
            key_id: k.key_id.clone(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            created_at: k.created_at,
        }
    }
}

/// An uploaded dataset.
#[derive(Debug, Serialize, ToSchema)]
pub struct DatasetView {
    pub file_id: String,
    /// The client's file name (sanitised).
    pub filename: String,
    /// Where it is stored, relative to the server's data dir (`dataset_path` of a task may
    /// name it this way).
    pub file_path: String,
    pub size: u64,
    pub format: DatasetFormat,
    /// What it trains: `sft` (prompts with answers), `preference` (chosen/rejected: dpo, rm),
    /// `kto` (answers labelled good or bad), `text` (plain text: pt).
    pub kind: DatasetKind,
    /// The stages that fit it, the first being the one a task uses when it names none.
    pub stages: Vec<crate::training::spec::Stage>,
    pub container: Container,
    pub num_rows: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl DatasetView {
    pub fn new(state: &AppState, d: &Dataset) -> DatasetView {
        DatasetView {
            file_id: d.file_id.clone(),
            filename: d.filename.clone(),
            file_path: relative_path(&state.config.data_dir, &d.file_path.to_string_lossy()),
            size: d.size,
            format: d.format,
            kind: d.kind,
            stages: crate::training::spec::Stage::fitting(d.kind),
            container: d.container,
            num_rows: d.num_rows,
            created_at: d.created_at,
        }
    }
}

/// A model: a base model (a folder in the models dir) or one a user trained.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelView {
    /// A base model's name; a trained model's id.
    pub model_id: String,
    pub name: String,
    /// Relative: a base model's folder in the models dir, a trained model's in the data dir.
    pub model_path: String,
    pub kind: ModelKind,
    /// The base model a trained model was trained from.
    pub base_model: Option<String>,
    pub task_id: Option<String>,
    pub size: u64,
    /// A base model: its folder's time; a trained model: when it was registered.
    #[serde(with = "time::serde::rfc3339::option")]
    pub created_at: Option<OffsetDateTime>,
    /// A base model with Hugging Face weights (config.json) can be trained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trainable: Option<bool>,
    /// A base model's architecture (`llama`, `qwen2`…).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// A trained model: the LlamaFactory template it was trained with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// A trained model: the system prompt it was trained with, which chat uses when a
    /// conversation has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// A trained model whose training template formats conversations differently from the
    /// chat template chat uses: why its answers may not follow the fine-tune.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template_warning: Option<String>,
}

impl ModelView {
    pub fn base(state: &AppState, m: &BaseModel) -> ModelView {
        ModelView {
            model_id: m.name.clone(),
            name: m.name.clone(),
            model_path: relative_path(&state.config.models_dir, &m.path.to_string_lossy()),
            kind: ModelKind::Base,
            base_model: None,
            task_id: None,
            size: m.size,
            created_at: m.created_at,
            trainable: Some(m.hf_dir.is_some()),
            model_type: m.model_type.clone(),
            template: None,
            system_prompt: None,
            template_warning: None,
        }
    }

    pub fn trained(state: &AppState, m: &ModelRecord) -> ModelView {
        ModelView {
            model_id: m.model_id.clone(),
            name: m.name.clone(),
            model_path: relative_path(&state.config.data_dir, &m.model_path),
            kind: m.kind,
            base_model: Some(m.base_model.clone()),
            task_id: m.task_id.clone(),
            size: m.size,
            created_at: Some(m.created_at),
            trainable: None,
            model_type: None,
            template: m.template.clone(),
            system_prompt: m.system.clone(),
            template_warning: None,
        }
    }
}

/// A task in a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskSummary {
    pub task_id: String,
    /// `training` or `evaluation` (see `/api/evaluations/{id}`).
    pub kind: &'static str,
    pub name: String,
    pub model_name: String,
    pub status: TaskStatus,
    pub progress: Progress,
    /// 1 = next to start; only while queued.
    pub queue_position: Option<usize>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Whose task (in an administrator's list of everyone's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Owner {
    pub user_id: String,
    pub username: Option<String>,
}

impl TaskSummary {
    pub fn new(t: &Task, positions: &HashMap<String, usize>) -> TaskSummary {
        TaskSummary {
            task_id: t.task_id.clone(),
            kind: task_kind(t),
            name: t.spec.name.clone(),
            model_name: t.spec.model_name.clone(),
            status: t.status,
            progress: t.progress.clone(),
            queue_position: positions.get(&t.task_id).copied(),
            created_at: t.created_at,
            updated_at: t.updated_at,
            owner: None,
        }
    }
}

/// Every parameter of a task, its status, progress, error, diagnosis and model.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskDetail {
    pub task_id: String,
    /// `training` or `evaluation` (see `/api/evaluations/{id}`).
    pub kind: &'static str,
    #[serde(flatten)]
    pub spec: TaskSpec,
    /// An evaluation's scores, once it completed.
    pub eval_metrics: Option<crate::store::EvalMetrics>,
    pub status: TaskStatus,
    pub queue_position: Option<usize>,
    pub progress: Progress,
    pub gpu_ids: Vec<u32>,
    /// The checkpoint the next run resumes from (its folder in the output).
    pub resume_from: Option<String>,
    /// The retention sweep removed the outputs (the registered model keeps its files).
    pub outputs_removed: bool,
    pub error: Option<String>,
    /// What probably went wrong and what to try, for a failed task.
    pub diagnosis: Option<String>,
    pub model_id: Option<String>,
    pub dataset_id: Option<String>,
    /// The dataset's file, relative to the data dir.
    pub dataset_path: String,
    pub dataset_format: DatasetFormat,
    /// What the dataset trains (`sft`, `preference`, `kto`, `text`).
    pub dataset_kind: DatasetKind,
    /// The output folder, relative to the task's folder.
    pub output_dir: String,
    /// For a task created through OpenAI's fine-tuning API: its job there.
    pub openai_job: Option<JobBadge>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

/// A task's job in OpenAI's fine-tuning API.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobBadge {
    /// `ftjob-…`.
    pub id: String,
    /// `supervised` or `dpo`.
    pub method: String,
    /// Paused through the API (the task reads `cancelled` until it is resumed).
    pub paused: bool,
    pub suffix: Option<String>,
}

/// `training` or `evaluation`.
pub fn task_kind(t: &Task) -> &'static str {
    if t.spec.evaluation.is_some() {
        "evaluation"
    } else {
        "training"
    }
}

impl TaskDetail {
    pub fn new(state: &AppState, t: &Task, queue_position: Option<usize>) -> TaskDetail {
        let mut spec = t.spec.clone();
        if let Some(e) = spec.evaluation.as_mut() {
            // Server paths are shown relative to the data dir.
            e.adapter_dir = e
                .adapter_dir
                .as_deref()
                .map(|p| relative_path(&state.config.data_dir, p));
        }
        TaskDetail {
            task_id: t.task_id.clone(),
            kind: task_kind(t),
            eval_metrics: t.eval_metrics.clone(),
            spec,
            status: t.status,
            queue_position,
            progress: t.progress.clone(),
            gpu_ids: t.gpu_ids.clone(),
            resume_from: t
                .resume_from
                .as_deref()
                .map(|p| relative_path(t.output_dir(), p)),
            outputs_removed: t.outputs_removed,
            error: t.error.clone(),
            diagnosis: t.diagnosis.clone(),
            model_id: t.model_id.clone(),
            dataset_id: t.dataset_id.clone(),
            dataset_path: relative_path(&state.config.data_dir, &t.paths.dataset_file),
            dataset_format: t.paths.dataset_format,
            dataset_kind: t.paths.dataset_kind,
            output_dir: relative_path(Path::new(&t.paths.task_dir), &t.paths.output_dir),
            openai_job: t.job.as_ref().map(|j| JobBadge {
                id: format!("ftjob-{}", t.task_id),
                method: j.method.clone(),
                paused: j.paused,
                suffix: j.suffix.clone(),
            }),
            created_at: t.created_at,
            updated_at: t.updated_at,
            started_at: t.started_at,
            finished_at: t.finished_at,
        }
    }
}
