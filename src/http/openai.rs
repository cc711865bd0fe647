//! The OpenAI-compatible `/v1` API: `/v1/models`, `/v1/chat/completions` and
//! `/v1/completions` (streaming as Server-Sent Events; logprobs, `n`, `logit_bias`), with
//! OpenAI-shaped errors. Parameters the server does not implement are refused by name, never
//! ignored.

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
use crate::inference::{
    ChatMessage, Completion, GenEvent, Generation, Grammar, MAX_TOP_LOGPROBS, RawPrompt,
    SamplingParams, TokenLogprob,
    tools::{AnswerSplitter, Part, ToolCall, ToolFormat},
};
use crate::store::{ModelKind, new_id};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(models))
        .routes(routes!(model))
        .routes(routes!(chat_completions))
        .routes(routes!(completions))
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
    /// An assistant message's calls: `[{"id", "type": "function", "function": {"name",
    /// "arguments"}}]`.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    tool_calls: Option<Vec<Value>>,
    /// A `tool` message: the call it answers.
    #[serde(default)]
    tool_call_id: Option<String>,
    /// A participant's name (accepted; templates do not print it).
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
}

/// OpenAI messages as the engine's: text parts joined, roles checked (`chat::messages`).
pub fn to_messages(messages: Vec<V1Message>) -> Result<Vec<ChatMessage>> {
    let mut out = Vec::with_capacity(messages.len());
    let mut extras = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let calls = match m.tool_calls {
            None => Vec::new(),
            Some(calls) => calls
                .iter()
                .enumerate()
                .map(|(j, c)| tool_call_of(c, &format!("messages[{i}].tool_calls[{j}]")))
                .collect::<Result<Vec<_>>>()?,
        };
        if !calls.is_empty() && m.role != "assistant" {
            return Err(param_error(
                &format!("messages[{i}].tool_calls"),
                "only assistant messages carry tool calls",
            ));
        }
        extras.push((calls, m.tool_call_id));
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part["type"].as_str(), part["text"].as_str()) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        (Some(kind @ ("image_url" | "input_audio" | "file")), _) => {
                            return Err(param_error(
                                &format!("messages[{i}].content[{j}]"),
                                format!(
                                    "`{kind}` parts are not supported: the models here read text"
                                ),
                            ));
                        }
                        _ => {
                            return Err(param_error(
                                &format!("messages[{i}].content[{j}]"),
                                "a content part must be `{\"type\": \"text\", \"text\": …}`",
                            ));
                        }
                    }
                }
                text
            }
        };
        out.push((m.role, content));
    }
    let mut messages = crate::chat::messages(out)?;
    for (m, (calls, id)) in messages.iter_mut().zip(extras) {
        m.tool_calls = calls;
        m.tool_call_id = id;
    }
    Ok(messages)
}

/// A tool call as OpenAI clients send it back in an assistant message.
fn tool_call_of(c: &Value, param: &str) -> Result<ToolCall> {
    let name = c["function"]["name"].as_str();
    let arguments = match &c["function"]["arguments"] {
        Value::String(s) => Some(s.clone()),
        Value::Null => Some("{}".to_string()),
        v @ Value::Object(_) => Some(v.to_string()),
        _ => None,
    };
    match (name, arguments) {
        (Some(name), Some(arguments)) => Ok(ToolCall {
            id: c["id"].as_str().unwrap_or_default().to_string(),
            name: name.to_string(),
            arguments,
        }),
        _ => Err(param_error(
            param,
            "a tool call is `{\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}`",
        )),
    }
}

/// What a request's `tools`, `tool_choice` and `parallel_tool_calls` ask for.
struct ToolUse {
    /// Rendered through the template (none with `tool_choice: "none"`).
    tools: Vec<Value>,
    /// Calls are parsed out of the answer.
    parse: bool,
    parallel: bool,
    /// `required` or a named function: the answer must be calls (constrained decoding).
    grammar: Option<Grammar>,
}

/// Checks the tools (OpenAI function tools) and the choice among them.
fn tool_use(
    tools: Option<Vec<Value>>,
    choice: Option<Value>,
    parallel: Option<bool>,
) -> Result<ToolUse> {
    let tools = tools.unwrap_or_default();
    let parallel = parallel.unwrap_or(true);
    let mut functions = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let f = &t["function"];
        let name_ok = f["name"].as_str().is_some_and(|n| {
            !n.is_empty()
                && n.len() <= 64
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
        if t["type"] != "function" || !name_ok {
            return Err(param_error(
                &format!("tools[{i}]"),
                "a tool is `{\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\"}}` \
                 with a name of at most 64 letters, digits, `_` or `-`",
            ));
        }
        if !matches!(f.get("parameters"), None | Some(Value::Object(_))) {
            return Err(param_error(
                &format!("tools[{i}].function.parameters"),
                "must be a JSON Schema (an object)",
            ));
        }
        functions.push(f.clone());
    }
    if tools.is_empty() {
        return match choice {
            None | Some(Value::String(_)) if choice.as_ref().is_none_or(|c| c == "none") => {
                Ok(ToolUse {
                    tools,
                    parse: false,
                    parallel,
                    grammar: None,
                })
            }
            _ => Err(param_error("tool_choice", "needs `tools`")),
        };
    }
    let required = |functions: Vec<Value>| -> Result<Option<Grammar>> {
        for f in &functions {
            if let Some(p) = f.get("parameters") {
                Grammar::JsonSchema(p.clone()).check().map_err(|e| {
                    param_error(
                        &format!("tools.{}.parameters", f["name"].as_str().unwrap_or("")),
                        e,
                    )
                })?;
            }
        }
        Ok(Some(Grammar::ToolCalls {
            functions,
            parallel,
        }))
    };
    let (tools, parse, grammar) = match choice.as_ref().map(|c| (c, c.as_str())) {
        None | Some((_, Some("auto"))) => (tools, true, None),
        Some((_, Some("none"))) => (Vec::new(), false, None),
        Some((_, Some("required"))) => (tools, true, required(functions)?),
        Some((c, None)) if c["type"] == "function" => {
            let name = c["function"]["name"].as_str().unwrap_or_default();
            let Some(f) = functions.iter().find(|f| f["name"] == name) else {
                return Err(param_error(
                    "tool_choice",
                    format!("no tool is named `{name}`"),
                ));
            };
            // One call of that function, as OpenAI answers a named choice.
            let chosen = vec![f.clone()];
            let grammar = Some(Grammar::ToolCalls {
                functions: chosen.clone(),
                parallel: false,
            });
            required(chosen)?;
            return Ok(ToolUse {
                tools,
                parse: true,
                parallel: false,
                grammar,
            });
        }
        _ => {
            return Err(param_error(
                "tool_choice",
                "must be `none`, `auto`, `required` or `{\"type\": \"function\", \"function\": {\"name\"}}`",
            ));
        }
    };
    Ok(ToolUse {
        tools,
        parse,
        parallel,
        grammar,
    })
}

/// An assistant message (or a stream's delta) from an answer's parts and calls.
fn assistant_message(parts: Vec<Part>, calls: &[ToolCall], whole: bool) -> Value {
    let (mut reasoning, mut content) = (None::<String>, None::<String>);
    for p in parts {
        match p {
            Part::Reasoning(r) => reasoning.get_or_insert_with(String::new).push_str(&r),
            Part::Content(c) => content.get_or_insert_with(String::new).push_str(&c),
        }
    }
    let mut m = serde_json::Map::new();
    if whole {
        m.insert("role".into(), json!("assistant"));
        // `null` beside tool calls, as OpenAI answers.
        let content = match content {
            None if calls.is_empty() => Some(String::new()),
            c => c,
        };
        m.insert("content".into(), json!(content));
        m.insert("refusal".into(), Value::Null);
    } else if let Some(c) = content {
        m.insert("content".into(), json!(c));
    }
    if let Some(r) = reasoning {
        m.insert("reasoning_content".into(), json!(r));
    }
    if !calls.is_empty() {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut v = c.to_openai();
                if !whole {
                    v["index"] = json!(i);
                }
                v
            })
            .collect();
        m.insert("tool_calls".into(), Value::Array(calls));
    }
    Value::Object(m)
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
    /// Capped by the server's `max_generation_tokens` and the model's context.
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    /// Return each generated token's log-probability.
    #[serde(default)]
    logprobs: bool,
    /// With `logprobs`: this many most likely alternatives per token (0–20).
    top_logprobs: Option<usize>,
    /// Functions the model may call (`{"type": "function", "function": {"name",
    /// "description", "parameters"}}`), rendered through the model's chat template; calls
    /// come back as `tool_calls`.
    #[schema(value_type = Option<Vec<Object>>)]
    tools: Option<Vec<Value>>,
    /// `auto` (default with tools), `none`, `required`, or `{"type": "function", "function":
    /// {"name"}}`; the last two are enforced by constrained decoding.
    #[schema(value_type = Option<Object>)]
    tool_choice: Option<Value>,
    /// Several calls in one answer (default true).
    parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    sampling: V1Sampling,
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
    Ok(Json(V1ModelList {
        object: "list",
        data: list_models(&state, &p).await?,
    }))
}

async fn list_models(state: &AppState, p: &crate::auth::Principal) -> Result<Vec<V1Model>> {
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
    Ok(data)
}

/// What every `/v1` generation request shares: sampling, limits, and the parameters we
/// refuse by name rather than ignore.
#[derive(Deserialize, ToSchema, Default)]
pub struct V1Sampling {
    /// 0–2.
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    stop: Option<Stop>,
    seed: Option<u64>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// Token id (as a string) → bias from -100 to 100.
    #[schema(value_type = Option<Object>)]
    logit_bias: Option<std::collections::HashMap<String, f64>>,
    /// 1–8 answers per request.
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// Generate `max_tokens` whatever the model says (vLLM's and llama.cpp's extension, for
    /// benchmarks).
    #[serde(default)]
    ignore_eos: bool,
    /// `{"type": "text"}` (the default), `{"type": "json_object"}` (any JSON object) or
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`: the answer is
    /// generated under that grammar (constrained decoding), so it parses and fits the schema.
    #[schema(value_type = Option<Object>)]
    response_format: Option<Value>,
    /// Accepted and ignored (OpenAI's end-user id).
    #[allow(dead_code)]
    user: Option<String>,
    /// Anything else: refused by name.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    other: serde_json::Map<String, Value>,
}

/// Most answers one request may ask for (`n`).
const MAX_N: u32 = 8;

fn param_error(param: &str, message: impl std::fmt::Display) -> Error {
    Error::new(
        Kind::Invalid,
        "invalid_parameter",
        format!("{param}: {message}"),
    )
}

impl V1Sampling {
    /// The engine's parameters, with `max_tokens` and the logprobs settled by the caller.
    fn params(&self, max_tokens: usize) -> Result<SamplingParams> {
        if let Some(name) = self.other.keys().next() {
            return Err(Error::new(
                Kind::Invalid,
                "unsupported_parameter",
                format!("{name}: this parameter is not supported by this server"),
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(param_error(
                "temperature",
                format!("must be between 0 and 2, not {temperature}"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(param_error("stop", "at most 4 stop sequences"));
        }
        let mut logit_bias = Vec::new();
        for (k, v) in self.logit_bias.iter().flatten() {
            let id: u32 = k
                .parse()
                .map_err(|_| param_error("logit_bias", format!("`{k}` is not a token id")))?;
            logit_bias.push((id, *v as f32));
        }
        Ok(SamplingParams {
            temperature,
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: self.seed,
            max_tokens,
            stop,
            logit_bias,
            ignore_eos: self.ignore_eos,
            grammar: self.grammar()?,
            ..SamplingParams::default()
        })
    }

    /// The grammar `response_format` asks for.
    fn grammar(&self) -> Result<Option<Grammar>> {
        let Some(format) = &self.response_format else {
            return Ok(None);
        };
        match format.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(Grammar::JsonObject)),
            Some("json_schema") => {
                let spec = format.get("json_schema").ok_or_else(|| {
                    param_error(
                        "response_format.json_schema",
                        "is required with `json_schema`",
                    )
                })?;
                match spec.get("schema") {
                    Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                        let grammar = Grammar::JsonSchema(schema.clone());
                        grammar
                            .check()
                            .map_err(|e| param_error("response_format.json_schema.schema", e))?;
                        Ok(Some(grammar))
                    }
                    Some(_) => Err(param_error(
                        "response_format.json_schema.schema",
                        "must be a JSON Schema (an object)",
                    )),
                    // OpenAI's own default: no schema, any JSON.
                    None => Ok(Some(Grammar::JsonObject)),
                }
            }
            _ => Err(param_error(
                "response_format",
                "type must be `text`, `json_object` or `json_schema`",
            )),
        }
    }

    /// `stream_options.include_usage`.
    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    fn n(&self) -> Result<u32> {
        match self.n.unwrap_or(1) {
            n @ 1..=MAX_N => Ok(n),
            n => Err(param_error(
                "n",
                format!("must be between 1 and {MAX_N}, not {n}"),
            )),
        }
    }
}

/// A chat logprobs entry (OpenAI's `ChatCompletionTokenLogprob`).
fn chat_logprob(t: &TokenLogprob) -> Value {
    json!({
        "token": t.text, "logprob": t.logprob.unwrap_or(0.0), "bytes": t.bytes,
        "top_logprobs": t.top.iter().map(|(_, text, bytes, lp)| json!({
            "token": text, "logprob": lp, "bytes": bytes,
        })).collect::<Vec<_>>(),
    })
}

/// A completions `logprobs` object over `tokens` (text offsets counted from `offset`).
fn completion_logprobs(tokens: &[TokenLogprob], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.text.len();
    }
    json!({
        "tokens": tokens.iter().map(|t| t.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| {
            if t.logprob.is_none() {
                Value::Null
            } else {
                Value::Object(t.top.iter().map(|(_, text, _, lp)| (text.clone(), json!(lp))).collect())
            }
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

/// OpenAI's `usage`; `cached`: prompt tokens read from the prefix cache (OpenAI's
/// `prompt_tokens_details.cached_tokens`).
fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

/// Starts `n` generations (choice `i` seeded `seed + i` when a seed is given), each with its
/// own place under the limits.
async fn start_n(
    state: &AppState,
    owner: &str,
    target: &crate::models::Resolved,
    input: Input,
    params: SamplingParams,
    n: u32,
) -> Result<Vec<(Generation, crate::chat::GenerationPermit)>> {
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut p = params.clone();
        p.seed = p.seed.map(|s| s.wrapping_add(i as u64));
        let started = match &input {
            Input::Messages(m, tools) => {
                state
                    .chat
                    .start_with_tools(owner, target, m.clone(), tools.clone(), p)
                    .await?
            }
            Input::Raw(r) => state.chat.start_raw(owner, target, r.clone(), p).await?,
        };
        out.push(started);
    }
    Ok(out)
}

enum Input {
    /// Messages and the tools rendered with them.
    Messages(Vec<ChatMessage>, Vec<Value>),
    Raw(RawPrompt),
}

/// What a choice's stream carries to the response.
enum ChoiceEvent {
    Text(String),
    Token(TokenLogprob),
    Prompt(Vec<TokenLogprob>),
    Done(Completion),
    Failed(String),
}

/// Merges the events of several generations into one channel of (choice, event); each
/// generation's permit is held until it ends. Dropping the receiver cancels them all.
fn merge(
    generations: Vec<(Generation, crate::chat::GenerationPermit)>,
) -> tokio::sync::mpsc::Receiver<(usize, ChoiceEvent)> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    for (index, (generation, permit)) in generations.into_iter().enumerate() {
        let tx = tx.clone();
        let mut events = generation.events;
        tokio::spawn(async move {
            let _permit = permit;
            let mut text = String::new();
            let mut logprobs = Vec::new();
            let mut prompt_logprobs = Vec::new();
            loop {
                let ev = tokio::select! {
                    _ = tx.closed() => return,
                    ev = events.recv() => ev,
                };
                let out = match ev {
                    Some(GenEvent::Text(t)) => {
                        text.push_str(&t);
                        ChoiceEvent::Text(t)
                    }
                    Some(GenEvent::Token(t)) => {
                        logprobs.push(t.clone());
                        ChoiceEvent::Token(t)
                    }
                    Some(GenEvent::Prompt(p)) => {
                        prompt_logprobs = p.clone();
                        ChoiceEvent::Prompt(p)
                    }
                    Some(GenEvent::Done {
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                    }) => ChoiceEvent::Done(Completion {
                        text: std::mem::take(&mut text),
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                        logprobs: std::mem::take(&mut logprobs),
                        prompt_logprobs: std::mem::take(&mut prompt_logprobs),
                    }),
                    Some(GenEvent::Error(e)) => ChoiceEvent::Failed(e),
                    None => ChoiceEvent::Failed("the generation ended without a result".into()),
                };
                let last = matches!(out, ChoiceEvent::Done(_) | ChoiceEvent::Failed(_));
                if tx.send((index, out)).await.is_err() || last {
                    return;
                }
            }
        });
    }
    rx
}

/// Every choice's whole result, in order.
async fn collect_all(
    generations: Vec<(Generation, crate::chat::GenerationPermit)>,
) -> Result<Vec<Completion>> {
    let n = generations.len();
    let mut rx = merge(generations);
    let mut done: Vec<Option<Completion>> = (0..n).map(|_| None).collect();
    let mut left = n;
    while left > 0 {
        match rx.recv().await {
            Some((i, ChoiceEvent::Done(c))) => {
                done[i] = Some(c);
                left -= 1;
            }
            Some((_, ChoiceEvent::Failed(e))) => return Err(Error::internal(e)),
            Some(_) => {}
            None => return Err(Error::internal("a generation ended without a result")),
        }
    }
    Ok(done.into_iter().flatten().collect())
}

/// Where the request waited for a place in its model's batch when it arrived (0: none).
fn queue_position(generations: &[(Generation, crate::chat::GenerationPermit)]) -> usize {
    generations
        .iter()
        .map(|(g, _)| g.queue_position)
        .max()
        .unwrap_or(0)
}

/// `x-queue-position: N` when the request had to wait behind N−1 others for a place in its
/// model's batch.
fn with_position(mut response: Response, position: usize) -> Response {
    if position > 0
        && let Ok(v) = axum::http::HeaderValue::from_str(&position.to_string())
    {
        response.headers_mut().insert("x-queue-position", v);
    }
    response
}

/// The envelope of one API's streamed chunks.
#[derive(Clone)]
struct Chunks {
    id: String,
    object: &'static str,
    created: i64,
    model: String,
}

impl Chunks {
    fn make(&self, choice: Value) -> Value {
        json!({"id": self.id, "object": self.object, "created": self.created,
               "model": self.model, "choices": [choice]})
    }
}

/// What a streamed choice has to show: text (with the tokens that made it, when logprobs
/// are asked for), the scored prompt, or its end.
enum Piece {
    Text(String),
    Prompt(Vec<TokenLogprob>),
    Finish(Completion),
}

/// Drives the merged events of every choice into stream chunks: `opening` first, then what
/// `chunk` makes of each piece (given the tokens behind it), then, when given, the usage
/// chunk (`choices: []`, the usage of them all). A failed generation ends the stream with an
/// OpenAI error object; a client gone away cancels the generations.
fn stream_choices<F>(
    mut events: tokio::sync::mpsc::Receiver<(usize, ChoiceEvent)>,
    opening: Vec<Value>,
    usage_chunk: Option<Value>,
    mut chunk: F,
) -> tokio::sync::mpsc::Receiver<Value>
where
    F: FnMut(usize, Piece, Vec<TokenLogprob>) -> Option<Value> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(64);
    tokio::spawn(async move {
        for v in opening {
            if tx.send(v).await.is_err() {
                return;
            }
        }
        // Tokens wait for the text they make (the detokenizer may hold one back).
        let mut pending: Vec<Vec<TokenLogprob>> = Vec::new();
        let (mut done, mut prompt_tokens, mut completion_tokens) = (0usize, 0, 0);
        let mut cached_tokens = 0;
        while let Some((i, ev)) = events.recv().await {
            if pending.len() <= i {
                pending.resize_with(i + 1, Vec::new);
            }
            let out = match ev {
                ChoiceEvent::Token(t) => {
                    pending[i].push(t);
                    continue;
                }
                ChoiceEvent::Prompt(p) => chunk(i, Piece::Prompt(p), Vec::new()),
                ChoiceEvent::Text(t) => chunk(i, Piece::Text(t), std::mem::take(&mut pending[i])),
                ChoiceEvent::Done(c) => {
                    done += 1;
                    prompt_tokens = c.prompt_tokens;
                    completion_tokens += c.completion_tokens;
                    cached_tokens = cached_tokens.max(c.cached_tokens);
                    chunk(i, Piece::Finish(c), std::mem::take(&mut pending[i]))
                }
                ChoiceEvent::Failed(e) => {
                    tracing::error!(error = %e, "generation failed");
                    let _ = tx
                        .send(json!({"error": {"message": "generation failed",
                                               "type": "server_error", "code": "internal"}}))
                        .await;
                    return;
                }
            };
            if let Some(v) = out
                && tx.send(v).await.is_err()
            {
                return; // the client went away: dropping `events` cancels the generations
            }
        }
        if let Some(mut u) = usage_chunk.filter(|_| done > 0) {
            u["choices"] = json!([]);
            u["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens);
            let _ = tx.send(u).await;
        }
    });
    rx
}

/// A non-streamed answer: `head` (id, object, created, model) with every generation's
/// choice (`choice(index, completion)`) and the usage of them all.
async fn whole_answer(
    generations: Vec<(Generation, crate::chat::GenerationPermit)>,
    mut head: Value,
    position: usize,
    choice: impl Fn(usize, &Completion) -> Value,
) -> Result<Response> {
    let done = collect_all(generations).await?;
    let prompt_tokens = done.first().map_or(0, |c| c.prompt_tokens);
    let completion_tokens: usize = done.iter().map(|c| c.completion_tokens).sum();
    // The prompt is counted once for the `n` choices; as cached, what the best of them reused.
    let cached_tokens = done.iter().map(|c| c.cached_tokens).max().unwrap_or(0);
    head["choices"] = done.iter().enumerate().map(|(i, c)| choice(i, c)).collect();
    head["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens);
    Ok(with_position(Json(head).into_response(), position))
}

/// Server-Sent Events from `rx`, ending `data: [DONE]`; keeps the connection alive.
fn sse(rx: tokio::sync::mpsc::Receiver<Value>) -> Response {
    use futures_util::StreamExt;
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string())))
        .chain(futures_util::stream::once(async {
            Ok(Event::default().data("[DONE]"))
        }));
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// OpenAI chat completions: `model`, `messages` (text content; image and audio parts are
/// refused), `temperature` (0–2), `top_p`, `top_k`, `max_tokens`/`max_completion_tokens`,
/// `stop` (up to 4), `seed`, penalties, `logit_bias`, `logprobs` + `top_logprobs` (0–20, the
/// model's own distribution), `n` (1–8), and `stream` (Server-Sent Events of
/// `chat.completion.chunk`, ending `data: [DONE]`; `stream_options.include_usage`),
/// `response_format` (`json_object`, `json_schema`: constrained decoding), `tools` +
/// `tool_choice` + `parallel_tool_calls` (calls parsed back into `tool_calls`; `required` and a
/// named function are enforced by constrained decoding), reasoning as `reasoning_content`. Any
/// other parameter (`functions`, …) is refused by name.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    request_body = V1Request,
    responses((status = 200, description = "A `chat.completion`, or with `stream` a text/event-stream of chunks", body = Object),
              (status = 404, description = "No such model", body = ErrorBody),
              (status = 422, description = "Invalid or unsupported parameter (named in the message)", body = ErrorBody),
              (status = 429, description = "Too many generations at once", body = ErrorBody)))]
async fn chat_completions(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Json(req): Json<V1Request>,
) -> Result<Response> {
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 {
        return Err(param_error("max_tokens", "must be at least 1"));
    }
    let mut params = req.sampling.params(max_tokens)?;
    let n = req.sampling.n()?;
    match (req.logprobs, req.top_logprobs) {
        (true, top) => {
            let top = top.unwrap_or(0);
            if top > MAX_TOP_LOGPROBS {
                return Err(param_error(
                    "top_logprobs",
                    format!("must be between 0 and {MAX_TOP_LOGPROBS}"),
                ));
            }
            params.logprobs = Some(top);
        }
        (false, Some(_)) => {
            return Err(param_error("top_logprobs", "needs `logprobs: true`"));
        }
        (false, None) => {}
    }
    let want_logprobs = req.logprobs;
    let tool_use = tool_use(req.tools, req.tool_choice, req.parallel_tool_calls)?;
    if let Some(g) = tool_use.grammar {
        if params.grammar.is_some() {
            return Err(param_error(
                "tool_choice",
                "cannot be combined with a `response_format` grammar",
            ));
        }
        params.grammar = Some(g);
    }
    let target = state.chat.resolve(&p.user.user_id, &req.model).await?;
    let messages = to_messages(req.messages)?;
    let generations = start_n(
        &state,
        &p.user.user_id,
        &target,
        Input::Messages(messages, tool_use.tools),
        params,
        n,
    )
    .await?;
    let position = queue_position(&generations);
    // How to split answers: reasoning, content, and (when tools were given) calls.
    let (format, opens_think) = generations
        .first()
        .map_or((ToolFormat::Hermes, false), |(g, _)| {
            (g.tool_format, g.opens_think)
        });
    let (parse, parallel) = (tool_use.parse, tool_use.parallel);
    let splitter = move || AnswerSplitter::new(parse.then_some(format), parallel, opens_think);
    let id = format!("chatcmpl-{}", new_id());
    let created = OffsetDateTime::now_utc().unix_timestamp();
    let model = target.id;
    if !req.sampling.stream {
        let head =
            json!({"id": id, "object": "chat.completion", "created": created, "model": model});
        return whole_answer(generations, head, position, |i, c| {
            let logprobs = if want_logprobs {
                json!({"content": c.logprobs.iter().map(chat_logprob).collect::<Vec<_>>(),
                       "refusal": null})
            } else {
                Value::Null
            };
            let (reasoning, content, calls) = splitter().split(&c.text);
            let mut parts: Vec<Part> = reasoning.into_iter().map(Part::Reasoning).collect();
            if !content.is_empty() {
                parts.push(Part::Content(content));
            }
            let finish = if calls.is_empty() {
                c.finish_reason.as_str()
            } else {
                "tool_calls"
            };
            json!({"index": i, "message": assistant_message(parts, &calls, true),
                   "finish_reason": finish, "logprobs": logprobs})
        })
        .await;
    }
    let include_usage = req.sampling.include_usage();
    let chunks = Chunks {
        id,
        object: "chat.completion.chunk",
        created,
        model,
    };
    let chunk = move |index: usize, delta: Value, finish: Option<&str>, logprobs: Value| {
        chunks.make(
            json!({"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}),
        )
    };
    let opening = (0..n as usize)
        .map(|i| {
            chunk(
                i,
                json!({"role": "assistant", "content": ""}),
                None,
                Value::Null,
            )
        })
        .collect();
    let usage_chunk = include_usage.then(|| chunk(0, json!({}), None, Value::Null));
    // Per choice: its splitter, and the tokens of text it holds back (they go out with the
    // text when it is let through).
    let mut splitters: Vec<Option<AnswerSplitter>> = (0..n).map(|_| Some(splitter())).collect();
    let mut held: Vec<Vec<TokenLogprob>> = (0..n).map(|_| Vec::new()).collect();
    let rx = stream_choices(
        merge(generations),
        opening,
        usage_chunk,
        move |i, piece, tokens| {
            held[i].extend(tokens);
            let lp = |tokens: Vec<TokenLogprob>| {
                if want_logprobs {
                    json!({"content": tokens.iter().map(chat_logprob).collect::<Vec<_>>()})
                } else {
                    Value::Null
                }
            };
            match piece {
                Piece::Prompt(_) => None,
                Piece::Text(t) => {
                    let parts = splitters[i]
                        .as_mut()
                        .map(|s| s.push(&t))
                        .unwrap_or_default();
                    if parts.is_empty() {
                        return None;
                    }
                    let delta = assistant_message(parts, &[], false);
                    Some(chunk(i, delta, None, lp(std::mem::take(&mut held[i]))))
                }
                Piece::Finish(c) => {
                    let (parts, calls) = splitters[i]
                        .take()
                        .map(AnswerSplitter::finish)
                        .unwrap_or_default();
                    let finish = if calls.is_empty() {
                        c.finish_reason.as_str()
                    } else {
                        "tool_calls"
                    };
                    let delta = assistant_message(parts, &calls, false);
                    let mut last = chunk(i, delta, Some(finish), lp(std::mem::take(&mut held[i])));
                    if n == 1 {
                        last["usage"] =
                            usage(c.prompt_tokens, c.completion_tokens, c.cached_tokens);
                    }
                    Some(last)
                }
            }
        },
    );
    Ok(with_position(sse(rx), position))
}

/// A completions prompt: a string, a list of strings (one only), or token ids.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum V1Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize, ToSchema)]
pub struct V1CompletionRequest {
    /// A base model's name or one of your trained models' ids.
    model: String,
    /// The text to continue, as is (no chat template): a string, a one-string list, or
    /// token ids.
    prompt: V1Prompt,
    /// Default 16 (OpenAI's); 0 with `echo` and `logprobs` scores the prompt only.
    max_tokens: Option<usize>,
    /// Per token, the log-probability and this many alternatives (0–20).
    logprobs: Option<usize>,
    /// Return the prompt before the completion (with its logprobs when asked).
    #[serde(default)]
    echo: bool,
    /// Only equal to `n` (or absent).
    best_of: Option<u32>,
    #[serde(flatten)]
    sampling: V1Sampling,
}

/// OpenAI (legacy) completions: `prompt` continued as is, without the chat template — what
/// lm-evaluation-harness and completion-style tools call. `logprobs` (0–20 alternatives) and
/// `echo` (the prompt's tokens scored too; with `max_tokens: 0`, scoring only), `n`,
/// `stream`, and the sampling parameters of chat completions.
#[utoipa::path(post, path = "/v1/completions", tag = "openai",
    request_body = V1CompletionRequest,
    responses((status = 200, description = "A `text_completion`, or with `stream` a text/event-stream of them", body = Object),
              (status = 404, description = "No such model", body = ErrorBody),
              (status = 422, description = "Invalid or unsupported parameter (named in the message)", body = ErrorBody),
              (status = 429, description = "Too many generations at once", body = ErrorBody)))]
async fn completions(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Json(req): Json<V1CompletionRequest>,
) -> Result<Response> {
    let prompt = match req.prompt {
        V1Prompt::Text(t) => RawPrompt::Text(t),
        V1Prompt::Ids(ids) => RawPrompt::Ids(ids),
        V1Prompt::Texts(mut v) if v.len() == 1 => RawPrompt::Text(v.remove(0)),
        V1Prompt::IdLists(mut v) if v.len() == 1 => RawPrompt::Ids(v.remove(0)),
        _ => {
            return Err(param_error(
                "prompt",
                "one prompt per request (send a list of several as separate requests)",
            ));
        }
    };
    if matches!(&prompt, RawPrompt::Text(t) if t.is_empty())
        || matches!(&prompt, RawPrompt::Ids(v) if v.is_empty())
    {
        return Err(param_error("prompt", "is empty"));
    }
    let max_tokens = req.max_tokens.unwrap_or(16);
    let n = req.sampling.n()?;
    if req.best_of.is_some_and(|b| b != n) {
        return Err(param_error("best_of", "only equal to `n` is supported"));
    }
    let mut params = req.sampling.params(max_tokens)?;
    if let Some(top) = req.logprobs {
        if top > MAX_TOP_LOGPROBS {
            return Err(param_error(
                "logprobs",
                format!("must be between 0 and {MAX_TOP_LOGPROBS}"),
            ));
        }
        params.logprobs = Some(top);
        if req.echo {
            params.prompt_logprobs = Some(top);
        }
    }
    if max_tokens == 0 && !(req.echo && req.logprobs.is_some()) {
        return Err(param_error(
            "max_tokens",
            "0 is only for scoring a prompt (`echo` with `logprobs`)",
        ));
    }
    let echo_text = match (&prompt, req.echo) {
        (RawPrompt::Text(t), true) => Some(t.clone()),
        _ => None,
    };
    let echo = req.echo;
    let want_logprobs = req.logprobs.is_some();
    let target = state.chat.resolve(&p.user.user_id, &req.model).await?;
    let generations = start_n(
        &state,
        &p.user.user_id,
        &target,
        Input::Raw(prompt),
        params,
        n,
    )
    .await?;
    let position = queue_position(&generations);
    let id = format!("cmpl-{}", new_id());
    let created = OffsetDateTime::now_utc().unix_timestamp();
    let model = target.id;
    // The echoed prompt: its text, or (token ids) the tokens' texts joined.
    let prompt_text = move |c: &Completion| -> String {
        match &echo_text {
            Some(t) => t.clone(),
            None => c.prompt_logprobs.iter().map(|t| t.text.as_str()).collect(),
        }
    };
    if !req.sampling.stream {
        let head =
            json!({"id": id, "object": "text_completion", "created": created, "model": model});
        return whole_answer(generations, head, position, |i, c| {
            let echoed = if echo { prompt_text(c) } else { String::new() };
            let logprobs = if want_logprobs {
                let mut tokens = if echo {
                    c.prompt_logprobs.clone()
                } else {
                    Vec::new()
                };
                tokens.extend(c.logprobs.iter().cloned());
                completion_logprobs(&tokens, 0)
            } else {
                Value::Null
            };
            json!({"index": i, "text": echoed + &c.text, "logprobs": logprobs,
                   "finish_reason": c.finish_reason.as_str()})
        })
        .await;
    }
    let include_usage = req.sampling.include_usage();
    let chunks = Chunks {
        id,
        object: "text_completion",
        created,
        model,
    };
    let chunk = move |index: usize, text: String, finish: Option<&str>, logprobs: Value| {
        chunks.make(
            json!({"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}),
        )
    };
    let usage_chunk = include_usage.then(|| chunk(0, String::new(), None, Value::Null));
    // Each choice's text offsets continue from its previous chunk.
    let mut offsets = vec![0usize; n as usize];
    let rx = stream_choices(
        merge(generations),
        Vec::new(),
        usage_chunk,
        move |i, piece, tokens| {
            let mut lp = |tokens: Vec<TokenLogprob>| {
                if want_logprobs {
                    let v = completion_logprobs(&tokens, offsets[i]);
                    offsets[i] += tokens.iter().map(|t| t.text.len()).sum::<usize>();
                    v
                } else {
                    Value::Null
                }
            };
            match piece {
                Piece::Prompt(p) if echo => {
                    let text: String = p.iter().map(|t| t.text.as_str()).collect();
                    Some(chunk(i, text, None, lp(p)))
                }
                Piece::Prompt(_) => None,
                Piece::Text(t) => Some(chunk(i, t, None, lp(tokens))),
                Piece::Finish(c) => Some(chunk(
                    i,
                    String::new(),
                    Some(c.finish_reason.as_str()),
                    lp(tokens),
                )),
            }
        },
    );
    Ok(with_position(sse(rx), position))
}

/// One model of `/v1/models` by id.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai",
    params(("id" = String, Path, description = "A base model's name or one of your models' ids")),
    responses((status = 200, description = "The model", body = V1Model),
              (status = 401, description = "No or bad credentials", body = ErrorBody),
              (status = 404, description = "No such model", body = ErrorBody)))]
async fn model(
    state: AppState,
    CurrentUser(p): CurrentUser,
    super::error::Path(id): super::error::Path<String>,
) -> Result<Json<V1Model>> {
    list_models(&state, &p)
        .await?
        .into_iter()
        .find(|m| m.id == id)
        .map(Json)
        .ok_or_else(|| {
            Error::new(
                Kind::NotFound,
                "model_not_found",
                format!("The model `{id}` does not exist or you do not have access to it."),
            )
        })
}

/// OpenAI's 404 for a `/v1` path that is no route.
pub fn unknown_v1_route(method: &axum::http::Method, path: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": {
            "message": format!("Unknown request URL: {method} {path}."),
            "type": "invalid_request_error", "param": null, "code": "unknown_url"}})),
    )
        .into_response()
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
    // Our messages about one parameter start with its name (`temperature: …`).
    let param = match ours["code"].as_str() {
        Some("invalid_parameter" | "unsupported_parameter") => message
            .split_once(": ")
            .map(|(p, _)| Value::String(p.to_string())),
        _ => None,
    }
    .unwrap_or(Value::Null);
    let body =
        json!({"error": {"message": message, "type": kind, "param": param, "code": ours["code"]}});
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
        let err = to_messages(msgs).unwrap_err();
        assert!(
            err.message
                .starts_with("messages[1].content[1]: `image_url` parts"),
            "{}",
            err.message
        );
        let msgs: Vec<V1Message> = serde_json::from_value(json!([
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
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
