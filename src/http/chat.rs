//! Chat outside `/v1`: the original `/api/chat/completion`, and saved conversations
//! (`/api/chat/sessions`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ErrorBody, Json, Path, Query};
use super::extract::CurrentUser;
use super::openai::{DEFAULT_MAX_TOKENS, V1Message, to_messages};
use super::views::Message;
use crate::chat::sessions::{Session, SessionChange, SessionMessage, to_markdown};
use crate::error::{Error, Kind, Result};
use crate::inference::SamplingParams;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(completion))
        .routes(routes!(list_sessions, create_session))
        .routes(routes!(get_session, rename_session, delete_session))
        .routes(routes!(append_messages))
        .routes(routes!(export_session))
}

#[derive(Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// A base model's folder (relative to the models dir, or its name) or a trained model's
    /// `model_path` as the model lists show it.
    model_path: Option<String>,
    /// A base model's name or a trained model's id.
    model_id: Option<String>,
    messages: Vec<V1Message>,
    /// Default 0.7.
    temperature: Option<f64>,
    /// Default 2048, capped by the server's maximum.
    max_tokens: Option<usize>,
    top_p: Option<f64>,
    seed: Option<u64>,
    /// Append the last user message and the answer to this saved conversation.
    session_id: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Completion {
    /// `assistant`.
    role: &'static str,
    content: String,
    /// `stop` or `length`.
    finish_reason: &'static str,
    usage: Usage,
    model: String,
}

#[derive(Serialize, ToSchema)]
pub struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
}

/// The original chat API: one answer, optionally recorded in a saved conversation.
#[utoipa::path(post, path = "/api/chat/completion", tag = "chat",
    request_body = CompletionRequest,
    responses((status = 200, description = "The answer", body = Completion),
              (status = 404, description = "No such model or session", body = ErrorBody),
              (status = 422, description = "Invalid request", body = ErrorBody),
              (status = 429, description = "Too many generations at once", body = ErrorBody)))]
async fn completion(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Json(req): Json<CompletionRequest>,
) -> Result<Json<Completion>> {
    let owner = p.user.user_id.clone();
    let target = match (req.model_id.as_deref(), req.model_path.as_deref()) {
        (Some(id), _) if !id.is_empty() => state.chat.resolve(&owner, id).await?,
        (_, Some(path)) if !path.is_empty() => state.chat.resolve_path(&owner, path).await?,
        _ => {
            return Err(Error::new(
                Kind::Invalid,
                "invalid_request",
                "model_id or model_path is required",
            ));
        }
    };
    let messages = to_messages(req.messages)?;
    let params = SamplingParams {
        temperature: req.temperature.unwrap_or(0.7),
        top_p: req.top_p.unwrap_or(1.0),
        seed: req.seed,
        max_tokens: req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        ..SamplingParams::default()
    };
    let answer = state
        .chat
        .complete(&owner, &target, messages, params, req.session_id.as_deref())
        .await?;
    Ok(Json(Completion {
        role: "assistant",
        content: answer.text,
        finish_reason: answer.finish_reason.as_str(),
        usage: Usage {
            prompt_tokens: answer.prompt_tokens,
            completion_tokens: answer.completion_tokens,
        },
        model: target.id,
    }))
}

// ---- sessions -----------------------------------------------------------------------------

#[derive(Serialize, ToSchema)]
pub struct SessionSummary {
    session_id: String,
    title: String,
    /// The model it talks to (a base model's name or a trained model's id).
    model: Option<String>,
    message_count: usize,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
}

impl From<&Session> for SessionSummary {
    fn from(s: &Session) -> Self {
        SessionSummary {
            session_id: s.session_id.clone(),
            title: s.title.clone(),
            model: s.model.clone(),
            message_count: s.messages.len(),
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct SessionFull {
    #[serde(flatten)]
    summary: SessionSummary,
    messages: Vec<SessionMessage>,
}

impl From<&Session> for SessionFull {
    fn from(s: &Session) -> Self {
        SessionFull {
            summary: SessionSummary::from(s),
            messages: s.messages.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct SessionList {
    sessions: Vec<SessionSummary>,
}

/// The caller's saved conversations, newest first.
#[utoipa::path(get, path = "/api/chat/sessions", tag = "chat",
    responses((status = 200, description = "The conversations", body = SessionList)))]
async fn list_sessions(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<SessionList>> {
    let sessions = state.chat.sessions().list(&p.user.user_id).await?;
    Ok(Json(SessionList {
        sessions: sessions.iter().map(SessionSummary::from).collect(),
    }))
}

#[derive(Deserialize, ToSchema)]
pub struct CreateSession {
    /// Default "New chat".
    title: Option<String>,
    model: Option<String>,
    #[serde(default)]
    messages: Vec<V1Message>,
}

/// Starts a saved conversation.
#[utoipa::path(post, path = "/api/chat/sessions", tag = "chat",
    request_body = CreateSession,
    responses((status = 201, description = "Created", body = SessionFull),
              (status = 404, description = "No such model", body = ErrorBody),
              (status = 422, description = "Invalid title or messages", body = ErrorBody)))]
async fn create_session(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Json(body): Json<CreateSession>,
) -> Result<(StatusCode, Json<SessionFull>)> {
    if let Some(model) = &body.model {
        state.chat.resolve(&p.user.user_id, model).await?;
    }
    let messages = if body.messages.is_empty() {
        Vec::new()
    } else {
        to_messages(body.messages)?
    };
    let session = state
        .chat
        .sessions()
        .create(&p.user.user_id, body.title.as_deref(), body.model, messages)
        .await?;
    Ok((StatusCode::CREATED, Json(SessionFull::from(&session))))
}

/// A conversation with its messages.
#[utoipa::path(get, path = "/api/chat/sessions/{id}", tag = "chat",
    params(("id" = String, Path, description = "The conversation's id")),
    responses((status = 200, description = "The conversation", body = SessionFull),
              (status = 404, description = "No such conversation of yours", body = ErrorBody)))]
async fn get_session(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<SessionFull>> {
    let s = state.chat.sessions().get(&p.user.user_id, &id).await?;
    Ok(Json(SessionFull::from(&s)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSession {
    title: Option<String>,
    model: Option<String>,
}

/// Renames a conversation or points it at another model.
#[utoipa::path(patch, path = "/api/chat/sessions/{id}", tag = "chat",
    params(("id" = String, Path, description = "The conversation's id")),
    request_body = UpdateSession,
    responses((status = 200, description = "The conversation", body = SessionFull),
              (status = 404, description = "No such conversation or model", body = ErrorBody),
              (status = 422, description = "Invalid title", body = ErrorBody)))]
async fn rename_session(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Json(body): Json<UpdateSession>,
) -> Result<Json<SessionFull>> {
    if let Some(m) = &body.model {
        state.chat.resolve(&p.user.user_id, m).await?;
    }
    let s = state
        .chat
        .sessions()
        .change(
            &p.user.user_id,
            &id,
            SessionChange {
                title: body.title,
                model: body.model,
            },
        )
        .await?;
    Ok(Json(SessionFull::from(&s)))
}

#[derive(Deserialize, ToSchema)]
pub struct AppendMessages {
    messages: Vec<V1Message>,
}

/// Appends messages to a conversation (messages appended at the same time all stay).
#[utoipa::path(post, path = "/api/chat/sessions/{id}/messages", tag = "chat",
    params(("id" = String, Path, description = "The conversation's id")),
    request_body = AppendMessages,
    responses((status = 200, description = "The conversation", body = SessionFull),
              (status = 404, description = "No such conversation of yours", body = ErrorBody),
              (status = 422, description = "Invalid messages", body = ErrorBody)))]
async fn append_messages(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Json(body): Json<AppendMessages>,
) -> Result<Json<SessionFull>> {
    let messages = to_messages(body.messages)?;
    let s = state
        .chat
        .sessions()
        .append(&p.user.user_id, &id, messages, None)
        .await?;
    Ok(Json(SessionFull::from(&s)))
}

/// Deletes a conversation.
#[utoipa::path(delete, path = "/api/chat/sessions/{id}", tag = "chat",
    params(("id" = String, Path, description = "The conversation's id")),
    responses((status = 200, description = "Deleted", body = Message),
              (status = 404, description = "No such conversation of yours", body = ErrorBody)))]
async fn delete_session(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Message>> {
    state.chat.sessions().delete(&p.user.user_id, &id).await?;
    Ok(Json(Message::new("chat session deleted")))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// `json` (default) or `markdown`.
    format: Option<String>,
}

/// A conversation as a JSON or Markdown file.
#[utoipa::path(get, path = "/api/chat/sessions/{id}/export", tag = "chat",
    params(("id" = String, Path, description = "The conversation's id"), ExportQuery),
    responses((status = 200, description = "The file", content_type = "application/octet-stream", body = String),
              (status = 400, description = "An unknown format", body = ErrorBody),
              (status = 404, description = "No such conversation of yours", body = ErrorBody)))]
async fn export_session(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<ExportQuery>,
) -> Result<Response> {
    let s = state.chat.sessions().get(&p.user.user_id, &id).await?;
    let (body, content_type, ext) = match q.format.as_deref().unwrap_or("json") {
        "json" => (
            serde_json::to_string_pretty(&SessionFull::from(&s)).map_err(Error::internal)?,
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
