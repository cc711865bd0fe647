//! `/api/tasks…`: training tasks, their live events (SSE and WebSocket), logs, metrics,
//! configuration and artifacts, and the task form's rules.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ErrorBody, Json, Path, Query};
use super::extract::CurrentUser;
use super::views::{Message, Owner, TaskDetail, TaskSummary};
use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::training::spec::{TaskForm, TaskRequest};
use crate::training::{MetricPoint, Task, TaskStatus};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(form))
        .routes(routes!(compare))
        .routes(routes!(detail, delete_task))
        .routes(routes!(cancel))
        .routes(routes!(set_priority))
        .routes(routes!(resume))
        .routes(routes!(clone_task))
        .routes(routes!(events))
        .routes(routes!(websocket))
        .routes(routes!(artifact))
        .routes(routes!(logs))
        .routes(routes!(metrics))
        .routes(routes!(config))
}

/// The task `id` as the caller may see it: their own; any, for an administrator (DESIGN.md:
/// admins may see everything). Another user's is a 404.
pub(super) async fn visible_task(state: &AppState, p: &Principal, id: &str) -> Result<Task> {
    state
        .training
        .get_as(&p.user.user_id, p.is_admin(), id)
        .await
}

#[derive(Serialize, ToSchema)]
pub struct Created {
    task_id: String,
    status: TaskStatus,
    /// The chat template chosen (from the model when the request named none).
    template: String,
    message: String,
}

impl Created {
    pub(super) fn of(state: &AppState, task: Task) -> Created {
        let message = if state.training.env().is_ready() {
            "queued"
        } else {
            "queued; it starts once the training environment is ready (see /api/system/status)"
        };
        Created {
            task_id: task.task_id,
            status: task.status,
            template: task.spec.template,
            message: message.into(),
        }
    }
}

/// Validates a task and queues it.
#[utoipa::path(post, path = "/api/tasks", tag = "tasks",
    request_body = TaskRequest,
    responses((status = 201, description = "Queued", body = Created),
              (status = 422, description = "A bad value: the field is named", body = ErrorBody)))]
async fn create(
    state: AppState,
    CurrentUser(p): CurrentUser,
    note: crate::audit::AuditNote,
    Json(body): Json<TaskRequest>,
) -> Result<(StatusCode, Json<Created>)> {
    let task = state.training.submit(&p.user.user_id, body).await?;
    note.edit(|n| n.target_id = Some(task.task_id.clone()));
    Ok((StatusCode::CREATED, Json(Created::of(&state, task))))
}

/// The task form's rules: every numeric field's default and range, the templates, stages,
/// fine-tuning types and precisions — what `POST /api/tasks` checks.
#[utoipa::path(get, path = "/api/tasks/form", tag = "tasks",
    responses((status = 200, description = "The rules", body = TaskForm)))]
async fn form(_user: CurrentUser) -> Json<TaskForm> {
    Json(crate::training::spec::form())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Administrators: every user's tasks, each with its owner.
    #[serde(default)]
    all: bool,
}

#[derive(Serialize, ToSchema)]
pub struct TaskList {
    tasks: Vec<TaskSummary>,
}

/// The caller's tasks, newest first (`?all=true`: everyone's, for administrators).
#[utoipa::path(get, path = "/api/tasks", tag = "tasks", params(ListQuery),
    responses((status = 200, description = "The tasks", body = TaskList),
              (status = 403, description = "`all` asked by a non-administrator", body = ErrorBody)))]
async fn list(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Query(q): Query<ListQuery>,
) -> Result<Json<TaskList>> {
    let positions = state.training.queue_positions().await?;
    if !q.all {
        let tasks = state.training.list(&p.user.user_id).await?;
        return Ok(Json(TaskList {
            tasks: tasks
                .iter()
                .map(|t| TaskSummary::new(t, &positions))
                .collect(),
        }));
    }
    if !p.is_admin() {
        return Err(Error::forbidden(
            "only administrators may list every user's tasks",
        ));
    }
    let mut tasks = state.training.list_all().await?;
    tasks.sort_by_key(|t| std::cmp::Reverse(t.created_at));
    let names: std::collections::HashMap<String, String> = state
        .accounts
        .list()
        .await?
        .into_iter()
        .map(|u| (u.user_id, u.username))
        .collect();
    Ok(Json(TaskList {
        tasks: tasks
            .iter()
            .map(|t| TaskSummary {
                owner: Some(Owner {
                    user_id: t.owner.clone(),
                    username: names.get(&t.owner).cloned(),
                }),
                ..TaskSummary::new(t, &positions)
            })
            .collect(),
    }))
}

/// Every parameter, the status, progress, error, diagnosis and model of a task.
#[utoipa::path(get, path = "/api/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "The task's id")),
    responses((status = 200, description = "The task", body = TaskDetail),
              (status = 404, description = "No such task of yours", body = ErrorBody)))]
async fn detail(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<TaskDetail>> {
    let task = visible_task(&state, &p, &id).await?;
    let position = state
        .training
        .queue_positions()
        .await?
        .get(&task.task_id)
        .copied();
    Ok(Json(TaskDetail::new(&state, &task, position)))
}

#[derive(Serialize, ToSchema)]
pub struct Cancelled {
    task_id: String,
    /// `cancelled`, or `cancelling` while a running worker saves and stops.
    status: &'static str,
    message: &'static str,
}

/// Cancels a task: a queued one at once; a running one stops and saves at its next step
/// (terminated after the grace period otherwise).
#[utoipa::path(post, path = "/api/tasks/{id}/cancel", tag = "tasks",
    params(("id" = String, Path, description = "The task's id")),
    responses((status = 200, description = "Cancelled or cancelling", body = Cancelled),
              (status = 404, description = "No such task of yours", body = ErrorBody),
              (status = 409, description = "The task is not queued or running", body = ErrorBody)))]
async fn cancel(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Cancelled>> {
    let task = visible_task(&state, &p, &id).await?;
    let status = state.training.cancel(&task).await?;
    Ok(Json(if status == TaskStatus::Running {
        Cancelled {
            task_id: id,
            status: "cancelling",
            message: "stopping: the worker saves a checkpoint and exits (terminated after the grace period)",
        }
    } else {
        Cancelled {
            task_id: id,
            status: "cancelled",
            message: "cancelled",
        }
    }))
}

/// The body of `POST /api/tasks/{id}/priority`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriorityRequest {
    /// -100..=100; higher runs first.
    priority: i32,
}

#[derive(Serialize, ToSchema)]
pub struct PriorityChanged {
    task_id: String,
    priority: i32,
    /// The task's place in the queue now (1: next).
    queue_position: Option<usize>,
}

/// Moves a queued task in the queue by changing its priority.
#[utoipa::path(post, path = "/api/tasks/{id}/priority", tag = "tasks",
    params(("id" = String, Path, description = "The task's id")),
    request_body = PriorityRequest,
    responses((status = 200, description = "The new priority and place", body = PriorityChanged),
              (status = 404, description = "No such task of yours", body = ErrorBody),
              (status = 409, description = "The task is no longer queued", body = ErrorBody),
              (status = 422, description = "Priority out of range", body = ErrorBody)))]
async fn set_priority(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Json(body): Json<PriorityRequest>,
) -> Result<Json<PriorityChanged>> {
    let task = visible_task(&state, &p, &id).await?;
    let task = state.training.set_priority(&task, body.priority).await?;
    let positions = state.training.queue_positions().await?;
    Ok(Json(PriorityChanged {
        queue_position: positions.get(&task.task_id).copied(),
        task_id: task.task_id,
        priority: task.spec.priority,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct Resumed {
    task_id: String,
    status: TaskStatus,
    /// The checkpoint it continues from (its folder in the output).
    resume_from: Option<String>,
}

/// Queues a failed or cancelled task again, continuing from its newest checkpoint.
#[utoipa::path(post, path = "/api/tasks/{id}/resume", tag = "tasks",
    params(("id" = String, Path, description = "The task's id")),
    responses((status = 200, description = "Queued again", body = Resumed),
              (status = 404, description = "No such task of yours", body = ErrorBody),
              (status = 409, description = "Not failed or cancelled, or no checkpoint", body = ErrorBody)))]
async fn resume(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Resumed>> {
    let task = state.training.get(&p.user.user_id, &id).await?;
    let task = state.training.resume(&task).await?;
    Ok(Json(Resumed {
        resume_from: task
            .resume_from
            .as_deref()
            .map(|p| crate::text::relative_path(task.output_dir(), p)),
        task_id: task.task_id,
        status: task.status,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct Cloned {
    task_id: String,
    status: TaskStatus,
    cloned_from: String,
    message: &'static str,
}

/// A new queued task with the same specification; the body may override any field.
#[utoipa::path(post, path = "/api/tasks/{id}/clone", tag = "tasks",
    params(("id" = String, Path, description = "The task to copy")),
    request_body(content = Object, description = "Optional: fields of POST /api/tasks to change"),
    responses((status = 201, description = "Queued", body = Cloned),
              (status = 404, description = "No such task of yours", body = ErrorBody),
              (status = 422, description = "A bad value", body = ErrorBody)))]
async fn clone_task(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Cloned>)> {
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
    let source = state.training.get(&p.user.user_id, &id).await?;
    let task = state.training.clone_task(&source, overrides).await?;
    Ok((
        StatusCode::CREATED,
        Json(Cloned {
            task_id: task.task_id,
            status: task.status,
            cloned_from: id,
            message: "queued",
        }),
    ))
}

/// Deletes a finished task and its files (its registered model keeps its own).
#[utoipa::path(delete, path = "/api/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "The task's id")),
    responses((status = 200, description = "Deleted", body = Message),
              (status = 404, description = "No such task of yours", body = ErrorBody),
              (status = 409, description = "Queued or running", body = ErrorBody)))]
async fn delete_task(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Message>> {
    let task = visible_task(&state, &p, &id).await?;
    state.training.delete(&task).await?;
    Ok(Json(Message::new("task deleted")))
}

// ---- events -------------------------------------------------------------------------------

/// The snapshot every event stream starts with: the task as `GET /api/tasks/{id}` shows it,
/// and the id of the last event it already reflects. The id is read first: an event recorded
/// meanwhile is then sent after the snapshot (at worst once more), never lost.
async fn snapshot(state: &AppState, task: &Task) -> Result<(TaskDetail, u64)> {
    let last = state.training.last_event_id(task).await?;
    let task = state.training.get(&task.owner, &task.task_id).await?;
    let position = state
        .training
        .queue_positions()
        .await?
        .get(&task.task_id)
        .copied();
    Ok((TaskDetail::new(state, &task, position), last))
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
    let mut live = state.training.subscribe(&task);
    let (first, mut seen) = match after {
        Some(after) => {
            let missed = state.training.events_since(&task, after).await?;
            let seen = missed.last().map_or(after, |e| e.id);
            (missed.iter().map(StreamItem::of).collect::<Vec<_>>(), seen)
        }
        None => {
            let (snap, last) = snapshot(&state, &task).await?;
            let item = StreamItem {
                id: last,
                event: "snapshot".into(),
                data: serde_json::to_string(&snap).map_err(Error::internal)?,
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
                        match state.training.events_since(&task, seen).await {
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

/// The task's events as they happen (Server-Sent Events). The stream opens with a
/// `snapshot` event (the task detail); a client reconnecting with `Last-Event-ID` gets every
/// event it missed instead. Then `status`, `starting`, `train_begin`, `step`, `log`, `eval`,
/// `train_end`, `checkpoint`, `heartbeat`, `done`, `stopped`, `error` as they happen; each
/// event's id is its position in the task's log.
#[utoipa::path(get, path = "/api/tasks/{id}/events", tag = "tasks",
    params(("id" = String, Path, description = "The task's id"),
           ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event")),
    responses((status = 200, description = "text/event-stream: the task's events", content_type = "text/event-stream", body = String),
              (status = 404, description = "No such task of yours", body = ErrorBody)))]
async fn events(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>> {
    let task = visible_task(&state, &p, &id).await?;
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WsQuery {
    /// Resume after this event id.
    last_event_id: Option<u64>,
}

/// The same events over a WebSocket: JSON messages `{"id", "event", "data"}`, starting with a
/// snapshot (or, with `?last_event_id=N`, every event after N).
#[utoipa::path(get, path = "/api/tasks/{id}/ws", tag = "tasks",
    params(("id" = String, Path, description = "The task's id"), WsQuery),
    responses((status = 101, description = "Switching to a WebSocket"),
              (status = 200, description = "Not a WebSocket upgrade (never sent)"),
              (status = 404, description = "No such task of yours", body = ErrorBody)))]
async fn websocket(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response> {
    let task = visible_task(&state, &p, &id).await?;
    let items = task_stream(state, task, q.last_event_id).await?;
    Ok(ws.on_upgrade(move |socket| ws_session(socket, items)))
}

async fn ws_session(mut socket: WebSocket, mut items: tokio::sync::mpsc::Receiver<StreamItem>) {
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            item = items.recv() => {
                let Some(item) = item else { return };
                let data: Value = serde_json::from_str(&item.data).unwrap_or(Value::Null);
                let text = serde_json::json!({"id": item.id, "event": item.event, "data": data})
                    .to_string();
                if socket.send(WsMessage::Text(text.into())).await.is_err() {
                    return;
                }
            }
        }
    }
}

// ---- outputs ------------------------------------------------------------------------------

/// One of a task's outputs as a `.tar.gz`, streamed: `adapter` (the files of the output
/// folder), `logs`, `checkpoint-N`, or `bundle`: the run, portable (`train.yaml`,
/// `data/dataset_info.json` and the data, paths relative to the bundle) for
/// `llamafactory-cli train train.yaml` on any machine.
#[utoipa::path(get, path = "/api/tasks/{id}/artifacts/{name}", tag = "tasks",
    params(("id" = String, Path, description = "The task's id"),
           ("name" = String, Path, description = "`adapter`, `logs`, `bundle` or `checkpoint-N`")),
    responses((status = 200, description = "The archive", content_type = "application/gzip", body = Vec<u8>),
              (status = 404, description = "No such task of yours, or no such artifact", body = ErrorBody)))]
async fn artifact(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response> {
    let task = visible_task(&state, &p, &id).await?;
    let (filename, stream) = state.training.artifact(&task, &name).await?;
    Ok(gzip_download(filename, stream))
}

/// A streamed `.tar.gz` attachment.
pub fn gzip_download(
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Lines from the end (default 500).
    tail: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub struct Logs {
    task_id: String,
    status: TaskStatus,
    /// What the worker printed (LlamaFactory, transformers).
    logs: String,
}

/// The end of the task's log.
#[utoipa::path(get, path = "/api/tasks/{id}/logs", tag = "tasks",
    params(("id" = String, Path, description = "The task's id"), LogsQuery),
    responses((status = 200, description = "The log's last lines", body = Logs),
              (status = 404, description = "No such task of yours", body = ErrorBody)))]
async fn logs(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Json<Logs>> {
    let task = visible_task(&state, &p, &id).await?;
    let tail = q
        .tail
        .unwrap_or(crate::training::DEFAULT_LOG_TAIL)
        .clamp(1, 100_000);
    let logs = state.training.logs(&task, tail).await?;
    Ok(Json(Logs {
        task_id: task.task_id,
        status: task.status,
        logs,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct Metrics {
    task_id: String,
    points: Vec<MetricPoint>,
}

/// The loss curve: one point per logging step.
#[utoipa::path(get, path = "/api/tasks/{id}/metrics", tag = "tasks",
    params(("id" = String, Path, description = "The task's id")),
    responses((status = 200, description = "The points", body = Metrics),
              (status = 404, description = "No such task of yours", body = ErrorBody)))]
async fn metrics(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Metrics>> {
    let task = visible_task(&state, &p, &id).await?;
    let points = state.training.metrics(&task).await?;
    Ok(Json(Metrics {
        task_id: task.task_id,
        points,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CompareQuery {
    /// 2 to 6 task ids, comma-separated.
    ids: String,
    /// `json` (the default) or `csv` (one row per run, as a download).
    #[serde(default)]
    format: Option<String>,
}

/// One run of a comparison.
#[derive(Serialize, ToSchema)]
pub struct ComparedTask {
    task_id: String,
    name: String,
    status: TaskStatus,
    /// The model it produced, when it completed.
    model_id: Option<String>,
    /// Its loss curve (one point per logging step), to overlay on the others'.
    points: Vec<MetricPoint>,
    /// Steps done.
    steps: u64,
    /// The last logged training loss.
    final_loss: Option<f64>,
    /// What LlamaFactory reported at the end of the run (`all_results.json`): `train_loss`,
    /// `eval_loss` when a validation split was held out (`val_size`), runtimes and rates.
    results: std::collections::BTreeMap<String, f64>,
}

/// A parameter whose value is not the same in every run.
#[derive(Serialize, ToSchema)]
pub struct Difference {
    /// Its dotted name in the task's parameters (`lora.rank`).
    parameter: String,
    /// Its value in each run, in the order of `tasks` (null where a run lacks it).
    #[schema(value_type = Vec<Object>)]
    values: Vec<Value>,
}

#[derive(Serialize, ToSchema)]
pub struct Comparison {
    tasks: Vec<ComparedTask>,
    differences: Vec<Difference>,
}

/// Compares 2 to 6 runs: their loss curves, final metrics and the parameters that differ
/// (`format=csv`: the same table as CSV).
#[utoipa::path(get, path = "/api/tasks/compare", tag = "tasks", params(CompareQuery),
    responses((status = 200, description = "The comparison (JSON, or CSV with `format=csv`)", body = Comparison),
              (status = 404, description = "One of the tasks is not yours, or does not exist", body = ErrorBody),
              (status = 422, description = "Fewer than 2 or more than 6 ids, one twice, or an unknown format", body = ErrorBody)))]
async fn compare(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Query(q): Query<CompareQuery>,
) -> Result<Response> {
    use crate::training::compare;
    let csv = match q.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(Error::invalid(format!(
                "format: `{other}` is not one of json, csv"
            )));
        }
    };
    let ids: Vec<&str> = q
        .ids
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if !(2..=6).contains(&ids.len()) {
        return Err(Error::invalid(format!(
            "ids: compare 2 to 6 tasks ({} given)",
            ids.len()
        )));
    }
    if let Some(dup) = ids
        .iter()
        .enumerate()
        .find(|(i, id)| ids[..*i].contains(id))
    {
        return Err(Error::invalid(format!("ids: `{}` is given twice", dup.1)));
    }
    let mut tasks = Vec::with_capacity(ids.len());
    for id in &ids {
        tasks.push(visible_task(&state, &p, id).await?);
    }
    let mut compared = Vec::with_capacity(tasks.len());
    let mut specs = Vec::with_capacity(tasks.len());
    for task in &tasks {
        let points = state.training.metrics(task).await?;
        let out = task.output_dir().to_path_buf();
        let results = tokio::task::spawn_blocking(move || compare::final_results(&out))
            .await
            .map_err(Error::internal)?;
        let mut spec =
            compare::flatten(&serde_json::to_value(&task.spec).map_err(Error::internal)?);
        spec.insert("dataset_id".into(), json_opt(&task.dataset_id));
        specs.push(spec);
        compared.push(ComparedTask {
            task_id: task.task_id.clone(),
            name: task.spec.name.clone(),
            status: task.status,
            model_id: task.model_id.clone(),
            final_loss: points.iter().rev().find_map(|p| p.loss),
            steps: task.progress.current_step,
            points,
            results,
        });
    }
    let differences = compare::differences(&specs, &["name"]);
    if csv {
        let rows: Vec<compare::Row<'_>> = compared
            .iter()
            .map(|t| compare::Row {
                task_id: &t.task_id,
                name: &t.name,
                status: t.status.as_str(),
                steps: t.steps,
                final_loss: t.final_loss,
                results: &t.results,
            })
            .collect();
        let body = compare::to_csv(&rows, &differences).map_err(Error::internal)?;
        let mut response = body.into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        headers.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment; filename=\"comparison.csv\""),
        );
        return Ok(response);
    }
    Ok(Json(Comparison {
        tasks: compared,
        differences: differences
            .into_iter()
            .map(|(parameter, values)| Difference { parameter, values })
            .collect(),
    })
    .into_response())
}

fn json_opt(v: &Option<String>) -> Value {
    v.as_ref().map_or(Value::Null, |s| Value::String(s.clone()))
}

/// The exact LlamaFactory configuration of the run, as YAML.
#[utoipa::path(get, path = "/api/tasks/{id}/config", tag = "tasks",
    params(("id" = String, Path, description = "The task's id")),
    responses((status = 200, description = "LlamaFactory YAML", content_type = "application/yaml", body = String),
              (status = 404, description = "No such task of yours", body = ErrorBody)))]
async fn config(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response> {
    let task = visible_task(&state, &p, &id).await?;
    let yaml = state.training.config_yaml(&task);
    let mut response = yaml.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/yaml; charset=utf-8"),
    );
    Ok(response)
}
