//! The decoder (Llama / Mistral / Qwen2 / Qwen3) over candle tensors, with a KV cache and
//! unmerged LoRA on every linear layer.
//!
//! Weights come from a GGUF file (kept quantised; formats without SIMD kernels in candle are
//! re-quantised at load, see [`Requantize`]) or from a Hugging Face folder (float32). Both
//! end up in one layout:
//! - q/k rows in the Hugging Face order: llama.cpp's converter permutes the q/k rows of
//!   Llama-architecture GGUFs for its interleaved rope; the permutation only moves whole rows,
//!   so it is undone here on the quantised bytes (exactly, nothing is re-computed). Adapters,
//!   trained against the Hugging Face layout, then apply unchanged, and one rope (halves,
//!   "NeoX") serves every source.
//! - q, k and v fused into one matrix, gate and up into another: fewer, larger matmuls and
//!   one activation quantisation each, which is what decode time on a CPU is made of.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor, ggml_file::qtensor_from_ggml};
use candle_core::{DType, Device, Module, Tensor};
use half::f16;

use super::ops::{self, KvElem, KvPrecision};

use super::config::{Family, ModelConfig};
use super::kernels::{Format, LowRank, QuantMatrix};
use super::lora::{LayerLora, LoraAdapter, LoraPair};
use crate::models::convert::{Arch, Heads, Mapped, map_tensor_name};
use crate::models::gguf::Meta;

mod cache;
mod load;
mod plain;
mod tensor;

use load::{load_gguf, load_hf};
use plain::Plain;
use tensor::{Linear, Weight};

/// What happens to GGUF weights at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Requantize {
    /// Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K are kept and run on the engine's own kernels
    /// (float activations, see `kernels`); Q5_0, Q5_1 and Q8_1 become Q8_0 (near-lossless
    /// from 5-bit data); Q2_K and Q3_K are kept and run on candle's kernels (8-bit
    /// activations).
    #[default]
    Auto,
    /// Keep every tensor as stored.
    Keep,
    /// Every quantised tensor becomes this format (falling back to Q8_0 where the row length
    /// is not a multiple of its block).
    To(GgmlDType),
}

impl Requantize {
    fn target(self, dtype: GgmlDType, cols: usize) -> GgmlDType {
        use GgmlDType as G;
        if matches!(dtype, G::F32 | G::F16 | G::BF16) {
            return dtype;
        }
        let want = match self {
            Requantize::Keep => dtype,
            Requantize::Auto => match dtype {
                G::Q5_0 | G::Q5_1 | G::Q8_1 => G::Q8_0,
                other => other,
            },
            Requantize::To(t) => t,
        };
        if cols.is_multiple_of(want.block_size()) {
            want
        } else {
            G::Q8_0
        }
    }

    /// Parses `auto`, `keep`, or a format name (`q8_0`, `q4_0`, `q4k`, `f32`, …).
    pub fn parse(s: &str) -> anyhow::Result<Requantize> {
        use GgmlDType as G;
        Ok(match s.to_ascii_lowercase().replace('_', "").as_str() {
            "auto" | "" => Requantize::Auto,
            "keep" | "none" => Requantize::Keep,
            "f32" => Requantize::To(G::F32),
            "f16" => Requantize::To(G::F16),
            "q40" => Requantize::To(G::Q4_0),
            "q41" => Requantize::To(G::Q4_1),
            "q50" => Requantize::To(G::Q5_0),
            "q51" => Requantize::To(G::Q5_1),
            "q80" => Requantize::To(G::Q8_0),
            "q2k" => Requantize::To(G::Q2K),
            "q3k" => Requantize::To(G::Q3K),
            "q4k" => Requantize::To(G::Q4K),
            "q5k" => Requantize::To(G::Q5K),
            "q6k" => Requantize::To(G::Q6K),
            other => bail!("unknown weight format `{other}`"),
        })
    }
}

/// Where a model runs, and on whose kernels.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: Device,
    /// The engine's own CPU kernels and plain layer loop where the weights allow (Q4_0, Q4_1,
    /// Q8_0, float32); otherwise every matmul runs through candle on `device` — the
    /// device-generic path, which is what a GPU runs and what the parity tests check on the
    /// CPU.
    pub own_kernels: bool,
    /// What float weights become off the engine's kernels: `None` keeps float32 on the CPU
    /// and makes bf16 on a GPU.
    pub dense: Option<DType>,
}

impl Placement {
    /// The CPU, on the engine's kernels (unless FERROTUNE_TENSOR_PATH=1 asks for candle's).
    pub fn cpu() -> Placement {
        Placement {
            device: Device::Cpu,
            own_kernels: std::env::var_os("FERROTUNE_TENSOR_PATH").is_none_or(|v| v == "0"),
            dense: None,
        }
    }

    /// The device-generic path on `device` (candle's kernels, a GPU's).
    pub fn generic(device: Device) -> Placement {
        Placement {
            device,
            own_kernels: false,
            dense: None,
        }
    }

    /// `device`, on the engine's kernels when it is the CPU.
    pub fn on(device: Device) -> Placement {
        if device.is_cpu() {
            Placement::cpu()
        } else {
            Placement::generic(device)
        }
    }
}

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    Gguf(PathBuf),
    /// A Hugging Face folder (`config.json` + `model.safetensors` or an index of shards).
    Hf(PathBuf),
}

struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    qkv: Linear,
    o: Linear,
    gate_up: Linear,
    down: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
}

enum Embedding {
    Quantized(std::sync::Arc<QTensor>),
    Dense(Tensor),
    /// On the engine's kernels (rows de-quantised as they are looked up); shared with the
    /// output head when the two are tied.
    Own(std::sync::Arc<QuantMatrix>),
}

impl Embedding {
    /// The rows of `tokens`, as a `tokens × hidden` float32 tensor.
    fn lookup(&self, tokens: &[u32], device: &Device) -> anyhow::Result<Tensor> {
        let ids = Tensor::new(tokens, device)?;
        Ok(match self {
            Embedding::Quantized(q) => q.embedding(&ids)?,
            Embedding::Dense(t) => t.index_select(&ids, 0)?,
            Embedding::Own(m) => {
                Tensor::from_vec(m.rows_f32(tokens)?, (tokens.len(), m.cols()), device)?
            }
        }
        .to_dtype(DType::F32)?)
    }
}

/// A loaded base model. Immutable once loaded: sequences keep their state in a [`KvCache`]
/// and adapters are passed per call, so one model serves many requests and adapters.
pub struct Model {
    pub config: ModelConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    /// What was loaded, for logs (`gguf Q4_1→Q8_0`, `safetensors F32`).
    pub description: String,
    device: Device,
    /// Set when every matmul runs on the engine's own kernels: the layers then run on plain
    /// slices (see [`Model::forward_plain`]) instead of candle tensors.
    plain: Option<Plain>,
    /// How new caches on the plain loop hold keys and values.
    kv_precision: KvPrecision,
}

/// `cpu`, `cuda:0`, ….
pub fn describe_device(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Positions a KV cache grows by.
pub const KV_BLOCK: usize = 256;

/// Which logits a [`BatchItem`] wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// None (a prompt chunk that does not finish the prompt).
    Nothing,
    /// Its last position's.
    Last,
    /// Every position's.
    All,
}

/// One sequence's part of a [`Model::forward_batch`] step.
pub struct BatchItem<'a> {
    /// The sequence's next tokens.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a LoraAdapter>,
    pub want: Want,
}

/// The attention state of one sequence: per layer, keys and values of every position so far.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    /// The same for the plain layer loop: per layer, keys and values as
    /// `num_kv_heads × cap × head_dim` values in the model's [`KvPrecision`]. A cache uses one
    /// of the two, by its model.
    raw: Vec<(KvBuf, KvBuf)>,
    /// The precision of `raw` (the model's when the cache was made).
    precision: KvPrecision,
    len: usize,
    cap: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position from `len` on (the sequence goes back to its first `len`
    /// tokens; e.g. to reuse a prompt's cache).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held by the cache's buffers.
    pub fn bytes(&self) -> usize {
        let tensors: usize = self
            .layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * 4)
            .sum();
        let raw: usize = self.raw.iter().map(|(k, v)| k.bytes() + v.bytes()).sum();
        tensors + raw
    }
}

/// One layer's keys or values on the plain layer loop.
pub(super) enum KvBuf {
    Half(Vec<f16>),
    Full(Vec<f32>),
}

impl KvBuf {
    fn zeros(precision: KvPrecision, n: usize) -> KvBuf {
        match precision {
            KvPrecision::Half => KvBuf::Half(vec![f16::ZERO; n]),
            KvPrecision::Full => KvBuf::Full(vec![0.0; n]),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvBuf::Half(b) => b.len() * 2,
            KvBuf::Full(b) => b.len() * 4,
        }
    }

    pub(super) fn slice(&self) -> ops::KvSlice<'_> {
        match self {
            KvBuf::Half(b) => ops::KvSlice::Half(b),
            KvBuf::Full(b) => ops::KvSlice::Full(b),
        }
    }

    /// Values `at..at + x.len()` set to `x` (rounded to the buffer's precision).
    pub(super) fn write(&mut self, at: usize, x: &[f32]) {
        match self {
            KvBuf::Half(b) => f16::narrow(x, &mut b[at..at + x.len()]),
            KvBuf::Full(b) => f32::narrow(x, &mut b[at..at + x.len()]),
        }
    }

    /// Values `to..to + n` copied from `from`'s `at..at + n` (the same precision).
    fn copy_from(&mut self, to: usize, from: &KvBuf, at: usize, n: usize) -> anyhow::Result<()> {
        match (self, from) {
            (KvBuf::Half(b), KvBuf::Half(f)) => b[to..to + n].copy_from_slice(&f[at..at + n]),
            (KvBuf::Full(b), KvBuf::Full(f)) => b[to..to + n].copy_from_slice(&f[at..at + n]),
            _ => bail!("the cache holds another precision"),
        }
        Ok(())
    }
}

impl Model {
    /// How the caches this model makes from now on ([`Model::new_cache`]) hold keys and values
    /// on the plain layer loop (half floats unless set; candle's tensors keep 32-bit floats).
    pub fn set_kv_precision(&mut self, precision: KvPrecision) {
        self.kv_precision = precision;
    }

    /// Loads the weights. Takes seconds for large models: call it off the async runtime.
    ///
    /// A Hugging Face folder's float weights are quantised as they are read (`Auto`: Q8_0;
    /// `To(format)`; `Keep`: float32) and the result is cached beside the model, memory-mapped
    /// on later loads (see `cache`).
    pub fn load(source: &WeightsSource, requantize: Requantize) -> anyhow::Result<Model> {
        Model::load_on(source, requantize, &Placement::cpu())
    }

    /// [`Model::load`] onto `placement`: the weights are read (and quantised, and cached) on
    /// the CPU as always, then moved where they run. On a GPU, quantised weights stay in
    /// their format (candle's CUDA kernels run them) and float weights become bf16.
    pub fn load_on(
        source: &WeightsSource,
        requantize: Requantize,
        placement: &Placement,
    ) -> anyhow::Result<Model> {
        let model = match source {
            WeightsSource::Gguf(path) => load_gguf(path, requantize),
            WeightsSource::Hf(dir) => load_hf(dir, requantize),
        }?;
        model.place(placement)
    }

    /// On a processor with AVX-512 VNNI, the matrices of the block formats its integer
    /// kernels run are interleaved for them now, and held only so (see `vnni`).
    fn pack_for_cpu(&mut self) {
        let pack = |w: &mut Weight| {
            if let Weight::Own(m) = w
                && let Some(m) = std::sync::Arc::get_mut(m)
            {
                m.pack_in_place();
            }
        };
        for l in &mut self.layers {
            for lin in [&mut l.qkv, &mut l.o, &mut l.gate_up, &mut l.down] {
                pack(&mut lin.w);
            }
        }
        // A tied head shares the embedding's matrix: packed once for both (the embedding's
        // row lookups unpack their rows).
        let tied = match (&self.embed, &self.lm_head.w) {
            (Embedding::Own(e), Weight::Own(h)) => std::sync::Arc::ptr_eq(e, h),
            _ => false,
        };
        if tied
            && let Embedding::Own(e) = &mut self.embed
            && let Ok(empty) = QuantMatrix::from_f32(Vec::new(), 0, 0)
        {
            self.lm_head.w = Weight::Own(std::sync::Arc::new(empty));
            if let Some(m) = std::sync::Arc::get_mut(e) {
                m.pack_in_place();
            }
            self.lm_head.w = Weight::Own(e.clone());
        } else {
            pack(&mut self.lm_head.w);
        }
    }

    /// Moves a model loaded for the CPU onto `placement` (nothing to do for the CPU on the
    /// engine's kernels).
    fn place(mut self, placement: &Placement) -> anyhow::Result<Model> {
        let device = &placement.device;
        if device.is_cpu() && placement.own_kernels {
            self.pack_for_cpu();
            return Ok(self);
        }
        let dense = placement.dense.unwrap_or(if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        });
        self.plain = None;
        // A tied output head reads the embedding's matrix: it stays one matrix.
        let tied = match (&self.embed, &self.lm_head.w) {
            (Embedding::Own(m), Weight::Own(h)) => std::sync::Arc::ptr_eq(m, h),
            (Embedding::Quantized(q), Weight::Candle(QMatMul::QTensor(h))) => {
                std::sync::Arc::ptr_eq(q, h)
            }
            (Embedding::Dense(t), Weight::Candle(QMatMul::Tensor(h))) => t.id() == h.id(),
            _ => false,
        };
        self.embed = match self.embed {
            Embedding::Own(m) => match tensor::own_to_candle(&m, device, dense)? {
                QMatMul::QTensor(q) => Embedding::Quantized(q),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => Embedding::Dense(t),
            },
            Embedding::Quantized(q) => {
                Embedding::Quantized(std::sync::Arc::new(tensor::qtensor_to(&q, device)?))
            }
            Embedding::Dense(t) => Embedding::Dense(t.to_dtype(dense)?.to_device(device)?),
        };
        self.lm_head = if tied {
            Linear {
                w: Weight::Candle(match &self.embed {
                    Embedding::Quantized(q) => QMatMul::from_arc(q.clone())?,
                    Embedding::Dense(t) => QMatMul::Tensor(t.clone()),
                    Embedding::Own(_) => bail!("the embedding was just moved"),
                }),
                b: None,
            }
        } else {
            self.lm_head.place(device, dense)?
        };
        let layers = std::mem::take(&mut self.layers);
        let on = |t: Tensor| t.to_device(device);
        let on_opt = |t: Option<Tensor>| t.map(|t| t.to_device(device)).transpose();
        for l in layers {
            self.layers.push(Layer {
                input_norm: on(l.input_norm)?,
                post_norm: on(l.post_norm)?,
                qkv: l.qkv.place(device, dense)?,
                o: l.o.place(device, dense)?,
                gate_up: l.gate_up.place(device, dense)?,
                down: l.down.place(device, dense)?,
                q_norm: on_opt(l.q_norm)?,
                k_norm: on_opt(l.k_norm)?,
            });
        }
        self.norm = on(self.norm)?;
        (self.cos, self.sin) = load::rope_tables(&self.config, device)?;
        let source = self
            .description
            .split("; layers")
            .next()
            .unwrap_or_default();
        self.description = format!(
            "{source}; layers {}, head {}; on {} through candle's kernels",
            self.layers
                .first()
                .map(|l| l.qkv.describe())
                .unwrap_or_default(),
            self.lm_head.describe(),
            describe_device(device)
        );
        self.device = device.clone();
        Ok(self)
    }

    /// Whether every matmul runs on the engine's own kernels (and the layers on the plain
    /// loop).
    pub fn on_own_kernels(&self) -> bool {
        self.plain.is_some()
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A model from its loaded parts, for the CPU: the rope tables, the description
    /// (`source`, then the formats the layers and head run in) and the plain layer loop
    /// when every matmul is on the engine's kernels ([`Model::load_on`] moves it elsewhere).
    fn assemble(
        config: ModelConfig,
        embed: Embedding,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Linear,
        source: &str,
    ) -> anyhow::Result<Model> {
        let device = Device::Cpu;
        let (cos, sin) = load::rope_tables(&config, &device)?;
        let mut model = Model {
            description: format!(
                "{source}; layers {}, head {}",
                layers.first().map(|l| l.qkv.describe()).unwrap_or_default(),
                lm_head.describe()
            ),
            config,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device,
            plain: None,
            kv_precision: KvPrecision::default(),
        };
        model.plain = Plain::new(&model)?;
        Ok(model)
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: Vec::new(),
            raw: Vec::new(),
            precision: self.kv_precision,
            len: 0,
            cap: 0,
        }
    }

    /// A new cache holding the first `len` positions of `from` (a cache this model filled):
    /// a sequence whose tokens begin with those positions' tokens, on the same adapter,
    /// continues from there instead of running them again (the keys and values of a position
    /// depend only on the tokens up to it).
    pub fn copy_prefix(&self, from: &KvCache, len: usize) -> anyhow::Result<KvCache> {
        let len = len.min(from.len);
        let mut cache = self.new_cache();
        // The copy keeps the precision of the cache it copies.
        cache.precision = from.precision;
        if len == 0 {
            return Ok(cache);
        }
        self.ensure_capacity(&mut cache, len)?;
        let (nkv, hd) = (self.config.num_kv_heads, self.config.head_dim);
        if self.plain.is_some() {
            if from.raw.len() != cache.raw.len() {
                bail!("the cache is not this model's");
            }
            for ((k, v), (fk, fv)) in cache.raw.iter_mut().zip(&from.raw) {
                for g in 0..nkv {
                    let (to, at) = (g * cache.cap * hd, g * from.cap * hd);
                    k.copy_from(to, fk, at, len * hd)?;
                    v.copy_from(to, fv, at, len * hd)?;
                }
            }
        } else {
            if from.layers.len() != cache.layers.len() {
                bail!("the cache is not this model's");
            }
            for ((k, v), (fk, fv)) in cache.layers.iter().zip(&from.layers) {
                k.slice_set(&fk.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                v.slice_set(&fv.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
        }
        cache.len = len;
        Ok(cache)
    }

    /// Bytes of KV cache one position of one sequence takes (keys and values, every layer:
    /// in the [`KvPrecision`] on the plain layer loop, 32-bit floats on candle's tensors).
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = &self.config;
        let elem = match (&self.plain, self.kv_precision) {
            (Some(_), KvPrecision::Half) => 2,
            _ => 4,
        };
        2 * c.num_layers * c.num_kv_heads * c.head_dim * elem
    }

    /// Bytes of the weights in memory.
    pub fn weight_bytes(&self) -> usize {
        let (embed, tied) = match (&self.embed, &self.lm_head.w) {
            (Embedding::Quantized(q), _) => (q.storage_size_in_bytes(), false),
            (Embedding::Dense(t), _) => (t.elem_count() * 4, false),
            (Embedding::Own(m), Weight::Own(h)) => (m.bytes(), std::sync::Arc::ptr_eq(m, h)),
            (Embedding::Own(m), _) => (m.bytes(), false),
        };
        embed
            + if tied { 0 } else { self.lm_head.bytes() }
            + self
                .layers
                .iter()
                .map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes())
                .sum::<usize>()
    }

    /// Runs `tokens` (the next positions of the sequence in `cache`) through the model and
    /// returns the logits of the last position (`vocab`), or of every position
    /// (`tokens.len() × vocab`) when `all` is set. The cache grows by `tokens.len()`.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        adapter: Option<&LoraAdapter>,
        all: bool,
    ) -> anyhow::Result<Tensor> {
        if let Some(plain) = &self.plain {
            let s = tokens.len();
            self.check(tokens, cache, adapter)?;
            let mut items = [BatchItem {
                tokens,
                cache,
                adapter,
                want: if all { Want::All } else { Want::Last },
            }];
            let mut logits = self.forward_plain(plain, &mut items)?;
            let logits = std::mem::take(&mut logits[0]);
            let vocab = logits.len() / if all { s } else { 1 };
            let t = Tensor::from_vec(logits, (if all { s } else { 1 }, vocab), &self.device)?;
            return Ok(if all { t } else { t.squeeze(0)? });
        }
        self.check(tokens, cache, adapter)?;
        let mut items = [BatchItem {
            tokens,
            cache,
            adapter,
            want: if all { Want::All } else { Want::Last },
        }];
        let t = self
            .forward_tensor(&mut items)?
            .pop()
            .flatten()
            .ok_or_else(|| anyhow::anyhow!("no logits"))?;
        Ok(if all { t } else { t.squeeze(0)? })
    }

    /// One step of several sequences at once: each item's tokens (a decode token, or a chunk
    /// of its prompt) run at that item's next positions over its own cache, with its own
    /// adapter (or none). Returns, per item, the logits it wants: nothing, its last position's
    /// (`vocab`), or all of its positions' (`tokens × vocab`), flat.
    ///
    /// On the engine's kernels the whole batch shares each pass over the weights; elsewhere
    /// (candle's kernels, a GPU) the items run one after the other.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> anyhow::Result<Vec<Vec<f32>>> {
        for it in items.iter_mut() {
            self.check(it.tokens, it.cache, it.adapter)?;
        }
        if let Some(plain) = &self.plain {
            return self.forward_plain(plain, items);
        }
        self.forward_tensor(items)?
            .into_iter()
            .map(|t| match t {
                None => Ok(Vec::new()),
                Some(t) => Ok(t.flatten_all()?.to_vec1()?),
            })
            .collect()
    }

    /// Checks that `tokens` fit after `cache` and that the adapter fits the model, and makes
    /// room in the cache.
    fn check(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        adapter: Option<&LoraAdapter>,
    ) -> anyhow::Result<()> {
        let s = tokens.len();
        if s == 0 {
            bail!("no tokens to run");
        }
        let pos = cache.len;
        if pos + s > self.config.max_positions {
            bail!(
                "the sequence would be {} tokens long; the model's context is {}",
                pos + s,
                self.config.max_positions
            );
        }
        if let Some(a) = adapter {
            if a.layers.len() != self.layers.len() {
                bail!(
                    "the adapter has {} layers, the model {}",
                    a.layers.len(),
                    self.layers.len()
                );
            }
            self.prepare_dora(a)?;
        }
        self.ensure_capacity(cache, pos + s)
    }

    /// Computes a DoRA adapter's gains `m / ‖W + s·B·A‖` against this model's weights, the
    /// first time the adapter runs on it (a pass over the adapted weights: about as long as
    /// one token's forward pass for the norms, plus `A·Wᵀ`).
    fn prepare_dora(&self, adapter: &LoraAdapter) -> anyhow::Result<()> {
        if !adapter.pending_gains() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        for (layer, lora) in self.layers.iter().zip(&adapter.layers) {
            for (linear, pair) in [
                (&layer.qkv, &lora.qkv),
                (&layer.o, &lora.o),
                (&layer.gate_up, &lora.gate_up),
                (&layer.down, &lora.down),
            ] {
                if let Some(pair) = pair
                    && pair.needs_gains()
                {
                    let (norms, aw) = linear.dora_basis(pair.a())?;
                    pair.set_gains(&norms, &aw)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                }
            }
        }
        tracing::debug!(
            adapter = %adapter.path.display(),
            ms = started.elapsed().as_millis() as u64,
            "DoRA gains computed"
        );
        Ok(())
    }

    /// [`Model::forward_batch`] on candle tensors (any device, what a GPU runs): the rows of
    /// every sequence go through each matmul together (one pass over the weights per step,
    /// each sequence's rows with its own adapter's term), attention runs per sequence over its
    /// own cache, and the output head runs on the rows whose logits are wanted. Per item, its
    /// logits (`rows × vocab`), or none.
    fn forward_tensor(&self, items: &mut [BatchItem<'_>]) -> anyhow::Result<Vec<Option<Tensor>>> {
        let mut tokens = Vec::new();
        let mut spans = Vec::with_capacity(items.len());
        for it in items.iter() {
            spans.push((tokens.len()..tokens.len() + it.tokens.len(), it.cache.len));
            tokens.extend_from_slice(it.tokens);
        }
        let mut x = self.embed.lookup(&tokens, &self.device)?;
        let ropes = spans
            .iter()
            .map(|(rows, pos)| {
                Ok((
                    self.cos.narrow(0, *pos, rows.len())?,
                    self.sin.narrow(0, *pos, rows.len())?,
                    self.mask(rows.len(), *pos)?,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        {
            let seqs: Vec<tensor::Seq<'_>> = items
                .iter()
                .zip(&spans)
                .zip(&ropes)
                .map(|((it, (rows, pos)), (cos, sin, mask))| tensor::Seq {
                    rows: rows.clone(),
                    pos: *pos,
                    cos,
                    sin,
                    mask: mask.as_ref(),
                    cache: &*it.cache,
                    adapter: it.adapter,
                })
                .collect();
            for (i, layer) in self.layers.iter().enumerate() {
                x = self.layer_forward(layer, i, &x, &seqs)?;
            }
        }
        let mut wanted: Vec<u32> = Vec::new();
        let mut counts = Vec::with_capacity(items.len());
        for (it, (rows, pos)) in items.iter_mut().zip(&spans) {
            it.cache.len = pos + rows.len();
            let before = wanted.len();
            match it.want {
                Want::Nothing => {}
                Want::Last => wanted.push((rows.end - 1) as u32),
                Want::All => wanted.extend(rows.clone().map(|r| r as u32)),
            }
            counts.push(wanted.len() - before);
        }
        if wanted.is_empty() {
            return Ok(counts.iter().map(|_| None).collect());
        }
        let n = wanted.len();
        let x = if n == tokens.len() {
            x
        } else {
            x.index_select(&Tensor::from_vec(wanted, n, &self.device)?, 0)?
        };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.config.rms_norm_eps as f32)?;
        let logits = self.lm_head.forward(&x, None)?;
        let mut at = 0;
        let mut out = Vec::with_capacity(counts.len());
        for c in counts {
            out.push((c > 0).then(|| logits.narrow(0, at, c)).transpose()?);
            at += c;
        }
        Ok(out)
    }

    fn ensure_capacity(&self, cache: &mut KvCache, need: usize) -> anyhow::Result<()> {
        if need <= cache.cap {
            return Ok(());
        }
        // Grown in blocks of KV_BLOCK positions: a sequence holds memory in proportion to its
        // length (at most one block more), and gives it all back when it ends.
        let cap = need
            .next_multiple_of(KV_BLOCK)
            .min(self.config.max_positions);
        let c = &self.config;
        if self.plain.is_some() {
            let (nkv, hd) = (c.num_kv_heads, c.head_dim);
            // A cache keeps the precision it was made with.
            let precision = cache.precision;
            let grow = |old: Option<&KvBuf>| -> anyhow::Result<KvBuf> {
                let mut buf = KvBuf::zeros(precision, nkv * cap * hd);
                if let Some(old) = old {
                    for g in 0..nkv {
                        buf.copy_from(g * cap * hd, old, g * cache.cap * hd, cache.len * hd)?;
                    }
                }
                Ok(buf)
            };
            cache.raw = (0..c.num_layers)
                .map(|i| {
                    let old = cache.raw.get(i);
                    Ok((grow(old.map(|o| &o.0))?, grow(old.map(|o| &o.1))?))
                })
                .collect::<anyhow::Result<_>>()?;
            cache.cap = cap;
            return Ok(());
        }
        let shape = (c.num_kv_heads, cap, c.head_dim);
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let k = Tensor::zeros(shape, DType::F32, &self.device)?;
            let v = Tensor::zeros(shape, DType::F32, &self.device)?;
            if let Some((ok, ov)) = cache.layers.get(i)
                && cache.len > 0
            {
                k.slice_set(&ok.narrow(1, 0, cache.len)?.contiguous()?, 1, 0)?;
                v.slice_set(&ov.narrow(1, 0, cache.len)?.contiguous()?, 1, 0)?;
            }
            layers.push((k, v));
        }
        cache.layers = layers;
        cache.cap = cap;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::load::{Raw, reorder_rows, unpermute_order};
    use super::*;

    #[test]
    fn unpermute_order_matches_the_converter() {
        for (rows, n) in [(16usize, 2usize), (24, 3), (576, 9), (192, 3)] {
            let t = Tensor::arange(0u32, rows as u32, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .reshape((rows, 1))
                .unwrap();
            let expected: Vec<f32> = crate::models::convert::unpermute_rows(&t, n)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let order = unpermute_order(rows, n).unwrap();
            let got: Vec<f32> = order.iter().map(|&i| i as f32).collect();
            assert_eq!(got, expected, "rows {rows}, heads {n}");
        }
        assert!(unpermute_order(10, 3).is_err());
    }

    #[test]
    fn quantised_rows_reorder_exactly() {
        let t = Tensor::randn(0f32, 1.0, (8, 64), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
        let before = q.dequantize(&Device::Cpu).unwrap();
        let order = unpermute_order(8, 2).unwrap();
        let Raw::Q(r) = reorder_rows(Raw::Q(q), &order).unwrap() else {
            panic!("stays quantised")
        };
        let after = r.dequantize(&Device::Cpu).unwrap();
        for (i, &src) in order.iter().enumerate() {
            let a: Vec<f32> = after.get(i).unwrap().to_vec1().unwrap();
            let b: Vec<f32> = before.get(src).unwrap().to_vec1().unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn requantize_targets() {
        use GgmlDType as G;
        assert_eq!(Requantize::Auto.target(G::Q4_1, 576), G::Q4_1);
        assert_eq!(Requantize::Auto.target(G::Q5_1, 576), G::Q8_0);
        assert_eq!(Requantize::Auto.target(G::Q4_0, 576), G::Q4_0);
        assert_eq!(Requantize::Auto.target(G::F32, 576), G::F32);
        assert_eq!(Requantize::Keep.target(G::Q4_1, 576), G::Q4_1);
        // 576 is not a multiple of the K-quants' 256-value blocks.
        assert_eq!(Requantize::To(G::Q4K).target(G::Q4_1, 576), G::Q8_0);
        assert_eq!(Requantize::To(G::Q4K).target(G::Q4_1, 1536), G::Q4K);
        assert_eq!(Requantize::parse("Q8_0").unwrap(), Requantize::To(G::Q8_0));
        assert!(Requantize::parse("q9").is_err());
    }
}
