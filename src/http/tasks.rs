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

/// Every parameter, the status, progress, error, diagnosis and model of a task.
fn detail_view(t: &Task, queue_position: Option<usize>) -> Value {
    let mut v = serde_json::to_value(&t.spec).unwrap_or_else(|_| json!({}));
    let fields = json!({
        "task_id": t.task_id,
        "status": t.status,
        "queue_position": queue_position,
        "progress": t.progress,
        "gpu_ids": t.gpu_ids,
        "pid": t.pid,
        "resume_from": t.resume_from,
        "outputs_removed": t.outputs_removed,
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

/// Whose task `id` is, as seen by the caller: their own; for an administrator, anyone's
/// (DESIGN.md: admins may see everything); otherwise the caller's id, so the lookup is a 404.
fn task_owner(state: &AppState, p: &crate::auth::Principal, id: &str) -> Result<String> {
    if p.is_admin()
        && let Some(t) = state.store.tasks().get_any(id)?
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
    let positions = state.trainer.queue_positions()?;
    if !q.all {
        let tasks = state.trainer.list(&p.user.user_id)?;
        let items: Vec<TaskSummary> = tasks.iter().map(|t| summary(t, &positions)).collect();
        return Ok(Json(json!({ "tasks": items })));
    }
    if !p.is_admin() {
        return Err(Error::forbidden(
            "only administrators may list every user's tasks",
        ));
    }
    let mut tasks = state.store.tasks().list_all()?;
    tasks.sort_by_key(|t| std::cmp::Reverse(t.created_at));
    let names: std::collections::HashMap<String, String> = state
        .store
        .users()?
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
    let task = state.trainer.get(&task_owner(&state, &p, &id)?, &id)?;
    let position = state.trainer.queue_positions()?.get(&task.task_id).copied();
    Ok(Json(detail_view(&task, position)))
}

async fn cancel(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let status = state
        .trainer
        .cancel(&task_owner(&state, &p, &id)?, &id)
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
        .delete(&task_owner(&state, &p, &id)?, &id)
        .await?;
    Ok(Json(json!({"message": "task deleted"})))
}

/// The snapshot every event stream starts with: the task as `GET /api/tasks/{id}` shows it.
async fn snapshot(state: &AppState, owner: &str, id: &str) -> Result<(Value, u64)> {
    let task = state.trainer.get(owner, id)?;
    let position = state.trainer.queue_positions()?.get(&task.task_id).copied();
    let last = state.trainer.last_event_id(&task).await;
    Ok((detail_view(&task, position), last))
}

fn last_event_id(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn event_type(data: &str) -> String {
    serde_json::from_str::<Value>(data)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_string))
        .unwrap_or_else(|| "message".into())
}

/// The task's events as they happen (SSE). The stream opens with a `snapshot` event; a
/// client reconnecting with `Last-Event-ID` gets every event it missed instead. Each event's
/// id is its line number in the task's events file.
async fn events(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>> {
    let task = state.trainer.get(&task_owner(&state, &p, &id)?, &id)?;
    // Subscribe before reading history, so nothing falls between the two.
    let live = state.trainer.subscribe(&id);
    let resume_after = last_event_id(&headers);
    let (first, mut seen): (Vec<Event>, u64) = match resume_after {
        Some(after) => {
            let missed = state.trainer.events_since(&task, after).await?;
            let seen = missed.last().map(|e| e.id).unwrap_or(after);
            let events = missed
                .into_iter()
                .map(|e| {
                    Event::default()
                        .id(e.id.to_string())
                        .event(event_type(&e.data))
                        .data(&*e.data)
                })
                .collect();
            (events, seen)
        }
        None => {
            let (snap, last) = snapshot(&state, &task.owner, &id).await?;
            (
                vec![
                    Event::default()
                        .id(last.to_string())
                        .event("snapshot")
                        .data(snap.to_string()),
                ],
                last,
            )
        }
    };
    let stream = async_stream_events(first, live, move |e: &crate::training::TaskEvent| {
        if e.id <= seen {
            return None;
        }
        seen = e.id;
        Some(
            Event::default()
                .id(e.id.to_string())
                .event(event_type(&e.data))
                .data(&*e.data),
        )
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// `first`, then every live event mapped through `map` (skipping `None`), until the channel
/// closes. A subscriber that lags behind gets a `lagged` event telling it to reconnect with
/// its last id.
fn async_stream_events<M>(
    first: Vec<Event>,
    mut live: tokio::sync::broadcast::Receiver<crate::training::TaskEvent>,
    mut map: M,
) -> impl Stream<Item = std::result::Result<Event, Infallible>>
where
    M: FnMut(&crate::training::TaskEvent) -> Option<Event> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        for e in first {
            if tx.send(e).await.is_err() {
                return;
            }
        }
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                next = live.recv() => match next {
                    Ok(event) => {
                        if let Some(e) = map(&event)
                            && tx.send(e).await.is_err() {
                                return;
                            }
                    }
                    Err(RecvError::Lagged(n)) => {
                        let e = Event::default().event("lagged").data(json!({"missed": n}).to_string());
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        }
    });
    futures_util::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
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
    let task = state.trainer.get(&task_owner(&state, &p, &id)?, &id)?;
    let live = state.trainer.subscribe(&id);
    let owner = task.owner.clone();
    Ok(ws.on_upgrade(move |socket| ws_session(socket, state, owner, task, live, q.last_event_id)))
}

#[derive(Deserialize)]
struct WsQuery {
    last_event_id: Option<u64>,
}

async fn ws_session(
    mut socket: WebSocket,
    state: AppState,
    owner: String,
    task: Task,
    mut live: tokio::sync::broadcast::Receiver<crate::training::TaskEvent>,
    after: Option<u64>,
) {
    let msg = |id: u64, event: &str, data: Value| {
        Message::Text(
            json!({"id": id, "event": event, "data": data})
                .to_string()
                .into(),
        )
    };
    let mut seen = match after {
        Some(after) => {
            let Ok(missed) = state.trainer.events_since(&task, after).await else {
                return;
            };
            let mut seen = after;
            for e in missed {
                let data: Value = serde_json::from_str(&e.data).unwrap_or(Value::Null);
                if socket
                    .send(msg(e.id, &event_type(&e.data), data))
                    .await
                    .is_err()
                {
                    return;
                }
                seen = e.id;
            }
            seen
        }
        None => {
            let Ok((snap, last)) = snapshot(&state, &owner, &task.task_id).await else {
                return;
            };
            if socket.send(msg(last, "snapshot", snap)).await.is_err() {
                return;
            }
            last
        }
    };
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            next = live.recv() => match next {
                Ok(e) if e.id > seen => {
                    seen = e.id;
                    let data: Value = serde_json::from_str(&e.data).unwrap_or(Value::Null);
                    if socket.send(msg(e.id, &event_type(&e.data), data)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => {
                    if socket.send(msg(seen, "lagged", json!({"missed": n}))).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    }
}

async fn artifact(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response> {
    let task = state.trainer.get(&task_owner(&state, &p, &id)?, &id)?;
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
        .get(&p.user.user_id, &id)?
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
            .get(&p.user.user_id, &task_id)?
            .is_some();
        if !mine && !p.is_admin() {
            continue;
        }
        running.push(json!({
            "task_id": task_id,
            "pid": pid,
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
    let task = state.trainer.get(&task_owner(&state, &p, &id)?, &id)?;
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
    let task = state.trainer.get(&task_owner(&state, &p, &id)?, &id)?;
    let points = state.trainer.metrics(&task)?;
    Ok(Json(json!({ "task_id": task.task_id, "points": points })))
}

async fn config(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response> {
    let task = state.trainer.get(&task_owner(&state, &p, &id)?, &id)?;
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
        "limits": {"max_upload_bytes": state.config.max_upload_bytes},
    })))
}
