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
    ///
    /// A Hugging Face folder's float weights are quantised as they are read (`Auto`: Q8_0;
    /// `To(format)`; `Keep`: float32) and the result is cached beside the model, memory-mapped
    /// on later loads (see `cache`).
    pub fn load(source: &WeightsSource, requantize: Requantize) -> anyhow::Result<Model> {
        match source {
            WeightsSource::Gguf(path) => load_gguf(path, requantize),
            WeightsSource::Hf(dir) => load_hf(dir, requantize),
        }
    }

    /// A model from its loaded parts: the rope tables, the description (`source`, then the
    /// formats the layers and head run in) and, unless FERROTUNE_TENSOR_PATH=1 keeps the
    /// candle-tensor layer loop (to compare the two), the plain layer loop.
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
        };
        if std::env::var_os("FERROTUNE_TENSOR_PATH").is_none_or(|v| v == "0") {
            model.plain = Plain::new(&model)?;
        }
        Ok(model)
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
            Embedding::Own(_) => self.embed.lookup(tokens, &self.device)?,
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
