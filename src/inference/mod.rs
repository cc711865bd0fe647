//! Chat inference with candle: base models from the models directory (GGUF, kept quantised,
//! or Hugging Face safetensors), PEFT LoRA adapters applied unmerged on top, the model's own
//! chat template, sampling, and a generation loop on dedicated threads that streams text
//! pieces through a channel.
//!
//! ```text
//! Engine::generate(req) ──▶ checks (model, params, template, adapter, queue) ──▶ Job
//!        │                                                                       │ std channel
//!        ▼                                                                       ▼
//!  Generation { events }  ◀── GenEvent::Text… Done ──  worker thread of that base model
//!  (tokio Receiver; drop = cancel)                      (loads the weights once, then runs
//!                                                        batched steps over its sequences)
//! ```
//!
//! - [`Engine`]: one per server. One worker thread per base model in use; the first request
//!   for a model waits for its weights to load, later ones reuse them.
//! - Continuous batching: a worker admits waiting requests between steps (FIFO, while its
//!   batch has fewer than [`EngineOptions::max_batch`] sequences and their KV-cache
//!   reservations fit [`EngineOptions::kv_cache_bytes`]), and each step is one
//!   [`Model::forward_batch`]: a token for every decoding sequence plus chunks of the prompts
//!   being read (about 60 ms of them while others decode; up to
//!   [`EngineOptions::prefill_chunk`] otherwise). The rows of one step may use different
//!   adapters: the base matmul is shared and each row adds its own adapter's low-rank term.
//!   Every decoding sequence advances every step (none starves); a sequence whose client went
//!   away leaves the batch before the next step and frees its cache.
//! - Bounds: `max_tokens` is capped by [`EngineOptions::max_tokens`] and the context; at most
//!   [`EngineOptions::max_queue`] requests wait per model ([`EngineError::Busy`] beyond); the
//!   number of generations per user and server is bounded above the engine (`chat::limits`).
//! - KV caches grow in blocks of [`model::KV_BLOCK`] positions: memory in proportion to each
//!   sequence's length, freed when it ends.
//! - Adapters are loaded (and checked against the model's shape) when a request names them
//!   and kept in an LRU cache bounded by bytes ([`EngineOptions::adapter_cache_bytes`]).
//! - Metrics ([`EngineMetrics`]): queue, batch, tokens, time to first token, adapter cache.

pub mod config;
mod engine;
mod grammar;
mod kernels;
pub mod lora;
pub mod metrics;
pub mod model;
mod ops;
pub mod sampling;
pub mod template;
pub mod text;
pub mod tools;
mod vnni;

use std::path::PathBuf;

pub use engine::Engine;
pub use grammar::Grammar;
pub use metrics::EngineMetrics;
pub use model::{
    BatchItem, KvCache, Model, Placement, Requantize, Want, WeightsSource, describe_device,
};
pub use ops::KvPrecision;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant message's tool calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<tools::ToolCall>,
    /// A `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
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
    /// Report each generated token's log-probability, with this many most likely
    /// alternatives (0–20), as [`GenEvent::Token`] events.
    pub logprobs: Option<usize>,
    /// Report each prompt token's log-probability given the tokens before it, with this many
    /// alternatives (0–20), as one [`GenEvent::Prompt`] event once the prompt is read. With it
    /// `max_tokens` may be 0: score the prompt, generate nothing.
    pub prompt_logprobs: Option<usize>,
    /// Added to these tokens' logits before sampling (OpenAI's `logit_bias`: −100 bans a
    /// token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
    /// Generate `max_tokens` whatever the model says: its end-of-sequence tokens do not end
    /// the answer (benchmarks; vLLM's and llama.cpp's `ignore_eos`).
    pub ignore_eos: bool,
    /// The answer must follow this grammar (constrained decoding; OpenAI's
    /// `response_format`).
    pub grammar: Option<Grammar>,
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
            logprobs: None,
            prompt_logprobs: None,
            logit_bias: Vec::new(),
            ignore_eos: false,
            grammar: None,
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
        if self.max_tokens == 0 && self.prompt_logprobs.is_none() {
            return bad("max_tokens must be at least 1".into());
        }
        if self.logit_bias.len() > 300
            || self
                .logit_bias
                .iter()
                .any(|(_, b)| !b.is_finite() || !(-100.0..=100.0).contains(b))
        {
            return bad("logit_bias: at most 300 tokens, each biased by -100 to 100".into());
        }
        for (name, v) in [
            ("logprobs", self.logprobs),
            ("prompt_logprobs", self.prompt_logprobs),
        ] {
            if v.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
                return bad(format!(
                    "{name}: at most {MAX_TOP_LOGPROBS} alternatives per token"
                ));
            }
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
    /// Tools the model may call (OpenAI's `{"type": "function", "function": {…}}`), rendered
    /// through the chat template.
    pub tools: Vec<serde_json::Value>,
    pub params: SamplingParams,
    /// A raw prompt (`/v1/completions`): run as is, without the chat template; `messages`
    /// are then ignored.
    pub prompt: Option<RawPrompt>,
}

/// Why generation ended.
/// Most alternatives reported per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A token with its log-probability under the model (the raw distribution: before
/// temperature, penalties and top-k/top-p), and the most likely alternatives at its place.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    /// The token alone, decoded (an incomplete character shows as U+FFFD; `bytes` has it).
    pub text: String,
    pub bytes: Vec<u8>,
    /// `None` for a prompt's first token (nothing before it to predict it from).
    pub logprob: Option<f32>,
    /// Most likely first: (id, text, bytes, log-probability).
    pub top: Vec<(u32, String, Vec<u8>, f32)>,
}

/// A prompt given as text (tokenized with the tokenizer's special tokens, e.g. a BOS) or as
/// token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawPrompt {
    Text(String),
    Ids(Vec<u32>),
}

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
    /// A generated token's log-probability (when asked for), sent before the text it adds.
    Token(TokenLogprob),
    /// The prompt's tokens with their log-probabilities (when asked for).
    Prompt(Vec<TokenLogprob>),
    /// The last event of a successful generation.
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache (not run again).
        cached_tokens: usize,
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
    /// 0 when the request went straight into its model's batch; else its place in the
    /// queue (1 = next) when it was made.
    pub queue_position: usize,
    /// How the model writes tool calls (its template's format).
    pub tool_format: tools::ToolFormat,
    /// The prompt ends inside a `<think>` block: the answer starts as reasoning.
    pub opens_think: bool,
}

impl Generation {
    pub async fn collect(mut self) -> Result<Completion, EngineError> {
        let mut done = Collector::default();
        while let Some(ev) = self.events.recv().await {
            if let Some(result) = done.take(ev) {
                return result;
            }
        }
        done.ended()
    }

    pub fn collect_blocking(mut self) -> Result<Completion, EngineError> {
        let mut done = Collector::default();
        while let Some(ev) = self.events.blocking_recv() {
            if let Some(result) = done.take(ev) {
                return result;
            }
        }
        done.ended()
    }
}

/// A whole completion gathered from its events.
#[derive(Default)]
struct Collector {
    text: String,
    logprobs: Vec<TokenLogprob>,
    prompt_logprobs: Vec<TokenLogprob>,
}

impl Collector {
    /// Takes one event; the result once the generation ended.
    fn take(&mut self, ev: GenEvent) -> Option<Result<Completion, EngineError>> {
        match ev {
            GenEvent::Text(t) => self.text.push_str(&t),
            GenEvent::Token(t) => self.logprobs.push(t),
            GenEvent::Prompt(p) => self.prompt_logprobs = p,
            GenEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => {
                return Some(Ok(Completion {
                    text: std::mem::take(&mut self.text),
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                    logprobs: std::mem::take(&mut self.logprobs),
                    prompt_logprobs: std::mem::take(&mut self.prompt_logprobs),
                }));
            }
            GenEvent::Error(e) => return Some(Err(EngineError::Internal(e))),
        }
        None
    }

    fn ended(self) -> Result<Completion, EngineError> {
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
    /// Prompt tokens taken from the prefix cache.
    pub cached_tokens: usize,
    /// Per generated token, when `logprobs` was asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// Per prompt token, when `prompt_logprobs` was asked for.
    pub prompt_logprobs: Vec<TokenLogprob>,
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
    /// The model's queue is full: try again shortly.
    #[error("{0}")]
    Busy(String),
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

/// Where chat runs (`inference_device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InferenceDevice {
    /// The first GPU when this build has CUDA (the `cuda` feature) and a GPU answers; the CPU
    /// otherwise.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl InferenceDevice {
    /// `auto`, `cpu`, `cuda` (the first GPU) or `cuda:N`.
    pub fn parse(s: &str) -> anyhow::Result<InferenceDevice> {
        let s = s.trim().to_ascii_lowercase();
        Ok(match s.as_str() {
            "auto" | "" => InferenceDevice::Auto,
            "cpu" => InferenceDevice::Cpu,
            "cuda" | "gpu" => InferenceDevice::Cuda(0),
            other => match other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) => InferenceDevice::Cuda(n),
                None => anyhow::bail!("`{other}` is not auto, cpu or cuda:N"),
            },
        })
    }

    /// Refuses `cuda:N` in a build without CUDA (a setting that could never work).
    pub fn check_build(self) -> anyhow::Result<InferenceDevice> {
        if matches!(self, InferenceDevice::Cuda(_)) && !candle_core::utils::cuda_is_available() {
            anyhow::bail!(
                "this binary is built without CUDA: build it with `cargo build --release \
                 --features cuda` (see the README), or set `cpu` or `auto`"
            );
        }
        Ok(self)
    }

    /// The device models load onto. `Auto` falls back to the CPU (with a warning) when the
    /// GPU does not answer; an explicit `cuda:N` that does not answer is an error.
    pub fn resolve(self) -> anyhow::Result<candle_core::Device> {
        use candle_core::Device;
        match self {
            InferenceDevice::Cpu => Ok(Device::Cpu),
            InferenceDevice::Cuda(n) => {
                self.check_build()?;
                Device::new_cuda(n).map_err(|e| anyhow::anyhow!("cuda:{n} cannot be used: {e}"))
            }
            InferenceDevice::Auto if candle_core::utils::cuda_is_available() => {
                match Device::new_cuda(0) {
                    Ok(d) => Ok(d),
                    Err(e) => {
                        tracing::warn!(error = %e, "no usable GPU: chat runs on the CPU");
                        Ok(Device::Cpu)
                    }
                }
            }
            InferenceDevice::Auto => Ok(Device::Cpu),
        }
    }
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
    /// Where models run.
    pub device: InferenceDevice,
    /// Most prompt tokens run in one step (before the other sequences get their turn).
    pub prefill_chunk: usize,
    /// Most tokens one generation may produce, whatever it asks (the context bounds it too).
    pub max_tokens: usize,
    /// Most sequences one model advances together in a batched step.
    pub max_batch: usize,
    /// KV-cache bytes the sequences of one model's batch may reserve together (each reserves
    /// its prompt plus `max_tokens` positions); beyond it requests wait.
    pub kv_cache_bytes: usize,
    /// KV-cache bytes one model keeps of finished sequences, so that prompts beginning with
    /// the same tokens (a shared system prompt, a conversation's earlier turns) on the same
    /// adapter reuse them instead of running those tokens again; 0 turns it off.
    pub prefix_cache_bytes: usize,
    /// Most requests that may wait for a place in one model's batch; beyond it they are
    /// refused with [`EngineError::Busy`].
    pub max_queue: usize,
    /// How the CPU's own layer loop keeps keys and values (half floats by default; the
    /// tensor path, GPUs included, keeps 32-bit floats whatever this says).
    pub kv_precision: KvPrecision,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            adapter_cache_bytes: 512 << 20,
            format: WeightsFormat::Auto,
            requantize: Requantize::Auto,
            model_requantize: std::collections::HashMap::new(),
            device: InferenceDevice::Auto,
            prefill_chunk: 256,
            max_tokens: 4096,
            max_batch: 16,
            kv_cache_bytes: 4 << 30,
            prefix_cache_bytes: 1 << 30,
            max_queue: 64,
            kv_precision: KvPrecision::default(),
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
