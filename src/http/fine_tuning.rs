//! OpenAI's fine-tuning API on `/v1`: `/v1/files` and `/v1/fine_tuning/jobs`, so a script
//! written for `client.files.create(...)` / `client.fine_tuning.jobs.create(...)` runs here
//! with only `base_url` and `api_key` changed.
//!
//! It is a second face of what the rest of the API shows: a file is a dataset (validated the
//! same way on upload; `file-<dataset id>`), a job is a training task (`ftjob-<task id>`, in
//! the web UI like any other). Every training task reads as a job; a task created here also
//! keeps the job's own fields ([`FineTuningJob`]: method, hyperparameters as asked, suffix,
//! metadata, the pause flag).

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::extract::multipart::Multipart;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::datasets::{MULTIPART_OVERHEAD, form, multipart_error, refuse_declared_oversize};
use super::error::{ErrorBody, Json, Path, Query};
use super::extract::CurrentUser;
use crate::auth::Principal;
use crate::datasets::Dataset;
use crate::datasets::format::DatasetKind;
use crate::error::{Error, Kind, Result};
use crate::store::{FineTuningJob, TaskStatus};
use crate::training::events::{StatusChange, WorkerEvent};
use crate::training::spec::{Stage, TaskRequest};
use crate::training::{Task, TaskEvent};

pub fn router(max_upload: u64) -> OpenApiRouter<AppState> {
    let body_limit = usize::try_from(max_upload + MULTIPART_OVERHEAD).unwrap_or(usize::MAX);
    OpenApiRouter::new()
        .routes(routes!(upload_file, list_files))
        .layer(DefaultBodyLimit::max(body_limit))
        .routes(routes!(get_file, delete_file))
        .routes(routes!(file_content))
        .routes(routes!(create_job, list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(cancel_job))
        .routes(routes!(pause_job))
        .routes(routes!(resume_job))
        .routes(routes!(job_events))
        .routes(routes!(job_checkpoints))
}

const FILE_PREFIX: &str = "file-";
const JOB_PREFIX: &str = "ftjob-";

/// The learning rate a multiplier of 1 means, per method: LlamaFactory's own LoRA examples'
/// rates (`examples/train_lora/*_sft.yaml`: 1e-4; `*_dpo.yaml`: 5e-6).
const SUPERVISED_LR: f64 = 1e-4;
const DPO_LR: f64 = 5e-6;
/// What `auto` resolves to.
const AUTO_EPOCHS: f64 = 3.0;
const AUTO_BATCH: u32 = 4;
const AUTO_BETA: f64 = 0.1;
/// The most examples one device step holds; a larger `batch_size` accumulates gradients.
const MAX_DEVICE_BATCH: u32 = 8;

fn param_error(param: &str, message: impl std::fmt::Display) -> Error {
    Error::new(
        Kind::Invalid,
        "invalid_parameter",
        format!("{param}: {message}"),
    )
}

fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

// ---- files ------------------------------------------------------------------------------

fn file_id(d: &Dataset) -> String {
    format!("{FILE_PREFIX}{}", d.file_id)
}

/// A dataset id from a file id (`file-…`, or the dataset's own id).
fn dataset_id(file_id: &str) -> &str {
    file_id.strip_prefix(FILE_PREFIX).unwrap_or(file_id)
}

fn file_object(d: &Dataset) -> Value {
    json!({
        "id": file_id(d),
        "object": "file",
        "bytes": d.size,
        "created_at": unix(d.created_at),
        "filename": d.filename,
        "purpose": "fine-tune",
        "status": "processed",
        "status_details": null,
        // ferrotune's own: what the file trains and how many examples it holds.
        "kind": d.kind,
        "rows": d.num_rows,
    })
}

async fn own_file(state: &AppState, p: &Principal, id: &str) -> Result<Dataset> {
    state
        .datasets
        .get(&p.user.user_id, dataset_id(id))
        .await
        .map_err(|e| {
            if e.kind == Kind::NotFound {
                Error::not_found(&format!("file `{id}`"))
            } else {
                e
            }
        })
}

/// The upload form: `purpose` (`fine-tune`) and `file`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct FileForm {
    /// `fine-tune`.
    purpose: String,
    /// OpenAI chat JSONL (`messages`), DPO JSONL (`input`, `preferred_output`,
    /// `non_preferred_output`), or any dataset `/api/files/datasets` takes.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
}

/// Uploads a training file (a dataset, validated as `/api/files/datasets` validates one).
#[utoipa::path(post, path = "/v1/files", tag = "openai",
    request_body(content = FileForm, content_type = "multipart/form-data"),
    responses((status = 200, description = "The file object", body = Object),
              (status = 400, description = "No `file`, or a `purpose` other than `fine-tune`", body = ErrorBody),
              (status = 413, description = "Larger than `max_upload_bytes`", body = ErrorBody),
              (status = 422, description = "Not a valid dataset: the first bad record is named", body = ErrorBody)))]
async fn upload_file(
    state: AppState,
    CurrentUser(p): CurrentUser,
    headers: axum::http::HeaderMap,
    multipart: std::result::Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Json<Value>> {
    let max = state.datasets.max_bytes();
    refuse_declared_oversize(&headers, max)?;
    let bad_purpose = |given: &str| {
        Error::new(
            Kind::BadRequest,
            "invalid_parameter",
            format!("purpose: only `fine-tune` files are kept here, not `{given}`"),
        )
    };
    let mut multipart = form(multipart)?;
    let mut purpose: Option<String> = None;
    let mut uploaded: Option<Dataset> = None;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, max))?
    {
        match field.name() {
            Some("purpose") => {
                let value = field.text().await.map_err(|e| multipart_error(e, max))?;
                if value != "fine-tune" {
                    // Nothing of a refused upload stays.
                    if let Some(d) = uploaded.take() {
                        discard_upload(&state, &p.user.user_id, &d).await;
                    }
                    return Err(bad_purpose(&value));
                }
                purpose = Some(value);
            }
            Some("file") if uploaded.is_none() => {
                let client_name = field.file_name().unwrap_or("training.jsonl").to_string();
                let stream = field.map(move |chunk| chunk.map_err(|e| multipart_error(e, max)));
                uploaded = Some(
                    state
                        .datasets
                        .upload(&p.user.user_id, &client_name, Box::pin(stream))
                        .await?,
                );
            }
            _ => {}
        }
    }
    let Some(dataset) = uploaded else {
        return Err(Error::bad_request("file: the form has no `file` field"));
    };
    if purpose.is_none() {
        discard_upload(&state, &p.user.user_id, &dataset).await;
        return Err(Error::new(
            Kind::BadRequest,
            "invalid_parameter",
            "purpose: required (`fine-tune`)",
        ));
    }
    Ok(Json(file_object(&dataset)))
}

/// Removes an upload the request then refused; the refusal is what the client gets, so a
/// failure here is logged (the dataset stays listed, for its owner to delete).
async fn discard_upload(state: &AppState, user_id: &str, dataset: &Dataset) {
    if let Err(e) = state
        .training
        .delete_dataset(user_id, &dataset.file_id)
        .await
    {
        tracing::warn!(dataset = %dataset.file_id, error = %e, "cannot remove a refused upload");
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// Only files of this purpose (all files here are `fine-tune`).
    purpose: Option<String>,
    /// At most this many (default 10000).
    limit: Option<usize>,
    /// The files after this one in the listed order.
    after: Option<String>,
    /// `desc` (newest first, the default) or `asc`.
    order: Option<String>,
}

/// The caller's files (their datasets).
#[utoipa::path(get, path = "/v1/files", tag = "openai", params(FileQuery),
    responses((status = 200, description = "`{object: list, data, has_more}`", body = Object)))]
async fn list_files(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Query(q): Query<FileQuery>,
) -> Result<Json<Value>> {
    let mut files = state.datasets.list(&p.user.user_id).await?;
    if q.purpose.as_deref().is_some_and(|v| v != "fine-tune") {
        files.clear();
    }
    files.sort_by_key(|d| d.created_at);
    match q.order.as_deref() {
        None | Some("desc") => files.reverse(),
        Some("asc") => {}
        Some(other) => {
            return Err(param_error(
                "order",
                format!("`asc` or `desc`, not `{other}`"),
            ));
        }
    }
    let objects: Vec<Value> = files.iter().map(file_object).collect();
    Ok(Json(page(
        objects,
        q.after.as_deref(),
        q.limit.unwrap_or(10_000),
        10_000,
    )?))
}

/// One page of a newest-first list: the items after `after` (an id), at most `limit`.
fn page(items: Vec<Value>, after: Option<&str>, limit: usize, max: usize) -> Result<Value> {
    if limit == 0 || limit > max {
        return Err(param_error("limit", format!("between 1 and {max}")));
    }
    let start = match after {
        None => 0,
        Some(id) => items
            .iter()
            .position(|v| v["id"] == id)
            .map(|i| i + 1)
            .ok_or_else(|| param_error("after", format!("`{id}` is not in this list")))?,
    };
    let rest = items.len().saturating_sub(start);
    let data: Vec<Value> = items.into_iter().skip(start).take(limit).collect();
    Ok(json!({
        "object": "list",
        "first_id": data.first().map(|v| v["id"].clone()),
        "last_id": data.last().map(|v| v["id"].clone()),
        "has_more": rest > data.len(),
        "data": data,
    }))
}

/// One of the caller's files.
#[utoipa::path(get, path = "/v1/files/{file_id}", tag = "openai",
    params(("file_id" = String, Path, description = "`file-…`")),
    responses((status = 200, description = "The file object", body = Object),
              (status = 404, description = "No such file of yours", body = ErrorBody)))]
async fn get_file(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    Ok(Json(file_object(&own_file(&state, &p, &id).await?)))
}

/// Deletes a file (its dataset), unless a queued or running job trains on it.
#[utoipa::path(delete, path = "/v1/files/{file_id}", tag = "openai",
    params(("file_id" = String, Path, description = "`file-…`")),
    responses((status = 200, description = "`{id, object: file, deleted: true}`", body = Object),
              (status = 404, description = "No such file of yours", body = ErrorBody),
              (status = 409, description = "A queued or running job uses it", body = ErrorBody)))]
async fn delete_file(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let d = own_file(&state, &p, &id).await?;
    state
        .training
        .delete_dataset(&p.user.user_id, &d.file_id)
        .await?;
    Ok(Json(
        json!({"id": file_id(&d), "object": "file", "deleted": true}),
    ))
}

/// A file's bytes (as stored: uploads in another shape are kept as the JSONL they were
/// rewritten to).
#[utoipa::path(get, path = "/v1/files/{file_id}/content", tag = "openai",
    params(("file_id" = String, Path, description = "`file-…`")),
    responses((status = 200, description = "The file", content_type = "application/octet-stream", body = Vec<u8>),
              (status = 404, description = "No such file of yours", body = ErrorBody)))]
async fn file_content(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response> {
    let d = own_file(&state, &p, &id).await?;
    let (d, file) = state.datasets.open(&p.user.user_id, &d.file_id).await?;
    let mut response = Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&d.size.to_string()) {
        headers.insert(header::CONTENT_LENGTH, v);
    }
    Ok(response)
}

// ---- jobs -------------------------------------------------------------------------------

/// `POST /v1/fine_tuning/jobs`, as OpenAI documents it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// A base model's name, as `/v1/models` lists it.
    model: String,
    /// `file-…`: chat JSONL for `supervised`, preference pairs for `dpo`.
    training_file: String,
    /// `file-…`: scored (validation loss) while the job trains.
    validation_file: Option<String>,
    /// The deprecated top-level form of `method.supervised.hyperparameters`.
    #[schema(value_type = Option<Object>)]
    hyperparameters: Option<Value>,
    /// `{"type": "supervised" | "dpo", "<type>": {"hyperparameters": {n_epochs, batch_size,
    /// learning_rate_multiplier, beta (dpo)}}}`; each value a number or `auto`.
    #[schema(value_type = Option<Object>)]
    method: Option<Value>,
    /// Up to 64 characters: the fine-tuned model's name.
    suffix: Option<String>,
    seed: Option<u64>,
    /// Up to 16 string pairs kept with the job.
    metadata: Option<BTreeMap<String, String>>,
    /// Refused when not empty (no Weights & Biases here).
    #[schema(value_type = Option<Vec<Object>>)]
    integrations: Option<Vec<Value>>,
}

/// A hyperparameter: `auto`, absent, or a number in `range`.
fn hyper(
    given: &Map<String, Value>,
    path: &str,
    key: &str,
    auto: f64,
    valid: impl Fn(f64) -> bool,
    rule: &str,
) -> Result<f64> {
    match given.get(key) {
        None | Some(Value::Null) => Ok(auto),
        Some(Value::String(s)) if s == "auto" => Ok(auto),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(v) if valid(v) => Ok(v),
            _ => Err(param_error(&format!("{path}.{key}"), rule)),
        },
        Some(other) => Err(param_error(
            &format!("{path}.{key}"),
            format!("a number or \"auto\", not {other}"),
        )),
    }
}

/// The method and hyperparameters asked for, checked.
struct Plan {
    stage: Stage,
    method: &'static str,
    epochs: f64,
    batch: u32,
    multiplier: f64,
    beta: Option<f64>,
}

fn plan(body: &CreateJob) -> Result<Plan> {
    let (method, hyper_path, given) = match &body.method {
        None => (
            "supervised",
            "hyperparameters",
            body.hyperparameters.clone(),
        ),
        Some(m) => {
            let Some(kind) = m["type"].as_str() else {
                return Err(param_error(
                    "method.type",
                    "required: `supervised` or `dpo`",
                ));
            };
            let method = match kind {
                "supervised" => "supervised",
                "dpo" => "dpo",
                "reinforcement" => {
                    return Err(param_error(
                        "method.type",
                        "`reinforcement` (graders) is not offered here: use `supervised` or \
                         `dpo`",
                    ));
                }
                other => {
                    return Err(param_error(
                        "method.type",
                        format!("`supervised` or `dpo`, not `{other}`"),
                    ));
                }
            };
            if body.hyperparameters.is_some() {
                return Err(param_error(
                    "hyperparameters",
                    "give them in `method` when `method` is set",
                ));
            }
            (
                method,
                if method == "dpo" {
                    "method.dpo.hyperparameters"
                } else {
                    "method.supervised.hyperparameters"
                },
                Some(m[method]["hyperparameters"].clone()),
            )
        }
    };
    let given = match given {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(param_error(hyper_path, "must be an object")),
    };
    let known = ["n_epochs", "batch_size", "learning_rate_multiplier", "beta"];
    if let Some(k) = given
        .keys()
        .find(|k| !known.contains(&k.as_str()) || (*k == "beta" && method != "dpo"))
    {
        return Err(param_error(
            &format!("{hyper_path}.{k}"),
            "not a hyperparameter of this method (n_epochs, batch_size, \
             learning_rate_multiplier; beta for dpo)",
        ));
    }
    let epochs = hyper(
        &given,
        hyper_path,
        "n_epochs",
        AUTO_EPOCHS,
        |v| v.fract() == 0.0 && (1.0..=50.0).contains(&v),
        "a whole number from 1 to 50",
    )?;
    let batch = hyper(
        &given,
        hyper_path,
        "batch_size",
        f64::from(AUTO_BATCH),
        |v| v.fract() == 0.0 && (1.0..=256.0).contains(&v),
        "a whole number from 1 to 256",
    )? as u32;
    let multiplier = hyper(
        &given,
        hyper_path,
        "learning_rate_multiplier",
        1.0,
        |v| v > 0.0 && v <= 10.0,
        "a number above 0, at most 10",
    )?;
    let beta = if method == "dpo" {
        Some(hyper(
            &given,
            hyper_path,
            "beta",
            AUTO_BETA,
            |v| v > 0.0 && v <= 2.0,
            "a number above 0, at most 2",
        )?)
    } else {
        None
    };
    Ok(Plan {
        stage: if method == "dpo" {
            Stage::Dpo
        } else {
            Stage::Sft
        },
        method,
        epochs,
        batch,
        multiplier,
        beta,
    })
}

/// `batch_size` as a device batch and gradient accumulation: the largest device batch up to
/// [`MAX_DEVICE_BATCH`] that divides it.
fn split_batch(batch: u32) -> (u32, u32) {
    let device = (1..=batch.min(MAX_DEVICE_BATCH))
        .rev()
        .find(|d| batch.is_multiple_of(*d))
        .unwrap_or(1);
    (device, batch / device)
}

fn check_job_fields(body: &CreateJob) -> Result<()> {
    if let Some(suffix) = &body.suffix {
        if suffix.is_empty() || suffix.chars().count() > 64 {
            return Err(param_error("suffix", "1 to 64 characters"));
        }
        if suffix.chars().any(char::is_control) {
            return Err(param_error("suffix", "no control characters"));
        }
    }
    if let Some(meta) = &body.metadata {
        if meta.len() > 16 {
            return Err(param_error("metadata", "at most 16 pairs"));
        }
        if let Some((k, _)) = meta
            .iter()
            .find(|(k, v)| k.chars().count() > 64 || v.chars().count() > 512)
        {
            return Err(param_error(
                &format!("metadata.{k}"),
                "keys up to 64 characters, values up to 512",
            ));
        }
    }
    if body.integrations.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(param_error(
            "integrations",
            "not offered here: watch the job's events, checkpoints and the web UI",
        ));
    }
    Ok(())
}

/// Creates a fine-tuning job: a LoRA training task of the model on the file.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs", tag = "openai",
    request_body = CreateJob,
    responses((status = 200, description = "The job, queued", body = Object),
              (status = 404, description = "No such file of yours", body = ErrorBody),
              (status = 422, description = "A bad value: the parameter is named", body = ErrorBody)))]
async fn create_job(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Json(body): Json<CreateJob>,
) -> Result<Json<Value>> {
    check_job_fields(&body)?;
    let plan = plan(&body)?;
    let owner = &p.user.user_id;
    if state.models.find_base(&body.model).await?.is_none() {
        let trained = state.chat.models(owner).await?;
        let message = match trained.trained.iter().find(|m| m.model_id == body.model) {
            Some(m) => format!(
                "`{}` is a fine-tuned model; continuing from one is not offered yet: fine-tune \
                 its base `{}` on both files",
                body.model, m.base_model
            ),
            None => format!(
                "no base model named `{}` (GET /v1/models lists them)",
                body.model
            ),
        };
        return Err(param_error("model", message));
    }
    let file = |param: &'static str, id: String| {
        let state = state.clone();
        let owner = owner.clone();
        async move {
            state
                .datasets
                .get(&owner, dataset_id(&id))
                .await
                .map_err(|e| {
                    if e.kind == Kind::NotFound {
                        param_error(param, format!("no file `{id}` of yours"))
                    } else {
                        e
                    }
                })
        }
    };
    let training = file("training_file", body.training_file.clone()).await?;
    let wanted = plan.stage.dataset_kind();
    if training.kind != wanted {
        return Err(param_error(
            "training_file",
            format!(
                "`{}` holds {} data; method `{}` trains on {} data{}",
                body.training_file,
                training.kind.as_str(),
                plan.method,
                wanted.as_str(),
                match training.kind {
                    DatasetKind::Preference => " (use method `dpo`)",
                    DatasetKind::Supervised => " (use method `supervised`)",
                    _ => " (the web UI trains it with its own stage)",
                }
            ),
        ));
    }
    let validation = match body.validation_file.clone() {
        None => None,
        Some(id) => {
            let v = file("validation_file", id.clone()).await?;
            if v.kind != wanted {
                return Err(param_error(
                    "validation_file",
                    format!(
                        "`{id}` holds {} data, the training file {}",
                        v.kind.as_str(),
                        wanted.as_str()
                    ),
                ));
            }
            Some(v)
        }
    };
    let (device_batch, accumulation) = split_batch(plan.batch);
    let base_lr = if plan.stage == Stage::Dpo {
        DPO_LR
    } else {
        SUPERVISED_LR
    };
    let name = match &body.suffix {
        Some(s) => s.clone(),
        None => format!("ft-{}", training.filename),
    };
    // A checkpoint at every epoch's end (as OpenAI keeps them), a metrics event at least
    // once an epoch.
    let steps_per_epoch = training.num_rows.div_ceil(u64::from(plan.batch)).max(1);
    let mut request = json!({
        "save_steps": steps_per_epoch,
        "logging_steps": steps_per_epoch.min(10),
        "name": name.chars().take(100).collect::<String>(),
        "model_name": body.model,
        "dataset_id": training.file_id,
        "stage": plan.stage,
        "finetuning_type": "lora",
        "epochs": plan.epochs,
        "batch_size": device_batch,
        "gradient_accumulation_steps": accumulation,
        "learning_rate": base_lr * plan.multiplier,
    });
    if let Some(seed) = body.seed {
        request["seed"] = json!(seed);
    }
    if let Some(beta) = plan.beta {
        request["pref_beta"] = json!(beta);
    }
    if let Some(v) = &validation {
        request["validation_dataset_id"] = json!(v.file_id);
    }
    let request: TaskRequest = serde_json::from_value(request).map_err(Error::internal)?;
    let mut hyperparameters = Map::new();
    hyperparameters.insert("n_epochs".into(), json!(plan.epochs as u64));
    hyperparameters.insert("batch_size".into(), json!(plan.batch));
    hyperparameters.insert("learning_rate_multiplier".into(), json!(plan.multiplier));
    if let Some(beta) = plan.beta {
        hyperparameters.insert("beta".into(), json!(beta));
    }
    let job = FineTuningJob {
        method: plan.method.to_string(),
        hyperparameters,
        training_file: format!("{FILE_PREFIX}{}", training.file_id),
        validation_file: validation.map(|v| format!("{FILE_PREFIX}{}", v.file_id)),
        suffix: body.suffix.clone(),
        metadata: body.metadata.clone().unwrap_or_default(),
        paused: false,
    };
    let task = state
        .training
        .submit_job(owner, request, Some(job))
        .await
        .map_err(|e| {
            // The task's own field names, as this API names them.
            let message = e
                .message
                .replace("model_name:", "model:")
                .replace("dataset_id:", "training_file:");
            Error::new(e.kind, e.code, message)
        })?;
    tracing::info!(task_id = %task.task_id, "fine-tuning job created through /v1");
    Ok(Json(job_object(&task)))
}

/// A job id's task, as the caller may see it.
async fn job_task(state: &AppState, p: &Principal, id: &str) -> Result<Task> {
    let not_found = || Error::not_found(&format!("fine-tuning job `{id}`"));
    let task_id = id.strip_prefix(JOB_PREFIX).ok_or_else(not_found)?;
    let task = state
        .training
        .get_as(&p.user.user_id, p.is_admin(), task_id)
        .await
        .map_err(|e| {
            if e.kind == Kind::NotFound {
                not_found()
            } else {
                e
            }
        })?;
    if task.spec.evaluation.is_some() {
        return Err(not_found());
    }
    Ok(task)
}

fn job_status(task: &Task) -> &'static str {
    match task.status {
        TaskStatus::Queued => "queued",
        TaskStatus::Running => "running",
        TaskStatus::Completed => "succeeded",
        TaskStatus::Failed => "failed",
        TaskStatus::Cancelled if task.job.as_ref().is_some_and(|j| j.paused) => "paused",
        TaskStatus::Cancelled => "cancelled",
    }
}

/// The job as OpenAI's `FineTuningJob` object.
fn job_object(task: &Task) -> Value {
    let spec = &task.spec;
    let (method, hyperparameters) = match &task.job {
        Some(job) => (
            job.method.clone(),
            Value::Object(job.hyperparameters.clone()),
        ),
        // A task created elsewhere: its settings in this API's terms.
        None => {
            let base = if spec.stage == Stage::Dpo {
                DPO_LR
            } else {
                SUPERVISED_LR
            };
            let mut h = json!({
                "n_epochs": spec.epochs,
                "batch_size": spec.batch_size * spec.gradient_accumulation_steps,
                "learning_rate_multiplier": spec.learning_rate / base,
            });
            if let Some(beta) = spec.pref_beta {
                h["beta"] = json!(beta);
            }
            let method = match spec.stage {
                Stage::Sft => "supervised",
                other => other.as_str(),
            };
            (method.to_string(), h)
        }
    };
    let error = (task.status == TaskStatus::Failed).then(|| {
        let mut message = task
            .error
            .clone()
            .unwrap_or_else(|| "training failed".into());
        if let Some(d) = &task.diagnosis {
            message = format!("{message} ({d})");
        }
        json!({"code": "training_failed", "message": message, "param": null})
    });
    let estimated_finish = match (task.status, task.progress.eta_s) {
        (TaskStatus::Running, Some(eta)) => {
            Some(OffsetDateTime::now_utc().unix_timestamp() + eta.round() as i64)
        }
        _ => None,
    };
    let training_file = match &task.job {
        Some(job) => Some(job.training_file.clone()),
        None => task
            .dataset_id
            .as_ref()
            .map(|d| format!("{FILE_PREFIX}{d}")),
    };
    let result_files: Vec<Value> = Vec::new();
    json!({
        "id": format!("{JOB_PREFIX}{}", task.task_id),
        "object": "fine_tuning.job",
        "created_at": unix(task.created_at),
        "finished_at": task.finished_at.map(unix),
        "error": error,
        "fine_tuned_model": task.model_id,
        "hyperparameters": hyperparameters,
        "method": {"type": method, method.clone(): {"hyperparameters": hyperparameters}},
        "model": spec.model_name,
        "organization_id": task.owner,
        "result_files": result_files,
        "seed": spec.seed,
        "status": job_status(task),
        "trained_tokens": null,
        "training_file": training_file,
        "validation_file": task.job.as_ref().and_then(|j| j.validation_file.clone()),
        "estimated_finish": estimated_finish,
        "integrations": [],
        "metadata": task.job.as_ref().map(|j| &j.metadata).filter(|m| !m.is_empty()),
        "user_provided_suffix": task.job.as_ref().and_then(|j| j.suffix.clone()),
        // ferrotune's own: the task behind the job (the web UI's /tasks/<id>).
        "task_id": task.task_id,
    })
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// The items after this id (lists are newest first).
    after: Option<String>,
    /// At most this many (default 20; checkpoints 10).
    limit: Option<usize>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobsQuery {
    after: Option<String>,
    limit: Option<usize>,
    /// `metadata[key]=value` filters are refused by name (not offered yet); any other
    /// query parameter too.
    #[serde(flatten)]
    #[param(value_type = Object)]
    other: BTreeMap<String, String>,
}

/// The caller's fine-tuning jobs (every training task of theirs), newest first.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs", tag = "openai", params(JobsQuery),
    responses((status = 200, description = "`{object: list, data, has_more}`", body = Object)))]
async fn list_jobs(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Query(q): Query<JobsQuery>,
) -> Result<Json<Value>> {
    if let Some(k) = q.other.keys().next() {
        return Err(param_error(k, "not a filter offered here"));
    }
    let mut tasks = state.training.list(&p.user.user_id).await?;
    tasks.retain(|t| t.spec.evaluation.is_none());
    tasks.sort_by_key(|t| std::cmp::Reverse(t.created_at));
    let jobs: Vec<Value> = tasks.iter().map(job_object).collect();
    Ok(Json(page(
        jobs,
        q.after.as_deref(),
        q.limit.unwrap_or(20),
        100,
    )?))
}

/// One fine-tuning job.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{job_id}", tag = "openai",
    params(("job_id" = String, Path, description = "`ftjob-…`")),
    responses((status = 200, description = "The job", body = Object),
              (status = 404, description = "No such job of yours", body = ErrorBody)))]
async fn get_job(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let task = job_task(&state, &p, &id).await?;
    Ok(Json(job_object(&task)))
}

/// Cancels a job: a queued one at once, a running one saves and stops (`running` until it
/// has), a paused one stays stopped and reads `cancelled`.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{job_id}/cancel", tag = "openai",
    params(("job_id" = String, Path, description = "`ftjob-…`")),
    responses((status = 200, description = "The job", body = Object),
              (status = 404, description = "No such job of yours", body = ErrorBody),
              (status = 409, description = "The job has ended", body = ErrorBody)))]
async fn cancel_job(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let task = job_task(&state, &p, &id).await?;
    if job_status(&task) == "paused" {
        state.training.set_paused(&task, false).await?;
    } else {
        state.training.cancel(&task).await?;
    }
    let task = job_task(&state, &p, &id).await?;
    Ok(Json(job_object(&task)))
}

/// Pauses a queued or running job (a running one saves a checkpoint and stops).
#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{job_id}/pause", tag = "openai",
    params(("job_id" = String, Path, description = "`ftjob-…`")),
    responses((status = 200, description = "The job: `paused`, or `running` while it saves", body = Object),
              (status = 404, description = "No such job of yours", body = ErrorBody),
              (status = 409, description = "The job is not queued or running, or was not created through this API", body = ErrorBody)))]
async fn pause_job(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let task = job_task(&state, &p, &id).await?;
    let task = state.training.pause(&task).await?;
    Ok(Json(job_object(&task)))
}

/// Resumes a paused job: queued again, from its last checkpoint (or the start when it was
/// paused before saving one).
#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{job_id}/resume", tag = "openai",
    params(("job_id" = String, Path, description = "`ftjob-…`")),
    responses((status = 200, description = "The job, queued", body = Object),
              (status = 404, description = "No such job of yours", body = ErrorBody),
              (status = 409, description = "The job is not paused", body = ErrorBody)))]
async fn resume_job(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let task = job_task(&state, &p, &id).await?;
    let task = state.training.unpause(&task).await?;
    Ok(Json(job_object(&task)))
}

/// One task event as a job event (`None`: not one this API shows — steps, heartbeats, the
/// worker's own output).
fn job_event(task: &Task, event: &TaskEvent) -> Option<Value> {
    let parsed: WorkerEvent = serde_json::from_str(&event.data).ok()?;
    let (level, message, data, kind, ts) = match &parsed {
        WorkerEvent::Status {
            status,
            error,
            model_id,
            resume_from_step,
            paused,
            at,
            ..
        } => {
            let (level, message) = match status {
                StatusChange::Queued => (
                    "info",
                    match resume_from_step {
                        Some(step) => format!("Job queued again, to continue from step {step}"),
                        None if event.id <= 1 => {
                            format!("Created fine-tuning job: {JOB_PREFIX}{}", task.task_id)
                        }
                        None => "Job queued again, from the start".to_string(),
                    },
                ),
                StatusChange::Running => ("info", "Fine-tuning job started".to_string()),
                StatusChange::Cancelling => {
                    ("info", "Stopping: saving a checkpoint first".to_string())
                }
                StatusChange::Cancelled => (
                    "info",
                    if *paused {
                        "Job paused".to_string()
                    } else {
                        "Job cancelled".to_string()
                    },
                ),
                StatusChange::Completed => (
                    "info",
                    match model_id {
                        Some(m) => format!(
                            "The job has successfully completed. New fine-tuned model created: {m}"
                        ),
                        None => "The job has successfully completed".to_string(),
                    },
                ),
                StatusChange::Failed => (
                    "error",
                    format!(
                        "The job failed: {}",
                        error.as_deref().unwrap_or("training stopped with an error")
                    ),
                ),
            };
            (level, message, json!({}), "message", at.ts)
        }
        WorkerEvent::TrainBegin {
            total_steps, at, ..
        } => (
            "info",
            match total_steps {
                Some(n) => format!("Training began: {n} steps"),
                None => "Training began".to_string(),
            },
            json!({}),
            "message",
            at.ts,
        ),
        WorkerEvent::Log {
            step: Some(step),
            total_steps,
            epoch,
            loss: Some(loss),
            learning_rate,
            metrics,
            at,
            ..
        } => {
            let mut data = json!({"step": step, "train_loss": loss, "total_steps": total_steps,
                                  "epoch": epoch, "learning_rate": learning_rate});
            for (k, v) in metrics {
                data[k] = v.clone();
            }
            let of = total_steps.map(|n| format!("/{n}")).unwrap_or_default();
            (
                "info",
                format!("Step {step}{of}: training loss={loss:.4}"),
                data,
                "metrics",
                at.ts,
            )
        }
        WorkerEvent::Eval {
            metrics, step, at, ..
        } => {
            let loss = metrics.get("eval_loss").and_then(Value::as_f64)?;
            let step = step.unwrap_or(0);
            (
                "info",
                format!("Step {step}: validation loss={loss:.4}"),
                json!({"step": step, "valid_loss": loss}),
                "metrics",
                at.ts,
            )
        }
        WorkerEvent::Checkpoint { step, at, .. } => (
            "info",
            format!("Checkpoint created at step {step}"),
            json!({"step": step}),
            "message",
            at.ts,
        ),
        WorkerEvent::Error { message, at, .. } => {
            ("error", message.clone(), json!({}), "message", at.ts)
        }
        _ => return None,
    };
    let created = ts
        .map(|t| t as i64)
        .unwrap_or_else(|| unix(task.created_at));
    Some(json!({
        "id": format!("ftevent-{}-{}", task.task_id, event.id),
        "object": "fine_tuning.job.event",
        "created_at": created,
        "level": level,
        "message": message,
        "data": data,
        "type": kind,
    }))
}

/// The job's events, newest first, paged with `after` and `limit`.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{job_id}/events", tag = "openai",
    params(("job_id" = String, Path, description = "`ftjob-…`"), PageQuery),
    responses((status = 200, description = "`{object: list, data, has_more}`", body = Object),
              (status = 404, description = "No such job of yours", body = ErrorBody)))]
async fn job_events(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Value>> {
    let task = job_task(&state, &p, &id).await?;
    let events = state.training.events_since(&task, 0).await?;
    let mut shown: Vec<Value> = events.iter().filter_map(|e| job_event(&task, e)).collect();
    shown.reverse();
    Ok(Json(page(
        shown,
        q.after.as_deref(),
        q.limit.unwrap_or(20),
        1000,
    )?))
}

/// The job's checkpoints, newest first, each with the training figures at its step.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{job_id}/checkpoints", tag = "openai",
    params(("job_id" = String, Path, description = "`ftjob-…`"), PageQuery),
    responses((status = 200, description = "`{object: list, data, has_more}`", body = Object),
              (status = 404, description = "No such job of yours", body = ErrorBody)))]
async fn job_checkpoints(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Value>> {
    let task = job_task(&state, &p, &id).await?;
    let probe = task.clone();
    let found = tokio::task::spawn_blocking(move || {
        probe
            .checkpoints()
            .into_iter()
            .map(|(step, path)| {
                let saved = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs() as i64);
                (step, saved)
            })
            .collect::<Vec<_>>()
    })
    .await?;
    let points = state.training.metrics(&task).await?;
    let valid = validation_losses(&state, &task).await?;
    let job_id = format!("{JOB_PREFIX}{}", task.task_id);
    let mut data: Vec<Value> = found
        .into_iter()
        .map(|(step, saved)| {
            let train = points
                .iter()
                .filter(|m| m.step <= step && m.loss.is_some())
                .max_by_key(|m| m.step);
            let mut metrics = json!({"step": step});
            if let Some(m) = train {
                metrics["train_loss"] = json!(m.loss);
                for (k, v) in &m.extra {
                    metrics[k] = json!(v);
                }
            }
            if let Some((_, loss)) = valid.iter().rev().find(|(s, _)| *s <= step) {
                metrics["valid_loss"] = json!(loss);
            }
            json!({
                "id": format!("ftckpt-{}-{step}", task.task_id),
                "object": "fine_tuning.job.checkpoint",
                "created_at": saved.unwrap_or_else(|| unix(task.created_at)),
                // The checkpoint's name in this job (checkpoints are kept for resuming;
                // chat uses the job's `fine_tuned_model`).
                "fine_tuned_model_checkpoint": format!("{job_id}:checkpoint-{step}"),
                "fine_tuning_job_id": job_id,
                "metrics": metrics,
                "step_number": step,
            })
        })
        .collect();
    data.reverse();
    Ok(Json(page(
        data,
        q.after.as_deref(),
        q.limit.unwrap_or(10),
        100,
    )?))
}

/// `(step, eval loss)` from the task's evaluation events, by step.
async fn validation_losses(state: &AppState, task: &Task) -> Result<Vec<(u64, f64)>> {
    let events = state.training.events_since(task, 0).await?;
    Ok(events
        .iter()
        .filter_map(
            |e| match serde_json::from_str::<WorkerEvent>(&e.data).ok()? {
                WorkerEvent::Eval { metrics, step, .. } => {
                    Some((step?, metrics.get("eval_loss")?.as_f64()?))
                }
                _ => None,
            },
        )
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> CreateJob {
        let mut base = json!({"model": "m", "training_file": "file-x"});
        if let (Some(b), Some(extra)) = (base.as_object_mut(), v.as_object()) {
            b.extend(extra.clone());
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn hyperparameters_resolve_auto_and_refuse_bad_values_by_name() {
        let p = plan(&body(json!({}))).unwrap();
        assert_eq!(
            (p.method, p.epochs, p.batch, p.multiplier),
            ("supervised", 3.0, 4, 1.0)
        );
        assert_eq!(p.beta, None);
        let p = plan(&body(
            json!({"method": {"type": "dpo", "dpo": {"hyperparameters":
            {"n_epochs": 2, "batch_size": "auto", "beta": 0.3}}}}),
        ))
        .unwrap();
        assert_eq!(
            (p.stage, p.epochs, p.batch, p.beta),
            (Stage::Dpo, 2.0, 4, Some(0.3))
        );
        let p = plan(&body(
            json!({"hyperparameters": {"n_epochs": 1, "batch_size": 24,
            "learning_rate_multiplier": 0.5}}),
        ))
        .unwrap();
        assert_eq!((p.epochs, p.batch, p.multiplier), (1.0, 24, 0.5));
        for (v, param) in [
            (json!({"method": {"type": "reinforcement"}}), "method.type"),
            (json!({"method": {}}), "method.type"),
            (
                json!({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}}),
                "method.supervised.hyperparameters.n_epochs",
            ),
            (
                json!({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}}),
                "method.supervised.hyperparameters.beta",
            ),
            (
                json!({"hyperparameters": {"batch_size": 1.5}}),
                "hyperparameters.batch_size",
            ),
            (
                json!({"hyperparameters": {"learning_rate_multiplier": "high"}}),
                "hyperparameters.learning_rate_multiplier",
            ),
            (
                json!({"method": {"type": "supervised"}, "hyperparameters": {}}),
                "hyperparameters",
            ),
        ] {
            let e = plan(&body(v.clone()))
                .err()
                .unwrap_or_else(|| panic!("{v} passed"));
            assert!(
                e.message.starts_with(&format!("{param}:")),
                "{v}: {}",
                e.message
            );
        }
        for (v, param) in [
            (json!({"suffix": ""}), "suffix"),
            (json!({"suffix": "x".repeat(65)}), "suffix"),
            (json!({"integrations": [{"type": "wandb"}]}), "integrations"),
            (json!({"metadata": {"k": "v".repeat(513)}}), "metadata.k"),
        ] {
            let e = check_job_fields(&body(v.clone()))
                .err()
                .unwrap_or_else(|| panic!("{v} passed"));
            assert!(
                e.message.starts_with(&format!("{param}:")),
                "{v}: {}",
                e.message
            );
        }
    }

    #[test]
    fn batch_sizes_split_into_device_batch_and_accumulation() {
        assert_eq!(split_batch(1), (1, 1));
        assert_eq!(split_batch(4), (4, 1));
        assert_eq!(split_batch(8), (8, 1));
        assert_eq!(split_batch(24), (8, 3));
        assert_eq!(split_batch(7), (7, 1));
        assert_eq!(split_batch(11), (1, 11));
        assert_eq!(split_batch(256), (8, 32));
    }

    #[test]
    fn pages_follow_after_and_limit() {
        let items: Vec<Value> = (0..5).map(|i| json!({"id": format!("e{i}")})).collect();
        let p = page(items.clone(), None, 2, 10).unwrap();
        assert_eq!(p["data"].as_array().unwrap().len(), 2);
        assert_eq!(p["has_more"], true);
        assert_eq!(p["last_id"], "e1");
        let p = page(items.clone(), Some("e3"), 2, 10).unwrap();
        assert_eq!(p["data"], json!([{"id": "e4"}]));
        assert_eq!(p["has_more"], false);
        assert!(page(items.clone(), Some("nope"), 2, 10).is_err());
        assert!(page(items, None, 0, 10).is_err());
    }
}
