//! Shapes that LlamaFactory cannot read as they are, rewritten into ones it can, record by
//! record, before validation (the upload then stores the rewritten records as JSON Lines):
//!
//! * OpenAI content-part arrays (`"content": [{"type": "text", "text": …}]`, and LlamaFactory's
//!   own v1 parts with `value`): text parts joined; `reasoning` parts become a leading
//!   `<think>…</think>` block (how the chat templates of reasoning models write it, and what
//!   chat returns as `reasoning_content`); `tool_call` parts become a function turn. Image,
//!   audio and file parts are refused until multimodal training exists.
//! * OpenAI tool calls: an assistant message with `tool_calls` becomes a `function` turn whose
//!   content is the call (`{"name", "arguments"}`, a list for parallel calls), what
//!   LlamaFactory's function formatter parses; consecutive `tool` results become one turn;
//!   a `tools` array becomes the JSON string LlamaFactory reads.
//! * OpenAI's DPO JSONL (`input.messages`, `preferred_output`, `non_preferred_output`) and
//!   LlamaFactory v1's (`chosen_messages`, `rejected_messages` sharing a prefix): the prompt
//!   conversation in `messages`, the answers in `chosen` and `rejected`.
//!
//! * OpenAI's legacy `prompt`/`completion` rows: alpaca's `instruction`/`output`.
//!
//! Per-message weights that would skip an assistant turn (`weight: 0`, `loss_weight: 0`) are
//! refused: LlamaFactory trains every assistant turn.

use super::records::kind;
use super::*;

/// The record in a shape LlamaFactory reads, and whether anything changed.
pub(super) fn normalize(value: Value) -> Result<(Value, bool), String> {
    let Value::Object(mut record) = value else {
        return Ok((value, false));
    };
    let mut changed = false;
    // OpenAI's legacy completion fine-tuning rows.
    if record.contains_key("prompt")
        && record.contains_key("completion")
        && !["instruction", "output", "messages", "conversations", "text"]
            .iter()
            .any(|k| record.contains_key(*k))
    {
        if let Some(prompt) = record.remove("prompt") {
            record.insert("instruction".into(), prompt);
        }
        if let Some(completion) = record.remove("completion") {
            record.insert("output".into(), completion);
        }
        changed = true;
    }
    if record.contains_key("preferred_output") || record.contains_key("non_preferred_output") {
        record = openai_dpo(record)?;
        changed = true;
    } else if record.contains_key("chosen_messages") || record.contains_key("rejected_messages") {
        record = v1_dpo(record)?;
        changed = true;
    }
    if let Some(Value::Array(tools)) = record.get("tools") {
        let text = serde_json::to_string(tools).map_err(|e| e.to_string())?;
        record.insert("tools".into(), Value::String(text));
        changed = true;
    }
    if let Some(Value::Array(messages)) = record.get_mut("messages") {
        changed |= normalize_messages(messages)?;
    }
    for key in ["chosen", "rejected"] {
        if let Some(Value::Object(turn)) = record.get_mut(key)
            && turn.contains_key("role")
        {
            changed |= normalize_message(turn).map_err(|m| format!("{key}: {m}"))?;
        }
    }
    Ok((Value::Object(record), changed))
}

/// OpenAI's preference fine-tuning rows.
fn openai_dpo(mut record: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let input = match record.remove("input") {
        Some(Value::Object(input)) => input,
        Some(other) => return Err(format!("`input` must be an object, found {}", kind(&other))),
        None => return Err("missing field `input` (the prompt's `messages`)".to_string()),
    };
    for (key, value) in input {
        match key.as_str() {
            "messages" | "tools" => {
                out.insert(key, value);
            }
            "parallel_tool_calls" => {}
            other => return Err(format!("input: unknown field `{other}`")),
        }
    }
    for (from, to) in [
        ("preferred_output", "chosen"),
        ("non_preferred_output", "rejected"),
    ] {
        let answer = match record.remove(from) {
            Some(Value::Array(mut turns)) if turns.len() == 1 => turns.remove(0),
            Some(Value::Array(turns)) => {
                return Err(format!(
                    "`{from}` must hold one assistant message, found {}",
                    turns.len()
                ));
            }
            Some(other) => {
                return Err(format!("`{from}` must be an array, found {}", kind(&other)));
            }
            None => return Err(format!("missing field `{from}`")),
        };
        out.insert(to.into(), answer);
    }
    Ok(out)
}

/// LlamaFactory v1's preference rows: two whole conversations that differ in the last turn.
fn v1_dpo(mut record: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut take = |key: &str| match record.remove(key) {
        Some(Value::Array(turns)) if !turns.is_empty() => Ok(turns),
        Some(other) => Err(format!(
            "`{key}` must be a non-empty array, found {}",
            kind(&other)
        )),
        None => Err(format!("missing field `{key}`")),
    };
    let mut chosen = take("chosen_messages")?;
    let mut rejected = take("rejected_messages")?;
    let (Some(chosen_answer), Some(rejected_answer)) = (chosen.pop(), rejected.pop()) else {
        return Err("`chosen_messages` and `rejected_messages` must not be empty".to_string());
    };
    if chosen != rejected {
        return Err(
            "`chosen_messages` and `rejected_messages` must share every turn but the last (the \
             two answers to one prompt)"
                .to_string(),
        );
    }
    let mut out = Map::new();
    out.insert("messages".into(), Value::Array(chosen));
    out.insert("chosen".into(), chosen_answer);
    out.insert("rejected".into(), rejected_answer);
    if let Some(tools) = record.remove("tools") {
        out.insert("tools".into(), tools);
    }
    Ok(out)
}

/// Rewrites each message; merges consecutive tool results into one turn.
fn normalize_messages(messages: &mut Vec<Value>) -> Result<bool, String> {
    let mut changed = false;
    for (i, message) in messages.iter_mut().enumerate() {
        if let Value::Object(m) = message {
            changed |= normalize_message(m).map_err(|e| format!("messages[{i}]: {e}"))?;
        }
    }
    let is_tool = |v: &Value| v.get("role").and_then(Value::as_str) == Some("tool");
    if messages
        .windows(2)
        .any(|w| is_tool(&w[0]) && is_tool(&w[1]))
    {
        let mut merged: Vec<Value> = Vec::with_capacity(messages.len());
        for message in messages.drain(..) {
            if let (Some(last), true) = (merged.last_mut(), is_tool(&message))
                && is_tool(last)
            {
                let add = message.get("content").and_then(Value::as_str).unwrap_or("");
                if let Some(Value::String(text)) = last.get_mut("content") {
                    text.push('\n');
                    text.push_str(add);
                }
                continue;
            }
            merged.push(message);
        }
        *messages = merged;
        changed = true;
    }
    Ok(changed)
}

/// One OpenAI message: content parts flattened, tool calls turned into a function turn,
/// OpenAI's bookkeeping fields dropped.
fn normalize_message(m: &mut Map<String, Value>) -> Result<bool, String> {
    let mut changed = false;
    let role = m
        .get("role")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    for key in ["weight", "loss_weight"] {
        if let Some(w) = m.remove(key) {
            changed = true;
            if role == "assistant" && w.as_f64() == Some(0.0) {
                return Err(format!(
                    "`{key}: 0` asks not to train this assistant turn; LlamaFactory trains every \
                     assistant turn: remove the turn (or the weight) instead"
                ));
            }
        }
    }
    for key in ["tool_call_id", "name", "refusal"] {
        if m.remove(key).is_some() {
            changed = true;
        }
    }
    let mut calls: Vec<Value> = Vec::new();
    let mut thought = String::new();
    if let Some(Value::Array(parts)) = m.get("content") {
        let mut text = String::new();
        for (i, part) in parts.iter().enumerate() {
            let at = |e: String| format!("content[{i}]: {e}");
            let Value::Object(part) = part else {
                return Err(at(format!(
                    "a content part must be an object, found {}",
                    kind(part)
                )));
            };
            let kind_name = part.get("type").and_then(Value::as_str).unwrap_or("");
            let body = || {
                part.get("text")
                    .or_else(|| part.get("value"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| at(format!("a `{kind_name}` part needs a `text` string")))
            };
            match kind_name {
                "text" | "input_text" | "output_text" => text.push_str(body()?),
                "reasoning" | "thinking" => thought.push_str(body()?),
                "tool_call" => {
                    let call: Value = serde_json::from_str(body()?).map_err(|e| {
                        at(format!(
                            "a tool_call part must hold JSON (name, arguments): {e}"
                        ))
                    })?;
                    calls.push(call);
                }
                "image_url" | "image" | "input_image" | "video" | "video_url" | "audio"
                | "input_audio" | "file" => {
                    return Err(at(format!(
                        "`{kind_name}` parts are multimodal, which ferrotune does not train yet; \
                         keep only text parts"
                    )));
                }
                other => {
                    return Err(at(format!(
                        "unknown content part type `{other}` (text parts are supported)"
                    )));
                }
            }
        }
        m.insert("content".into(), Value::String(text));
        changed = true;
    }
    if let Some(Value::String(r)) = m.remove("reasoning_content") {
        thought.push_str(&r);
        changed = true;
    }
    match m.remove("tool_calls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            changed = true;
            for (i, call) in list.iter().enumerate() {
                let function = call
                    .get("function")
                    .ok_or_else(|| format!("tool_calls[{i}]: missing `function`"))?;
                let name = function
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("tool_calls[{i}]: missing `function.name`"))?;
                let arguments = match function.get("arguments") {
                    Some(Value::String(s)) => {
                        serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
                    }
                    Some(other) => other.clone(),
                    None => Value::Object(Map::new()),
                };
                calls.push(serde_json::json!({"name": name, "arguments": arguments}));
            }
        }
        Some(other) => {
            return Err(format!(
                "`tool_calls` must be an array, found {}",
                kind(&other)
            ));
        }
    }
    let prefix = |body: &str| {
        if thought.trim().is_empty() {
            body.to_string()
        } else {
            format!("<think>\n{}\n</think>\n\n{body}", thought.trim())
        }
    };
    if !calls.is_empty() {
        if role != "assistant" {
            return Err(format!("only assistant messages call tools, not `{role}`"));
        }
        let text = m.get("content").and_then(Value::as_str).unwrap_or("");
        if !text.trim().is_empty() {
            return Err(
                "an assistant message with both text and tool calls cannot be trained as one \
                 turn (LlamaFactory's function turn holds only the calls): split it or drop the \
                 text"
                    .to_string(),
            );
        }
        let call = if calls.len() == 1 {
            calls.remove(0)
        } else {
            Value::Array(calls)
        };
        let body = serde_json::to_string(&call).map_err(|e| e.to_string())?;
        m.insert("role".into(), Value::String("function".into()));
        m.insert("content".into(), Value::String(prefix(&body)));
        return Ok(true);
    }
    if !thought.is_empty() {
        let text = m.get("content").and_then(Value::as_str).unwrap_or("");
        let merged = prefix(text);
        m.insert("content".into(), Value::String(merged));
    }
    Ok(changed)
}
