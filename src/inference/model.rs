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

use super::config::{Family, ModelConfig};
use super::kernels::{Format, LowRank, QuantMatrix};
use super::lora::{LayerLora, LoraAdapter, LoraPair};
use crate::models::convert::{Arch, Heads, Mapped, map_tensor_name};
use crate::models::gguf::Meta;

/// What happens to GGUF weights at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Requantize {
    /// Q4_0, Q4_1 and Q8_0 are kept and run on the engine's own kernels (float activations,
    /// see `kernels`); Q5_0, Q5_1 and Q8_1 become Q8_0 (near-lossless from 5-bit data); the
    /// K-quants are kept and run on candle's kernels (8-bit activations).
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

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    Gguf(PathBuf),
    /// A Hugging Face folder (`config.json` + `model.safetensors` or an index of shards).
    Hf(PathBuf),
}

/// One linear layer: `y = x·Wᵀ (+ b)`, W quantised or dense.
/// A matmul weight: Q4_0 / Q4_1 / Q8_0 on the engine's own kernels (float activations),
/// anything else on candle's (dense, or quantised with 8-bit activations).
enum Weight {
    Candle(QMatMul),
    Own(QuantMatrix),
}

impl Weight {
    fn new(w: QMatMul) -> anyhow::Result<Weight> {
        if let QMatMul::QTensor(q) = &w {
            let format = match q.dtype() {
                GgmlDType::Q4_0 => Some(Format::Q4_0),
                GgmlDType::Q4_1 => Some(Format::Q4_1),
                GgmlDType::Q8_0 => Some(Format::Q8_0),
                _ => None,
            };
            if let Some(format) = format {
                let (rows, cols) = q.shape().dims2()?;
                return Ok(Weight::Own(QuantMatrix::from_bytes(
                    format,
                    &q.data()?,
                    rows,
                    cols,
                )?));
            }
        }
        if let QMatMul::Tensor(t) = &w
            && t.dtype() == DType::F32
            && t.device().is_cpu()
            && let Ok((rows, cols)) = t.dims2()
        {
            let values = t.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            return Ok(Weight::Own(QuantMatrix::from_f32(values, rows, cols)?));
        }
        Ok(Weight::Candle(w))
    }

    /// `x·Wᵀ`, plus the LoRA term when `lora` is given and the weight runs on the engine's own
    /// kernels (the caller adds it otherwise).
    fn forward(&self, x: &Tensor, lora: Option<&LoraPair>) -> candle_core::Result<Tensor> {
        match self {
            Weight::Candle(w) => w.forward(x),
            Weight::Own(w) => {
                let (s, _) = x.dims2()?;
                let x = x.contiguous()?;
                let mut out = vec![0f32; s * w.rows()];
                {
                    let (storage, layout) = x.storage_and_layout();
                    let candle_core::Storage::Cpu(cpu) = &*storage else {
                        candle_core::bail!("the quantised kernels run on the CPU");
                    };
                    let data = cpu.as_slice::<f32>()?;
                    let xs = &data[layout.start_offset()..layout.start_offset() + x.elem_count()];
                    w.matmul(xs, &mut out, lora.map(LoraPair::rows));
                }
                Tensor::from_vec(out, (s, w.rows()), x.device())
            }
        }
    }
}

/// One linear layer: `y = x·Wᵀ (+ b)`, W quantised or dense.
struct Linear {
    w: Weight,
    b: Option<Tensor>,
}

impl Linear {
    fn new(w: QMatMul, b: Option<Tensor>) -> anyhow::Result<Linear> {
        Ok(Linear {
            w: Weight::new(w)?,
            b,
        })
    }

    fn forward(&self, x: &Tensor, lora: Option<&LoraPair>) -> candle_core::Result<Tensor> {
        let own = matches!(self.w, Weight::Own(_));
        let mut y = self.w.forward(x, lora.filter(|_| own))?;
        if let Some(b) = &self.b {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = lora.filter(|_| !own) {
            let (m, n) = y.dims2()?;
            let mut out = y.flatten_all()?.to_vec1::<f32>()?;
            l.rows()
                .add_to(&x.flatten_all()?.to_vec1::<f32>()?, &mut out);
            y = Tensor::from_vec(out, (m, n), y.device())?;
        }
        Ok(y)
    }

    fn bytes(&self) -> usize {
        let w = match &self.w {
            Weight::Own(m) => m.bytes(),
            Weight::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        };
        w + self.b.as_ref().map_or(0, |b| b.elem_count() * 4)
    }

    fn describe(&self) -> String {
        match &self.w {
            Weight::Own(m) => format!("{:?} (float activations)", m.format()),
            Weight::Candle(QMatMul::QTensor(q)) => format!("{:?}", q.dtype()),
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                format!("{:?}", t.dtype())
            }
        }
    }
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
}

/// What the engine's own layer loop reads besides the matmul weights, as plain slices.
struct Plain {
    layers: Vec<PlainLayer>,
    norm: Vec<f32>,
    /// `max_positions × head_dim/2` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

struct PlainLayer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    qkv_bias: Option<Vec<f32>>,
}

fn own(l: &Linear) -> anyhow::Result<&QuantMatrix> {
    match &l.w {
        Weight::Own(m) => Ok(m),
        Weight::Candle(_) => bail!("a weight is not on the engine's kernels"),
    }
}

fn low(p: Option<&Option<LoraPair>>) -> Option<LowRank<'_>> {
    p.and_then(|p| p.as_ref()).map(LoraPair::rows)
}

fn plain_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

impl Plain {
    /// `None` unless every matmul weight of `m` runs on the engine's own kernels.
    fn new(m: &Model) -> anyhow::Result<Option<Plain>> {
        let own = |l: &Linear| matches!(l.w, Weight::Own(_));
        if !m.device.is_cpu()
            || !m.layers.iter().all(|l| {
                own(&l.qkv)
                    && own(&l.o)
                    && own(&l.gate_up)
                    && own(&l.down)
                    && l.o.b.is_none()
                    && l.gate_up.b.is_none()
                    && l.down.b.is_none()
            })
        {
            return Ok(None);
        }
        let opt = |t: &Option<Tensor>| t.as_ref().map(plain_vec).transpose();
        let layers = m
            .layers
            .iter()
            .map(|l| {
                Ok(PlainLayer {
                    input_norm: plain_vec(&l.input_norm)?,
                    post_norm: plain_vec(&l.post_norm)?,
                    q_norm: opt(&l.q_norm)?,
                    k_norm: opt(&l.k_norm)?,
                    qkv_bias: opt(&l.qkv.b)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(Plain {
            layers,
            norm: plain_vec(&m.norm)?,
            cos: plain_vec(&m.cos)?,
            sin: plain_vec(&m.sin)?,
        }))
    }
}

/// The attention state of one sequence: per layer, keys and values of every position so far.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    /// The same for the plain layer loop: per layer, keys and values as
    /// `num_kv_heads × cap × head_dim` floats. A cache uses one of the two, by its model.
    raw: Vec<(Vec<f32>, Vec<f32>)>,
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
        let raw: usize = self.raw.iter().map(|(k, v)| (k.len() + v.len()) * 4).sum();
        tensors + raw
    }
}

impl Model {
    /// Loads the weights. Takes seconds for large models: call it off the async runtime.
    pub fn load(source: &WeightsSource, requantize: Requantize) -> anyhow::Result<Model> {
        match source {
            WeightsSource::Gguf(path) => load_gguf(path, requantize),
            WeightsSource::Hf(dir) => load_hf(dir),
        }
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: Vec::new(),
            raw: Vec::new(),
            len: 0,
            cap: 0,
        }
    }

    /// Bytes of the weights in memory.
    pub fn weight_bytes(&self) -> usize {
        let embed = match &self.embed {
            Embedding::Quantized(q) => q.storage_size_in_bytes(),
            Embedding::Dense(t) => t.elem_count() * 4,
        };
        embed
            + self.lm_head.bytes()
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
        if let Some(a) = adapter
            && a.layers.len() != self.layers.len()
        {
            bail!(
                "the adapter has {} layers, the model {}",
                a.layers.len(),
                self.layers.len()
            );
        }
        self.ensure_capacity(cache, pos + s)?;
        if let Some(plain) = &self.plain {
            return self.forward_plain(plain, tokens, cache, adapter, all);
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = match &self.embed {
            Embedding::Quantized(q) => q.embedding(&ids)?,
            Embedding::Dense(t) => t.index_select(&ids, 0)?,
        };
        let cos = self.cos.narrow(0, pos, s)?;
        let sin = self.sin.narrow(0, pos, s)?;
        let mask = self.mask(s, pos)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let lora = adapter.map(|a| &a.layers[i]);
            let (k_cache, v_cache) = &cache.layers[i];
            x = self.layer_forward(
                layer,
                &x,
                pos,
                &cos,
                &sin,
                mask.as_ref(),
                k_cache,
                v_cache,
                lora,
            )?;
        }
        cache.len = pos + s;
        let x = if all { x } else { x.narrow(0, s - 1, 1)? };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.config.rms_norm_eps as f32)?;
        let logits = self.lm_head.forward(&x, None)?;
        Ok(if all { logits } else { logits.squeeze(0)? })
    }

    /// [`Model::forward`] on plain slices: the engine's kernels for every matmul (with the
    /// LoRA term inside) and the `ops` functions for the rest, with no candle tensor between
    /// them. Computes what the tensor path computes (the same operations in the same order,
    /// up to float summation order).
    fn forward_plain(
        &self,
        plain: &Plain,
        tokens: &[u32],
        cache: &mut KvCache,
        adapter: Option<&LoraAdapter>,
        all: bool,
    ) -> anyhow::Result<Tensor> {
        use super::ops;
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let (s, pos) = (tokens.len(), cache.len);
        let (hidden, nh, nkv, hd) = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
        let [qs, ks, _] = c.qkv_sizes();
        let n_qkv = qs + 2 * ks;
        let inter = c.intermediate_size;
        let half = hd / 2;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = match &self.embed {
            Embedding::Quantized(q) => q.embedding(&ids)?,
            Embedding::Dense(t) => t.index_select(&ids, 0)?,
        }
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
        let mut h = vec![0f32; s * hidden];
        let mut qkv = vec![0f32; s * n_qkv];
        let mut q = vec![0f32; s * qs];
        let mut att = vec![0f32; s * qs];
        let mut o = vec![0f32; s * hidden];
        let mut gu = vec![0f32; s * 2 * inter];
        let mut act = vec![0f32; s * inter];
        let heads = ops::Heads {
            nh,
            nkv,
            hd,
            cap: cache.cap,
            window: c.sliding_window,
        };
        for (li, (layer, pl)) in self.layers.iter().zip(&plain.layers).enumerate() {
            let lora = adapter.map(|a| &a.layers[li]);
            ops::rms_norm_rows(&x, &pl.input_norm, eps, &mut h);
            own(&layer.qkv)?.matmul(&h, &mut qkv, low(lora.map(|l| &l.qkv)));
            if let Some(b) = &pl.qkv_bias {
                for row in qkv.chunks_exact_mut(n_qkv) {
                    for (v, b) in row.iter_mut().zip(b) {
                        *v += b;
                    }
                }
            }
            let (kc, vc) = &mut cache.raw[li];
            for (i, row) in qkv.chunks_exact_mut(n_qkv).enumerate() {
                let p = pos + i;
                let (cos, sin) = (
                    &plain.cos[p * half..][..half],
                    &plain.sin[p * half..][..half],
                );
                let (qr, kv) = row.split_at_mut(qs);
                let (kr, vr) = kv.split_at_mut(ks);
                for head in qr.chunks_exact_mut(hd) {
                    if let Some(n) = &pl.q_norm {
                        ops::rms_norm_in_place(head, n, eps);
                    }
                    ops::rope(head, cos, sin);
                }
                q[i * qs..][..qs].copy_from_slice(qr);
                for (g, (kh, vh)) in kr.chunks_exact_mut(hd).zip(vr.chunks_exact(hd)).enumerate() {
                    if let Some(n) = &pl.k_norm {
                        ops::rms_norm_in_place(kh, n, eps);
                    }
                    ops::rope(kh, cos, sin);
                    let at = (g * cache.cap + p) * hd;
                    kc[at..at + hd].copy_from_slice(kh);
                    vc[at..at + hd].copy_from_slice(vh);
                }
            }
            ops::attention(&q, kc, vc, pos, heads, &mut att);
            own(&layer.o)?.matmul(&att, &mut o, low(lora.map(|l| &l.o)));
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            ops::rms_norm_rows(&x, &pl.post_norm, eps, &mut h);
            own(&layer.gate_up)?.matmul(&h, &mut gu, low(lora.map(|l| &l.gate_up)));
            ops::silu_mul(&gu, inter, &mut act);
            own(&layer.down)?.matmul(&act, &mut o, low(lora.map(|l| &l.down)));
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
        }
        cache.len = pos + s;
        let rows = if all { s } else { 1 };
        let x = &x[(s - rows) * hidden..];
        ops::rms_norm_rows(x, &plain.norm, eps, &mut h[..rows * hidden]);
        let logits = match &self.lm_head.w {
            Weight::Own(head) if self.lm_head.b.is_none() => {
                let mut logits = vec![0f32; rows * head.rows()];
                head.matmul(&h[..rows * hidden], &mut logits, None);
                Tensor::from_vec(logits, (rows, head.rows()), &self.device)?
            }
            _ => {
                let h = Tensor::from_slice(&h[..rows * hidden], (rows, hidden), &self.device)?;
                self.lm_head.forward(&h, None)?
            }
        };
        Ok(if all { logits } else { logits.squeeze(0)? })
    }

    fn ensure_capacity(&self, cache: &mut KvCache, need: usize) -> anyhow::Result<()> {
        if need <= cache.cap {
            return Ok(());
        }
        let cap = need
            .max(cache.cap * 2)
            .max(256)
            .min(self.config.max_positions);
        let c = &self.config;
        if self.plain.is_some() {
            let (nkv, hd) = (c.num_kv_heads, c.head_dim);
            let grow = |old: Option<&Vec<f32>>| {
                let mut buf = vec![0f32; nkv * cap * hd];
                if let Some(old) = old {
                    for g in 0..nkv {
                        let n = cache.len * hd;
                        buf[g * cap * hd..][..n].copy_from_slice(&old[g * cache.cap * hd..][..n]);
                    }
                }
                buf
            };
            cache.raw = (0..c.num_layers)
                .map(|i| {
                    let old = cache.raw.get(i);
                    (grow(old.map(|o| &o.0)), grow(old.map(|o| &o.1)))
                })
                .collect();
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

    /// The additive attention mask (`s × (pos+s)`) for a chunk of `s` positions starting at
    /// `pos`: causal, plus the sliding window when the model has one. `None` when nothing is
    /// masked (one position, no window in reach).
    fn mask(&self, s: usize, pos: usize) -> anyhow::Result<Option<Tensor>> {
        let t = pos + s;
        let window = self.config.sliding_window.filter(|w| *w < t);
        if s == 1 && window.is_none() {
            return Ok(None);
        }
        let mut m = vec![0f32; s * t];
        for i in 0..s {
            let qpos = pos + i;
            for j in 0..t {
                if j > qpos || window.is_some_and(|w| qpos - j >= w) {
                    m[i * t + j] = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (s, t), &self.device)?))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        pos: usize,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        k_cache: &Tensor,
        v_cache: &Tensor,
        lora: Option<&LayerLora>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let (s, _) = x.dims2()?;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let n_rep = nh / nkv;

        let h = candle_nn::ops::rms_norm(x, &l.input_norm, eps)?;
        let qkv = l.qkv.forward(&h, lora.and_then(|l| l.qkv.as_ref()))?;
        let [qs, ks, _] = c.qkv_sizes();
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((s, n, hd))?.transpose(0, 1)?.contiguous()
        };
        let mut q = heads(qkv.narrow(1, 0, qs)?, nh)?;
        let mut k = heads(qkv.narrow(1, qs, ks)?, nkv)?;
        let v = heads(qkv.narrow(1, qs + ks, ks)?, nkv)?;
        if let Some(n) = &l.q_norm {
            q = candle_nn::ops::rms_norm(&q, n, eps)?;
        }
        if let Some(n) = &l.k_norm {
            k = candle_nn::ops::rms_norm(&k, n, eps)?;
        }
        let q = candle_nn::rotary_emb::rope(&q.unsqueeze(0)?, cos, sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope(&k.unsqueeze(0)?, cos, sin)?.squeeze(0)?;
        k_cache.slice_set(&k, 1, pos)?;
        v_cache.slice_set(&v, 1, pos)?;
        let t = pos + s;
        let k_all = k_cache.narrow(1, 0, t)?;
        let v_all = v_cache.narrow(1, 0, t)?;

        // Query heads that share a key/value head are stacked as rows of one matmul.
        let q = q.reshape((nkv, n_rep * s, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut att = (q.matmul(&k_all.t()?)? * scale)?;
        if let Some(m) = mask {
            att = att
                .reshape((nkv, n_rep, s, t))?
                .broadcast_add(m)?
                .reshape((nkv, n_rep * s, t))?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let out = att
            .matmul(&v_all)?
            .reshape((nh, s, hd))?
            .transpose(0, 1)?
            .reshape((s, nh * hd))?;
        let o = l.o.forward(&out, lora.and_then(|l| l.o.as_ref()))?;
        let x = (x + o)?;

        let h = candle_nn::ops::rms_norm(&x, &l.post_norm, eps)?;
        let gu = l
            .gate_up
            .forward(&h, lora.and_then(|l| l.gate_up.as_ref()))?;
        let i = c.intermediate_size;
        let act = (gu.narrow(1, 0, i)?.silu()? * gu.narrow(1, i, i)?)?;
        let d = l.down.forward(&act, lora.and_then(|l| l.down.as_ref()))?;
        x + d
    }
}

/// A weight as read: quantised (GGUF) or dense (safetensors, or GGUF f32).
enum Raw {
    Q(QTensor),
    F(Tensor),
}

impl Raw {
    fn rows_cols(&self) -> anyhow::Result<(usize, usize)> {
        Ok(match self {
            Raw::Q(q) => q.shape().dims2()?,
            Raw::F(t) => t.dims2()?,
        })
    }

    fn dense(&self) -> anyhow::Result<Tensor> {
        Ok(match self {
            Raw::Q(q) => q.dequantize(&Device::Cpu)?,
            Raw::F(t) => t.to_dtype(DType::F32)?,
        })
    }

    /// 1-D weights (norms, biases) as f32.
    fn vector(&self) -> anyhow::Result<Tensor> {
        Ok(self.dense()?.flatten_all()?)
    }
}

/// The row order that undoes llama.cpp's q/k permutation for `n` heads: row `i` of the result
/// is row `order[i]` of the stored matrix. The inverse of
/// `reshape(n, 2, rows/n/2, …).swapaxes(1, 2)`.
pub(crate) fn unpermute_order(rows: usize, n: usize) -> anyhow::Result<Vec<usize>> {
    if n == 0 || !rows.is_multiple_of(2 * n) {
        bail!("{rows} rows cannot be split into {n} heads of an even size");
    }
    let per = rows / n;
    let half = per / 2;
    let mut order = Vec::with_capacity(rows);
    for h in 0..n {
        for b in 0..2 {
            for a in 0..half {
                order.push(h * per + 2 * a + b);
            }
        }
    }
    Ok(order)
}

fn reorder_rows(raw: Raw, order: &[usize]) -> anyhow::Result<Raw> {
    match raw {
        Raw::Q(q) => {
            let (rows, cols) = q.shape().dims2()?;
            let data = q.data()?;
            let row_bytes = data.len() / rows;
            let mut out = Vec::with_capacity(data.len());
            for &src in order {
                out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
            Ok(Raw::Q(qtensor_from_ggml(
                q.dtype(),
                &out,
                vec![rows, cols],
                &Device::Cpu,
            )?))
        }
        Raw::F(t) => {
            let idx = Tensor::new(
                order.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                t.device(),
            )?;
            Ok(Raw::F(t.index_select(&idx, 0)?))
        }
    }
}

/// Stacks the rows of `parts` (same column count) into one matmul weight, in the format
/// `requantize` picks.
fn fuse(parts: Vec<Raw>, requantize: Requantize) -> anyhow::Result<QMatMul> {
    let mut cols = None;
    let mut rows = 0;
    for p in &parts {
        let (r, c) = p.rows_cols()?;
        if cols.is_some_and(|x| x != c) {
            bail!("fused weights have different input sizes");
        }
        cols = Some(c);
        rows += r;
    }
    let cols = cols.context("nothing to fuse")?;
    let all_q = parts.iter().all(|p| matches!(p, Raw::Q(_)));
    if all_q {
        let dtypes: Vec<GgmlDType> = parts
            .iter()
            .filter_map(|p| match p {
                Raw::Q(q) => Some(q.dtype()),
                Raw::F(_) => None,
            })
            .collect();
        let target = requantize.target(dtypes[0], cols);
        if dtypes.iter().all(|d| *d == target) {
            // Same format throughout: whole rows of blocks, concatenated as bytes.
            let mut bytes = Vec::new();
            for p in &parts {
                if let Raw::Q(q) = p {
                    bytes.extend_from_slice(&q.data()?);
                }
            }
            let q = qtensor_from_ggml(target, &bytes, vec![rows, cols], &Device::Cpu)?;
            return Ok(QMatMul::from_qtensor(q)?);
        }
        let dense = Tensor::cat(
            &parts
                .iter()
                .map(Raw::dense)
                .collect::<anyhow::Result<Vec<_>>>()?,
            0,
        )?;
        return dense_as(dense, target);
    }
    let dense = if parts.len() == 1 {
        parts[0].dense()?
    } else {
        Tensor::cat(
            &parts
                .iter()
                .map(Raw::dense)
                .collect::<anyhow::Result<Vec<_>>>()?,
            0,
        )?
    };
    Ok(QMatMul::Tensor(dense.contiguous()?))
}

/// A dense f32 matrix as a matmul weight of format `target`.
fn dense_as(dense: Tensor, target: GgmlDType) -> anyhow::Result<QMatMul> {
    Ok(match target {
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => QMatMul::Tensor(dense),
        t => QMatMul::from_qtensor(QTensor::quantize(&dense, t)?)?,
    })
}

/// Weights by Hugging Face name, from either source.
struct Store {
    tensors: HashMap<String, Raw>,
}

impl Store {
    fn take(&mut self, name: &str) -> anyhow::Result<Raw> {
        self.tensors
            .remove(name)
            .with_context(|| format!("the weights have no `{name}`"))
    }

    fn take_opt(&mut self, name: &str) -> Option<Raw> {
        self.tensors.remove(name)
    }

    fn build(
        mut self,
        config: ModelConfig,
        requantize: Requantize,
        description: String,
    ) -> anyhow::Result<Model> {
        let device = Device::Cpu;
        let c = &config;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let proj = |s: &mut Store, m: &str, rows: usize, cols: usize| -> anyhow::Result<Raw> {
                let r = s.take(&format!("{p}.{m}.weight"))?;
                let (rr, cc) = r.rows_cols()?;
                if (rr, cc) != (rows, cols) {
                    bail!("`{p}.{m}.weight` is {rr}×{cc}, expected {rows}×{cols}");
                }
                Ok(r)
            };
            let (h, qs, kvs, inter) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
            let q = proj(&mut self, "self_attn.q_proj", qs, h)?;
            let k = proj(&mut self, "self_attn.k_proj", kvs, h)?;
            let v = proj(&mut self, "self_attn.v_proj", kvs, h)?;
            let qkv_bias = if c.attention_bias {
                let mut b = Vec::new();
                for m in ["q_proj", "k_proj", "v_proj"] {
                    b.push(self.take(&format!("{p}.self_attn.{m}.bias"))?.vector()?);
                }
                Some(Tensor::cat(&b, 0)?)
            } else {
                None
            };
            let o = proj(&mut self, "self_attn.o_proj", h, qs)?;
            let gate = proj(&mut self, "mlp.gate_proj", inter, h)?;
            let up = proj(&mut self, "mlp.up_proj", inter, h)?;
            let down = proj(&mut self, "mlp.down_proj", h, inter)?;
            let qk_norm = c.family == Family::Qwen3;
            let norm = |s: &mut Store, m: &str| -> anyhow::Result<Tensor> {
                s.take(&format!("{p}.{m}.weight"))?.vector()
            };
            layers.push(Layer {
                input_norm: norm(&mut self, "input_layernorm")?,
                post_norm: norm(&mut self, "post_attention_layernorm")?,
                q_norm: if qk_norm {
                    Some(norm(&mut self, "self_attn.q_norm")?)
                } else {
                    None
                },
                k_norm: if qk_norm {
                    Some(norm(&mut self, "self_attn.k_norm")?)
                } else {
                    None
                },
                qkv: Linear::new(fuse(vec![q, k, v], requantize)?, qkv_bias)?,
                o: Linear::new(fuse(vec![o], requantize)?, None)?,
                gate_up: Linear::new(fuse(vec![gate, up], requantize)?, None)?,
                down: Linear::new(fuse(vec![down], requantize)?, None)?,
            });
        }
        let embed_raw = self.take("model.embed_tokens.weight")?;
        let (vocab, hidden) = embed_raw.rows_cols()?;
        if hidden != c.hidden_size {
            bail!(
                "the embedding has {hidden} columns, expected {}",
                c.hidden_size
            );
        }
        // No `lm_head.weight`: the output projection is the embedding (tied).
        let lm_head_raw = self.take_opt("lm_head.weight");
        let (embed, lm_head) = match embed_raw {
            Raw::Q(q) => {
                let q = std::sync::Arc::new(q);
                let head = Linear::new(
                    match lm_head_raw {
                        Some(r) => fuse(vec![r], requantize)?,
                        None => {
                            let target = requantize.target(q.dtype(), hidden);
                            if target == q.dtype() {
                                QMatMul::from_arc(q.clone())?
                            } else {
                                dense_as(q.dequantize(&device)?, target)?
                            }
                        }
                    },
                    None,
                )?;
                (Embedding::Quantized(q), head)
            }
            Raw::F(t) => {
                let t = t.to_dtype(DType::F32)?.contiguous()?;
                let head = match lm_head_raw {
                    Some(r) => Linear::new(fuse(vec![r], requantize)?, None)?,
                    // Tied: candle's matmul over the embedding itself (no second copy).
                    None => Linear {
                        w: Weight::Candle(QMatMul::Tensor(t.clone())),
                        b: None,
                    },
                };
                (Embedding::Dense(t), head)
            }
        };
        let norm = self.take("model.norm.weight")?.vector()?;
        let (cos, sin) = rope_tables(c, &device)?;
        let config = ModelConfig {
            vocab_size: vocab,
            ..config
        };
        let mut model = Model {
            description: format!(
                "{description}; layers {}, head {}",
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
        };
        // FERROTUNE_TENSOR_PATH=1 keeps the candle-tensor layer loop (to compare the two).
        if std::env::var_os("FERROTUNE_TENSOR_PATH").is_none_or(|v| v == "0") {
            model.plain = Plain::new(&model)?;
        }
        Ok(model)
    }
}

fn rope_tables(c: &ModelConfig, device: &Device) -> anyhow::Result<(Tensor, Tensor)> {
    let inv = c.inv_freq();
    let n = c.max_positions;
    let half = inv.len();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv {
            // f32 product, as transformers computes it.
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
}

fn load_gguf(path: &Path, requantize: Requantize) -> anyhow::Result<Model> {
    let device = Device::Cpu;
    let mut file = BufReader::with_capacity(
        1 << 20,
        File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
    );
    let content = Content::read(&mut file)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
    let meta = Meta::new(&content.metadata)?;
    let family = super::config::Family::from_gguf_arch(&meta.arch)?;
    let rope_freqs = if content.tensor_infos.contains_key("rope_freqs.weight") {
        let t = content.tensor(&mut file, "rope_freqs.weight", &device)?;
        Some(t.dequantize(&device)?.flatten_all()?.to_vec1::<f32>()?)
    } else {
        None
    };
    let tied = !content.tensor_infos.contains_key("output.weight");
    let bias = content.tensor_infos.contains_key("blk.0.attn_q.bias");
    let config = ModelConfig::from_gguf(&meta, rope_freqs, tied, bias)?;
    let arch = match family {
        Family::Llama | Family::Mistral => Arch::Llama,
        Family::Qwen2 | Family::Qwen3 => Arch::Qwen2,
    };
    let mut tensors = HashMap::new();
    let mut formats: Vec<GgmlDType> = Vec::new();
    for name in content.tensor_infos.keys() {
        let (hf, heads) = match gguf_name(arch, family, &config, name)? {
            None => continue,
            Some(x) => x,
        };
        let q = content
            .tensor(&mut file, name, &device)
            .with_context(|| format!("cannot read tensor `{name}`"))?;
        if !formats.contains(&q.dtype()) {
            formats.push(q.dtype());
        }
        let raw = match q.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Raw::F(q.dequantize(&device)?),
            _ => Raw::Q(q),
        };
        let raw = match heads {
            Some(n) => {
                let (rows, _) = raw.rows_cols()?;
                reorder_rows(raw, &unpermute_order(rows, n)?)
                    .with_context(|| format!("cannot un-permute `{name}`"))?
            }
            None => raw,
        };
        tensors.insert(hf, raw);
    }
    formats.sort_by_key(|f| format!("{f:?}"));
    let description = format!(
        "gguf {} ({})",
        path.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        formats
            .iter()
            .map(|f| format!("{f:?}"))
            .collect::<Vec<_>>()
            .join("+")
    );
    Store { tensors }.build(config, requantize, description)
}

/// The Hugging Face name of a GGUF tensor, and the head count its rows are permuted by;
/// `None` for tensors the model does not use (`rope_freqs`).
fn gguf_name(
    arch: Arch,
    family: Family,
    config: &ModelConfig,
    name: &str,
) -> anyhow::Result<Option<(String, Option<usize>)>> {
    // Qwen3's per-head q/k norms are not in the converter's table.
    if family == Family::Qwen3
        && let Some(rest) = name.strip_prefix("blk.")
        && let Some((layer, m)) = rest.split_once('.')
    {
        let hf = match m {
            "attn_q_norm.weight" => Some("self_attn.q_norm.weight"),
            "attn_k_norm.weight" => Some("self_attn.k_norm.weight"),
            _ => None,
        };
        if let Some(hf) = hf {
            return Ok(Some((format!("model.layers.{layer}.{hf}"), None)));
        }
    }
    Ok(match map_tensor_name(arch, name)? {
        Mapped::Skip => None,
        Mapped::Tensor { name: hf, heads } => Some((
            hf,
            heads.map(|h| match h {
                Heads::Query => config.num_heads,
                Heads::Key => config.num_kv_heads,
            }),
        )),
    })
}

fn load_hf(dir: &Path) -> anyhow::Result<Model> {
    let config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let device = Device::Cpu;
    let single = dir.join("model.safetensors");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else {
        let index = dir.join("model.safetensors.index.json");
        let text = std::fs::read(&index).with_context(|| {
            format!(
                "{} has neither model.safetensors nor an index of shards",
                dir.display()
            )
        })?;
        let v: serde_json::Value = serde_json::from_slice(&text)?;
        let mut files: Vec<PathBuf> = v["weight_map"]
            .as_object()
            .context("the shard index has no `weight_map`")?
            .values()
            .filter_map(|f| f.as_str().map(|f| dir.join(f)))
            .collect();
        files.sort();
        files.dedup();
        files
    };
    let mut tensors = HashMap::new();
    let mut dtypes = Vec::new();
    for f in &files {
        for (name, t) in candle_core::safetensors::load(f, &device)
            .with_context(|| format!("cannot read {}", f.display()))?
        {
            if !dtypes.contains(&t.dtype()) {
                dtypes.push(t.dtype());
            }
            let t = if t.dtype() == DType::F32 {
                t
            } else {
                t.to_dtype(DType::F32)?
            };
            tensors.insert(name, Raw::F(t));
        }
    }
    let description = format!(
        "safetensors ({}) as F32",
        dtypes
            .iter()
            .map(|d| format!("{d:?}"))
            .collect::<Vec<_>>()
            .join("+")
    );
    Store { tensors }.build(config, Requantize::Keep, description)
}

#[cfg(test)]
mod tests {
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
