//! Chat: the OpenAI-compatible `/v1` API, the original `/api/chat/completion`, and saved
//! conversations (`/api/chat/sessions`).

use std::convert::Infallible;
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::AppState;
use super::error::{Json, Path, Query};
use super::extract::CurrentUser;
use crate::error::{Error, Kind, Result};
use crate::inference::{ChatMessage, EngineError, GenEvent, GenerateRequest, SamplingParams};
use crate::store::{ChatSession, ModelKind, SessionMessage, new_id};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(v1_models))
        .route("/v1/chat/completions", post(v1_chat))
        .route("/api/chat/completion", post(api_chat))
        .route(
            "/api/chat/sessions",
            get(list_sessions).post(create_session),
        )
        .route(
            "/api/chat/sessions/{id}",
            get(get_session)
                .patch(rename_session)
                .delete(delete_session),
        )
        .route("/api/chat/sessions/{id}/messages", post(append_messages))
        .route("/api/chat/sessions/{id}/export", get(export_session))
}

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NotFound(m) => Error::new(Kind::NotFound, "model_not_found", m),
            EngineError::Invalid(m) => Error::new(Kind::Invalid, "invalid_request", m),
            EngineError::Unsupported(m) => Error::new(Kind::Invalid, "unsupported", m),
            EngineError::Internal(m) => Error::internal(m),
        }
    }
}

/// What a model id names for the engine: a base model, optionally with an adapter.
struct Target {
    /// The id as the client gave it (echoed in answers).
    id: String,
    base_model: String,
    adapter: Option<PathBuf>,
}

/// Resolves a model id: one of the caller's trained models (by `model_id`), else a base
/// model (by name). Another user's model is "not found".
async fn resolve(state: &AppState, owner: &str, id: &str) -> Result<Target> {
    if let Some(m) = state.store.models().get(owner, id).await? {
        return match m.kind {
            ModelKind::Adapter => Ok(Target {
                id: id.to_string(),
                base_model: m.base_model.clone(),
                adapter: Some(PathBuf::from(&m.model_path)),
            }),
            _ => Err(Error::new(
                Kind::Invalid,
                "unsupported",
                "chat serves base models and LoRA adapters; full fine-tunes are not served yet",
            )),
        };
    }
    match crate::models::find_base_model(&state.config.models_dir, id)? {
        Some(b) => Ok(Target {
            id: id.to_string(),
            base_model: b.name,
            adapter: None,
        }),
        None => Err(Error::new(
            Kind::NotFound,
            "model_not_found",
            format!("the model `{id}` does not exist (see /v1/models)"),
        )),
    }
}

/// Resolves the original API's `model_path`: a trained model's path as `/api/files/models`
/// shows it (relative to the data dir), a base model's (relative to the models dir), a base
/// model's name, or either as an absolute path.
async fn resolve_path(state: &AppState, owner: &str, path: &str) -> Result<Target> {
    if let Some(wanted) = crate::text::resolve_client_path(&state.config.data_dir, path)
        && let Some(m) = state
            .store
            .models()
            .list(owner)
            .await?
            .into_iter()
            .find(|m| std::path::Path::new(&m.model_path) == wanted)
    {
        return resolve(state, owner, &m.model_id).await;
    }
    let wanted = crate::text::resolve_client_path(&state.config.models_dir, path);
    let base = crate::models::list_base_models(&state.config.models_dir)?
        .into_iter()
        .find(|b| Some(&b.path) == wanted.as_ref() || b.name == path);
    match base {
        Some(b) => Ok(Target {
            id: b.name.clone(),
            base_model: b.name,
            adapter: None,
        }),
        None => Err(Error::new(
            Kind::NotFound,
            "model_not_found",
            "model_path: no base model or trained model of yours is at that path",
        )),
    }
}

/// Starts a generation for `user` once the limits allow it. The engine's checks read files
/// (the model's tokenizer and template, an adapter), so they run on the blocking pool. The
/// permit must live as long as the generation.
async fn start_generation(
    state: &AppState,
    user: &str,
    req: GenerateRequest,
) -> Result<(crate::inference::Generation, crate::chat::GenerationPermit)> {
    let permit = state.generations.acquire(user)?;
    let engine = state.engine.clone();
    let generation = tokio::task::spawn_blocking(move || engine.generate(req)).await??;
    Ok((generation, permit))
}

fn unix_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

// ---- /v1 ----------------------------------------------------------------------------------

async fn v1_models(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<Value>> {
    let mut data: Vec<Value> = crate::models::list_base_models(&state.config.models_dir)?
        .iter()
        .map(|b| json!({"id": b.name, "object": "model", "created": 0, "owned_by": "ferrotune", "kind": "base"}))
        .collect();
    for m in state.store.models().list(&p.user.user_id).await? {
        if m.kind != ModelKind::Adapter {
            continue;
        }
        data.push(json!({
            "id": m.model_id, "object": "model", "created": m.created_at.unix_timestamp(),
            "owned_by": p.user.username, "kind": "adapter", "name": m.name, "base_model": m.base_model,
        }));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

/// OpenAI message content: a string, or an array of parts of which the text ones count.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize)]
struct V1Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct V1Request {
    model: String,
    messages: Vec<V1Message>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    stop: Option<Stop>,
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    n: Option<u32>,
}

/// Default answer length when the client sets none.
const DEFAULT_MAX_TOKENS: usize = 2048;

fn to_messages(messages: Vec<V1Message>) -> Result<Vec<ChatMessage>> {
    if messages.is_empty() {
        return Err(Error::new(
            Kind::Invalid,
            "invalid_request",
            "messages must not be empty",
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !matches!(
                m.role.as_str(),
                "system" | "user" | "assistant" | "tool" | "developer"
            ) {
                return Err(Error::new(
                    Kind::Invalid,
                    "invalid_request",
                    format!("messages[{i}].role: unknown role `{}`", m.role),
                ));
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => parts
                    .iter()
                    .filter(|p| p["type"] == "text")
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join(""),
            };
            let role = if m.role == "developer" {
                "system".into()
            } else {
                m.role
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

async fn v1_chat(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Json(req): Json<V1Request>,
) -> Result<Response> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(Error::new(
            Kind::Invalid,
            "invalid_request",
            "only n = 1 is supported",
        ));
    }
    let target = resolve(&state, &p.user.user_id, &req.model).await?;
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let params = SamplingParams {
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        top_k: req.top_k,
        repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
        presence_penalty: req.presence_penalty.unwrap_or(0.0),
        frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
        seed: req.seed,
        max_tokens: req
            .max_completion_tokens
            .or(req.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS),
        stop,
    };
    let (generation, permit) = start_generation(
        &state,
        &p.user.user_id,
        GenerateRequest {
            base_model: target.base_model.clone(),
            adapter: target.adapter.clone(),
            messages: to_messages(req.messages)?,
            params,
        },
    )
    .await?;
    let id = format!("chatcmpl-{}", new_id());
    let created = unix_now();
    if !req.stream {
        let done = generation.collect().await?;
        return Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": target.id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": done.finish_reason.as_str(), "logprobs": null}],
            "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                      "total_tokens": done.prompt_tokens + done.completion_tokens},
        }))
        .into_response());
    }
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let model = target.id;
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]})
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::result::Result<Event, Infallible>>(32);
    let mut events = generation.events;
    tokio::spawn(async move {
        // The generation's place is freed when this task ends.
        let _permit = permit;
        let send = |v: Value| Event::default().data(v.to_string());
        if tx
            .send(Ok(send(chunk(
                json!({"role": "assistant", "content": ""}),
                None,
            ))))
            .await
            .is_err()
        {
            return;
        }
        // Dropping `events` when the client goes away cancels the generation.
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                ev = events.recv() => match ev {
                    Some(GenEvent::Text(t)) => {
                        if tx.send(Ok(send(chunk(json!({"content": t}), None)))).await.is_err() {
                            return;
                        }
                    }
                    Some(GenEvent::Done { finish_reason, prompt_tokens, completion_tokens }) => {
                        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                           "total_tokens": prompt_tokens + completion_tokens});
                        let mut last = chunk(json!({}), Some(finish_reason.as_str()));
                        last["usage"] = usage.clone();
                        let _ = tx.send(Ok(send(last))).await;
                        if include_usage {
                            let mut u = chunk(json!({}), None);
                            u["choices"] = json!([]);
                            u["usage"] = usage;
                            let _ = tx.send(Ok(send(u))).await;
                        }
                        break;
                    }
                    Some(GenEvent::Error(e)) => {
                        tracing::error!(error = %e, "generation failed");
                        let err = json!({"error": {"message": "generation failed", "type": "server_error", "code": "internal"}});
                        let _ = tx.send(Ok(send(err))).await;
                        break;
                    }
                    None => break,
                }
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Rewrites our error bodies (`{"error": "...", "code"}`) into OpenAI's shape
/// (`{"error": {"message", "type", "param", "code"}}`) on `/v1`, so OpenAI clients show them.
pub async fn openai_errors(response: Response) -> Response {
    let status = response.status();
    if status.is_success() || status == StatusCode::SWITCHING_PROTOCOLS {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let ours: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let Some(message) = ours["error"].as_str() else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let kind = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    let body =
        json!({"error": {"message": message, "type": kind, "param": null, "code": ours["code"]}});
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body.to_string()))
}

// ---- /api/chat/completion -----------------------------------------------------------------

#[derive(Deserialize)]
struct ApiChatRequest {
    model_path: Option<String>,
    model_id: Option<String>,
    messages: Vec<V1Message>,
    temperature: Option<f64>,
    max_tokens: Option<usize>,
    top_p: Option<f64>,
    seed: Option<u64>,
    /// Append the last user message and the answer to this saved conversation.
    session_id: Option<String>,
}

async fn api_chat(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Json(req): Json<ApiChatRequest>,
) -> Result<Json<Value>> {
    let owner = p.user.user_id.clone();
    let target = match (req.model_id.as_deref(), req.model_path.as_deref()) {
        (Some(id), _) if !id.is_empty() => resolve(&state, &owner, id).await?,
        (_, Some(path)) if !path.is_empty() => resolve_path(&state, &owner, path).await?,
        _ => {
            return Err(Error::new(
                Kind::Invalid,
                "invalid_request",
                "model_id or model_path is required",
            ));
        }
    };
    if let Some(id) = &req.session_id {
        // Checked before generating; the answer is appended to what the session holds then.
        load_session(&state, &owner, id).await?;
    }
    let messages = to_messages(req.messages)?;
    let last_user = messages.iter().rev().find(|m| m.role == "user").cloned();
    let (generation, permit) = start_generation(
        &state,
        &owner,
        GenerateRequest {
            base_model: target.base_model,
            adapter: target.adapter,
            messages,
            params: SamplingParams {
                temperature: req.temperature.unwrap_or(0.7),
                top_p: req.top_p.unwrap_or(1.0),
                seed: req.seed,
                max_tokens: req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
                ..SamplingParams::default()
            },
        },
    )
    .await?;
    let done = generation.collect().await?;
    drop(permit);
    if let Some(id) = &req.session_id {
        let now = OffsetDateTime::now_utc();
        let mut added: Vec<SessionMessage> = last_user
            .map(|u| SessionMessage {
                role: u.role,
                content: u.content,
                created_at: now,
            })
            .into_iter()
            .collect();
        added.push(SessionMessage {
            role: "assistant".into(),
            content: done.text.clone(),
            created_at: now,
        });
        let model = target.id.clone();
        // Atomic, so answers recorded at the same time in one session all stay.
        state
            .store
            .chat_sessions()
            .update(&owner, id, move |s| {
                s.messages.extend(added.iter().cloned());
                s.model = Some(model.clone());
                s.updated_at = now;
                true
            })
            .await?
            .ok_or_else(|| Error::not_found("chat session"))?;
    }
    Ok(Json(json!({
        "role": "assistant",
        "content": done.text,
        "finish_reason": done.finish_reason.as_str(),
        "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens},
        "model": target.id,
    })))
}

// ---- sessions -----------------------------------------------------------------------------

fn session_summary(s: &ChatSession) -> Value {
    json!({
        "session_id": s.session_id, "title": s.title, "model": s.model,
        "message_count": s.messages.len(),
        "created_at": s.created_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "updated_at": s.updated_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
    })
}

fn session_full(s: &ChatSession) -> Value {
    let mut v = session_summary(s);
    v["messages"] = serde_json::to_value(&s.messages).unwrap_or(Value::Null);
    v
}

#[derive(Deserialize)]
struct CreateSession {
    title: Option<String>,
    model: Option<String>,
    #[serde(default)]
    messages: Vec<V1Message>,
}

fn check_title(title: &str) -> Result<String> {
    let t = crate::text::clean_name(title);
    let t = t.as_str();
    if t.is_empty() || t.chars().count() > 200 {
        return Err(Error::new(
            Kind::Invalid,
            "invalid_title",
            "title must be 1 to 200 characters",
        ));
    }
    Ok(t.to_string())
}

async fn create_session(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Json(body): Json<CreateSession>,
) -> Result<(StatusCode, Json<Value>)> {
    let now = OffsetDateTime::now_utc();
    let title = match body.title {
        Some(t) => check_title(&t)?,
        None => "New chat".into(),
    };
    if let Some(model) = &body.model {
        resolve(&state, &p.user.user_id, model).await?;
    }
    let messages = to_messages_allow_empty(body.messages)?
        .into_iter()
        .map(|m| SessionMessage {
            role: m.role,
            content: m.content,
            created_at: now,
        })
        .collect();
    let session = ChatSession {
        session_id: new_id(),
        owner: p.user.user_id.clone(),
        title,
        model: body.model,
        messages,
        created_at: now,
        updated_at: now,
    };
    state.store.chat_sessions().put(&session).await?;
    Ok((StatusCode::CREATED, Json(session_full(&session))))
}

fn to_messages_allow_empty(messages: Vec<V1Message>) -> Result<Vec<ChatMessage>> {
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    to_messages(messages)
}

async fn list_sessions(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<Value>> {
    let sessions: Vec<Value> = state
        .store
        .chat_sessions()
        .list(&p.user.user_id)
        .await?
        .iter()
        .map(session_summary)
        .collect();
    Ok(Json(json!({ "sessions": sessions })))
}

async fn load_session(state: &AppState, owner: &str, id: &str) -> Result<ChatSession> {
    state
        .store
        .chat_sessions()
        .get(owner, id)
        .await?
        .ok_or_else(|| Error::not_found("chat session"))
}

async fn get_session(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let s = load_session(&state, &p.user.user_id, &id).await?;
    Ok(Json(session_full(&s)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateSession {
    title: Option<String>,
    model: Option<String>,
}

async fn rename_session(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Json(body): Json<UpdateSession>,
) -> Result<Json<Value>> {
    let title = body.title.as_deref().map(check_title).transpose()?;
    if let Some(m) = &body.model {
        resolve(&state, &p.user.user_id, m).await?;
    }
    let model = body.model;
    let now = OffsetDateTime::now_utc();
    let s = state
        .store
        .chat_sessions()
        .update(&p.user.user_id, &id, move |s| {
            if let Some(t) = &title {
                s.title = t.clone();
            }
            if let Some(m) = &model {
                s.model = Some(m.clone());
            }
            s.updated_at = now;
            true
        })
        .await?
        .ok_or_else(|| Error::not_found("chat session"))?;
    Ok(Json(session_full(&s)))
}

#[derive(Deserialize)]
struct AppendMessages {
    messages: Vec<V1Message>,
}

async fn append_messages(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Json(body): Json<AppendMessages>,
) -> Result<Json<Value>> {
    let now = OffsetDateTime::now_utc();
    let added: Vec<SessionMessage> = to_messages(body.messages)?
        .into_iter()
        .map(|m| SessionMessage {
            role: m.role,
            content: m.content,
            created_at: now,
        })
        .collect();
    // Atomic: messages appended at the same time to one session all stay.
    let s = state
        .store
        .chat_sessions()
        .update(&p.user.user_id, &id, move |s| {
            s.messages.extend(added.iter().cloned());
            s.updated_at = now;
            true
        })
        .await?
        .ok_or_else(|| Error::not_found("chat session"))?;
    Ok(Json(session_full(&s)))
}

async fn delete_session(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    state
        .store
        .chat_sessions()
        .remove(&p.user.user_id, &id)
        .await?
        .ok_or_else(|| Error::not_found("chat session"))?;
    Ok(Json(json!({"message": "chat session deleted"})))
}

#[derive(Deserialize)]
struct ExportQuery {
    format: Option<String>,
}

async fn export_session(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<ExportQuery>,
) -> Result<Response> {
    let s = load_session(&state, &p.user.user_id, &id).await?;
    let (body, content_type, ext) = match q.format.as_deref().unwrap_or("json") {
        "json" => (
            serde_json::to_string_pretty(&session_full(&s)).map_err(Error::internal)?,
            "application/json",
            "json",
        ),
        "markdown" | "md" => (to_markdown(&s), "text/markdown; charset=utf-8", "md"),
        other => {
            return Err(Error::new(
                Kind::BadRequest,
                "bad_query",
                format!("format must be json or markdown, not {other}"),
            ));
        }
    };
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"chat-{}.{ext}\"",
        s.session_id
    )) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

/// A conversation as Markdown: a title, the model, then one section per message.
pub fn to_markdown(s: &ChatSession) -> String {
    let mut out = format!("# {}\n\n", s.title);
    if let Some(m) = &s.model {
        out.push_str(&format!("*Model: {m}*\n\n"));
    }
    for m in &s.messages {
        let who = match m.role.as_str() {
            "user" => "User",
            "assistant" => "Assistant",
            "system" => "System",
            other => other,
        };
        out.push_str(&format!("## {who}\n\n{}\n\n", m.content.trim_end()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_export() {
        let now = OffsetDateTime::now_utc();
        let s = ChatSession {
            session_id: "s".into(),
            owner: "o".into(),
            title: "Sums".into(),
            model: Some("m1".into()),
            messages: vec![
                SessionMessage {
                    role: "user".into(),
                    content: "What is 3 plus 4?".into(),
                    created_at: now,
                },
                SessionMessage {
                    role: "assistant".into(),
                    content: "3 plus 4 is 7.\n".into(),
                    created_at: now,
                },
            ],
            created_at: now,
            updated_at: now,
        };
        assert_eq!(
            to_markdown(&s),
            "# Sums\n\n*Model: m1*\n\n## User\n\nWhat is 3 plus 4?\n\n## Assistant\n\n3 plus 4 is 7.\n\n"
        );
    }

    #[test]
    fn openai_content_parts_and_roles() {
        let msgs: Vec<V1Message> = serde_json::from_value(json!([
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": "there"}]},
        ]))
        .unwrap();
        let m = to_messages(msgs).unwrap();
        assert_eq!(m[0], ChatMessage::new("system", "be brief"));
        assert_eq!(m[1], ChatMessage::new("user", "hi there"));
        let bad: Vec<V1Message> =
            serde_json::from_value(json!([{"role": "wizard", "content": "x"}])).unwrap();
        assert!(to_messages(bad).is_err());
        assert!(to_messages(Vec::new()).is_err());
    }
}
