//! The engine: model slots (assets + a worker thread per base model), the adapter cache, and
//! the generation loop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;

use super::lora::{self, LoraAdapter};
use super::model::{KvCache, Model, WeightsSource};
use super::sampling::Sampler;
use super::text::{ChatAssets, Detokenizer, StopMatcher, StopOutcome};
use super::{
    ChatMessage, EngineError, EngineOptions, FinishReason, GenEvent, GenerateRequest, Generation,
    WeightsFormat,
};

/// Serves chat for every base model in a models directory. Create one per process and share
/// it (`Arc`); all methods take `&self`.
pub struct Engine {
    /// Where base models are found (the server's registry, or a folder of its own).
    models: Arc<crate::models::Registry>,
    opts: EngineOptions,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    adapters: Mutex<AdapterCache>,
}

/// One base model in use: its assets, and the channel to its worker thread.
struct Slot {
    name: String,
    assets: Arc<ChatAssets>,
    jobs: Mutex<std_mpsc::Sender<Job>>,
}

/// A request handed to a worker.
struct Job {
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
        })
    }

    pub fn models_dir(&self) -> &Path {
        self.models.models_dir()
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
        if req.messages.is_empty() {
            return Err(EngineError::Invalid("no messages".into()));
        }
        let slot = self.slot(&req.base_model, req.model_dir.as_deref())?;
        let assets = &slot.assets;
        let text = assets.template.render(&req.messages, true).map_err(|e| {
            EngineError::Invalid(format!("the chat template refused the messages: {e}"))
        })?;
        let prompt = assets
            .encode(&text)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
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
        // Room for every event, so the worker never waits on a slow reader.
        let (tx, rx) = mpsc::channel(params.max_tokens + 4);
        let prompt_tokens = prompt.len();
        let job = Job {
            prompt,
            adapter,
            params,
            events: tx,
        };
        let sent = lock(&slot.jobs).send(job);
        if let Err(std_mpsc::SendError(job)) = sent {
            // The worker is gone (its model failed to load): forget the slot, try once more.
            lock(&self.slots).remove(&slot.name);
            let slot = self.slot(&req.base_model, req.model_dir.as_deref())?;
            lock(&slot.jobs).send(job).map_err(|_| {
                EngineError::Internal(format!("the model {} cannot be loaded", slot.name))
            })?;
        }
        Ok(Generation {
            events: rx,
            prompt_tokens,
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
            return Ok(a);
        }
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
        lock(&self.adapters).insert(key, adapter.clone());
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
            assets: assets.clone(),
        };
        std::thread::Builder::new()
            .name(format!("infer-{}", found.name))
            .spawn(move || worker.run(rx))
            .map_err(|e| EngineError::Internal(format!("cannot start a worker thread: {e}")))?;
        let slot = Arc::new(Slot {
            name: found.name.clone(),
            assets,
            jobs: Mutex::new(tx),
        });
        slots.insert(found.name.clone(), slot.clone());
        if found.name != name {
            slots.insert(name.to_string(), slot.clone());
        }
        Ok(slot)
    }
}

/// The worker thread of one base model.
struct Worker {
    name: String,
    source: WeightsSource,
    requantize: super::Requantize,
    prefill_chunk: usize,
    assets: Arc<ChatAssets>,
}

/// A sequence being generated.
struct Seq {
    job: Job,
    cache: KvCache,
    /// Prompt tokens already run.
    prefilled: usize,
    /// Prompt and completion so far (for the repetition penalty).
    history: Vec<u32>,
    completion: usize,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopMatcher,
}

enum Step {
    Continue,
    Finished,
}

/// How long one prefill step may take while other sequences wait for theirs: a long prompt
/// then advances in chunks of about this much work, so the others' tokens keep coming (a
/// 4-token answer took 5.4 s instead of 0.17 s beside a 2k-token prompt in 256-token chunks).
const SHARED_PREFILL_BUDGET: std::time::Duration = std::time::Duration::from_millis(60);
/// The smallest prefill chunk (below it the fixed cost of a step dominates).
const MIN_PREFILL_CHUNK: usize = 8;

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

    /// Prompt tokens for the next step, at most `max`: all of them for a sequence alone
    /// (smaller chunks cost a long prompt a third more time: 15.4 → 20.4 s for 2k tokens
    /// with 250 ms chunks), what fits the shared budget when others wait.
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
        let model = match Model::load(&self.source, self.requantize) {
            Ok(m) => m,
            Err(e) => {
                let msg = format!("cannot load the model {}: {e:#}", self.name);
                tracing::error!("{msg}");
                // Fail what is queued; dropping `rx` makes later sends fail, and the engine
                // then forgets this slot and tries again.
                while let Ok(job) = rx.try_recv() {
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
        let mut active: Vec<Seq> = Vec::new();
        let mut pace = PrefillPace {
            secs_per_token: None,
        };
        loop {
            if active.is_empty() {
                match rx.recv() {
                    Ok(job) => active.push(self.start(&model, job)),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                active.push(self.start(&model, job));
            }
            // One step for each sequence, in turn.
            let shared = active.len() > 1;
            let mut i = 0;
            while i < active.len() {
                let done = if active[i].job.events.is_closed() {
                    true // the client went away
                } else {
                    match self.step(&model, &mut active[i], shared, &mut pace) {
                        Ok(Step::Continue) => false,
                        Ok(Step::Finished) => true,
                        Err(e) => {
                            tracing::error!(model = %self.name, "generation failed: {e:#}");
                            let _ = active[i]
                                .job
                                .events
                                .try_send(GenEvent::Error(format!("{e:#}")));
                            true
                        }
                    }
                };
                if done {
                    active.swap_remove(i);
                } else {
                    i += 1;
                }
            }
        }
    }

    fn start(&self, model: &Model, job: Job) -> Seq {
        let sampler = Sampler::new(&job.params);
        let stops = StopMatcher::new(job.params.stop.clone());
        Seq {
            cache: model.new_cache(),
            prefilled: 0,
            history: job.prompt.clone(),
            completion: 0,
            sampler,
            detok: Detokenizer::new(),
            stops,
            job,
        }
    }

    fn step(
        &self,
        model: &Model,
        seq: &mut Seq,
        shared: bool,
        pace: &mut PrefillPace,
    ) -> anyhow::Result<Step> {
        let adapter = seq.job.adapter.as_deref();
        let logits = if seq.prefilled < seq.job.prompt.len() {
            let chunk = pace.chunk(self.prefill_chunk, shared);
            let end = (seq.prefilled + chunk).min(seq.job.prompt.len());
            let started = Instant::now();
            let logits = model.forward(
                &seq.job.prompt[seq.prefilled..end],
                &mut seq.cache,
                adapter,
                false,
            )?;
            pace.record(end - seq.prefilled, started.elapsed());
            seq.prefilled = end;
            if end < seq.job.prompt.len() {
                return Ok(Step::Continue);
            }
            logits
        } else {
            let last = *seq.history.last().unwrap_or(&0);
            model.forward(&[last], &mut seq.cache, adapter, false)?
        };
        let mut logits: Vec<f32> = logits.to_vec1()?;
        let token = seq.sampler.sample(&mut logits, &seq.history);
        seq.history.push(token);
        seq.completion += 1;
        let tok = &self.assets.tokenizer;
        if self.assets.eos_ids.contains(&token) {
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
        });
        Ok(Step::Finished)
    }
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

    fn insert(&mut self, key: AdapterKey, adapter: Arc<LoraAdapter>) {
        let bytes = adapter.bytes;
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
            return; // too large to keep: used once
        }
        while self.used + bytes > self.cap && !self.entries.is_empty() {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.remove(&k),
                None => break,
            }
        }
        self.tick += 1;
        if let Some((old, _)) = self.entries.insert(key, (adapter, self.tick)) {
            self.used -= old.bytes;
        }
        self.used += bytes;
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
