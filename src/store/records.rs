//! The records kept in the store. Each is self-describing JSON; fields added later carry
//! `#[serde(default)]` so older records still read.
//!
//! These are the store's own types: it imports no domain module. Where a record holds
//! something a domain module defines (a dataset's format, a task's specification), it keeps
//! it in its stored form (a name, a JSON document) and the domain converts at the boundary
//! (`datasets::Dataset`, `training::Task`).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::OwnedRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub user_id: String,
    pub username: String,
    pub email: String,
    /// PHC string (argon2id).
    pub password_hash: String,
    pub role: Role,
    #[serde(default)]
    pub disabled: bool,
    /// Carried by every access token; bumped when the password changes, so tokens issued
    /// before (a leaked one among them) stop working at once.
    #[serde(default)]
    pub token_version: u64,
    /// The name shown for the account (defaults to the username).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// The notices also sent to the account's e-mail when a mail relay is configured
    /// (`task.succeeded`, `task.*`, …, as webhooks choose them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub email_events: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl User {
    pub fn new(username: String, email: String, password_hash: String) -> User {
        let now = OffsetDateTime::now_utc();
        User {
            user_id: super::new_id(),
            username,
            email,
            password_hash,
            role: Role::User,
            disabled: false,
            token_version: 0,
            display_name: None,
            email_events: Vec::new(),
            created_at: now,
            updated_at: now,
        }
    }
}

/// A one-time code sent by e-mail: a password reset, or the confirmation of a new address.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MailCode {
    pub user_id: String,
    /// `password_reset` or `email_change`.
    pub purpose: String,
    /// SHA-256 of the code.
    #[serde(with = "hex_bytes")]
    pub hash: Vec<u8>,
    /// Unix seconds.
    pub expires_at: i64,
    /// Wrong codes tried so far.
    pub attempts: u32,
    /// The address being confirmed (`email_change`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_email: Option<String>,
}

impl MailCode {
    pub const PURPOSES: [&'static str; 2] = ["password_reset", "email_change"];

    pub fn key(purpose: &str, user_id: &str) -> Vec<u8> {
        format!("{purpose}:{user_id}").into_bytes()
    }
}

/// A refresh token, stored under the SHA-256 of its secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefreshToken {
    pub user_id: String,
    /// Every token rotated from one login shares a family; reuse of a rotated token
    /// revokes the whole family.
    pub family: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub remember: bool,
    /// Unix seconds at which this token was rotated away, if it was.
    #[serde(default)]
    pub rotated_at: Option<i64>,
}

/// A login session: what one sign-in and every refresh rotated from it share. Access tokens
/// name it (`sid`), so ending it ends them at once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoginSession {
    /// The refresh-token family.
    pub session_id: String,
    pub user_id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds: the expiry of its newest refresh token.
    pub expires_at: i64,
    /// Unix seconds: the sign-in that opened it (absent in sessions older than the field:
    /// `created_at` then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_in_at: Option<i64>,
    /// The client address of the sign-in, then of its latest refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The browser or program that signed in (its `User-Agent`, cut to 200 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKey {
    pub key_id: String,
    pub owner: String,
    pub name: String,
    /// The first characters of the secret, to recognise it in a list.
    pub prefix: String,
    /// SHA-256 of the secret (the secret has 256 bits of entropy, so a fast hash suffices).
    #[serde(with = "hex_bytes")]
    pub secret_hash: Vec<u8>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl OwnedRecord for ApiKey {
    fn id(&self) -> &str {
        &self.key_id
    }
    fn owner(&self) -> &str {
        &self.owner
    }
}

/// An uploaded dataset (`datasets::Dataset` is its typed form).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetRecord {
    pub file_id: String,
    pub owner: String,
    /// The client's file name, sanitised; never used as a path.
    pub filename: String,
    /// Absolute path of the stored file.
    pub file_path: String,
    pub size: u64,
    /// The record format's name (`alpaca`, `sharegpt`, `openai`).
    pub format: String,
    /// The file's container (`json`, `jsonl`, `csv`).
    pub container: String,
    /// What it trains (`sft`, `preference`, `kto`, `text`); records from before kinds were
    /// told apart are `sft`.
    #[serde(default = "sft_kind")]
    pub kind: String,
    pub num_rows: u64,
    /// Top-level fields present in the records (CSV: recognised header columns).
    #[serde(default)]
    pub columns: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

fn sft_kind() -> String {
    "sft".to_string()
}

impl OwnedRecord for DatasetRecord {
    fn id(&self) -> &str {
        &self.file_id
    }
    fn owner(&self) -> &str {
        &self.owner
    }
}

#[cfg(test)]
impl DatasetRecord {
    pub fn example(owner: &str) -> DatasetRecord {
        DatasetRecord {
            file_id: super::new_id(),
            owner: owner.into(),
            filename: "d.json".into(),
            file_path: "/tmp/d.json".into(),
            size: 1,
            format: "alpaca".into(),
            container: "json".into(),
            kind: "sft".into(),
            num_rows: 1,
            columns: vec!["instruction".into(), "output".into()],
            created_at: OffsetDateTime::now_utc(),
        }
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd hex length"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_active(self) -> bool {
        matches!(self, TaskStatus::Queued | TaskStatus::Running)
    }
}

/// Live progress of a task, as the worker last reported it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Progress {
    pub current_step: u64,
    pub total_steps: u64,
    pub percentage: f64,
    pub epoch: f64,
    pub loss: Option<f64>,
    pub learning_rate: Option<f64>,
    pub elapsed_s: f64,
    pub eta_s: Option<f64>,
}

/// A training task (`training::Task` is its typed form).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    pub task_id: String,
    pub owner: String,
    /// The task's specification as submitted and completed with defaults (its schema is
    /// `training::spec::TaskSpec`).
    pub spec: serde_json::Value,
    pub dataset_id: Option<String>,
    /// The files the run uses (`training::spec::RunPaths`).
    pub paths: serde_json::Value,
    pub status: TaskStatus,
    #[serde(default)]
    pub progress: Progress,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub diagnosis: Option<String>,
    #[serde(default)]
    pub model_id: Option<String>,
    #[serde(default)]
    pub pid: Option<u32>,
    /// GPUs handed to the running worker.
    #[serde(default)]
    pub gpu_ids: Vec<u32>,
    /// The checkpoint the next run resumes from.
    #[serde(default)]
    pub resume_from: Option<String>,
    /// The retention sweep removed the outputs.
    #[serde(default)]
    pub outputs_removed: bool,
    /// An evaluation's scores, once it completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_metrics: Option<EvalMetrics>,
    /// Set on a task created through OpenAI's fine-tuning API (`/v1/fine_tuning/jobs`):
    /// what that API shows besides the task itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<FineTuningJob>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

/// A task's face in OpenAI's fine-tuning API: the job's own fields (the rest is the task).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FineTuningJob {
    /// `supervised` or `dpo`.
    pub method: String,
    /// The hyperparameters as the job reports them, `auto` resolved: `n_epochs`,
    /// `batch_size`, `learning_rate_multiplier` (and `beta` for dpo).
    pub hyperparameters: serde_json::Map<String, serde_json::Value>,
    pub training_file: String,
    #[serde(default)]
    pub validation_file: Option<String>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Paused through the API: the task is stopped (cancelled, its checkpoint kept) and the
    /// job reads `paused` until it is resumed.
    #[serde(default)]
    pub paused: bool,
}

impl OwnedRecord for TaskRecord {
    fn id(&self) -> &str {
        &self.task_id
    }
    fn owner(&self) -> &str {
        &self.owner
    }
}

/// What an evaluation measured. BLEU-4 and ROUGE are LlamaFactory's (`ComputeSimilarity`:
/// nltk's sentence BLEU-4 over characters, smoothing method 3; rouge-chinese's F1 over
/// jieba's words, so Chinese is scored by word), in percent, averaged over the rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EvalMetrics {
    /// Rows evaluated.
    pub samples: u64,
    pub bleu_4: Option<f64>,
    pub rouge_1: Option<f64>,
    pub rouge_2: Option<f64>,
    pub rouge_l: Option<f64>,
    /// Percent of answers equal to their reference (trimmed, case and spacing ignored, a
    /// final full stop ignored).
    pub exact_match: Option<f64>,
    /// Mean token loss of the references given their prompts (teacher forcing).
    pub eval_loss: Option<f64>,
    /// `exp(eval_loss)`.
    pub perplexity: Option<f64>,
    /// Tokens generated (with the model's tokenizer), and how fast, over the generation
    /// pass's wall time (batched greedy decoding in transformers).
    pub generated_tokens: Option<u64>,
    pub tokens_per_second: Option<f64>,
    pub samples_per_second: Option<f64>,
    pub generation_runtime_s: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Base,
    Adapter,
    /// A full fine-tune: a complete model of its own.
    Full,
}

/// A model a user owns: today, the adapter a finished task produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelRecord {
    pub model_id: String,
    pub owner: String,
    pub name: String,
    pub model_path: String,
    pub kind: ModelKind,
    /// The base model's name (its folder in the models dir).
    pub base_model: String,
    pub task_id: Option<String>,
    pub size: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The LlamaFactory template it was trained with (none: recorded before templates were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The system prompt it was trained with; chat uses it when a conversation has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

impl OwnedRecord for ModelRecord {
    fn id(&self) -> &str {
        &self.model_id
    }
    fn owner(&self) -> &str {
        &self.owner
    }
}

/// An export of a user's model (merged into its base, written as safetensors or GGUF): a
/// background job whose result is registered as a new model of the owner's.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExportRecord {
    pub export_id: String,
    pub owner: String,
    /// The model exported (an adapter or a full fine-tune of the owner's).
    pub source_model_id: String,
    pub source_name: String,
    pub format: crate::models::export::ExportFormat,
    pub quantization: crate::models::export::Quantization,
    /// The new model's name.
    pub name: String,
    pub status: ExportStatus,
    /// 0 to 1.
    pub progress: f64,
    /// What it is doing.
    pub message: String,
    pub error: Option<String>,
    /// The model the export registered, once it succeeded.
    pub model_id: Option<String>,
    /// Files, sizes, time, retention of the fine-tune, warning.
    pub report: Option<crate::models::export::ExportReport>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl ExportStatus {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            ExportStatus::Succeeded | ExportStatus::Failed | ExportStatus::Cancelled
        )
    }
}

impl OwnedRecord for ExportRecord {
    fn id(&self) -> &str {
        &self.export_id
    }
    fn owner(&self) -> &str {
        &self.owner
    }
}

/// One point of a task's loss curve.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct MetricPoint {
    pub step: u64,
    pub loss: Option<f64>,
    pub learning_rate: Option<f64>,
    pub epoch: f64,
    /// Seconds since the worker started.
    pub t: f64,
    /// A stage's own figures at this step (DPO: `rewards/accuracies`, `rewards/margins`...).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra: std::collections::BTreeMap<String, f64>,
}

/// A message of a saved conversation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct SessionMessage {
    pub role: String,
    pub content: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A saved conversation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatSession {
    pub session_id: String,
    pub owner: String,
    pub title: String,
    /// The model it talks to (a base model name or an adapter's model id), if chosen.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub messages: Vec<SessionMessage>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// A named set of task settings that new tasks start from (seed 004: training templates).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskTemplate {
    pub template_id: String,
    pub owner: String,
    pub name: String,
    /// The settings: a `POST /api/tasks` body without the task's name and datasets.
    pub settings: serde_json::Map<String, serde_json::Value>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl OwnedRecord for TaskTemplate {
    fn id(&self) -> &str {
        &self.template_id
    }
    fn owner(&self) -> &str {
        &self.owner
    }
}

impl OwnedRecord for ChatSession {
    fn id(&self) -> &str {
        &self.session_id
    }
    fn owner(&self) -> &str {
        &self.owner
    }
}

/// One entry of the audit log: who did what to what, from where, and how it ended. Written
/// once, never changed (the API has no way to edit or delete one; only the retention sweep
/// removes entries older than the configured age).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditRecord {
    /// Time-ordered id (creation order).
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: OffsetDateTime,
    /// The acting user's id (none: not signed in, e.g. a failed login).
    pub actor_id: Option<String>,
    /// The acting user's name at the time (or the name a failed login tried).
    pub actor_name: Option<String>,
    /// Set when the request was authenticated with an API key: the key's id.
    #[serde(default)]
    pub api_key_id: Option<String>,
    /// What was done: `dataset.delete`, `auth.login`, `task.create`, …
    pub action: String,
    /// The kind of object acted on (`dataset`, `task`, `user`, …).
    pub target_type: String,
    /// The object's id, where the request named one.
    pub target_id: Option<String>,
    /// What changed, in a few words, where the handler said (`role=admin`, the name a failed
    /// sign-in tried, …).
    #[serde(default)]
    pub detail: Option<String>,
    /// `success`, `denied` (401/403) or `failure`.
    pub outcome: String,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The client's address.
    pub client: String,
    /// The request's `x-request-id` (also in the server's log lines).
    pub request_id: Option<String>,
    /// The HTTP method and path.
    pub method: String,
    pub path: String,
}

/// A user's webhook: where to send which notices, and the secret that signs them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebhookRecord {
    pub webhook_id: String,
    pub owner: String,
    pub url: String,
    /// Event types (`task.succeeded`) or kinds (`task.*`); `*` for all.
    pub events: Vec<String>,
    /// `whsec_` + base64 of the key (Standard Webhooks' form).
    pub secret: String,
    #[serde(default)]
    pub description: String,
    pub active: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl OwnedRecord for WebhookRecord {
    fn id(&self) -> &str {
        &self.webhook_id
    }
    fn owner(&self) -> &str {
        &self.owner
    }
}

/// One attempt to deliver an event to a webhook (kept per webhook, the latest 200).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookDelivery {
    pub delivery_id: String,
    pub webhook_id: String,
    /// The event's id (`webhook-id` header): the same on every attempt of one event.
    pub event_id: String,
    pub event: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    /// Why the attempt failed, when it did.
    pub error: Option<String>,
    pub succeeded: bool,
    pub duration_ms: u64,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: OffsetDateTime,
    /// When the next attempt goes out, if one will.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_attempt_at: Option<OffsetDateTime>,
}

impl OwnedRecord for WebhookDelivery {
    fn id(&self) -> &str {
        &self.delivery_id
    }
    /// Deliveries are kept under their webhook (a prefix scan lists one webhook's).
    fn owner(&self) -> &str {
        &self.webhook_id
    }
}
