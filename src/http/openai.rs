//! The OpenAI-compatible `/v1` API: `/v1/models` and `/v1/chat/completions` (streaming as
//! Server-Sent Events), with OpenAI-shaped errors.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ErrorBody, Json};
use super::extract::CurrentUser;
use crate::error::{Error, Kind, Result};
use crate::inference::{ChatMessage, GenEvent, SamplingParams};
use crate::store::{ModelKind, new_id};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(models))
        .routes(routes!(chat_completions))
}

/// Default answer length when the client sets none.
pub const DEFAULT_MAX_TOKENS: usize = 2048;

/// OpenAI message content: a string, or an array of parts of which the text ones count.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    #[schema(value_type = Vec<Object>)]
    Parts(Vec<Value>),
}

/// A message as OpenAI clients send it.
#[derive(Deserialize, ToSchema)]
pub struct V1Message {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// OpenAI messages as the engine's: text parts joined, roles checked (`chat::messages`).
pub fn to_messages(messages: Vec<V1Message>) -> Result<Vec<ChatMessage>> {
    crate::chat::messages(
        messages
            .into_iter()
            .map(|m| {
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
                (m.role, content)
            })
            .collect(),
    )
}

#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize, ToSchema)]
pub struct V1Request {
    /// A base model's name or one of your trained models' ids (see `/v1/models`).
    model: String,
    messages: Vec<V1Message>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    /// Capped by the server's `max_generation_tokens` and the model's context.
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
    /// Only 1.
    n: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct V1Model {
    id: String,
    /// `model`.
    object: &'static str,
    created: i64,
    owned_by: String,
    /// `base`, `adapter` (LoRA over `base_model`) or `full` (whole weights of its own).
    kind: ModelKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    base_model: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct V1ModelList {
    /// `list`.
    object: &'static str,
    data: Vec<V1Model>,
}

/// Every base model (by name) and the caller's trained models (by id).
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, description = "OpenAI's model list", body = V1ModelList),
              (status = 401, description = "No or bad credentials", body = ErrorBody)))]
async fn models(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<V1ModelList>> {
    let models = state.chat.models(&p.user.user_id).await?;
    let mut data: Vec<V1Model> = models
        .base
        .iter()
        .map(|b| V1Model {
            id: b.name.clone(),
            object: "model",
            created: b.created_at.map_or(0, |t| t.unix_timestamp()),
            owned_by: "ferrotune".into(),
            kind: ModelKind::Base,
            name: None,
            base_model: None,
        })
        .collect();
    data.extend(models.trained.iter().map(|m| V1Model {
        id: m.model_id.clone(),
        object: "model",
        created: m.created_at.unix_timestamp(),
        owned_by: p.user.username.clone(),
        kind: m.kind,
        name: Some(m.name.clone()),
        base_model: Some(m.base_model.clone()),
    }));
    Ok(Json(V1ModelList {
        object: "list",
        data,
    }))
}

/// OpenAI chat completions: `model`, `messages`, `temperature`, `top_p`, `top_k`,
/// `max_tokens`, `stop`, `seed`, penalties, and `stream` (Server-Sent Events of
/// `chat.completion.chunk`, ending `data: [DONE]`; `stream_options.include_usage`).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    request_body = V1Request,
    responses((status = 200, description = "A `chat.completion`, or with `stream` a text/event-stream of chunks", body = Object),
              (status = 404, description = "No such model", body = ErrorBody),
              (status = 422, description = "Invalid request", body = ErrorBody),
              (status = 429, description = "Too many generations at once", body = ErrorBody)))]
async fn chat_completions(
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
    let target = state.chat.resolve(&p.user.user_id, &req.model).await?;
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
    let messages = to_messages(req.messages)?;
    let (generation, permit) = state
        .chat
        .start(&p.user.user_id, &target, messages, params)
        .await?;
    let id = format!("chatcmpl-{}", new_id());
    let created = OffsetDateTime::now_utc().unix_timestamp();
    if !req.stream {
        let done = generation.collect().await?;
        drop(permit);
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

/// OpenAI-shaped errors on `/v1` only (the rest of the API keeps ours).
pub async fn errors_on_v1(uri: axum::http::Uri, response: Response) -> Response {
    if uri.path().starts_with("/v1/") {
        openai_errors(response).await
    } else {
        response
    }
}

/// Rewrites our error bodies (`{"error": "...", "code"}`) into OpenAI's shape
/// (`{"error": {"message", "type", "param", "code"}}`) on `/v1`, so OpenAI clients show them.
async fn openai_errors(response: Response) -> Response {
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

#[cfg(test)]
mod tests {
    use super::*;

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
