//! The engine: model slots (assets + a worker thread per base model), the adapter cache, and
//! the generation loop.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;

use super::grammar::{Constrained, GrammarVocab};
use super::lora::{self, LoraAdapter};
use super::metrics::EngineMetrics;
use super::model::{BatchItem, KvCache, Model, Want, WeightsSource};
use super::sampling::Sampler;
use super::text::{ChatAssets, Detokenizer, StopMatcher, StopOutcome};
use super::{
    ChatMessage, EngineError, EngineOptions, FinishReason, GenEvent, GenerateRequest, Generation,
    Grammar, RawPrompt, TokenLogprob, WeightsFormat,
};

/// Serves chat for every base model in a models directory. Create one per process and share
/// it (`Arc`); all methods take `&self`.
pub struct Engine {
    /// Where base models are found (the server's registry, or a folder of its own).
    models: Arc<crate::models::Registry>,
    opts: EngineOptions,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    adapters: Mutex<AdapterCache>,
    metrics: EngineMetrics,
}

/// One base model in use: its assets, the channel to its worker thread, and how many of its
/// requests wait for a place in the batch.
struct Slot {
    name: String,
    assets: Arc<ChatAssets>,
    jobs: Mutex<std_mpsc::Sender<Job>>,
    load: Arc<SlotLoad>,
}

/// A worker's queue and batch, as the requests see them.
#[derive(Default)]
struct SlotLoad {
    /// Requests handed to the worker and not yet in its batch.
    waiting: AtomicUsize,
    /// Sequences in the batch.
    active: AtomicUsize,
}

/// A request handed to a worker.
struct Job {
    submitted: Instant,
    prompt: Vec<u32>,
    adapter: Option<Arc<LoraAdapter>>,
    params: super::SamplingParams,
    events: mpsc::Sender<GenEvent>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves consistent data (plain maps); keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// An engine over the base models in `models_dir` (the command line, Python, tests).
    pub fn new(models_dir: PathBuf, opts: EngineOptions) -> Arc<Engine> {
        Engine::with_registry(crate::models::Registry::local(models_dir), opts)
    }

    /// An engine that finds base models through `models` (the server's registry).
    pub fn with_registry(models: Arc<crate::models::Registry>, opts: EngineOptions) -> Arc<Engine> {
        let cap = opts.adapter_cache_bytes;
        Arc::new(Engine {
            models,
            opts,
            slots: Mutex::new(HashMap::new()),
            adapters: Mutex::new(AdapterCache::new(cap)),
            metrics: EngineMetrics::default(),
        })
    }

    /// The engine's serving metrics (queue, batch, tokens, time to first token, adapter
    /// cache), to register with a Prometheus registry.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    pub fn models_dir(&self) -> &Path {
        self.models.models_dir()
    }

    /// How this engine's models keep their KV caches on the CPU's own kernels.
    pub fn kv_precision(&self) -> super::KvPrecision {
        self.opts.kv_precision
    }

    /// Where this engine finds base models.
    pub fn registry(&self) -> &Arc<crate::models::Registry> {
        &self.models
    }

    /// Starts a generation on the model's worker thread and returns its event stream.
    ///
    /// Everything that can make the request invalid is checked before it returns (unknown
    /// model, parameters, template, prompt length, adapter), so the caller can answer with the
    /// right status. That reads small files: the first request for a model loads its tokenizer
    /// and template (tens of milliseconds), a request for an adapter not in the cache loads it
    /// (milliseconds per MB). The model's weights load on the worker thread: the first
    /// request's events start once they are in memory.
    pub fn generate(&self, req: GenerateRequest) -> Result<Generation, EngineError> {
        req.params.validate()?;
        if req.messages.is_empty() && req.prompt.is_none() {
            return Err(EngineError::Invalid("no messages".into()));
        }
        let slot = self.slot(&req.base_model, req.model_dir.as_deref())?;
        let assets = &slot.assets;
        let vocab = assets
            .tokenizer
            .get_vocab_size(true)
            .max(assets.config.vocab_size);
        if let Some((t, _)) = req
            .params
            .logit_bias
            .iter()
            .find(|(t, _)| *t as usize >= vocab)
        {
            return Err(EngineError::Invalid(format!(
                "logit_bias: token {t} is not in the model's vocabulary of {vocab}"
            )));
        }
        let tool_format = assets.template.tool_format();
        let mut req = req;
        if let Some(Grammar::ToolCalls {
            functions,
            parallel,
        }) = &req.params.grammar
        {
            let lark = tool_format.grammar(functions, *parallel);
            Grammar::Lark(lark.clone())
                .check()
                .map_err(|e| EngineError::Invalid(format!("tool_choice: {e}")))?;
            req.params.grammar = Some(Grammar::Lark(lark));
        } else if let Some(g) = &req.params.grammar {
            g.check()
                .map_err(|e| EngineError::Invalid(format!("response_format: {e}")))?;
        }
        let mut opens_think = false;
        let prompt = match &req.prompt {
            Some(RawPrompt::Ids(ids)) => {
                if let Some(t) = ids.iter().find(|t| **t as usize >= vocab) {
                    return Err(EngineError::Invalid(format!(
                        "prompt: token {t} is not in the model's vocabulary of {vocab}"
                    )));
                }
                ids.clone()
            }
            Some(RawPrompt::Text(text)) => assets
                .tokenizer
                .encode(text.as_str(), true)
                .map_err(|e| EngineError::Invalid(format!("cannot tokenize the prompt: {e}")))?
                .get_ids()
                .to_vec(),
            None => {
                let text = assets
                    .template
                    .render_with_tools(&req.messages, &req.tools, true)
                    .map_err(|e| {
                        EngineError::Invalid(format!("the chat template refused the messages: {e}"))
                    })?;
                opens_think = super::tools::prompt_opens_think(&text);
                assets
                    .encode(&text)
                    .map_err(|e| EngineError::Invalid(e.to_string()))?
            }
        };
        let context = assets.config.max_positions;
        if prompt.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        if prompt.len() >= context {
            return Err(EngineError::Invalid(format!(
                "the prompt is {} tokens; the model's context is {context}",
                prompt.len()
            )));
        }
        let adapter = match &req.adapter {
            Some(dir) => Some(self.adapter(&slot, dir)?),
            None => None,
        };
        let mut params = req.params;
        params.max_tokens = params
            .max_tokens
            .min(self.opts.max_tokens.max(1))
            .min(context - prompt.len());
        let waiting = slot.load.waiting.load(Ordering::Relaxed);
        let active = slot.load.active.load(Ordering::Relaxed);
        if waiting >= self.opts.max_queue {
            return Err(EngineError::Busy(format!(
                "{waiting} requests are waiting for the model {} (the queue's limit); try again \
                 shortly",
                slot.name
            )));
        }
        // Where it will wait: behind everything waiting, once the batch is full.
        let queue_position = if active + waiting >= self.opts.max_batch.max(1) {
            waiting + 1
        } else {
            0
        };
        // Room for every event, so the worker never waits on a slow reader (and never drops
        // one): a text piece per token at most, a log-probability per token when asked for,
        // the prompt's scores, the end.
        let per_token = if params.logprobs.is_some() { 2 } else { 1 };
        let (tx, rx) = mpsc::channel(per_token * params.max_tokens + 4);
        let prompt_tokens = prompt.len();
        let job = Job {
            submitted: Instant::now(),
            prompt,
            adapter,
            params,
            events: tx,
        };
        slot.load.waiting.fetch_add(1, Ordering::Relaxed);
        let sent = lock(&slot.jobs).send(job);
        if let Err(std_mpsc::SendError(job)) = sent {
            slot.load.waiting.fetch_sub(1, Ordering::Relaxed);
            // The worker is gone (its model failed to load): forget the slot, try once more.
            lock(&self.slots).remove(&slot.name);
            let slot = self.slot(&req.base_model, req.model_dir.as_deref())?;
            slot.load.waiting.fetch_add(1, Ordering::Relaxed);
            lock(&slot.jobs).send(job).map_err(|_| {
                slot.load.waiting.fetch_sub(1, Ordering::Relaxed);
                EngineError::Internal(format!("the model {} cannot be loaded", slot.name))
            })?;
        }
        Ok(Generation {
            events: rx,
            prompt_tokens,
            queue_position,
            tool_format,
            opens_think,
        })
    }

    /// The prompt text the model would see for `messages` (with the assistant's turn opened).
    pub fn render_prompt(
        &self,
        base_model: &str,
        messages: &[ChatMessage],
    ) -> Result<String, EngineError> {
        let slot = self.slot(base_model, None)?;
        slot.assets.template.render(messages, true).map_err(|e| {
            EngineError::Invalid(format!("the chat template refused the messages: {e}"))
        })
    }

    /// The assets of a base model (loaded on first use): tokenizer, template, config.
    pub fn assets(&self, base_model: &str) -> Result<Arc<ChatAssets>, EngineError> {
        Ok(self.slot(base_model, None)?.assets.clone())
    }

    /// Loads (or finds in the cache) an adapter for a base model, checking it fits. Useful to
    /// validate an adapter before it is offered.
    pub fn load_adapter(
        &self,
        base_model: &str,
        dir: &Path,
    ) -> Result<Arc<LoraAdapter>, EngineError> {
        let slot = self.slot(base_model, None)?;
        self.adapter(&slot, dir)
    }

    /// Bytes of adapters held by the cache, and how many.
    pub fn adapter_cache_usage(&self) -> (usize, usize) {
        let c = lock(&self.adapters);
        (c.used, c.entries.len())
    }

    fn adapter(&self, slot: &Slot, dir: &Path) -> Result<Arc<LoraAdapter>, EngineError> {
        let file = dir.join("adapter_model.safetensors");
        let stamp = std::fs::metadata(&file)
            .ok()
            .map(|m| (m.modified().ok(), m.len()));
        let key = AdapterKey {
            base: slot.name.clone(),
            dir: dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()),
            stamp,
        };
        if let Some(a) = lock(&self.adapters).get(&key) {
            self.metrics.adapter_hits.inc();
            return Ok(a);
        }
        self.metrics.adapter_misses.inc();
        let started = Instant::now();
        let adapter = Arc::new(lora::load(dir, &slot.assets.config)?);
        tracing::info!(
            adapter = %dir.display(),
            model = %slot.name,
            rank = adapter.rank,
            modules = %adapter.modules.join(","),
            bytes = adapter.bytes,
            ms = started.elapsed().as_millis() as u64,
            "adapter loaded"
        );
        let evicted = lock(&self.adapters).insert(key, adapter.clone());
        self.metrics.adapter_evictions.inc_by(evicted as u64);
        Ok(adapter)
    }

    /// The loaded model `name` (a base model of the models directory, or with `dir` the model
    /// in that folder), loading it on first use.
    fn slot(&self, name: &str, dir: Option<&Path>) -> Result<Arc<Slot>, EngineError> {
        if let Some(s) = lock(&self.slots).get(name) {
            return Ok(s.clone());
        }
        let found = match dir {
            Some(d) => crate::models::inspect(d, name.to_string())
                .map_err(|e| EngineError::Internal(format!("cannot read the model's folder: {e}")))?
                .ok_or_else(|| {
                    EngineError::NotFound(format!("the model `{name}` has no weights"))
                })?,
            None => self
                .models
                .find_base_blocking(name)
                .map_err(|e| {
                    EngineError::Internal(format!("cannot read the models directory: {e}"))
                })?
                .ok_or_else(|| EngineError::NotFound(format!("no base model `{name}`")))?,
        };
        if let Some(s) = lock(&self.slots).get(&found.name) {
            return Ok(s.clone());
        }
        let source = match (self.opts.format, &found.gguf, &found.hf_dir) {
            (WeightsFormat::Auto | WeightsFormat::Gguf, Some(g), _) => {
                WeightsSource::Gguf(g.clone())
            }
            (WeightsFormat::Auto | WeightsFormat::Safetensors, _, Some(d)) => {
                WeightsSource::Hf(d.clone())
            }
            (WeightsFormat::Gguf, None, _) => {
                return Err(EngineError::Unsupported(format!(
                    "the model `{}` has no GGUF file",
                    found.name
                )));
            }
            _ => {
                return Err(EngineError::Unsupported(format!(
                    "the model `{}` has no safetensors weights",
                    found.name
                )));
            }
        };
        let assets = ChatAssets::load(&found.path, source.clone()).map_err(|e| {
            let msg = format!("model `{}`: {e:#}", found.name);
            if msg.contains("not supported") {
                EngineError::Unsupported(msg)
            } else {
                EngineError::Internal(msg)
            }
        })?;
        let assets = Arc::new(assets);
        let mut slots = lock(&self.slots);
        if let Some(s) = slots.get(&found.name) {
            return Ok(s.clone());
        }
        let (tx, rx) = std_mpsc::channel();
        let load = Arc::new(SlotLoad::default());
        let worker = Worker {
            name: found.name.clone(),
            source,
            requantize: self
                .opts
                .model_requantize
                .get(&found.name)
                .copied()
                .unwrap_or(self.opts.requantize),
            prefill_chunk: self.opts.prefill_chunk.max(1),
            max_batch: self.opts.max_batch.max(1),
            kv_cache_bytes: self.opts.kv_cache_bytes,
            prefix_cache_bytes: self.opts.prefix_cache_bytes,
            kv_precision: self.opts.kv_precision,
            device: self.opts.device,
            assets: assets.clone(),
            load: load.clone(),
            metrics: self.metrics.clone(),
            grammar: std::cell::OnceCell::new(),
        };
        std::thread::Builder::new()
            .name(format!("infer-{}", found.name))
            .spawn(move || worker.run(rx))
            .map_err(|e| EngineError::Internal(format!("cannot start a worker thread: {e}")))?;
        let slot = Arc::new(Slot {
            name: found.name.clone(),
            assets,
            jobs: Mutex::new(tx),
            load,
        });
        slots.insert(found.name.clone(), slot.clone());
        if found.name != name {
            slots.insert(name.to_string(), slot.clone());
        }
        Ok(slot)
    }
}

/// The worker thread of one base model: a continuous-batching scheduler.
///
/// Between steps it takes new requests into a FIFO queue and admits them into the batch while
/// the batch has room (`max_batch` sequences) and the KV-cache budget allows (each sequence
/// reserves `prompt + max_tokens` positions). Each step is one [`Model::forward_batch`]: a
/// token for every decoding sequence and, within a time budget, chunks of the prompts still
/// being read (oldest first), each row with its own adapter. Every decoding sequence
/// advances every step, so none starves; a sequence whose client went away leaves the batch
/// (and frees its cache) before the next step.
struct Worker {
    name: String,
    source: WeightsSource,
    requantize: super::Requantize,
    prefill_chunk: usize,
    max_batch: usize,
    kv_cache_bytes: usize,
    prefix_cache_bytes: usize,
    kv_precision: super::KvPrecision,
    device: super::InferenceDevice,
    assets: Arc<ChatAssets>,
    load: Arc<SlotLoad>,
    metrics: EngineMetrics,
    /// The vocabulary as the grammar library sees it, built when an answer first needs it.
    grammar: std::cell::OnceCell<Result<GrammarVocab, String>>,
}

/// A sequence being generated.
struct Seq {
    job: Job,
    cache: KvCache,
    /// Prompt tokens already run.
    prefilled: usize,
    /// Prompt tokens taken from the prefix cache, not run.
    cached: usize,
    /// Prompt and completion so far (for the repetition penalty).
    history: Vec<u32>,
    completion: usize,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopMatcher,
    /// KV-cache bytes reserved for it.
    reserved: usize,
    /// Whether its first token was sent.
    first_sent: bool,
    /// The prompt's log-probabilities so far (when asked for).
    prompt_logprobs: Vec<TokenLogprob>,
    /// Where the answer stands in its grammar (`response_format`), if it has one.
    constraint: Option<Constrained>,
    /// Set when its generation failed (its cache is then not kept for reuse).
    failed: bool,
}

/// Finished sequences' KV caches, kept so that a prompt beginning with the same tokens on
/// the same adapter (a shared system prompt, a conversation's earlier turns) starts from
/// their keys and values instead of running those tokens again: llama.cpp's `cache_prompt`
/// and vLLM's prefix caching, for this engine's per-sequence caches. A sequence's cache is
/// kept whole when it ends (nothing is copied then); a new sequence copies the positions it
/// shares with the entry that shares the most. Bounded by bytes, least recently used first.
struct PrefixCache {
    cap: usize,
    used: usize,
    clock: u64,
    entries: Vec<PrefixEntry>,
}

struct PrefixEntry {
    /// The tokens whose keys and values `cache` holds (one per position).
    tokens: Vec<u32>,
    adapter: Option<Arc<LoraAdapter>>,
    cache: KvCache,
    last_used: u64,
}

/// Fewer shared tokens than this are run again (the copy would save little).
const MIN_PREFIX_REUSE: usize = 16;

fn same_adapter(a: &Option<Arc<LoraAdapter>>, b: &Option<Arc<LoraAdapter>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

impl PrefixCache {
    fn new(cap: usize) -> Self {
        PrefixCache {
            cap,
            used: 0,
            clock: 0,
            entries: Vec::new(),
        }
    }

    /// Keeps `cache`, the keys and values of `tokens[..cache.len()]` on `adapter`, evicting
    /// the least recently used entries to make room. Entries it extends go (it serves every
    /// prompt they serve); if one already covers it, nothing is kept.
    fn insert(&mut self, tokens: &[u32], adapter: Option<Arc<LoraAdapter>>, cache: KvCache) {
        let len = cache.len().min(tokens.len());
        let bytes = cache.bytes();
        if len < MIN_PREFIX_REUSE || bytes > self.cap {
            return;
        }
        let tokens = &tokens[..len];
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| {
            same_adapter(&e.adapter, &adapter)
                && e.tokens.len() >= len
                && e.tokens.starts_with(tokens)
        }) {
            e.last_used = self.clock;
            return;
        }
        let mut freed = 0;
        self.entries.retain(|e| {
            let extended = same_adapter(&e.adapter, &adapter) && tokens.starts_with(&e.tokens);
            if extended {
                freed += e.cache.bytes();
            }
            !extended
        });
        self.used -= freed;
        while self.used + bytes > self.cap {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            let e = self.entries.swap_remove(oldest);
            self.used -= e.cache.bytes();
        }
        self.used += bytes;
        self.entries.push(PrefixEntry {
            tokens: tokens.to_vec(),
            adapter,
            cache,
            last_used: self.clock,
        });
    }

    /// The entry sharing the longest start with `prompt` on `adapter`, and how many
    /// positions to reuse (at most all but the prompt's last token, whose logits are
    /// needed); `None` below [`MIN_PREFIX_REUSE`].
    fn lookup(
        &mut self,
        prompt: &[u32],
        adapter: &Option<Arc<LoraAdapter>>,
    ) -> Option<(&KvCache, usize)> {
        let limit = prompt.len().saturating_sub(1);
        let (best, len) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| same_adapter(&e.adapter, adapter))
            .map(|(i, e)| {
                let shared = e
                    .tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (i, shared.min(limit))
            })
            .max_by_key(|(_, n)| *n)?;
        if len < MIN_PREFIX_REUSE {
            return None;
        }
        self.clock += 1;
        let e = &mut self.entries[best];
        e.last_used = self.clock;
        Some((&e.cache, len))
    }
}

enum Step {
    Continue,
    Finished,
}

/// How long the prompt chunks of one step may take while other sequences decode: a long
/// prompt then advances in chunks of about this much work, so the others' tokens keep coming
/// (a 4-token answer took 5.4 s instead of 0.17 s beside a 2k-token prompt in 256-token
/// chunks).
const SHARED_PREFILL_BUDGET: std::time::Duration = std::time::Duration::from_millis(60);
/// The smallest prefill chunk (below it the fixed cost of a step dominates).
const MIN_PREFILL_CHUNK: usize = 8;

/// How many prompt tokens each sequence (by its prompt tokens `lefts` still to prefill)
/// prefills in a step of `budget` prompt tokens: the shortest first, so a short question
/// beside a long prompt gets its first token at once instead of after the long prefill;
/// the oldest sequence still prefilling (the first in `lefts`) always gets
/// [`MIN_PREFILL_CHUNK`] or half the budget, whichever is less, so a stream of short prompts
/// cannot starve it.
fn prefill_takes(lefts: &[usize], budget: usize) -> Vec<usize> {
    let mut takes = vec![0; lefts.len()];
    let mut budget = budget;
    if let Some(oldest) = lefts.iter().position(|&l| l > 0) {
        let take = lefts[oldest].min(MIN_PREFILL_CHUNK).min(budget / 2);
        takes[oldest] = take;
        budget -= take;
    }
    let mut order: Vec<usize> = (0..lefts.len()).filter(|&i| lefts[i] > 0).collect();
    order.sort_by_key(|&i| lefts[i]);
    for i in order {
        if budget == 0 {
            break;
        }
        let more = (lefts[i] - takes[i]).min(budget);
        takes[i] += more;
        budget -= more;
    }
    takes
}

/// The measured cost of prompt tokens, to size prefill chunks by time.
struct PrefillPace {
    /// Seconds per prompt token (moving average), once measured.
    secs_per_token: Option<f64>,
}

impl PrefillPace {
    fn record(&mut self, tokens: usize, took: std::time::Duration) {
        if tokens == 0 {
            return;
        }
        let per = took.as_secs_f64() / tokens as f64;
        self.secs_per_token = Some(match self.secs_per_token {
            Some(old) => 0.7 * old + 0.3 * per,
            None => per,
        });
    }

    /// Prompt tokens for the next step, at most `max`: all of them when no sequence decodes
    /// (smaller chunks cost a long prompt a third more time: 15.4 → 20.4 s for 2k tokens
    /// with 250 ms chunks), what fits the shared budget when others decode.
    fn chunk(&self, max: usize, shared: bool) -> usize {
        match (shared, self.secs_per_token) {
            (false, _) => max,
            (true, Some(per)) if per > 0.0 => {
                let fit = (SHARED_PREFILL_BUDGET.as_secs_f64() / per) as usize;
                fit.clamp(MIN_PREFILL_CHUNK, max.max(MIN_PREFILL_CHUNK))
            }
            (true, _) => max.min(32),
        }
    }
}

impl Worker {
    fn run(self, rx: std_mpsc::Receiver<Job>) {
        let started = Instant::now();
        let loaded = self.device.resolve().and_then(|device| {
            Model::load_on(
                &self.source,
                self.requantize,
                &super::Placement {
                    // `f32` asked for: float32 on a GPU too (else bf16 there).
                    dense: (self.requantize
                        == super::Requantize::To(candle_core::quantized::GgmlDType::F32))
                    .then_some(candle_core::DType::F32),
                    ..super::Placement::on(device)
                },
            )
        });
        let mut model = match loaded {
            Ok(m) => m,
            Err(e) => {
                let msg = format!("cannot load the model {}: {e:#}", self.name);
                tracing::error!("{msg}");
                // Fail what is queued; dropping `rx` makes later sends fail, and the engine
                // then forgets this slot and tries again.
                while let Ok(job) = rx.try_recv() {
                    self.load.waiting.fetch_sub(1, Ordering::Relaxed);
                    let _ = job.events.try_send(GenEvent::Error(msg.clone()));
                }
                return;
            }
        };
        tracing::info!(
            model = %self.name,
            weights = %model.description,
            mb = model.weight_bytes() / 1_000_000,
            secs = format!("{:.1}", started.elapsed().as_secs_f64()),
            "model loaded"
        );
        model.set_kv_precision(self.kv_precision);
        let per_token = model.kv_bytes_per_token();
        self.metrics.set_kv_bytes_per_token(&self.name, per_token);
        let context = model.config.max_positions;
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut active: Vec<Seq> = Vec::new();
        let mut reserved = 0usize;
        let mut pace = PrefillPace {
            secs_per_token: None,
        };
        let mut prefixes = PrefixCache::new(self.prefix_cache_bytes);
        loop {
            if active.is_empty() && waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => waiting.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                waiting.push_back(job);
            }
            // Requests whose client went away while they waited.
            let before = waiting.len();
            waiting.retain(|j| !j.events.is_closed());
            self.load
                .waiting
                .fetch_sub(before - waiting.len(), Ordering::Relaxed);
            // Sequences whose client went away: out of the batch (their cache kept for reuse
            // or freed).
            let mut i = 0;
            while i < active.len() {
                if active[i].job.events.is_closed() {
                    let s = active.remove(i);
                    reserved -= s.reserved;
                    keep_prefix(&mut prefixes, s);
                } else {
                    i += 1;
                }
            }
            // Admit in arrival order while there is room (one at least, whatever its size).
            while let Some(job) = waiting.front() {
                let need = (job.prompt.len() + job.params.max_tokens).min(context) * per_token;
                if !active.is_empty()
                    && (active.len() >= self.max_batch || reserved + need > self.kv_cache_bytes)
                {
                    break;
                }
                let Some(job) = waiting.pop_front() else {
                    break;
                };
                self.load.waiting.fetch_sub(1, Ordering::Relaxed);
                reserved += need;
                match self.start(&model, job, need, &mut prefixes) {
                    Some(seq) => active.push(seq),
                    None => reserved -= need,
                }
            }
            self.load.active.store(active.len(), Ordering::Relaxed);
            self.metrics
                .set_load(&self.name, waiting.len(), active.len(), reserved);
            if active.is_empty() {
                continue;
            }
            let done = self.step(&model, &mut active, &mut pace);
            // Finished (or failed) sequences leave, in any order.
            let mut i = 0;
            let mut removed = 0;
            while i < active.len() {
                if done.contains(&(i + removed)) {
                    let s = active.remove(i);
                    reserved -= s.reserved;
                    keep_prefix(&mut prefixes, s);
                    removed += 1;
                } else {
                    i += 1;
                }
            }
            self.load.active.store(active.len(), Ordering::Relaxed);
            self.metrics
                .set_load(&self.name, waiting.len(), active.len(), reserved);
        }
    }

    /// The sequence of `job`, or none when it cannot start (its client is told why).
    fn start(
        &self,
        model: &Model,
        job: Job,
        reserved: usize,
        prefixes: &mut PrefixCache,
    ) -> Option<Seq> {
        let constraint = match &job.params.grammar {
            None => None,
            Some(g) => match self.grammar_vocab().and_then(|v| v.matcher(g)) {
                Ok(c) => Some(c),
                Err(e) => {
                    let msg = format!("response_format: {e:#}");
                    tracing::error!(model = %self.name, "{msg}");
                    let _ = job.events.try_send(GenEvent::Error(msg));
                    return None;
                }
            },
        };
        let sampler = Sampler::new(&job.params);
        let stops = StopMatcher::new(job.params.stop.clone());
        // A prompt that begins like a kept sequence starts from its keys and values (not
        // when every prompt position's logits are asked for).
        let mut cache = model.new_cache();
        let mut prefilled = 0;
        if job.params.prompt_logprobs.is_none()
            && let Some((kept, len)) = prefixes.lookup(&job.prompt, &job.adapter)
        {
            match model.copy_prefix(kept, len) {
                Ok(c) => {
                    cache = c;
                    prefilled = len;
                    self.metrics.prefix_hits.inc();
                    self.metrics.prefix_tokens.inc_by(len as u64);
                }
                Err(e) => tracing::warn!(model = %self.name, "prefix cache: {e:#}"),
            }
        }
        Some(Seq {
            cache,
            prefilled,
            cached: prefilled,
            history: job.prompt.clone(),
            completion: 0,
            sampler,
            detok: Detokenizer::new(),
            stops,
            reserved,
            first_sent: false,
            prompt_logprobs: Vec::new(),
            constraint,
            failed: false,
            job,
        })
    }

    fn grammar_vocab(&self) -> anyhow::Result<&GrammarVocab> {
        self.grammar
            .get_or_init(|| {
                let tok = &self.assets.tokenizer;
                let vocab = tok.get_vocab_size(true).max(self.assets.config.vocab_size);
                let eos = self.assets.eos_ids.first().copied().unwrap_or(0);
                let started = Instant::now();
                let built = GrammarVocab::new(tok, vocab, eos, |id| token_bytes(tok, id))
                    .map_err(|e| format!("{e:#}"));
                tracing::info!(model = %self.name, ms = started.elapsed().as_millis() as u64,
                    "grammar vocabulary built");
                built
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// One batched step over `active`; returns the indices of the sequences that ended.
    fn step(&self, model: &Model, active: &mut [Seq], pace: &mut PrefillPace) -> Vec<usize> {
        // Any other sequence in the batch (decoding, or waiting for its own first token)
        // shares the step's time with the prompts.
        let budget = pace.chunk(self.prefill_chunk, active.len() > 1);
        let lefts: Vec<usize> = active
            .iter()
            .map(|s| s.job.prompt.len() - s.prefilled)
            .collect();
        let takes = prefill_takes(&lefts, budget);
        let prompt_rows: usize = takes.iter().sum();
        // Which sequences take part, with how many prompt tokens (0: a decode token).
        let plan: Vec<(usize, usize)> = lefts
            .iter()
            .zip(&takes)
            .enumerate()
            .filter(|(_, (left, take))| **left == 0 || **take > 0)
            .map(|(i, (_, take))| (i, *take))
            .collect();
        let mut items: Vec<BatchItem<'_>> = Vec::with_capacity(plan.len());
        let mut in_plan = plan.iter().peekable();
        for (i, s) in active.iter_mut().enumerate() {
            let Some(&(_, take)) = in_plan.next_if(|(j, _)| *j == i) else {
                continue;
            };
            let Seq {
                job,
                cache,
                prefilled,
                history,
                ..
            } = s;
            let (tokens, want) = if take == 0 {
                (&history[history.len() - 1..], Want::Last)
            } else {
                let end = *prefilled + take;
                let want = if job.params.prompt_logprobs.is_some() {
                    Want::All
                } else if end == job.prompt.len() {
                    Want::Last
                } else {
                    Want::Nothing
                };
                (&job.prompt[*prefilled..end], want)
            };
            items.push(BatchItem {
                tokens,
                cache,
                adapter: job.adapter.as_deref(),
                want,
            });
        }
        let rows = items.iter().map(|it| it.tokens.len()).sum::<usize>();
        let started = Instant::now();
        let result = model.forward_batch(&mut items);
        drop(items);
        let took = started.elapsed();
        if prompt_rows > 0 {
            pace.record(rows, took);
        }
        self.metrics.record_step(plan.len(), rows, took);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(model = %self.name, "generation failed: {e:#}");
                for &(i, _) in &plan {
                    active[i].failed = true;
                    let _ = active[i]
                        .job
                        .events
                        .try_send(GenEvent::Error(format!("{e:#}")));
                }
                return plan.iter().map(|&(i, _)| i).collect();
            }
        };
        let mut done = Vec::new();
        for (&(i, take), mut logits) in plan.iter().zip(logits) {
            let seq = &mut active[i];
            if let (Some(n), true) = (seq.job.params.prompt_logprobs, take > 0) {
                logits = self.score_prompt(seq, take, n, logits);
            }
            seq.prefilled += take;
            if logits.is_empty() {
                continue; // a prompt chunk: no token yet
            }
            if take > 0 && seq.job.params.prompt_logprobs.is_some() {
                let scored = std::mem::take(&mut seq.prompt_logprobs);
                let _ = seq.job.events.try_send(GenEvent::Prompt(scored));
                if seq.job.params.max_tokens == 0 {
                    // Scoring only.
                    let _ = self.done(seq, FinishReason::Length);
                    done.push(i);
                    continue;
                }
            }
            match self.advance(seq, logits) {
                Ok(Step::Continue) => {}
                Ok(Step::Finished) => done.push(i),
                Err(e) => {
                    tracing::error!(model = %self.name, "generation failed: {e:#}");
                    seq.failed = true;
                    let _ = seq.job.events.try_send(GenEvent::Error(format!("{e:#}")));
                    done.push(i);
                }
            }
        }
        done
    }

    /// Records the log-probabilities of the prompt tokens a chunk of `take` positions
    /// predicts (`logits`: every position's), the first token's as unknown; returns the last
    /// position's logits when the chunk ends the prompt (the first token comes from them),
    /// else nothing.
    fn score_prompt(&self, seq: &mut Seq, take: usize, top: usize, logits: Vec<f32>) -> Vec<f32> {
        let prompt = &seq.job.prompt;
        let vocab = logits.len() / take.max(1);
        if seq.prefilled == 0 {
            seq.prompt_logprobs
                .push(self.token_logprob(prompt[0], None, &[], 0));
        }
        for r in 0..take {
            let p = seq.prefilled + r;
            if p + 1 < prompt.len() {
                let row = &logits[r * vocab..(r + 1) * vocab];
                seq.prompt_logprobs
                    .push(self.token_logprob(prompt[p + 1], Some(row), row, top));
            }
        }
        if seq.prefilled + take == prompt.len() {
            logits[(take - 1) * vocab..].to_vec()
        } else {
            Vec::new()
        }
    }

    /// `token`'s log-probability under `logits` (when given) and the `top` most likely
    /// tokens there.
    fn token_logprob(
        &self,
        token: u32,
        logits: Option<&[f32]>,
        all: &[f32],
        top: usize,
    ) -> TokenLogprob {
        let tok = &self.assets.tokenizer;
        let text = |id: u32| tok.decode(&[id], false).unwrap_or_default();
        let bytes = |id: u32| token_bytes(tok, id);
        let lse = logits.map(log_sum_exp);
        let mut alts = Vec::new();
        if let Some(lse) = lse
            && top > 0
        {
            let mut ids: Vec<u32> = (0..all.len() as u32).collect();
            let k = top.min(ids.len());
            ids.select_nth_unstable_by(k - 1, |a, b| all[*b as usize].total_cmp(&all[*a as usize]));
            ids.truncate(k);
            ids.sort_by(|a, b| all[*b as usize].total_cmp(&all[*a as usize]));
            alts = ids
                .into_iter()
                .map(|id| (id, text(id), bytes(id), all[id as usize] - lse))
                .collect();
        }
        TokenLogprob {
            id: token,
            text: text(token),
            bytes: bytes(token),
            logprob: lse.and_then(|lse| logits.map(|l| l[token as usize] - lse)),
            top: alts,
        }
    }

    /// Samples the next token of `seq` from `logits` and sends what it adds to the text.
    fn advance(&self, seq: &mut Seq, mut logits: Vec<f32>) -> anyhow::Result<Step> {
        // The model's own distribution, before the sampler shapes it.
        let raw = seq.job.params.logprobs.map(|n| (n, logits.clone()));
        if let Some(c) = &mut seq.constraint {
            c.mask(&mut logits)?;
        }
        let token = seq.sampler.sample(&mut logits, &seq.history);
        if let Some(c) = &mut seq.constraint {
            c.consume(token)?;
        }
        if let Some((n, raw)) = raw {
            let lp = self.token_logprob(token, Some(&raw), &raw, n);
            let _ = seq.job.events.try_send(GenEvent::Token(lp));
        }
        seq.history.push(token);
        seq.completion += 1;
        if !seq.first_sent {
            seq.first_sent = true;
            self.metrics
                .time_to_first_token
                .observe(seq.job.submitted.elapsed().as_secs_f64());
        }
        self.metrics.tokens_generated.inc();
        let tok = &self.assets.tokenizer;
        if self.assets.eos_ids.contains(&token) && !seq.job.params.ignore_eos {
            return self.finish(seq, FinishReason::Stop);
        }
        if let Some(piece) = seq.detok.push(tok, token)? {
            match seq.stops.push(&piece) {
                StopOutcome::Continue(t) => send_text(seq, t),
                StopOutcome::Stop(t) => {
                    send_text(seq, t);
                    return self.done(seq, FinishReason::Stop);
                }
            }
        }
        if seq.constraint.as_ref().is_some_and(|c| c.is_stopped()) {
            return self.finish(seq, FinishReason::Stop);
        }
        if seq.completion >= seq.job.params.max_tokens {
            return self.finish(seq, FinishReason::Length);
        }
        Ok(Step::Continue)
    }

    /// Ends without a stop string: what the detokenizer and the stop matcher hold is text.
    fn finish(&self, seq: &mut Seq, reason: FinishReason) -> anyhow::Result<Step> {
        if let Some(piece) = seq.detok.flush(&self.assets.tokenizer)? {
            match seq.stops.push(&piece) {
                StopOutcome::Continue(t) => send_text(seq, t),
                StopOutcome::Stop(t) => {
                    send_text(seq, t);
                    return self.done(seq, FinishReason::Stop);
                }
            }
        }
        let rest = seq.stops.finish();
        send_text(seq, rest);
        self.done(seq, reason)
    }

    fn done(&self, seq: &mut Seq, finish_reason: FinishReason) -> anyhow::Result<Step> {
        let _ = seq.job.events.try_send(GenEvent::Done {
            finish_reason,
            prompt_tokens: seq.job.prompt.len(),
            completion_tokens: seq.completion,
            cached_tokens: seq.cached,
        });
        Ok(Step::Finished)
    }
}

/// A sequence leaving the batch: its cache is kept for prompts that begin the same way
/// (`history` holds the tokens its cache's positions were run for, and perhaps a last
/// sampled one not yet run), unless its generation failed.
fn keep_prefix(prefixes: &mut PrefixCache, seq: Seq) {
    if !seq.failed {
        prefixes.insert(&seq.history, seq.job.adapter.clone(), seq.cache);
    }
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The bytes a token stands for: its text, or for a byte-fallback token (`<0xE2>`) or a
/// byte-level BPE piece of an incomplete character, the raw byte(s).
fn token_bytes(tok: &tokenizers::Tokenizer, id: u32) -> Vec<u8> {
    let text = tok.decode(&[id], false).unwrap_or_default();
    if !text.contains('\u{FFFD}') {
        return text.into_bytes();
    }
    let Some(piece) = tok.id_to_token(id) else {
        return text.into_bytes();
    };
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'))
        && let Ok(b) = u8::from_str_radix(hex, 16)
    {
        return vec![b];
    }
    // Byte-level BPE: each char of the piece stands for one byte (GPT-2's table).
    let table = byte_level_decoder();
    let out: Option<Vec<u8>> = piece.chars().map(|c| table.get(&c).copied()).collect();
    out.unwrap_or_else(|| text.into_bytes())
}

/// GPT-2's byte-level alphabet, char → byte.
fn byte_level_decoder() -> &'static HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<HashMap<char, u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
        printable.extend(0xA1..=0xAC);
        printable.extend(0xAE..=0xFF);
        let mut map = HashMap::new();
        let mut n = 0;
        for b in 0..=255u32 {
            let c = if printable.contains(&b) {
                b
            } else {
                n += 1;
                255 + n
            };
            if let Some(c) = char::from_u32(c) {
                map.insert(c, b as u8);
            }
        }
        map
    })
}

fn send_text(seq: &Seq, text: String) {
    if !text.is_empty() {
        // The channel has room for every event of the generation; a closed one is noticed
        // before the next step.
        let _ = seq.job.events.try_send(GenEvent::Text(text));
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct AdapterKey {
    base: String,
    dir: PathBuf,
    /// Modification time and size of the weights: a rewritten adapter is loaded again.
    stamp: Option<(Option<SystemTime>, u64)>,
}

/// Loaded adapters, least recently used first out, bounded by bytes. An adapter in use by a
/// running generation stays alive (it holds an `Arc`) even when evicted.
struct AdapterCache {
    cap: usize,
    used: usize,
    tick: u64,
    entries: HashMap<AdapterKey, (Arc<LoraAdapter>, u64)>,
}

impl AdapterCache {
    fn new(cap: usize) -> Self {
        AdapterCache {
            cap,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    fn get(&mut self, key: &AdapterKey) -> Option<Arc<LoraAdapter>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(key).map(|(a, t)| {
            *t = tick;
            a.clone()
        })
    }

    /// Keeps `adapter`; returns how many others were evicted for it.
    fn insert(&mut self, key: AdapterKey, adapter: Arc<LoraAdapter>) -> usize {
        let bytes = adapter.bytes;
        let mut evicted = 0;
        // An older version of the same adapter (same folder, other stamp) goes.
        let stale: Vec<AdapterKey> = self
            .entries
            .keys()
            .filter(|k| k.base == key.base && k.dir == key.dir && k.stamp != key.stamp)
            .cloned()
            .collect();
        for k in stale {
            self.remove(&k);
        }
        if bytes > self.cap {
            return evicted; // too large to keep: used once
        }
        while self.used + bytes > self.cap && !self.entries.is_empty() {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    self.remove(&k);
                    evicted += 1;
                }
                None => break,
            }
        }
        self.tick += 1;
        if let Some((old, _)) = self.entries.insert(key, (adapter, self.tick)) {
            self.used -= old.bytes;
        }
        self.used += bytes;
        evicted
    }

    fn remove(&mut self, key: &AdapterKey) {
        if let Some((a, _)) = self.entries.remove(key) {
            self.used -= a.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(bytes: usize) -> Arc<LoraAdapter> {
        Arc::new(LoraAdapter {
            path: PathBuf::new(),
            layers: Vec::new(),
            bytes,
            modules: Vec::new(),
            rank: 1,
            dora: false,
        })
    }

    fn key(n: &str) -> AdapterKey {
        AdapterKey {
            base: "m".into(),
            dir: PathBuf::from(n),
            stamp: None,
        }
    }

    #[test]
    fn shared_prefill_chunks_follow_a_time_budget() {
        let mut pace = PrefillPace {
            secs_per_token: None,
        };
        assert_eq!(pace.chunk(256, false), 256, "alone: the full chunk");
        assert_eq!(pace.chunk(256, true), 32, "unmeasured: a small first chunk");
        pace.record(256, std::time::Duration::from_millis(1600)); // 6.25 ms a token
        assert_eq!(pace.chunk(256, false), 256);
        assert_eq!(pace.chunk(256, true), 9, "shared: about 60 ms of work");
        pace.record(1000, std::time::Duration::from_millis(10));
        assert!(pace.chunk(256, true) <= 256, "never more than the maximum");
        pace.record(100, std::time::Duration::from_millis(1));
        assert!(pace.chunk(256, true) > 9, "faster steps, larger chunks");
        assert_eq!(pace.chunk(4, true), 8, "never below the minimum");
    }

    #[test]
    fn short_prompts_prefill_first_and_the_oldest_keeps_moving() {
        // A long prompt prefilling, a short one just admitted, one decoding.
        assert_eq!(prefill_takes(&[2000, 30, 0], 64), vec![34, 30, 0]);
        // Alone: the whole budget.
        assert_eq!(prefill_takes(&[2000], 256), vec![256]);
        // Short ones take precedence, but the oldest gets its minimum chunk.
        assert_eq!(prefill_takes(&[500, 20, 10], 24), vec![8, 6, 10]);
        assert_eq!(prefill_takes(&[0, 0], 64), vec![0, 0], "decode only");
        assert_eq!(prefill_takes(&[3, 100], 64), vec![3, 61]);
        // A small budget (a slow machine) is shared half and half at worst.
        assert_eq!(prefill_takes(&[2000, 30], 8), vec![4, 4]);
        assert_eq!(prefill_takes(&[2000, 30], 1), vec![0, 1]);
    }

    #[test]
    fn adapter_cache_evicts_least_recently_used_by_bytes() {
        let mut c = AdapterCache::new(100);
        c.insert(key("a"), adapter(40));
        c.insert(key("b"), adapter(40));
        assert!(c.get(&key("a")).is_some()); // a is now more recent than b
        c.insert(key("c"), adapter(40));
        assert!(c.get(&key("b")).is_none(), "b was the least recently used");
        assert!(c.get(&key("a")).is_some());
        assert!(c.get(&key("c")).is_some());
        assert_eq!(c.used, 80);
        c.insert(key("huge"), adapter(500));
        assert!(
            c.get(&key("huge")).is_none(),
            "larger than the cache: not kept"
        );
        let mut newer = key("a");
        newer.stamp = Some((None, 1));
        c.insert(newer.clone(), adapter(10));
        assert!(
            c.get(&key("a")).is_none(),
            "the rewritten adapter replaces the old one"
        );
        assert!(c.get(&newer).is_some());
    }
}
