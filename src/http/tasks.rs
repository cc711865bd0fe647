//! `/api/tasks…`, `/api/files/models…`, `/api/models/available` and `/api/system/status`.

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::AppState;
use super::error::{Json, Path, Query};
use super::extract::CurrentUser;
use crate::error::{Error, Result};
use crate::store::{ModelKind, ModelRecord, Progress, Task, TaskStatus};
use crate::training::spec::TaskRequest;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/tasks", get(list).post(create))
        .route("/api/tasks/{id}", get(detail))
        .route("/api/tasks/{id}/logs", get(logs))
        .route("/api/tasks/{id}/metrics", get(metrics))
        .route("/api/tasks/{id}/config", get(config))
        .route("/api/files/models", get(list_models))
        .route(
            "/api/files/models/{id}",
            get(model_detail).delete(delete_model),
        )
        .route("/api/models/available", get(available_models))
        .route("/api/system/status", get(system_status))
}

#[derive(Serialize)]
struct TaskSummary<'a> {
    task_id: &'a str,
    name: &'a str,
    model_name: &'a str,
    status: TaskStatus,
    progress: &'a Progress,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
}

fn summary(t: &Task) -> TaskSummary<'_> {
    TaskSummary {
        task_id: &t.task_id,
        name: &t.spec.name,
        model_name: &t.spec.model_name,
        status: t.status,
        progress: &t.progress,
        created_at: t.created_at,
        updated_at: t.updated_at,
    }
}

/// Every parameter, the status, progress, error, diagnosis and model of a task.
fn detail_view(t: &Task) -> Value {
    let mut v = serde_json::to_value(&t.spec).unwrap_or_else(|_| json!({}));
    let fields = json!({
        "task_id": t.task_id,
        "status": t.status,
        "progress": t.progress,
        "error": t.error,
        "diagnosis": t.diagnosis,
        "model_id": t.model_id,
        "dataset_id": t.dataset_id,
        "dataset_path": t.paths.dataset_file,
        "dataset_format": t.paths.dataset_format,
        "output_dir": t.paths.output_dir,
        "created_at": rfc3339(t.created_at),
        "updated_at": rfc3339(t.updated_at),
        "started_at": t.started_at.map(rfc3339),
        "finished_at": t.finished_at.map(rfc3339),
    });
    if let (Some(obj), Some(extra)) = (v.as_object_mut(), fields.as_object()) {
        for (k, val) in extra {
            obj.insert(k.clone(), val.clone());
        }
    }
    v
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

async fn create(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Json(body): Json<TaskRequest>,
) -> Result<(StatusCode, Json<Value>)> {
    let task = state.trainer.submit(&p.user.user_id, body).await?;
    let waiting = if state.trainer.env().is_ready() {
        "queued"
    } else {
        "queued; it starts once the training environment is ready (see /api/system/status)"
    };
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "task_id": task.task_id,
            "status": task.status,
            "template": task.spec.template,
            "message": waiting,
        })),
    ))
}

async fn list(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<Value>> {
    let tasks = state.trainer.list(&p.user.user_id)?;
    let items: Vec<TaskSummary> = tasks.iter().map(summary).collect();
    Ok(Json(json!({ "tasks": items })))
}

async fn detail(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let task = state.trainer.get(&p.user.user_id, &id)?;
    Ok(Json(detail_view(&task)))
}

#[derive(Deserialize)]
struct LogsQuery {
    tail: Option<usize>,
}

async fn logs(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Json<Value>> {
    let task = state.trainer.get(&p.user.user_id, &id)?;
    let tail = q
        .tail
        .unwrap_or(crate::training::DEFAULT_LOG_TAIL)
        .clamp(1, 100_000);
    let logs = state.trainer.logs(&task, tail).await?;
    Ok(Json(
        json!({ "task_id": task.task_id, "status": task.status, "logs": logs }),
    ))
}

async fn metrics(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let task = state.trainer.get(&p.user.user_id, &id)?;
    let points = state.trainer.metrics(&task)?;
    Ok(Json(json!({ "task_id": task.task_id, "points": points })))
}

async fn config(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response> {
    let task = state.trainer.get(&p.user.user_id, &id)?;
    let yaml = state.trainer.config_yaml(&task);
    let mut response = yaml.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/yaml; charset=utf-8"),
    );
    Ok(response)
}

// ---- models -------------------------------------------------------------------------------

fn base_model_view(m: &crate::models::BaseModel) -> Value {
    json!({
        "model_id": m.name,
        "name": m.name,
        "model_path": m.path.to_string_lossy(),
        "kind": ModelKind::Base,
        "base_model": Value::Null,
        "task_id": Value::Null,
        "size": m.size,
        "created_at": Value::Null,
        "trainable": m.hf_dir.is_some(),
        "model_type": m.model_type,
    })
}

fn model_view(m: &ModelRecord) -> Value {
    json!({
        "model_id": m.model_id,
        "name": m.name,
        "model_path": m.model_path,
        "kind": m.kind,
        "base_model": m.base_model,
        "task_id": m.task_id,
        "size": m.size,
        "created_at": rfc3339(m.created_at),
    })
}

fn base_models(state: &AppState) -> Result<Vec<crate::models::BaseModel>> {
    crate::models::list_base_models(&state.config.models_dir).map_err(Error::from)
}

async fn list_models(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<Value>> {
    let mut models: Vec<Value> = base_models(&state)?.iter().map(base_model_view).collect();
    models.extend(
        state
            .store
            .models()
            .list(&p.user.user_id)?
            .iter()
            .map(model_view),
    );
    Ok(Json(json!({ "models": models })))
}

async fn model_detail(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    if let Some(m) = state.store.models().get(&p.user.user_id, &id)? {
        return Ok(Json(model_view(&m)));
    }
    base_models(&state)?
        .iter()
        .find(|m| m.name == id)
        .map(|m| Json(base_model_view(m)))
        .ok_or_else(|| Error::not_found("model"))
}

/// Removes the record of one of the caller's models (its files stay with the task until the
/// task is deleted). Base models are folders in the models dir, not records.
async fn delete_model(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    match state.store.models().remove(&p.user.user_id, &id).await? {
        Some(m) => Ok(Json(
            json!({ "message": format!("removed model {}", m.name) }),
        )),
        None if base_models(&state)?.iter().any(|m| m.name == id) => Err(Error::forbidden(
            "base models are folders in the models dir; remove the folder to remove one",
        )),
        None => Err(Error::not_found("model")),
    }
}

async fn available_models(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<Value>> {
    let mut models: Vec<Value> = base_models(&state)?
        .iter()
        .map(|m| json!({"model_id": m.name, "name": m.name, "model_path": m.path.to_string_lossy(), "kind": "base"}))
        .collect();
    models.extend(state.store.models().list(&p.user.user_id)?.iter().map(|m| {
        json!({"model_id": m.model_id, "name": m.name, "model_path": m.model_path, "kind": m.kind, "base_model": m.base_model})
    }));
    Ok(Json(json!({ "models": models })))
}

async fn system_status(state: AppState, _user: CurrentUser) -> Result<Json<Value>> {
    let env = state.trainer.env().status();
    let models: Vec<String> = base_models(&state)?.into_iter().map(|m| m.name).collect();
    let pull = state
        .model_pull
        .read()
        .map(|s| s.clone())
        .unwrap_or_default();
    Ok(Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "environment": env,
        "models": models,
        "model_pull": pull,
    })))
}
