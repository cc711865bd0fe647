//! `/api/tasks…`, `/api/files/models…`, `/api/models/available` and `/api/system/status`.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::broadcast::error::RecvError;

use super::AppState;
use super::error::{Json, Path, Query};
use super::extract::CurrentUser;
use crate::error::{Error, Result};
use crate::store::{ModelKind, ModelRecord, Progress, Task, TaskStatus};
use crate::training::spec::TaskRequest;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/tasks", get(list).post(create))
        .route("/api/tasks/{id}", get(detail).delete(delete_task))
        .route("/api/tasks/{id}/cancel", post(cancel))
        .route("/api/tasks/{id}/resume", post(resume))
        .route("/api/tasks/{id}/clone", post(clone_task))
        .route("/api/tasks/{id}/events", get(events))
        .route("/api/tasks/{id}/ws", get(websocket))
        .route("/api/tasks/{id}/artifacts/{name}", get(artifact))
        .route("/api/system/resources", get(resources))
        .route("/api/tasks/{id}/logs", get(logs))
        .route("/api/tasks/{id}/metrics", get(metrics))
        .route("/api/tasks/{id}/config", get(config))
        .route("/api/files/models", get(list_models))
        .route(
            "/api/files/models/{id}",
            get(model_detail).delete(delete_model),
        )
        .route("/api/files/models/{id}/download", get(download_model))
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
    queue_position: Option<usize>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
}

fn summary<'a>(
    t: &'a Task,
    positions: &std::collections::HashMap<String, usize>,
) -> TaskSummary<'a> {
    TaskSummary {
        task_id: &t.task_id,
        name: &t.spec.name,
        model_name: &t.spec.model_name,
        status: t.status,
        progress: &t.progress,
        queue_position: positions.get(&t.task_id).copied(),
        created_at: t.created_at,
        updated_at: t.updated_at,
    }
}

/// Every parameter, the status, progress, error, diagnosis and model of a task. Paths are
/// relative (the dataset to the data dir, the output to the task's folder) and the worker's
/// pid is not shown: answers do not describe the server's insides.
fn detail_view(state: &AppState, t: &Task, queue_position: Option<usize>) -> Value {
    let mut v = serde_json::to_value(&t.spec).unwrap_or_else(|_| json!({}));
    let fields = json!({
        "task_id": t.task_id,
        "status": t.status,
        "queue_position": queue_position,
        "progress": t.progress,
        "gpu_ids": t.gpu_ids,
        "resume_from": t.resume_from.as_deref().map(|p| crate::text::relative_path(std::path::Path::new(&t.paths.output_dir), p)),
        "outputs_removed": t.outputs_removed,
        "error": t.error,
        "diagnosis": t.diagnosis,
        "model_id": t.model_id,
        "dataset_id": t.dataset_id,
        "dataset_path": crate::text::relative_path(&state.config.data_dir, &t.paths.dataset_file),
        "dataset_format": t.paths.dataset_format,
        "output_dir": crate::text::relative_path(std::path::Path::new(&t.paths.task_dir), &t.paths.output_dir),
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

/// Whose task `id` is, as seen by the caller: their own; for an administrator, anyone's
/// (DESIGN.md: admins may see everything); otherwise the caller's id, so the lookup is a 404.
async fn task_owner(state: &AppState, p: &crate::auth::Principal, id: &str) -> Result<String> {
    if p.is_admin()
        && let Some(t) = state.store.tasks().get_any(id).await?
    {
        return Ok(t.owner);
    }
    Ok(p.user.user_id.clone())
}

#[derive(Deserialize)]
struct ListQuery {
    /// Administrators: every user's tasks, newest first, each with its owner's name.
    #[serde(default)]
    all: bool,
}

async fn list(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>> {
    let positions = state.trainer.queue_positions().await?;
    if !q.all {
        let tasks = state.trainer.list(&p.user.user_id).await?;
        let items: Vec<TaskSummary> = tasks.iter().map(|t| summary(t, &positions)).collect();
        return Ok(Json(json!({ "tasks": items })));
    }
    if !p.is_admin() {
        return Err(Error::forbidden(
            "only administrators may list every user's tasks",
        ));
    }
    let mut tasks = state.store.tasks().list_all().await?;
    tasks.sort_by_key(|t| std::cmp::Reverse(t.created_at));
    let names: std::collections::HashMap<String, String> = state
        .store
        .users()
        .await?
        .into_iter()
        .map(|u| (u.user_id, u.username))
        .collect();
    let items: Vec<Value> = tasks
        .iter()
        .map(|t| {
            let mut v = serde_json::to_value(summary(t, &positions)).unwrap_or_default();
            v["owner"] = json!({"user_id": t.owner, "username": names.get(&t.owner)});
            v
        })
        .collect();
    Ok(Json(json!({ "tasks": items })))
}

async fn detail(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let task = state
        .trainer
        .get(&task_owner(&state, &p, &id).await?, &id)
        .await?;
    let position = state
        .trainer
        .queue_positions()
        .await?
        .get(&task.task_id)
        .copied();
    Ok(Json(detail_view(&state, &task, position)))
}

async fn cancel(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let status = state
        .trainer
        .cancel(&task_owner(&state, &p, &id).await?, &id)
        .await?;
    let message = match status {
        TaskStatus::Running => {
            "stopping: the worker saves a checkpoint and exits (terminated after the grace period)"
        }
        _ => "cancelled",
    };
    Ok(Json(
        json!({"task_id": id, "status": if status == TaskStatus::Running { "cancelling" } else { "cancelled" }, "message": message}),
    ))
}

async fn resume(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let task = state.trainer.resume(&p.user.user_id, &id).await?;
    Ok(Json(
        json!({"task_id": task.task_id, "status": task.status, "resume_from": task.resume_from}),
    ))
}

async fn clone_task(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    let overrides: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            Error::new(
                crate::error::Kind::BadRequest,
                "malformed_body",
                e.to_string(),
            )
        })?
    };
    let task = state
        .trainer
        .clone_task(&p.user.user_id, &id, overrides)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"task_id": task.task_id, "status": task.status, "cloned_from": id, "message": "queued"}),
        ),
    ))
}

async fn delete_task(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    state
        .trainer
        .delete(&task_owner(&state, &p, &id).await?, &id)
        .await?;
    Ok(Json(json!({"message": "task deleted"})))
}

/// The snapshot every event stream starts with: the task as `GET /api/tasks/{id}` shows it,
/// and the id of the last event it already reflects. The id is read first: an event recorded
/// meanwhile is then sent after the snapshot (at worst once more), never lost.
async fn snapshot(state: &AppState, task: &Task) -> Result<(Value, u64)> {
    let last = state.trainer.last_event_id(task).await?;
    let task = state.trainer.get(&task.owner, &task.task_id).await?;
    let position = state
        .trainer
        .queue_positions()
        .await?
        .get(&task.task_id)
        .copied();
    Ok((detail_view(state, &task, position), last))
}

fn last_event_id(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// One item of a task's event stream, as both transports (SSE and WebSocket) send it.
struct StreamItem {
    id: u64,
    event: String,
    data: String,
}

impl StreamItem {
    fn of(e: &crate::training::TaskEvent) -> StreamItem {
        StreamItem {
            id: e.id,
            event: e.kind(),
            data: e.data.to_string(),
        }
    }
}

/// A task's event stream, the one implementation behind SSE and the WebSocket: a snapshot,
/// or (resuming after an id) every event missed since; then every new event once, in order.
/// A subscriber that falls behind the live channel catches up from the task's log file, so
/// it never misses one. Ends when the receiver is dropped or the task is deleted.
async fn task_stream(
    state: AppState,
    task: Task,
    after: Option<u64>,
) -> Result<tokio::sync::mpsc::Receiver<StreamItem>> {
    // Subscribe before reading the history, so nothing falls between the two.
    let mut live = state.trainer.subscribe(&task);
    let (first, mut seen) = match after {
        Some(after) => {
            let missed = state.trainer.events_since(&task, after).await?;
            let seen = missed.last().map_or(after, |e| e.id);
            (missed.iter().map(StreamItem::of).collect::<Vec<_>>(), seen)
        }
        None => {
            let (snap, last) = snapshot(&state, &task).await?;
            let item = StreamItem {
                id: last,
                event: "snapshot".into(),
                data: snap.to_string(),
            };
            (vec![item], last)
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<StreamItem>(64);
    tokio::spawn(async move {
        for item in first {
            if tx.send(item).await.is_err() {
                return;
            }
        }
        loop {
            let batch = tokio::select! {
                _ = tx.closed() => return,
                next = live.recv() => match next {
                    Ok(e) => vec![e],
                    Err(RecvError::Lagged(_)) => {
                        match state.trainer.events_since(&task, seen).await {
                            Ok(missed) => missed,
                            Err(e) => {
                                tracing::warn!(task_id = %task.task_id, error = %e, "event replay failed");
                                return;
                            }
                        }
                    }
                    Err(RecvError::Closed) => return,
                }
            };
            for e in batch {
                if e.id <= seen {
                    continue;
                }
                seen = e.id;
                if tx.send(StreamItem::of(&e)).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

/// The task's events as they happen (SSE). The stream opens with a `snapshot` event; a
/// client reconnecting with `Last-Event-ID` gets every event it missed instead. Each event's
/// id is its position in the task's event log.
async fn events(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>> {
    let task = state
        .trainer
        .get(&task_owner(&state, &p, &id).await?, &id)
        .await?;
    let items = task_stream(state, task, last_event_id(&headers)).await?;
    let stream =
        futures_util::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(items), |item| {
            Ok(Event::default()
                .id(item.id.to_string())
                .event(item.event)
                .data(item.data))
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The same events over a WebSocket: JSON messages `{"id", "event", "data"}`, starting with a
/// snapshot (or, with `?last_event_id=N`, every event after N).
async fn websocket(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response> {
    let task = state
        .trainer
        .get(&task_owner(&state, &p, &id).await?, &id)
        .await?;
    let items = task_stream(state, task, q.last_event_id).await?;
    Ok(ws.on_upgrade(move |socket| ws_session(socket, items)))
}

#[derive(Deserialize)]
struct WsQuery {
    last_event_id: Option<u64>,
}

async fn ws_session(mut socket: WebSocket, mut items: tokio::sync::mpsc::Receiver<StreamItem>) {
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            item = items.recv() => {
                let Some(item) = item else { return };
                let data: Value = serde_json::from_str(&item.data).unwrap_or(Value::Null);
                let text = json!({"id": item.id, "event": item.event, "data": data}).to_string();
                if socket.send(Message::Text(text.into())).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn artifact(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response> {
    let task = state
        .trainer
        .get(&task_owner(&state, &p, &id).await?, &id)
        .await?;
    let artifact = crate::training::artifacts::Artifact::parse(&name)
        .ok_or_else(|| Error::not_found("artifact (use adapter, logs or checkpoint-N)"))?;
    let (filename, stream) = crate::training::artifacts::archive(&task, &artifact)?;
    Ok(gzip_download(filename, stream))
}

/// One of the caller's registered models as a `.tar.gz` (base models are folders on the
/// server and are not offered for download).
async fn download_model(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response> {
    let model = state
        .store
        .models()
        .get(&p.user.user_id, &id)
        .await?
        .ok_or_else(|| Error::not_found("model"))?;
    let (filename, stream) = crate::training::artifacts::model_archive(&model)?;
    Ok(gzip_download(filename, stream))
}

fn gzip_download(
    filename: String,
    stream: impl Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
) -> Response {
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/gzip"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    response
}

/// GPUs (utilisation, memory, temperature) where present; CPU and memory always; the
/// running workers with their memory and GPU figures.
async fn resources(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<Value>> {
    let cpu = crate::system::cpu(Duration::from_millis(200)).await;
    let (gpus, procs) =
        tokio::task::spawn_blocking(|| (crate::system::gpus(), crate::system::gpu_processes()))
            .await?;
    let mut running = Vec::new();
    for (task_id, pid, gpu_ids) in state.trainer.running_workers() {
        let mine = state
            .store
            .tasks()
            .get(&p.user.user_id, &task_id)
            .await?
            .is_some();
        if !mine && !p.is_admin() {
            continue;
        }
        running.push(json!({
            "task_id": task_id,
            // The process id is for administrators (who may look at the machine itself).
            "pid": p.is_admin().then_some(pid),
            "gpu_ids": gpu_ids,
            "rss_bytes": crate::system::process_rss(pid),
            "gpu_memory_mib": procs.get(&pid),
        }));
    }
    Ok(Json(json!({
        "cpu": cpu,
        "memory": crate::system::memory(),
        "gpus": gpus,
        "scheduler": {"slots": state.trainer.max_concurrent(), "gpu_ids": state.trainer.gpu_ids()},
        "running_tasks": running,
    })))
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
    let task = state
        .trainer
        .get(&task_owner(&state, &p, &id).await?, &id)
        .await?;
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
    let task = state
        .trainer
        .get(&task_owner(&state, &p, &id).await?, &id)
        .await?;
    let points = state.trainer.metrics(&task).await?;
    Ok(Json(json!({ "task_id": task.task_id, "points": points })))
}

async fn config(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response> {
    let task = state
        .trainer
        .get(&task_owner(&state, &p, &id).await?, &id)
        .await?;
    let yaml = state.trainer.config_yaml(&task);
    let mut response = yaml.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/yaml; charset=utf-8"),
    );
    Ok(response)
}

// ---- models -------------------------------------------------------------------------------

fn base_model_view(state: &AppState, m: &crate::models::BaseModel) -> Value {
    json!({
        "model_id": m.name,
        "name": m.name,
        "model_path": crate::text::relative_path(&state.config.models_dir, &m.path.to_string_lossy()),
        "kind": ModelKind::Base,
        "base_model": Value::Null,
        "task_id": Value::Null,
        "size": m.size,
        "created_at": Value::Null,
        "trainable": m.hf_dir.is_some(),
        "model_type": m.model_type,
    })
}

fn model_view(state: &AppState, m: &ModelRecord) -> Value {
    json!({
        "model_id": m.model_id,
        "name": m.name,
        "model_path": crate::text::relative_path(&state.config.data_dir, &m.model_path),
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
    let mut models: Vec<Value> = base_models(&state)?
        .iter()
        .map(|m| base_model_view(&state, m))
        .collect();
    models.extend(
        state
            .store
            .models()
            .list(&p.user.user_id)
            .await?
            .iter()
            .map(|m| model_view(&state, m)),
    );
    Ok(Json(json!({ "models": models })))
}

async fn model_detail(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    if let Some(m) = state.store.models().get(&p.user.user_id, &id).await? {
        return Ok(Json(model_view(&state, &m)));
    }
    base_models(&state)?
        .iter()
        .find(|m| m.name == id)
        .map(|m| Json(base_model_view(&state, m)))
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
        .map(|m| json!({"model_id": m.name, "name": m.name, "model_path": crate::text::relative_path(&state.config.models_dir, &m.path.to_string_lossy()), "kind": "base"}))
        .collect();
    models.extend(state.store.models().list(&p.user.user_id).await?.iter().map(|m| {
        json!({"model_id": m.model_id, "name": m.name, "model_path": crate::text::relative_path(&state.config.data_dir, &m.model_path), "kind": m.kind, "base_model": m.base_model})
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
        "limits": {"max_upload_bytes": state.config.max_upload_bytes},
    })))
}
