//! Export: a LoRA adapter merged into its base (`W + s·B·A`), or a full fine-tune, written as
//! a Hugging Face safetensors folder (f32/f16/bf16) or as one GGUF file (f32, f16, Q8_0,
//! Q4_0, Q4_K_M) with an Ollama `Modelfile` beside it.
//!
//! The GGUF is written in Rust (candle's GGUF writer and quantisers) from the base model's
//! own GGUF: its metadata (architecture, tokenizer, chat template) is copied and its tensor
//! list is followed, each tensor taken from the merged weights under its Hugging Face name
//! ([`super::convert::map_tensor_name`]) with llama.cpp's q/k row permutation re-applied. So
//! a base model needs its GGUF for a GGUF export (every pulled model has one); a base that is
//! only a Hugging Face folder exports safetensors.
//!
//! Which tensors get which type follows llama.cpp's `llama_tensor_get_type` for the types
//! offered: norms stay f32; with Q4_0 and Q4_K_M the output head (the token embedding when
//! it is tied) is Q6_K; Q4_K_M puts `attn_v` and `ffn_down` of the layers `use_more_bits`
//! picks in Q6_K and the rest in Q4_K; a row whose length is not a multiple of 256 falls back
//! as llama.cpp does (Q4_K → Q5_0, Q6_K → Q8_0).
//!
//! Merging an adapter whose change ΔW is small next to the quantisation step can lose the
//! fine-tune (`benches/merge_loss.py`); a GGUF export of an adapter measures how much of ΔW
//! survives (`retention`: `Σ⟨Q(W+ΔW) − W, ΔW⟩ / Σ‖ΔW‖²` over the adapted weights — 1 keeps
//! it all, 0 keeps none) and warns when a 4-bit export keeps less than [`WARN_RETENTION`].

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::BaseModel;
use super::convert::{Arch, Heads, Mapped, map_tensor_name, permute_rows, unpermute_rows};
use super::gguf::Meta;

/// Below this share of ΔW kept, a 4-bit export carries a warning.
pub const WARN_RETENTION: f64 = 0.75;

/// The files an export writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// A Hugging Face folder: `model.safetensors` (sharded above 2 GB), `config.json`, the
    /// tokenizer files.
    Safetensors,
    /// One `.gguf` file (llama.cpp, Ollama, ferrotune) and an Ollama `Modelfile`.
    Gguf,
}

/// The number type of the exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    #[serde(rename = "q4_k_m")]
    Q4KM,
}

impl Quantization {
    pub fn name(self) -> &'static str {
        match self {
            Quantization::F32 => "f32",
            Quantization::F16 => "f16",
            Quantization::Bf16 => "bf16",
            Quantization::Q8_0 => "q8_0",
            Quantization::Q4_0 => "q4_0",
            Quantization::Q4KM => "q4_k_m",
        }
    }

    /// Whether `format` can hold it; the message says what can.
    pub fn check(self, format: ExportFormat) -> Result<(), String> {
        let ok = match format {
            ExportFormat::Safetensors => matches!(
                self,
                Quantization::F32 | Quantization::F16 | Quantization::Bf16
            ),
            ExportFormat::Gguf => !matches!(self, Quantization::Bf16),
        };
        if ok {
            return Ok(());
        }
        Err(match format {
            ExportFormat::Safetensors => format!(
                "quantization: safetensors exports are f32, f16 or bf16 (not {})",
                self.name()
            ),
            ExportFormat::Gguf => format!(
                "quantization: GGUF exports are f32, f16, q8_0, q4_0 or q4_k_m (not {})",
                self.name()
            ),
        })
    }

    fn four_bit(self) -> bool {
        matches!(self, Quantization::Q4_0 | Quantization::Q4KM)
    }

    /// llama.cpp's `llama_ftype` number (`general.file_type`).
    fn file_type(self) -> u32 {
        match self {
            Quantization::F32 => 0,
            Quantization::F16 => 1,
            Quantization::Q4_0 => 2,
            Quantization::Q8_0 => 7,
            Quantization::Q4KM => 15,
            Quantization::Bf16 => 32,
        }
    }
}

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportSource {
    /// The base model (of the adapter, or the one a full fine-tune started from: its GGUF
    /// gives a GGUF export its metadata).
    pub base: BaseModel,
    /// A LoRA adapter folder to merge into the base.
    pub adapter: Option<PathBuf>,
    /// A full fine-tune's folder (whole weights and tokenizer files), instead of the base's.
    pub full: Option<PathBuf>,
    /// The exported model's name (`general.name`, the GGUF's file name).
    pub name: String,
    /// The system prompt it was trained with (the Modelfile's `SYSTEM`).
    pub system: Option<String>,
}

/// What an export wrote.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExportReport {
    /// The files, with their sizes in bytes.
    pub files: Vec<ExportedFile>,
    pub seconds: f64,
    /// Share of the adapter's weight change kept by the quantisation (GGUF exports of
    /// adapters).
    pub retention: Option<f64>,
    /// Why the export may not behave like the model it came from.
    pub warning: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExportedFile {
    pub name: String,
    pub size: u64,
}

/// Says how far an export is (`0..=1`, what it does); `false` back stops it.
pub type Progress<'a> = &'a dyn Fn(f64, &str) -> bool;

/// The tokenizer and configuration files copied into a safetensors export.
const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// Shards of a safetensors export hold at most this many bytes.
const SHARD_BYTES: usize = 2 << 30;

/// One adapted weight: A, B, the scale, and a DoRA's magnitude.
struct Delta {
    a: Tensor,
    b: Tensor,
    scale: f64,
    magnitude: Option<Tensor>,
}

/// The adapter's weight changes by Hugging Face weight name (`….q_proj.weight` → ΔW).
struct Deltas {
    by_weight: HashMap<String, Delta>,
}

impl Deltas {
    fn load(dir: &Path) -> anyhow::Result<Deltas> {
        let cfg = crate::inference::lora::read_config(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
        let file = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let mut pairs: HashMap<String, crate::inference::lora::PairSlots> = HashMap::new();
        for (name, t) in tensors {
            let (module, which) =
                crate::inference::lora::split_name(&name).map_err(|e| anyhow::anyhow!("{e}"))?;
            let t = t.to_dtype(DType::F32)?;
            let slot = pairs.entry(module).or_default();
            match which {
                'A' => slot.0 = Some(t),
                'B' => slot.1 = Some(t),
                _ => slot.2 = Some(t),
            }
        }
        let mut by_weight = HashMap::new();
        for (module, (a, b, magnitude)) in pairs {
            let (Some(a), Some(b)) = (a, b) else {
                bail!("`{module}` has only one of lora_A and lora_B");
            };
            if cfg.use_dora && magnitude.is_none() {
                bail!("`{module}` has no DoRA magnitude, though the adapter says `use_dora`");
            }
            let (_, scale) = cfg.rank_and_scale(&module);
            by_weight.insert(
                format!("{module}.weight"),
                Delta {
                    a,
                    b,
                    scale,
                    magnitude,
                },
            );
        }
        if by_weight.is_empty() {
            bail!("{} holds no LoRA weights", file.display());
        }
        Ok(Deltas { by_weight })
    }

    /// The change ΔW the adapter makes to the weight `w` named `name`, when it changes it:
    /// `s·B·A` for a LoRA; for a DoRA, `m/‖W + s·B·A‖ ⊙ (W + s·B·A) − W` (the norm per output
    /// row, PEFT's merge).
    fn delta(&self, name: &str, w: &Tensor) -> anyhow::Result<Option<Tensor>> {
        let Some(delta) = self.by_weight.get(name) else {
            return Ok(None);
        };
        let d = (delta.b.matmul(&delta.a)? * delta.scale)?;
        if d.dims() != w.dims() {
            bail!(
                "the adapter's change to `{name}` is {:?}; the weight is {:?} (an adapter \
                 for another base model?)",
                d.dims(),
                w.dims()
            );
        }
        let Some(m) = &delta.magnitude else {
            return Ok(Some(d));
        };
        let rows = w.dim(0)?;
        if m.dims() != [rows] {
            bail!(
                "the DoRA magnitude of `{name}` is {:?}; the weight has {rows} rows",
                m.dims()
            );
        }
        let adapted = (w + &d)?;
        let norms = adapted.sqr()?.sum_keepdim(1)?.sqrt()?;
        let gains = m.reshape((rows, 1))?.div(&norms)?;
        Ok(Some((adapted.broadcast_mul(&gains)? - w)?))
    }
}

/// The source's weights (the full fine-tune's, else the base's) and the adapter's changes.
struct Weights {
    files: MmapedSafetensors,
    names: Vec<String>,
    deltas: Option<Deltas>,
}

impl Weights {
    fn open(src: &ExportSource) -> anyhow::Result<Weights> {
        let dir = weights_dir(src)?;
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            bail!("{} holds no .safetensors weights", dir.display());
        }
        // SAFETY: the weight files are not modified while an export reads them (trained
        // models' files are written once; base models are replaced by renaming folders).
        let files = unsafe { MmapedSafetensors::multi(&paths)? };
        let mut names: Vec<String> = files.tensors().into_iter().map(|(n, _)| n).collect();
        names.sort_by_key(|n| super::convert::tensor_order(n));
        let deltas = match &src.adapter {
            Some(a) => Some(Deltas::load(a)?),
            None => None,
        };
        if let Some(d) = &deltas
            && let Some(missing) = d.by_weight.keys().find(|k| !names.contains(k))
        {
            bail!("the adapter changes `{missing}`, which the base model does not have");
        }
        Ok(Weights {
            files,
            names,
            deltas,
        })
    }

    /// The weight `name` in f32 and, for an adapted weight, (W, ΔW) apart.
    fn get(&self, name: &str) -> anyhow::Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let w = self.files.load(name, &Device::Cpu)?.to_dtype(DType::F32)?;
        let delta = match &self.deltas {
            Some(d) => d.delta(name, &w)?,
            None => None,
        };
        Ok(match delta {
            Some(d) => ((&w + &d)?, Some((w, d))),
            None => (w, None),
        })
    }
}

fn weights_dir(src: &ExportSource) -> anyhow::Result<PathBuf> {
    match (&src.full, &src.base.hf_dir) {
        (Some(full), _) => Ok(full.clone()),
        (None, Some(hf)) => Ok(hf.clone()),
        (None, None) => bail!(
            "the base model `{}` has no Hugging Face weights (config.json + safetensors) to \
             merge into",
            src.base.name
        ),
    }
}

/// Writes the export into `out_dir` (which must exist and be empty).
pub fn export(
    src: &ExportSource,
    format: ExportFormat,
    quant: Quantization,
    out_dir: &Path,
    progress: Progress<'_>,
) -> anyhow::Result<ExportReport> {
    quant.check(format).map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let weights = Weights::open(src)?;
    let mut report = match format {
        ExportFormat::Safetensors => write_safetensors(src, &weights, quant, out_dir, progress)?,
        ExportFormat::Gguf => write_gguf(src, &weights, quant, out_dir, progress)?,
    };
    report.seconds = started.elapsed().as_secs_f64();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(out_dir)? {
        let entry = entry?;
        files.push(ExportedFile {
            name: entry.file_name().to_string_lossy().into_owned(),
            size: entry.metadata()?.len(),
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    report.files = files;
    Ok(report)
}

fn stopped() -> anyhow::Error {
    anyhow::anyhow!("cancelled")
}

fn write_safetensors(
    src: &ExportSource,
    weights: &Weights,
    quant: Quantization,
    out_dir: &Path,
    progress: Progress<'_>,
) -> anyhow::Result<ExportReport> {
    let dtype = match quant {
        Quantization::F32 => DType::F32,
        Quantization::F16 => DType::F16,
        _ => DType::BF16,
    };
    // Shards of at most SHARD_BYTES, written as they fill (memory stays near one shard).
    let mut shards: Vec<Vec<String>> = vec![Vec::new()];
    let mut current: HashMap<String, Tensor> = HashMap::new();
    let mut bytes = 0usize;
    let mut total_bytes = 0usize;
    let tmp_name = |i: usize| format!(".shard-{i}.safetensors");
    let total = weights.names.len();
    for (i, name) in weights.names.iter().enumerate() {
        if !progress(i as f64 / total as f64 * 0.95, &format!("merging {name}")) {
            return Err(stopped());
        }
        let (w, _) = weights.get(name)?;
        let t = w.to_dtype(dtype)?;
        let size = t.elem_count() * dtype.size_in_bytes();
        if bytes > 0 && bytes + size > SHARD_BYTES {
            let shard = std::mem::take(&mut current);
            candle_core::safetensors::save(&shard, out_dir.join(tmp_name(shards.len() - 1)))?;
            shards.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        total_bytes += size;
        if let Some(last) = shards.last_mut() {
            last.push(name.clone());
        }
        current.insert(name.clone(), t);
    }
    candle_core::safetensors::save(&current, out_dir.join(tmp_name(shards.len() - 1)))?;
    drop(current);
    let n = shards.len();
    let final_name = |i: usize| {
        if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        }
    };
    for i in 0..n {
        std::fs::rename(out_dir.join(tmp_name(i)), out_dir.join(final_name(i)))?;
    }
    if n > 1 {
        let mut map = serde_json::Map::new();
        for (i, names) in shards.iter().enumerate() {
            for name in names {
                map.insert(name.clone(), serde_json::Value::String(final_name(i)));
            }
        }
        let index = serde_json::json!({
            "metadata": {"total_size": total_bytes},
            "weight_map": map,
        });
        std::fs::write(
            out_dir.join("model.safetensors.index.json"),
            serde_json::to_vec_pretty(&index)?,
        )?;
    }
    // The tokenizer and configuration, from the fine-tune's folder first, else the base's.
    let dirs: Vec<PathBuf> = [src.full.clone(), src.base.hf_dir.clone()]
        .into_iter()
        .flatten()
        .collect();
    for file in SIDE_FILES {
        let Some(from) = dirs.iter().map(|d| d.join(file)).find(|p| p.is_file()) else {
            continue;
        };
        if *file == "config.json" {
            let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&from)?)
                .with_context(|| format!("{} is not JSON", from.display()))?;
            if let Some(obj) = config.as_object_mut() {
                let name = match dtype {
                    DType::F32 => "float32",
                    DType::F16 => "float16",
                    _ => "bfloat16",
                };
                obj.insert("torch_dtype".into(), name.into());
                if obj.contains_key("dtype") {
                    obj.insert("dtype".into(), name.into());
                }
            }
            std::fs::write(out_dir.join(file), serde_json::to_vec_pretty(&config)?)?;
        } else {
            std::fs::copy(&from, out_dir.join(file))?;
        }
    }
    progress(1.0, "written");
    Ok(ExportReport::default())
}

/// llama.cpp's `use_more_bits`: the layers Q4_K_M keeps at 6 bits for `attn_v`/`ffn_down`.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
}

/// The GGUF type of one tensor (see the module's notes).
fn tensor_type(
    quant: Quantization,
    gguf_name: &str,
    shape: &[usize],
    output_like: bool,
    layers: usize,
) -> GgmlDType {
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    let cols = *shape.last().unwrap_or(&0);
    let fallback = |t: GgmlDType| -> GgmlDType {
        if cols.is_multiple_of(256) {
            return t;
        }
        match t {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            other => other,
        }
    };
    let layer = gguf_name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse::<usize>().ok());
    let t = match quant {
        Quantization::F32 => GgmlDType::F32,
        Quantization::F16 => GgmlDType::F16,
        Quantization::Bf16 => GgmlDType::BF16,
        Quantization::Q8_0 => GgmlDType::Q8_0,
        Quantization::Q4_0 if output_like => GgmlDType::Q6K,
        Quantization::Q4_0 => GgmlDType::Q4_0,
        Quantization::Q4KM if output_like => GgmlDType::Q6K,
        Quantization::Q4KM => match layer {
            Some(i)
                if (gguf_name.contains(".attn_v.") || gguf_name.contains(".ffn_down."))
                    && use_more_bits(i, layers) =>
            {
                GgmlDType::Q6K
            }
            _ => GgmlDType::Q4K,
        },
    };
    let t = fallback(t);
    // Whatever the type, its blocks must tile the rows.
    if !cols.is_multiple_of(t.block_size()) {
        return GgmlDType::F16;
    }
    t
}

fn write_gguf(
    src: &ExportSource,
    weights: &Weights,
    quant: Quantization,
    out_dir: &Path,
    progress: Progress<'_>,
) -> anyhow::Result<ExportReport> {
    let base_gguf = src.base.gguf.as_ref().with_context(|| {
        format!(
            "the base model `{}` has no GGUF file to take the tokenizer and architecture \
             metadata from; export safetensors instead",
            src.base.name
        )
    })?;
    let mut reader = BufReader::new(
        File::open(base_gguf).with_context(|| format!("cannot open {}", base_gguf.display()))?,
    );
    let content = Content::read(&mut reader)
        .with_context(|| format!("{} is not a readable GGUF file", base_gguf.display()))?;
    let meta = Meta::new(&content.metadata)?;
    let arch = Arch::parse(&meta.arch)?;
    let heads = meta.arch_uint_req("attention.head_count")? as usize;
    let kv_heads = meta
        .arch_uint("attention.head_count_kv")?
        .map(|v| v as usize)
        .unwrap_or(heads);
    let layers = meta.arch_uint_req("block_count")? as usize;
    let has_output = content.tensor_infos.contains_key("output.weight");

    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| super::convert::tensor_order(n));
    let total = names.len();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(total);
    let (mut kept, mut change) = (0f64, 0f64);
    for (i, gguf_name) in names.iter().enumerate() {
        if !progress(
            i as f64 / total as f64 * 0.9,
            &format!("quantising {gguf_name}"),
        ) {
            return Err(stopped());
        }
        let (hf_name, permute) = match map_tensor_name(arch, gguf_name)? {
            Mapped::Skip => {
                // Not a weight of the HF checkpoint (rope factors): the base's, as it is.
                let t = content.tensor(&mut reader, gguf_name, &Device::Cpu)?;
                tensors.push((gguf_name.to_string(), t));
                continue;
            }
            Mapped::Tensor { name, heads: h } => (name, h),
        };
        let hf_name = if weights.names.contains(&hf_name) {
            hf_name
        } else if hf_name == "lm_head.weight" {
            // A tied head stored once, as the embedding.
            "model.embed_tokens.weight".to_string()
        } else {
            bail!("the weights have no `{hf_name}` (for the GGUF tensor `{gguf_name}`)");
        };
        let (w, parts) = weights.get(&hf_name)?;
        let n = match permute {
            Some(Heads::Query) => Some(heads),
            Some(Heads::Key) => Some(kv_heads),
            None => None,
        };
        let w = match n {
            Some(n) => permute_rows(&w, n)?,
            None => w,
        };
        let expected: Vec<usize> = content.tensor_infos[*gguf_name].shape.dims().to_vec();
        if w.dims() != expected.as_slice() {
            bail!(
                "`{hf_name}` is {:?}; the base GGUF's `{gguf_name}` is {expected:?}",
                w.dims()
            );
        }
        let output_like =
            *gguf_name == "output.weight" || (!has_output && *gguf_name == "token_embd.weight");
        let dtype = tensor_type(quant, gguf_name, &expected, output_like, layers);
        let q = QTensor::quantize(&w, dtype)
            .with_context(|| format!("cannot quantise `{gguf_name}` to {dtype:?}"))?;
        if let Some((base, delta)) = parts {
            let back = q.dequantize(&Device::Cpu)?;
            let back = match n {
                Some(n) => unpermute_rows(&back, n)?,
                None => back,
            };
            kept += ((back - &base)? * &delta)?.sum_all()?.to_scalar::<f32>()? as f64;
            change += delta.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        tensors.push((gguf_name.to_string(), q));
    }

    // Metadata: the base's, with this file's name and type.
    let mut metadata: BTreeMap<String, Value> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.insert("general.name".into(), Value::String(src.name.clone()));
    metadata.insert("general.file_type".into(), Value::U32(quant.file_type()));
    metadata.insert("general.quantization_version".into(), Value::U32(2));
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    if !progress(0.92, "writing the GGUF file") {
        return Err(stopped());
    }
    let file_name = gguf_file_name(&src.name, quant);
    let tmp = out_dir.join(format!(".{file_name}.partial"));
    {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        candle_core::quantized::gguf_file::write(&mut w, &md, &ts)?;
        std::io::Write::flush(&mut w)?;
    }
    std::fs::rename(&tmp, out_dir.join(&file_name))?;
    let template = meta.string("tokenizer.chat_template").ok().flatten();
    std::fs::write(
        out_dir.join("Modelfile"),
        modelfile(&file_name, template, src.system.as_deref()),
    )?;
    progress(1.0, "written");

    let retention = (src.adapter.is_some() && change > 0.0).then(|| kept / change);
    let warning = match retention {
        Some(r) if quant.four_bit() && r < WARN_RETENTION => Some(format!(
            "{} keeps {:.0}% of the adapter's weight change (ΔW is small next to a 4-bit \
             step): the exported model may answer more like its base than the fine-tune. \
             q8_0 or f16 keep nearly all of it.",
            quant.name(),
            r * 100.0
        )),
        _ => None,
    };
    Ok(ExportReport {
        retention,
        warning,
        ..ExportReport::default()
    })
}

/// `<name>.<QUANT>.gguf`, with the name made safe for a file name.
pub fn gguf_file_name(name: &str, quant: Quantization) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let safe = safe.trim_matches(['-', '.']);
    let safe = if safe.is_empty() { "model" } else { safe };
    format!("{safe}.{}.gguf", quant.name().to_uppercase())
}

/// An Ollama `Modelfile` for the GGUF: `FROM`, and for the chat formats it recognises in the
/// model's template (ChatML, Llama 3) the same format as a Go template with its stop token;
/// otherwise Ollama reads the template stored in the GGUF itself.
pub fn modelfile(gguf: &str, chat_template: Option<&str>, system: Option<&str>) -> String {
    let mut out =
        format!("# Ollama: ollama create <name> -f Modelfile (in this folder)\nFROM ./{gguf}\n");
    let t = chat_template.unwrap_or("");
    if t.contains("<|im_start|>") {
        out.push_str(
            "TEMPLATE \"\"\"{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n\
             {{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n\
             {{ end }}<|im_start|>assistant\n\"\"\"\nPARAMETER stop \"<|im_end|>\"\n",
        );
    } else if t.contains("<|start_header_id|>") {
        out.push_str(
            "TEMPLATE \"\"\"{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n\
             {{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>\
             {{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}\
             <|start_header_id|>assistant<|end_header_id|>\n\n\"\"\"\nPARAMETER stop \"<|eot_id|>\"\n",
        );
    } else {
        out.push_str("# TEMPLATE: Ollama uses the chat template stored in the GGUF file.\n");
    }
    if let Some(s) = system.filter(|s| !s.trim().is_empty()) {
        out.push_str(&format!(
            "SYSTEM \"\"\"{}\"\"\"\n",
            s.replace("\"\"\"", "\"")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_types_follow_llama_cpp() {
        // SmolLM2's rows of 576 are not a multiple of 256: K-quants fall back.
        let t = |q, name, shape: &[usize], out| tensor_type(q, name, shape, out, 30);
        assert_eq!(
            t(Quantization::Q4KM, "blk.0.attn_norm.weight", &[576], false),
            GgmlDType::F32
        );
        assert_eq!(
            t(
                Quantization::Q4KM,
                "blk.5.attn_q.weight",
                &[576, 576],
                false
            ),
            GgmlDType::Q5_0
        );
        assert_eq!(
            t(
                Quantization::Q4KM,
                "blk.4.ffn_down.weight",
                &[576, 1536],
                false
            ),
            GgmlDType::Q4K
        );
        assert_eq!(
            t(
                Quantization::Q4KM,
                "blk.0.ffn_down.weight",
                &[576, 1536],
                false
            ),
            GgmlDType::Q6K
        );
        assert_eq!(
            t(Quantization::Q4KM, "token_embd.weight", &[49152, 576], true),
            GgmlDType::Q8_0
        );
        assert_eq!(
            t(
                Quantization::Q4_0,
                "token_embd.weight",
                &[49152, 4096],
                true
            ),
            GgmlDType::Q6K
        );
        assert_eq!(
            t(
                Quantization::Q4_0,
                "blk.1.attn_k.weight",
                &[192, 576],
                false
            ),
            GgmlDType::Q4_0
        );
        assert_eq!(
            t(
                Quantization::Q8_0,
                "blk.1.attn_k.weight",
                &[192, 576],
                false
            ),
            GgmlDType::Q8_0
        );
        assert_eq!(
            t(Quantization::F16, "blk.1.attn_k.weight", &[192, 576], false),
            GgmlDType::F16
        );
        // llama.cpp's pattern for 32 layers: 0–3, 28–31 and every third from 6.
        let more: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            more,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }

    #[test]
    fn formats_take_their_own_number_types() {
        assert!(Quantization::Q8_0.check(ExportFormat::Safetensors).is_err());
        assert!(Quantization::Bf16.check(ExportFormat::Gguf).is_err());
        assert!(Quantization::Q4KM.check(ExportFormat::Gguf).is_ok());
        assert!(Quantization::Bf16.check(ExportFormat::Safetensors).is_ok());
        assert_eq!(
            serde_json::to_value(Quantization::Q4KM).ok(),
            Some(serde_json::json!("q4_k_m"))
        );
    }

    #[test]
    fn modelfiles_carry_the_chat_format() {
        let m = modelfile(
            "m.Q8_0.gguf",
            Some("{{'<|im_start|>' + role}}"),
            Some("Be brief."),
        );
        assert!(m.contains("FROM ./m.Q8_0.gguf"));
        assert!(m.contains("PARAMETER stop \"<|im_end|>\""));
        assert!(m.contains("SYSTEM \"\"\"Be brief.\"\"\""));
        let m = modelfile("m.gguf", Some("<|start_header_id|>"), None);
        assert!(m.contains("<|eot_id|>"));
        assert!(modelfile("m.gguf", None, None).contains("stored in the GGUF"));
        assert_eq!(
            gguf_file_name("my model/v2", Quantization::Q4KM),
            "my-model-v2.Q4_K_M.gguf"
        );
    }
}
