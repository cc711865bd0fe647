//! Chat inference with candle: base models from the models directory (GGUF, kept quantised,
//! or Hugging Face safetensors), PEFT LoRA adapters applied unmerged on top, the model's own
//! chat template, sampling, and a generation loop on dedicated threads that streams text
//! pieces through a channel.
//!
//! ```text
//! Engine::generate(req) ──▶ checks (model, params, template, adapter) ──▶ Job
//!        │                                                                 │ std channel
//!        ▼                                                                 ▼
//!  Generation { events }  ◀── GenEvent::Text… Done ──  worker thread of that base model
//!  (tokio Receiver; drop = cancel)                      (loads the weights once, then
//!                                                        round-robin steps over its sequences)
//! ```
//!
//! - [`Engine`]: one per server. One worker thread per base model in use; the first request
//!   for a model waits for its weights to load, later ones reuse them.
//! - Fairness: a worker advances every active sequence by one step in turn (a decode token,
//!   or a chunk of prompt tokens: at most [`EngineOptions::prefill_chunk`] for a sequence
//!   alone, about 60 ms of work while others wait), so a long prompt does not stall the
//!   others. Each step is one `Model::forward` of one sequence; batching the decode steps of
//!   a round into one forward is the next step and needs no API change.
//! - Bounds: `max_tokens` is capped by [`EngineOptions::max_tokens`] and the context; the
//!   number of generations at once is bounded above the engine (`chat::limits`).
//! - Adapters are loaded (and checked against the model's shape) when a request names them
//!   and kept in an LRU cache bounded by bytes ([`EngineOptions::adapter_cache_bytes`]).

pub mod config;
mod engine;
mod kernels;
pub mod lora;
pub mod model;
mod ops;
pub mod sampling;
pub mod template;
pub mod text;

use std::path::PathBuf;

pub use engine::Engine;
pub use model::{KvCache, Model, Requantize, WeightsSource};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// How tokens are chosen and when generation ends.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling: the smallest set of best tokens holding this much probability.
    pub top_p: f64,
    pub top_k: Option<usize>,
    /// > 1 discourages tokens already in the prompt or the completion (transformers' rule).
    pub repetition_penalty: f32,
    /// OpenAI's penalties in [−2, 2]: subtracted from a token's logit once it is in the
    /// completion (presence), and per time it is there (frequency).
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Same seed, same request → same text. `None`: a random seed.
    pub seed: Option<u64>,
    /// Most tokens to generate (also cut to what the context leaves after the prompt).
    pub max_tokens: usize,
    /// Generation stops before any of these strings (which are not emitted).
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.7,
            top_p: 1.0,
            top_k: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..SamplingParams::default()
        }
    }

    fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Invalid(m));
        if !self.temperature.is_finite() || !(0.0..=100.0).contains(&self.temperature) {
            return bad(format!(
                "temperature must be between 0 and 100, not {}",
                self.temperature
            ));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return bad(format!("top_p must be in (0, 1], not {}", self.top_p));
        }
        if self.top_k == Some(0) {
            return bad("top_k must be at least 1".into());
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!(
                "repetition_penalty must be positive, not {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be between -2 and 2, not {v}"));
            }
        }
        if self.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if self.stop.len() > 16 || self.stop.iter().any(|s| s.len() > 256) {
            return bad("at most 16 stop strings of at most 256 bytes".into());
        }
        Ok(())
    }
}

/// The folder a request's model names when it is a path (with a `/`) to a folder: a model
/// outside the models directory (a full fine-tune's output, a Hugging Face cache snapshot).
pub fn model_dir_of(model: &str) -> Option<PathBuf> {
    let p = std::path::Path::new(model);
    (model.contains('/') && p.is_dir()).then(|| p.to_path_buf())
}

/// A chat request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// A base model: its folder name in the models directory (or catalogue name); with
    /// `model_dir`, the name that folder's model is known by (a trained model's id).
    pub base_model: String,
    /// A model folder outside the models directory: a full or freeze fine-tune's weights,
    /// loaded (and quantised) like a base model, under the name `base_model`.
    pub model_dir: Option<PathBuf>,
    /// A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`).
    pub adapter: Option<PathBuf>,
    pub messages: Vec<ChatMessage>,
    pub params: SamplingParams,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` (or the end of the context).
    Length,
}

impl FinishReason {
    /// OpenAI's name: `stop` / `length`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a generation streams.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// The next piece of the answer: whole UTF-8 characters, never part of a stop string.
    Text(String),
    /// The last event of a successful generation.
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The last event of a failed generation.
    Error(String),
}

/// A running generation. Dropping it (or its receiver) cancels the generation at the next
/// token.
#[derive(Debug)]
pub struct Generation {
    pub events: tokio::sync::mpsc::Receiver<GenEvent>,
    /// Tokens of the rendered prompt.
    pub prompt_tokens: usize,
}

impl Generation {
    /// Waits for the whole answer: (text, finish reason, prompt tokens, completion tokens).
    pub async fn collect(mut self) -> Result<Completion, EngineError> {
        let mut text = String::new();
        while let Some(ev) = self.events.recv().await {
            match ev {
                GenEvent::Text(t) => text.push_str(&t),
                GenEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    return Ok(Completion {
                        text,
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                    });
                }
                GenEvent::Error(e) => return Err(EngineError::Internal(e)),
            }
        }
        Err(EngineError::Internal(
            "the generation ended without a result".into(),
        ))
    }

    /// [`Generation::collect`] for code outside an async runtime (tests, the CLI).
    pub fn collect_blocking(mut self) -> Result<Completion, EngineError> {
        let mut text = String::new();
        while let Some(ev) = self.events.blocking_recv() {
            match ev {
                GenEvent::Text(t) => text.push_str(&t),
                GenEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    return Ok(Completion {
                        text,
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                    });
                }
                GenEvent::Error(e) => return Err(EngineError::Internal(e)),
            }
        }
        Err(EngineError::Internal(
            "the generation ended without a result".into(),
        ))
    }
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Why a request cannot be served. HTTP: NotFound → 404, Invalid/Unsupported → 422,
/// Internal → 500.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No such base model.
    #[error("{0}")]
    NotFound(String),
    /// A bad adapter, messages (the template refused them), or sampling parameters.
    #[error("{0}")]
    Invalid(String),
    /// An architecture, adapter type (DoRA, modules_to_save, …) or format chat cannot run.
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Internal(String),
}

/// Which weights of a model folder with both forms are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightsFormat {
    /// The GGUF when there is one (quantised: several times less to read per token), else
    /// the safetensors.
    #[default]
    Auto,
    Gguf,
    Safetensors,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Bytes of loaded adapters kept for reuse (least recently used go first).
    pub adapter_cache_bytes: usize,
    pub format: WeightsFormat,
    /// What the weights become at load: a Hugging Face folder's float weights are quantised
    /// (`Auto`: Q8_0; `To(Q4_0)`…; `Keep`: float32); GGUF weights in formats candle has no
    /// fast CPU kernel for are re-quantised.
    pub requantize: Requantize,
    /// The same, per base model (by folder name), overriding `requantize`.
    pub model_requantize: std::collections::HashMap<String, Requantize>,
    /// Most prompt tokens run in one step (before the other sequences get their turn).
    pub prefill_chunk: usize,
    /// Most tokens one generation may produce, whatever it asks (the context bounds it too).
    pub max_tokens: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            adapter_cache_bytes: 512 << 20,
            format: WeightsFormat::Auto,
            requantize: Requantize::Auto,
            model_requantize: std::collections::HashMap::new(),
            prefill_chunk: 256,
            max_tokens: 4096,
        }
    }
}

/// Pins the number of threads candle's CPU kernels use (`RAYON_NUM_THREADS`), unless the
/// environment already says. candle 0.11 otherwise works the number out again on every
/// operation — parsing `/proc/cpuinfo` each time, which cost about a tenth of decode time.
///
/// # Safety
/// Changes the process environment: call it before any other thread starts.
pub unsafe fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none()
        && std::env::var_os("CANDLE_NUM_THREADS").is_none()
    {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: the caller guarantees no other thread runs yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}
