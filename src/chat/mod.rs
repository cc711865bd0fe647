//! Chat: what every way of chatting (HTTP, the command line, Python) shares above the engine —
//! the roles a message may have, model resolution through the [`Registry`], the limits on
//! generations, and saved conversations ([`Sessions`]) with generate-and-record.

pub mod limits;
pub mod sessions;

use std::sync::Arc;

use crate::error::{Error, Kind, Result};
use crate::inference::{
    ChatMessage, Engine, GenerateRequest, Generation, RawPrompt, SamplingParams,
};
use crate::models::{Registry, Resolved};
use crate::store::ModelKind;
pub use limits::{GenerationLimits, GenerationPermit};
pub use sessions::{Session, SessionMessage, Sessions};

/// A message's role as people send it: `system`, `user`, `assistant`, `tool`, or OpenAI's
/// `developer` (a system message by another name). The one rule for HTTP and Python alike.
pub fn normalize_role(role: &str) -> Option<&'static str> {
    match role {
        "system" | "developer" => Some("system"),
        "user" => Some("user"),
        "assistant" => Some("assistant"),
        "tool" => Some("tool"),
        _ => None,
    }
}

/// Checks `(role, content)` pairs and makes them messages: roles normalised, at least one.
pub fn messages(pairs: Vec<(String, String)>) -> Result<Vec<ChatMessage>> {
    if pairs.is_empty() {
        return Err(Error::new(
            Kind::Invalid,
            "invalid_request",
            "messages must not be empty",
        ));
    }
    pairs
        .into_iter()
        .enumerate()
        .map(|(i, (role, content))| match normalize_role(&role) {
            Some(r) => Ok(ChatMessage::new(r, content)),
            None => Err(Error::new(
                Kind::Invalid,
                "invalid_request",
                format!(
                    "messages[{i}].role: unknown role `{role}` (system, developer, user, \
                     assistant or tool)"
                ),
            )),
        })
        .collect()
}

impl From<crate::inference::EngineError> for Error {
    fn from(e: crate::inference::EngineError) -> Self {
        use crate::inference::EngineError;
        match e {
            EngineError::NotFound(m) => Error::new(Kind::NotFound, "model_not_found", m),
            EngineError::Invalid(m) => Error::new(Kind::Invalid, "invalid_request", m),
            EngineError::Unsupported(m) => Error::new(Kind::Invalid, "unsupported", m),
            EngineError::Internal(m) => Error::internal(m),
            EngineError::Busy(m) => Error {
                retry_after: Some(2),
                ..Error::new(Kind::Throttled, "server_busy", m)
            },
        }
    }
}

/// A finished answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    pub finish_reason: crate::inference::FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// The chat service.
pub struct Chat {
    engine: Arc<Engine>,
    models: Arc<Registry>,
    limits: Arc<GenerationLimits>,
    sessions: Sessions,
}

impl Chat {
    pub fn new(
        engine: Arc<Engine>,
        models: Arc<Registry>,
        limits: Arc<GenerationLimits>,
        sessions: Sessions,
    ) -> Arc<Chat> {
        Arc::new(Chat {
            engine,
            models,
            limits,
            sessions,
        })
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// What a model id names for `owner` (a base model's name or one of their models' ids).
    pub async fn resolve(&self, owner: &str, id: &str) -> Result<Resolved> {
        self.models.resolve(owner, id).await
    }

    /// What the original API's `model_path` names for `owner`.
    pub async fn resolve_path(&self, owner: &str, path: &str) -> Result<Resolved> {
        self.models.resolve_path(owner, path).await
    }

    /// Starts a generation for `owner` once the limits allow it. The engine's checks read
    /// files (the model's tokenizer and template, an adapter), so they run on the blocking
    /// pool. The permit must live as long as the generation.
    pub async fn start(
        &self,
        owner: &str,
        target: &Resolved,
        messages: Vec<ChatMessage>,
        params: SamplingParams,
    ) -> Result<(Generation, GenerationPermit)> {
        self.start_with_tools(owner, target, messages, Vec::new(), params)
            .await
    }

    /// [`Chat::start`] with tools the model may call (OpenAI tool objects).
    pub async fn start_with_tools(
        &self,
        owner: &str,
        target: &Resolved,
        messages: Vec<ChatMessage>,
        tools: Vec<serde_json::Value>,
        params: SamplingParams,
    ) -> Result<(Generation, GenerationPermit)> {
        let permit = self.limits.acquire(owner)?;
        let engine = self.engine.clone();
        // A trained model answers with the system prompt it was trained with unless the
        // conversation brings its own.
        let mut messages = messages;
        if let Some(system) = &target.system
            && !messages.iter().any(|m| m.role == "system")
        {
            messages.insert(0, ChatMessage::new("system", system.clone()));
        }
        let req = GenerateRequest {
            base_model: target.base.name.clone(),
            // A full fine-tune is whole weights in its own folder, outside the models dir.
            model_dir: (target.kind == ModelKind::Full).then(|| target.base.path.clone()),
            adapter: target.adapter.clone(),
            messages,
            tools,
            params,
            prompt: None,
        };
        let generation = tokio::task::spawn_blocking(move || engine.generate(req)).await??;
        Ok((generation, permit))
    }

    /// [`Chat::start`] for a raw prompt (`/v1/completions`): no chat template, no system
    /// prompt.
    pub async fn start_raw(
        &self,
        owner: &str,
        target: &Resolved,
        prompt: RawPrompt,
        params: SamplingParams,
    ) -> Result<(Generation, GenerationPermit)> {
        let permit = self.limits.acquire(owner)?;
        let engine = self.engine.clone();
        let req = GenerateRequest {
            base_model: target.base.name.clone(),
            model_dir: (target.kind == ModelKind::Full).then(|| target.base.path.clone()),
            adapter: target.adapter.clone(),
            messages: Vec::new(),
            tools: Vec::new(),
            params,
            prompt: Some(prompt),
        };
        let generation = tokio::task::spawn_blocking(move || engine.generate(req)).await??;
        Ok((generation, permit))
    }

    /// Generates a whole answer; with `session_id`, appends the last user message and the
    /// answer to that saved conversation (atomically, whatever else is appended meanwhile).
    pub async fn complete(
        &self,
        owner: &str,
        target: &Resolved,
        messages: Vec<ChatMessage>,
        params: SamplingParams,
        session_id: Option<&str>,
    ) -> Result<Answer> {
        if let Some(id) = session_id {
            // Checked before generating; the answer is appended to what it holds then.
            self.sessions.get(owner, id).await?;
        }
        let last_user = messages.iter().rev().find(|m| m.role == "user").cloned();
        let (generation, permit) = self.start(owner, target, messages, params).await?;
        let done = generation.collect().await?;
        drop(permit);
        if let Some(id) = session_id {
            let mut added: Vec<ChatMessage> = last_user.into_iter().collect();
            added.push(ChatMessage::new("assistant", done.text.clone()));
            self.sessions
                .append(owner, id, added, Some(target.id.clone()))
                .await?;
        }
        Ok(Answer {
            text: done.text,
            finish_reason: done.finish_reason,
            prompt_tokens: done.prompt_tokens,
            completion_tokens: done.completion_tokens,
        })
    }

    /// The models `owner` may chat with: base models by name, their trained models (adapters
    /// and full fine-tunes) by id.
    pub async fn models(&self, owner: &str) -> Result<ChatModels> {
        let base = self.models.base_models().await?;
        let trained = self.models.trained(owner).await?;
        Ok(ChatModels {
            base: base.iter().cloned().collect(),
            trained,
        })
    }
}

/// The models one user may chat with.
pub struct ChatModels {
    pub base: Vec<crate::models::BaseModel>,
    pub trained: Vec<crate::store::ModelRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_one_rule() {
        let m = messages(vec![
            ("developer".into(), "be brief".into()),
            ("user".into(), "hi".into()),
            ("tool".into(), "{}".into()),
        ])
        .unwrap();
        assert_eq!(m[0], ChatMessage::new("system", "be brief"));
        assert_eq!(m[2].role, "tool");
        assert!(messages(vec![("wizard".into(), "x".into())]).is_err());
        assert!(messages(Vec::new()).is_err());
    }
}
