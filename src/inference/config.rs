//! A decoder's shape and numerics, read from `config.json` (Hugging Face) or from a GGUF
//! file's metadata, for the families the engine runs: Llama (incl. SmolLM), Mistral, Qwen2
//! and Qwen3.

use std::path::Path;

use anyhow::{Context, bail};
use serde_json::Value as Json;

use crate::models::gguf::Meta;

/// The model families the engine implements (one forward pass; the families differ in
/// biases, q/k norms and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3, SmolLM, TinyLlama, …
    Llama,
    /// Mistral (Llama layout; sliding window).
    Mistral,
    /// Qwen2 / Qwen2.5: q/k/v biases.
    Qwen2,
    /// Qwen3: per-head RMSNorm on q and k, no biases.
    Qwen3,
}

impl Family {
    /// From `config.json`'s `model_type`.
    pub fn from_model_type(t: &str) -> anyhow::Result<Family> {
        Ok(match t {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            other => bail!(
                "model type `{other}` is not supported for chat (supported: llama — \
                 Llama, SmolLM —, mistral, qwen2, qwen3)"
            ),
        })
    }

    /// From a GGUF file's `general.architecture`.
    pub fn from_gguf_arch(a: &str) -> anyhow::Result<Family> {
        Ok(match a {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            other => bail!(
                "GGUF architecture `{other}` is not supported for chat (supported: llama — \
                 Llama, SmolLM, Mistral —, qwen2, qwen3)"
            ),
        })
    }
}

/// Rotary embedding frequencies.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear(f64),
    /// Llama 3.x: per-frequency factors from these parameters.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors as stored in a GGUF `rope_freqs` tensor.
    Factors(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// The longest sequence (prompt + completion) the model is run on.
    pub max_positions: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2, some Llama variants).
    pub attention_bias: bool,
    /// Sliding attention window (Mistral), when the model has one.
    pub sliding_window: Option<usize>,
}

/// Contexts longer than this are cut to it: the KV cache and rope tables are sized by it.
const MAX_CONTEXT: usize = 32_768;

impl ModelConfig {
    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Output sizes of the projections the engine fuses: `[q, k, v]` and `[gate, up]`.
    pub fn qkv_sizes(&self) -> [usize; 3] {
        [self.q_size(), self.kv_size(), self.kv_size()]
    }

    /// Reads `config.json`.
    pub fn from_hf_file(path: &Path) -> anyhow::Result<ModelConfig> {
        let text =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: Json = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_hf(&v).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_hf(v: &Json) -> anyhow::Result<ModelConfig> {
        // Multimodal wrappers keep the language model's settings under `text_config`.
        let v = v.get("text_config").filter(|t| t.is_object()).unwrap_or(v);
        let model_type = v["model_type"]
            .as_str()
            .context("config.json has no `model_type`")?;
        let family = Family::from_model_type(model_type)?;
        let uint = |k: &str| -> anyhow::Result<Option<usize>> {
            match &v[k] {
                Json::Null => Ok(None),
                x => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .with_context(|| format!("`{k}` is not a non-negative integer: {x}")),
            }
        };
        let req = |k: &str| -> anyhow::Result<usize> {
            uint(k)?.with_context(|| format!("config.json has no `{k}`"))
        };
        let hidden_size = req("hidden_size")?;
        let num_heads = req("num_attention_heads")?;
        let num_kv_heads = uint("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = uint("head_dim")?.unwrap_or(hidden_size / num_heads.max(1));
        if let Some(act) = v["hidden_act"].as_str()
            && act != "silu"
        {
            bail!("activation `{act}` is not supported (only silu)");
        }
        if v["mlp_bias"].as_bool() == Some(true) {
            bail!("`mlp_bias` is not supported");
        }
        // transformers 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
        let rope = v
            .get("rope_parameters")
            .filter(|r| r.is_object())
            .or_else(|| v.get("rope_scaling").filter(|r| r.is_object()));
        let rope_theta = rope
            .and_then(|r| r["rope_theta"].as_f64())
            .or_else(|| v["rope_theta"].as_f64())
            .unwrap_or(10_000.0);
        let rope_scaling = match rope {
            None => RopeScaling::None,
            Some(r) => {
                let kind = r["rope_type"]
                    .as_str()
                    .or_else(|| r["type"].as_str())
                    .unwrap_or("default");
                let f = |k: &str| {
                    r[k].as_f64()
                        .with_context(|| format!("rope scaling `{kind}` needs `{k}`"))
                };
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear(f("factor")?),
                    "llama3" => RopeScaling::Llama3 {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")?,
                    },
                    other => bail!("rope scaling `{other}` is not supported"),
                }
            }
        };
        let default_bias = family == Family::Qwen2;
        let sliding_window = match family {
            Family::Mistral => uint("sliding_window")?,
            Family::Qwen2 | Family::Qwen3 if v["use_sliding_window"].as_bool() == Some(true) => {
                bail!("`use_sliding_window` is not supported")
            }
            _ => None,
        };
        let cfg = ModelConfig {
            family,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_layers: req("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: req("vocab_size")?,
            rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_positions: uint("max_position_embeddings")?
                .unwrap_or(4096)
                .min(MAX_CONTEXT),
            tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            attention_bias: v["attention_bias"].as_bool().unwrap_or(default_bias),
            sliding_window,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Reads the GGUF metadata. `rope_freqs` is the `rope_freqs.weight` tensor when present;
    /// `tied` says whether the file lacks `output.weight`; `attention_bias` whether it has
    /// q biases.
    pub(crate) fn from_gguf(
        meta: &Meta<'_>,
        rope_freqs: Option<Vec<f32>>,
        tied: bool,
        attention_bias: bool,
    ) -> anyhow::Result<ModelConfig> {
        let family = Family::from_gguf_arch(&meta.arch)?;
        let hidden_size = meta.arch_uint_req("embedding_length")? as usize;
        let num_heads = meta.arch_uint_req("attention.head_count")? as usize;
        let num_kv_heads = meta
            .arch_uint("attention.head_count_kv")?
            .map(|n| n as usize)
            .unwrap_or(num_heads);
        let head_dim = meta
            .arch_uint("attention.key_length")?
            .map(|n| n as usize)
            .unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match meta.arch_uint("vocab_size")? {
            Some(n) => n as usize,
            None => meta
                .strings("tokenizer.ggml.tokens")?
                .map(|t| t.len())
                .context("the GGUF file has no vocabulary size")?,
        };
        let rope_scaling = if let Some(f) = rope_freqs {
            RopeScaling::Factors(f)
        } else {
            match (
                meta.arch_string("rope.scaling.type")?,
                meta.arch_float("rope.scaling.factor")?,
            ) {
                (None | Some("none"), _) | (_, None) => RopeScaling::None,
                (Some("linear"), Some(f)) => RopeScaling::Linear(f),
                (Some(other), _) => bail!("rope scaling `{other}` is not supported"),
            }
        };
        let cfg = ModelConfig {
            family,
            hidden_size,
            intermediate_size: meta.arch_uint_req("feed_forward_length")? as usize,
            num_layers: meta.arch_uint_req("block_count")? as usize,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: meta
                .arch_float("attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-6),
            rope_theta: meta.arch_float("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling,
            max_positions: meta
                .arch_uint("context_length")?
                .map(|n| n as usize)
                .unwrap_or(4096)
                .min(MAX_CONTEXT),
            tie_word_embeddings: tied,
            attention_bias,
            sliding_window: None,
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            bail!(
                "{} attention heads cannot share {} key/value heads",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            bail!("head dimension {} is not even", self.head_dim);
        }
        if self.hidden_size == 0 || self.num_layers == 0 || self.vocab_size == 0 {
            bail!("the model has a zero size");
        }
        Ok(())
    }

    /// Inverse frequencies of the rotary embedding (`head_dim / 2` values), computed in f32 as
    /// transformers does.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base = self.rope_theta as f32;
        let mut inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear(f) => inv.iter_mut().for_each(|x| *x /= *f as f32),
            RopeScaling::Factors(f) => inv
                .iter_mut()
                .zip(f)
                .for_each(|(x, f)| *x /= if *f == 0.0 { 1.0 } else { *f }),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: orig,
            } => {
                let low_wavelen = orig / low_freq_factor;
                let high_wavelen = orig / high_freq_factor;
                for x in inv.iter_mut() {
                    let freq = f64::from(*x);
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    let scaled = if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        let smooth = (orig / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    };
                    *x = scaled as f32;
                }
            }
        }
        inv
    }
}

/// End-of-sequence token ids from `generation_config.json` (`eos_token_id`: one id or a list),
/// else `config.json`.
pub fn eos_from_hf(dir: &Path) -> Vec<u32> {
    let ids = |file: &str| -> Option<Vec<u32>> {
        let text = std::fs::read(dir.join(file)).ok()?;
        let v: Json = serde_json::from_slice(&text).ok()?;
        match &v["eos_token_id"] {
            Json::Number(n) => n.as_u64().map(|n| vec![n as u32]),
            Json::Array(a) => Some(
                a.iter()
                    .filter_map(|x| x.as_u64().map(|n| n as u32))
                    .collect(),
            ),
            _ => None,
        }
    };
    ids("generation_config.json")
        .or_else(|| ids("config.json"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_a_transformers_5_config() {
        let c = ModelConfig::from_hf(&json!({
            "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "head_dim": 64, "vocab_size": 49152, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
            "tie_word_embeddings": true, "max_position_embeddings": 8192
        }))
        .unwrap();
        assert_eq!(c.family, Family::Llama);
        assert_eq!(c.rope_theta, 100000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert_eq!(c.qkv_sizes(), [576, 192, 192]);
        assert!(c.tie_word_embeddings);
        assert!(!c.attention_bias);
    }

    #[test]
    fn refuses_unknown_families_and_activations() {
        let e = ModelConfig::from_hf(&json!({"model_type": "gpt2"})).unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
        let e = ModelConfig::from_hf(&json!({
            "model_type": "llama", "hidden_act": "gelu", "hidden_size": 8,
            "num_attention_heads": 2
        }))
        .unwrap_err();
        assert!(e.to_string().contains("gelu"), "{e}");
    }

    #[test]
    fn llama3_rope_matches_the_converters_factors() {
        let mut c = ModelConfig::from_hf(&json!({
            "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 1, "num_attention_heads": 32, "vocab_size": 10,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        }))
        .unwrap();
        let scaled = c.inv_freq();
        let factors =
            crate::models::convert::llama3_rope_factors(500000.0, 64, 32.0, 1.0, 4.0, 8192.0);
        c.rope_scaling = RopeScaling::Factors(factors.iter().map(|f| *f as f32).collect());
        let from_factors = c.inv_freq();
        for (a, b) in scaled.iter().zip(&from_factors) {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1e-12), "{a} vs {b}");
        }
    }
}
