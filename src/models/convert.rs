//! GGUF → Hugging Face folder: de-quantised float32 `model.safetensors`, `config.json`,
//! `generation_config.json` and the tokenizer files, written in Rust (candle), so a base model
//! is trainable without the Python environment.
//!
//! Supported: `general.architecture` `llama` (Llama 2/3, SmolLM, Mistral-style models as
//! llama.cpp writes them) and `qwen2`. llama.cpp's converter permutes the rows of the q/k
//! projections of Llama-architecture models (`permute(w, n_head, n_head_kv)`); that is undone
//! exactly here, so the weights equal what transformers' own GGUF loader produces.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use serde_json::{Value as Json, json};

use super::gguf::Meta;
use super::tokenizer;

/// The architectures the converter knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub fn parse(name: &str) -> anyhow::Result<Arch> {
        match name {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            other => bail!(
                "GGUF architecture `{other}` is not supported by the converter \
                 (supported: llama — Llama, SmolLM, Mistral — and qwen2)"
            ),
        }
    }

    /// llama.cpp permutes the q/k rows of Llama-architecture models only.
    fn qk_permuted(self) -> bool {
        self == Arch::Llama
    }

    fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    fn class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// What a GGUF tensor becomes in the HF checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Mapped {
    /// Stored under this name; `heads` says whose head count the rows were permuted by, when
    /// the architecture permutes (llama: q by `n_head`, k by `n_head_kv`).
    Tensor { name: String, heads: Option<Heads> },
    /// Not an HF weight (e.g. `rope_freqs.weight`, folded into `config.json`).
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Heads {
    /// Query rows: permuted by `n_head`.
    Query,
    /// Key rows: permuted by `n_head_kv`.
    Key,
}

/// Maps a GGUF tensor name to its Hugging Face name.
pub(crate) fn map_tensor_name(arch: Arch, gguf: &str) -> anyhow::Result<Mapped> {
    let plain = |s: &str| {
        Ok(Mapped::Tensor {
            name: s.to_string(),
            heads: None,
        })
    };
    match gguf {
        "token_embd.weight" => return plain("model.embed_tokens.weight"),
        "output_norm.weight" => return plain("model.norm.weight"),
        "output.weight" => return plain("lm_head.weight"),
        "rope_freqs.weight" => return Ok(Mapped::Skip),
        _ => {}
    }
    let unknown = || anyhow::anyhow!("GGUF tensor `{gguf}` has no Hugging Face counterpart here");
    let rest = gguf.strip_prefix("blk.").ok_or_else(unknown)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let layer: u32 = layer.parse().map_err(|_| unknown())?;
    let (module, kind) = rest.rsplit_once('.').ok_or_else(unknown)?;
    if kind != "weight" && kind != "bias" {
        return Err(unknown());
    }
    let (hf, heads) = match module {
        "attn_q" => ("self_attn.q_proj", Some(Heads::Query)),
        "attn_k" => ("self_attn.k_proj", Some(Heads::Key)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        _ => return Err(unknown()),
    };
    Ok(Mapped::Tensor {
        name: format!("model.layers.{layer}.{hf}.{kind}"),
        heads: if arch.qk_permuted() { heads } else { None },
    })
}

/// llama.cpp's `permute(w, n_head, n_head_kv)` as applied to rows (dimension 0):
/// `reshape(n, 2, rows/n/2, rest).swapaxes(1, 2)`. The converter undoes it; the GGUF export
/// ([`super::export`]) applies it.
pub(crate) fn permute_rows(t: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    t.reshape((n, 2, rows / n / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The exact inverse of [`permute_rows`]: `reshape(n, rows/n/2, 2, rest).swapaxes(1, 2)`.
/// Moves data only, so the result is bit-identical to the unpermuted original.
pub(crate) fn unpermute_rows(t: &Tensor, n: usize) -> anyhow::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = *dims.first().context("cannot unpermute a scalar")?;
    if n == 0 || rows % (2 * n) != 0 {
        bail!("{rows} rows cannot be split into {n} heads of an even size");
    }
    let rest: usize = dims[1..].iter().product();
    Ok(t.reshape((n, rows / n / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Model dimensions read from the GGUF metadata.
#[derive(Debug)]
struct Dims {
    hidden: u64,
    intermediate: u64,
    layers: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    context: Option<u64>,
    rms_eps: f64,
    rope_theta: f64,
}

impl Dims {
    fn read(meta: &Meta<'_>) -> anyhow::Result<Dims> {
        let hidden = meta.arch_uint_req("embedding_length")?;
        let heads = meta.arch_uint_req("attention.head_count")?;
        if heads == 0 {
            bail!("`{}.attention.head_count` is 0", meta.arch);
        }
        let kv_heads = meta.arch_uint("attention.head_count_kv")?.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            bail!("{heads} attention heads cannot share {kv_heads} key/value heads");
        }
        let head_dim = match meta.arch_uint("attention.key_length")? {
            Some(d) => d,
            None => hidden / heads,
        };
        Ok(Dims {
            hidden,
            intermediate: meta.arch_uint_req("feed_forward_length")?,
            layers: meta.arch_uint_req("block_count")?,
            heads,
            kv_heads,
            head_dim,
            context: meta.arch_uint("context_length")?,
            rms_eps: meta
                .arch_float("attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-6),
            rope_theta: meta.arch_float("rope.freq_base")?.unwrap_or(10000.0),
        })
    }
}

/// Converts a GGUF file into a Hugging Face model folder (which must exist), writing
/// `model.safetensors` (float32), `config.json`, `generation_config.json`, `tokenizer.json`,
/// `tokenizer_config.json` (with the chat template) and `special_tokens_map.json`.
/// Progress lines go to `progress`.
pub fn convert_gguf_to_hf(
    gguf: &Path,
    out_dir: &Path,
    progress: &dyn Fn(&str),
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut file = BufReader::with_capacity(
        1 << 20,
        File::open(gguf).with_context(|| format!("cannot open {}", gguf.display()))?,
    );
    let content = Content::read(&mut file)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("{} is not a readable GGUF file", gguf.display()))?;
    let meta = Meta::new(&content.metadata)?;
    let arch = Arch::parse(&meta.arch)?;
    let dims = Dims::read(&meta)?;
    progress(&format!(
        "convert: {} architecture, {} layers, hidden {}, {} heads ({} key/value), {} tensors",
        meta.arch,
        dims.layers,
        dims.hidden,
        dims.heads,
        dims.kv_heads,
        content.tensor_infos.len()
    ));

    // Tokenizer first: it is cheap and fails early on unsupported models.
    let tok = tokenizer::build(&meta, dims.context)?;
    for note in &tok.notes {
        progress(&format!("convert: note: {note}"));
    }

    // Tensors, in layer order.
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| tensor_order(n));
    let device = Device::Cpu;
    let mut weights: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut rope_freqs: Option<Vec<f32>> = None;
    let total = names.len();
    let mut reported = 0usize;
    for (i, gguf_name) in names.iter().enumerate() {
        let mapped = map_tensor_name(arch, gguf_name)?;
        let qtensor = content
            .tensor(&mut file, gguf_name, &device)
            .with_context(|| format!("cannot read tensor `{gguf_name}`"))?;
        let tensor = qtensor
            .dequantize(&device)
            .with_context(|| format!("cannot de-quantise `{gguf_name}` ({:?})", qtensor.dtype()))?;
        match mapped {
            Mapped::Skip => {
                if gguf_name.as_str() == "rope_freqs.weight" {
                    rope_freqs = Some(tensor.flatten_all()?.to_vec1::<f32>()?);
                }
            }
            Mapped::Tensor { name, heads } => {
                let tensor = match heads {
                    Some(h) => {
                        let n = match h {
                            Heads::Query => dims.heads,
                            Heads::Key => dims.kv_heads,
                        };
                        let rows = tensor.dims().first().copied().unwrap_or(0) as u64;
                        if rows != n * dims.head_dim {
                            bail!(
                                "`{gguf_name}` has {rows} rows, expected {n} heads × {}",
                                dims.head_dim
                            );
                        }
                        unpermute_rows(&tensor, n as usize)
                            .with_context(|| format!("cannot un-permute `{gguf_name}`"))?
                    }
                    None => tensor,
                };
                if weights.insert(name.clone(), tensor).is_some() {
                    bail!("two GGUF tensors map to `{name}`");
                }
            }
        }
        if (i + 1) * 10 / total > reported || i + 1 == total {
            reported = (i + 1) * 10 / total;
            progress(&format!(
                "convert: de-quantised {}/{total} tensors ({:.1} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            ));
        }
    }
    check_complete(arch, &dims, &weights)?;

    let embed_rows = weights
        .get("model.embed_tokens.weight")
        .map(|t| t.dims()[0])
        .unwrap_or(0);
    if embed_rows != tok.vocab_size {
        progress(&format!(
            "convert: note: the embedding has {embed_rows} rows for {} tokens; vocab_size = {embed_rows}",
            tok.vocab_size
        ));
    }
    let tied = !weights.contains_key("lm_head.weight");
    let attention_bias = weights.contains_key("model.layers.0.self_attn.q_proj.bias");
    let rope = rope_parameters(&meta, &dims, rope_freqs.as_deref())?;
    let config = hf_config(
        arch,
        &dims,
        &tok.specials,
        embed_rows,
        tied,
        attention_bias,
        rope,
    );

    let parameters: usize = weights.values().map(|t| t.elem_count()).sum();
    let st_path = out_dir.join("model.safetensors");
    progress(&format!(
        "convert: writing model.safetensors ({} tensors, {:.1} M parameters, {} MB float32)",
        weights.len(),
        parameters as f64 / 1e6,
        parameters * 4 / 1_000_000
    ));
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(weights.iter(), Some(metadata), &st_path)
        .with_context(|| format!("cannot write {}", st_path.display()))?;
    drop(weights);
    #[cfg(unix)]
    {
        // Written through a private temporary file (0600); readable like the other files.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&st_path, std::fs::Permissions::from_mode(0o644))?;
    }

    let generation = {
        let mut g = serde_json::Map::new();
        for (key, which) in [
            ("bos_token_id", &tok.specials.bos),
            ("eos_token_id", &tok.specials.eos),
            ("pad_token_id", &tok.specials.pad),
        ] {
            if let Some((id, _)) = which {
                g.insert(key.into(), json!(id));
            }
        }
        Json::Object(g)
    };
    write_json(&out_dir.join("config.json"), &config)?;
    write_json(&out_dir.join("generation_config.json"), &generation)?;
    write_json(&out_dir.join("tokenizer.json"), &tok.tokenizer_json)?;
    write_json(
        &out_dir.join("tokenizer_config.json"),
        &tok.tokenizer_config,
    )?;
    write_json(
        &out_dir.join("special_tokens_map.json"),
        &tok.special_tokens_map,
    )?;
    progress(&format!(
        "convert: wrote the Hugging Face files in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Sort key: global tensors first, then by layer number, then by name.
pub(crate) fn tensor_order(name: &str) -> (u64, String) {
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(n, _)| n.parse::<u64>().ok())
        .map(|n| n + 1)
        .unwrap_or(0);
    (layer, name.to_string())
}

/// Every layer must have its attention, MLP and norm weights.
fn check_complete(
    arch: Arch,
    dims: &Dims,
    weights: &BTreeMap<String, Tensor>,
) -> anyhow::Result<()> {
    let mut required: Vec<String> = vec![
        "model.embed_tokens.weight".into(),
        "model.norm.weight".into(),
    ];
    for l in 0..dims.layers {
        for m in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ] {
            required.push(format!("model.layers.{l}.{m}.weight"));
        }
        if arch == Arch::Qwen2 {
            for m in ["q_proj", "k_proj", "v_proj"] {
                required.push(format!("model.layers.{l}.self_attn.{m}.bias"));
            }
        }
    }
    let missing: Vec<&String> = required
        .iter()
        .filter(|n| !weights.contains_key(*n))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the GGUF file lacks {} expected tensors (first: {})",
            missing.len(),
            missing[0]
        );
    }
    let expected: HashSet<&String> = required.iter().collect();
    let extra_layers = weights
        .keys()
        .filter(|k| {
            k.starts_with("model.layers.") && !expected.contains(k) && !k.ends_with(".bias")
        })
        .count();
    if extra_layers > 0 {
        bail!("the GGUF file has {extra_layers} layer tensors beyond its `block_count`");
    }
    Ok(())
}

/// `rope_parameters` for config.json: default, linear/yarn scaling from metadata, or Llama 3
/// scaling recognised from the `rope_freqs` tensor.
fn rope_parameters(
    meta: &Meta<'_>,
    dims: &Dims,
    rope_freqs: Option<&[f32]>,
) -> anyhow::Result<Json> {
    let theta = dims.rope_theta;
    if let Some(freqs) = rope_freqs {
        let (factor, low, high, original) = llama3_rope(freqs, theta, dims.head_dim as usize)
            .context(
                "the GGUF file carries `rope_freqs` factors that match no known Llama 3 \
                 rope scaling; cannot write an equivalent config.json",
            )?;
        return Ok(json!({
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": original,
        }));
    }
    let kind = meta.arch_string("rope.scaling.type")?.unwrap_or("none");
    let factor = meta.arch_float("rope.scaling.factor")?;
    match (kind, factor) {
        ("none", _) | (_, None) => Ok(json!({"rope_type": "default", "rope_theta": theta})),
        ("linear", Some(f)) => Ok(json!({"rope_type": "linear", "rope_theta": theta, "factor": f})),
        ("yarn", Some(f)) => {
            let mut p = json!({"rope_type": "yarn", "rope_theta": theta, "factor": f});
            if let Some(orig) = meta.arch_uint("rope.scaling.original_context_length")? {
                p["original_max_position_embeddings"] = json!(orig);
            }
            Ok(p)
        }
        (other, _) => bail!("rope scaling `{other}` is not supported by the converter"),
    }
}

/// Llama 3.x rope factors as llama.cpp computes them.
pub(crate) fn llama3_rope_factors(
    theta: f64,
    head_dim: usize,
    factor: f64,
    low: f64,
    high: f64,
    original: f64,
) -> Vec<f64> {
    let low_wavelen = original / low;
    let high_wavelen = original / high;
    (0..head_dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / theta.powf(i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// Recognises the published Llama 3.1 / 3.2 parameter sets from the stored factors.
pub(crate) fn llama3_rope(
    freqs: &[f32],
    theta: f64,
    head_dim: usize,
) -> Option<(f64, f64, f64, u64)> {
    for factor in [8.0, 16.0, 32.0, 4.0, 2.0] {
        let (low, high, original) = (1.0, 4.0, 8192u64);
        let expected = llama3_rope_factors(theta, head_dim, factor, low, high, original as f64);
        if expected.len() == freqs.len()
            && expected
                .iter()
                .zip(freqs)
                .all(|(e, f)| ((*f as f64) - e).abs() <= 1e-4 * e.abs().max(1.0))
        {
            return Some((factor, low, high, original));
        }
    }
    None
}

fn hf_config(
    arch: Arch,
    dims: &Dims,
    specials: &tokenizer::Specials,
    vocab_size: usize,
    tied: bool,
    attention_bias: bool,
    rope: Json,
) -> Json {
    let mut c = json!({
        "architectures": [arch.class()],
        "model_type": arch.model_type(),
        "hidden_act": "silu",
        "hidden_size": dims.hidden,
        "intermediate_size": dims.intermediate,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "head_dim": dims.head_dim,
        "rms_norm_eps": dims.rms_eps,
        "rope_theta": dims.rope_theta,
        "rope_parameters": rope,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
        "dtype": "float32",
    });
    if let Some(ctx) = dims.context {
        c["max_position_embeddings"] = json!(ctx);
    }
    match arch {
        Arch::Llama => {
            c["attention_bias"] = json!(attention_bias);
            c["mlp_bias"] = json!(false);
            c["pretraining_tp"] = json!(1);
        }
        Arch::Qwen2 => {
            c["use_sliding_window"] = json!(false);
            c["max_window_layers"] = json!(dims.layers);
        }
    }
    if rope_is_scaled(&c) {
        let mut scaling = c["rope_parameters"].clone();
        if let Some(o) = scaling.as_object_mut() {
            o.remove("rope_theta");
        }
        c["rope_scaling"] = scaling;
    }
    for (key, which) in [
        ("bos_token_id", &specials.bos),
        ("eos_token_id", &specials.eos),
        ("pad_token_id", &specials.pad),
    ] {
        if let Some((id, _)) = which {
            c[key] = json!(id);
        }
    }
    c
}

fn rope_is_scaled(c: &Json) -> bool {
    c["rope_parameters"]["rope_type"].as_str() != Some("default")
}

fn write_json(path: &Path, value: &Json) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}
