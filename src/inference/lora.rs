//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`), applied unmerged:
//! `y = W·x + s·B·(A·x)`, so one base model in memory serves any number of adapters.
//!
//! The model fuses q/k/v and gate/up into single matmuls; an adapter is laid out the same way
//! at load: the A matrices of a fused group are stacked (one `x·Aᵀ` for the group) and each
//! rank's scaled row of Bᵀ is kept with the output rows it covers (the fused matrix would be
//! block-diagonal: the zero blocks, and modules without a LoRA, are not stored). The engine's
//! kernels add the term inside their matmul (`kernels::LowRank`).
//!
//! DoRA adapters (`use_dora`) also carry a magnitude `m` per output of each adapted module:
//! `y = m/‖W + s·B·A‖ ⊙ (W·x + s·B·A·x) + bias`, the norm taken per output row (PEFT's
//! `DoraLinearLayer`, the norm treated as a constant as the paper suggests). The gain
//! `m/‖W + s·B·A‖` depends on the base weights, so it is computed once per adapter by the
//! model that runs it ([`LoraPair::needs_gains`], [`LoraPair::set_gains`]); the kernels then
//! multiply each adapted row's outputs by it after adding the low-rank term.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value as Json;

use super::EngineError;
use super::config::ModelConfig;
use super::kernels::LowRank;

/// The A and B halves of one adapted projection and its DoRA magnitude, as they are found.
pub(crate) type PairSlots = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// One fused group's LoRA, ready to multiply.
pub struct LoraPair {
    /// The stacked A matrices (ΣR × in, row-major).
    a: Vec<f32>,
    /// Per rank, the scaled row of Bᵀ: (first output column, values over the module's outputs).
    b: Vec<(usize, Vec<f32>)>,
    /// `a` and a dense `ΣR × out` form of `b` as tensors on a model's device, made at first
    /// use there (the device-generic forward path: candle's kernels, the GPU).
    on_device: std::sync::OnceLock<(Tensor, Tensor)>,
    /// DoRA's magnitudes, when the adapter is a DoRA.
    dora: Option<Dora>,
}

/// DoRA's part of a fused group.
struct Dora {
    /// Per adapted module of the group: its first output in the fused projection and its
    /// magnitudes `m` (one per output).
    magnitude: Vec<(usize, Vec<f32>)>,
    /// `m / ‖W + s·B·A‖` per output of the fused projection (1 where no module of the group
    /// is a DoRA), set against the base weights before first use.
    gains: std::sync::OnceLock<Vec<f32>>,
    /// `gains` as a `1 × out` tensor on a model's device.
    on_device: std::sync::OnceLock<Tensor>,
}

impl LoraPair {
    /// `x·Aᵀ·B` for `x` (`tokens × in`) on `x`'s device, `out` outputs wide.
    pub(crate) fn term(&self, x: &Tensor, out: usize) -> candle_core::Result<Tensor> {
        let made;
        let (a, b) = match self.on_device.get() {
            Some((a, b)) if a.device().same_device(x.device()) && b.dim(1)? == out => (a, b),
            _ => {
                made = self.tensors(x.device(), out)?;
                let _ = self.on_device.set(made.clone());
                (&made.0, &made.1)
            }
        };
        x.matmul(&a.t()?)?.matmul(b)
    }

    /// A DoRA's gains as a `1 × out` tensor on `device` (`None` for a plain LoRA). An error
    /// when they were not set ([`LoraPair::set_gains`]).
    pub(crate) fn gains_on(&self, device: &Device) -> candle_core::Result<Option<Tensor>> {
        let Some(d) = &self.dora else {
            return Ok(None);
        };
        let Some(g) = d.gains.get() else {
            candle_core::bail!("the DoRA adapter's gains were not computed for this model");
        };
        if let Some(t) = d.on_device.get()
            && t.device().same_device(device)
        {
            return Ok(Some(t.clone()));
        }
        let t = Tensor::from_slice(g, (1, g.len()), device)?;
        let _ = d.on_device.set(t.clone());
        Ok(Some(t))
    }

    /// True for a DoRA whose gains are still to be computed against the base weights.
    pub(crate) fn needs_gains(&self) -> bool {
        self.dora.as_ref().is_some_and(|d| d.gains.get().is_none())
    }

    /// The stacked A matrices (`ΣR × in`, row-major): what [`LoraPair::set_gains`] needs
    /// multiplied by the base weights.
    pub(crate) fn a(&self) -> &[f32] {
        &self.a
    }

    /// Sets a DoRA's gains `m / ‖W + s·B·A‖` from the base weights of its fused projection:
    /// `w_norms_sq` (‖W_i‖² per output, `out` of them) and `aw` (`A·Wᵀ`, `ΣR × out`), using
    /// `‖W_i + Σ_j b_ij A_j‖² = ‖W_i‖² + 2 Σ_j b_ij (A_j·W_i) + Σ_jk b_ij b_ik (A_j·A_k)` over
    /// the ranks `j, k` of output i's module (`b` already holds the scale `s`).
    pub(crate) fn set_gains(&self, w_norms_sq: &[f32], aw: &[f32]) -> Result<(), EngineError> {
        let Some(d) = &self.dora else {
            return Ok(());
        };
        let out = w_norms_sq.len();
        let ranks = self.b.len();
        let k = self.a.len().checked_div(ranks).unwrap_or(0);
        if aw.len() != ranks * out {
            return Err(EngineError::Internal(format!(
                "DoRA: A·Wᵀ has {} values, expected {ranks} × {out}",
                aw.len()
            )));
        }
        let mut gains = vec![1f32; out];
        for (first, m) in &d.magnitude {
            if first + m.len() > out {
                return Err(EngineError::Invalid(format!(
                    "a DoRA magnitude does not fit the layer's {out} outputs"
                )));
            }
            // The module's ranks: those whose row of Bᵀ starts at its first output.
            let js: Vec<usize> = (0..ranks).filter(|&j| self.b[j].0 == *first).collect();
            // Their Gram matrix A_j·A_k, in f64 (a difference of large norms is taken).
            let gram: Vec<f64> = js
                .iter()
                .flat_map(|&j| {
                    js.iter().map(move |&l| {
                        self.a[j * k..(j + 1) * k]
                            .iter()
                            .zip(&self.a[l * k..(l + 1) * k])
                            .map(|(x, y)| f64::from(*x) * f64::from(*y))
                            .sum::<f64>()
                    })
                })
                .collect();
            for (o, &mag) in m.iter().enumerate() {
                let i = first + o;
                let bs: Vec<f64> = js.iter().map(|&j| f64::from(self.b[j].1[o])).collect();
                let cross: f64 = js
                    .iter()
                    .zip(&bs)
                    .map(|(&j, b)| b * f64::from(aw[j * out + i]))
                    .sum();
                let mut lora = 0f64;
                for (p, bp) in bs.iter().enumerate() {
                    for (q, bq) in bs.iter().enumerate() {
                        lora += bp * bq * gram[p * js.len() + q];
                    }
                }
                let norm = (f64::from(w_norms_sq[i]) + 2.0 * cross + lora)
                    .max(0.0)
                    .sqrt();
                gains[i] = if norm > 0.0 {
                    (f64::from(mag) / norm) as f32
                } else {
                    1.0
                };
            }
        }
        let _ = d.gains.set(gains);
        Ok(())
    }

    fn tensors(&self, device: &Device, out: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let r = self.b.len();
        let cols = self.a.len().checked_div(r).unwrap_or(0);
        let mut dense = vec![0f32; r * out];
        for (i, (first, values)) in self.b.iter().enumerate() {
            if first + values.len() > out {
                candle_core::bail!("the adapter's outputs do not fit the layer's {out}");
            }
            dense[i * out + first..][..values.len()].copy_from_slice(values);
        }
        Ok((
            Tensor::from_slice(&self.a, (r, cols), device)?,
            Tensor::from_vec(dense, (r, out), device)?,
        ))
    }

    /// A and B for the kernels (`QuantMatrix::matmul` adds the term inside its pass;
    /// [`LoraPair::term`] for weights on candle's kernels).
    pub(crate) fn rows(&self) -> LowRank<'_> {
        LowRank {
            a: &self.a,
            b: &self.b,
            gains: self
                .dora
                .as_ref()
                .and_then(|d| d.gains.get())
                .map(|g| &g[..]),
        }
    }

    /// Bytes held.
    fn bytes(&self) -> usize {
        let b: usize = self.b.iter().map(|(_, v)| v.len()).sum();
        let m: usize = self.dora.as_ref().map_or(0, |d| {
            d.magnitude.iter().map(|(_, m)| 2 * m.len()).sum::<usize>()
        });
        (self.a.len() + b + m) * 4
    }
}

/// The LoRA of one decoder layer, per fused projection.
#[derive(Default)]
pub struct LayerLora {
    pub(crate) qkv: Option<LoraPair>,
    pub(crate) o: Option<LoraPair>,
    pub(crate) gate_up: Option<LoraPair>,
    pub(crate) down: Option<LoraPair>,
}

/// A loaded adapter, laid out for one model shape.
pub struct LoraAdapter {
    pub path: PathBuf,
    pub(crate) layers: Vec<LayerLora>,
    /// Bytes of the tensors held (what the adapter cache counts).
    pub bytes: usize,
    /// Modules adapted, e.g. `q_proj`, `v_proj`.
    pub modules: Vec<String>,
    pub rank: usize,
    /// A DoRA (weight-decomposed) adapter.
    pub dora: bool,
}

impl LoraAdapter {
    /// True while some DoRA gains are still to be computed against the base weights.
    pub(crate) fn pending_gains(&self) -> bool {
        self.layers.iter().any(|l| {
            [&l.qkv, &l.o, &l.gate_up, &l.down]
                .into_iter()
                .flatten()
                .any(LoraPair::needs_gains)
        })
    }
}

/// The settings of `adapter_config.json` the engine reads.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub base_model: Option<String>,
    /// DoRA: every adapted module also has a magnitude vector.
    pub use_dora: bool,
}

#[derive(Deserialize)]
struct RawConfig {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    rank_pattern: Option<BTreeMap<String, usize>>,
    #[serde(default)]
    alpha_pattern: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    modules_to_save: Option<Json>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    use_qalora: bool,
    #[serde(default)]
    target_parameters: Option<Json>,
    #[serde(default)]
    trainable_token_indices: Option<Json>,
    #[serde(default)]
    alora_invocation_tokens: Option<Json>,
    #[serde(default)]
    layer_replication: Option<Json>,
    base_model_name_or_path: Option<String>,
}

fn non_empty(v: &Option<Json>) -> bool {
    match v {
        None | Some(Json::Null) => false,
        Some(Json::Array(a)) => !a.is_empty(),
        Some(Json::Object(o)) => !o.is_empty(),
        Some(_) => true,
    }
}

/// Reads and checks `adapter_config.json` in `dir`: what the engine cannot apply is refused
/// here, with the reason.
pub fn read_config(dir: &Path) -> Result<AdapterConfig, EngineError> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            EngineError::Invalid(format!(
                "{} is not a PEFT adapter (no adapter_config.json)",
                dir.display()
            ))
        } else {
            EngineError::Internal(format!("cannot read {}: {e}", path.display()))
        }
    })?;
    let raw: RawConfig = serde_json::from_slice(&text)
        .map_err(|e| EngineError::Invalid(format!("adapter_config.json: {e}")))?;
    let unsupported = |what: &str| {
        Err(EngineError::Unsupported(format!(
            "the adapter uses {what}, which chat does not support"
        )))
    };
    match raw.peft_type.as_deref() {
        Some("LORA") | None => {}
        Some(other) => return unsupported(&format!("PEFT type {other} (only LORA is)")),
    }
    if non_empty(&raw.modules_to_save) {
        return unsupported("`modules_to_save` (fully trained modules)");
    }
    if raw.bias.as_deref().is_some_and(|b| b != "none") || raw.lora_bias {
        return unsupported("trained biases (`bias`/`lora_bias`)");
    }
    if raw.use_qalora {
        return unsupported("QALoRA");
    }
    if non_empty(&raw.target_parameters) {
        return unsupported("`target_parameters`");
    }
    if non_empty(&raw.trainable_token_indices) {
        return unsupported("`trainable_token_indices`");
    }
    if non_empty(&raw.alora_invocation_tokens) {
        return unsupported("activated LoRA (`alora_invocation_tokens`)");
    }
    if non_empty(&raw.layer_replication) {
        return unsupported("`layer_replication`");
    }
    let r = raw
        .r
        .ok_or_else(|| EngineError::Invalid("adapter_config.json has no `r`".into()))?;
    if r == 0 {
        return Err(EngineError::Invalid("adapter rank `r` is 0".into()));
    }
    Ok(AdapterConfig {
        r,
        lora_alpha: raw.lora_alpha.unwrap_or(8.0),
        use_rslora: raw.use_rslora,
        rank_pattern: raw.rank_pattern.unwrap_or_default(),
        alpha_pattern: raw.alpha_pattern.unwrap_or_default(),
        base_model: raw.base_model_name_or_path,
        use_dora: raw.use_dora,
    })
}

/// PEFT's pattern lookup (`get_pattern_key`): the first pattern that matches the module's
/// full name or a dotted suffix of it, as a regular expression.
fn pattern_value<'a, T>(patterns: &'a BTreeMap<String, T>, module: &str) -> Option<&'a T> {
    patterns.iter().find_map(|(p, v)| {
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")).ok()?;
        re.is_match(module).then_some(v)
    })
}

impl AdapterConfig {
    /// (rank, scale) of one module, e.g. `model.layers.3.self_attn.q_proj`.
    pub(crate) fn rank_and_scale(&self, module: &str) -> (usize, f64) {
        let r = *pattern_value(&self.rank_pattern, module).unwrap_or(&self.r);
        let alpha = *pattern_value(&self.alpha_pattern, module).unwrap_or(&self.lora_alpha);
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        (r, scale)
    }
}

/// The projections a LoRA may target, by their Hugging Face module name.
const PROJECTIONS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// (in, out) features of a projection.
fn features(cfg: &ModelConfig, proj: &str) -> (usize, usize) {
    let (h, q, kv, i) = (
        cfg.hidden_size,
        cfg.q_size(),
        cfg.kv_size(),
        cfg.intermediate_size,
    );
    match proj {
        "q_proj" => (h, q),
        "k_proj" | "v_proj" => (h, kv),
        "o_proj" => (q, h),
        "gate_proj" | "up_proj" => (h, i),
        _ => (i, h),
    }
}

/// Loads an adapter for a model of shape `cfg`: every tensor is checked against the model.
pub fn load(dir: &Path, cfg: &ModelConfig) -> Result<LoraAdapter, EngineError> {
    let ac = read_config(dir)?;
    let file = dir.join("adapter_model.safetensors");
    if !file.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() {
            " (adapter_model.bin, the pickle format, is not read: save with safetensors)"
        } else {
            ""
        };
        return Err(EngineError::Invalid(format!(
            "{} has no adapter_model.safetensors{hint}",
            dir.display()
        )));
    }
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
        .map_err(|e| EngineError::Invalid(format!("cannot read {}: {e}", file.display())))?;
    let invalid = |m: String| EngineError::Invalid(m);

    // (layer, projection) → (A: r × in, B: out × r)
    let mut a_b: HashMap<(usize, &'static str), PairSlots> = HashMap::new();
    for (name, t) in tensors {
        let (module, which) = split_name(&name)?;
        let (layer, proj) = parse_module(&module)?;
        if layer >= cfg.num_layers {
            return Err(invalid(format!(
                "adapter tensor `{name}` is for layer {layer}; the model has {}",
                cfg.num_layers
            )));
        }
        let t = t
            .to_dtype(DType::F32)
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let entry = a_b.entry((layer, proj)).or_default();
        match which {
            'A' => entry.0 = Some(t),
            'B' => entry.1 = Some(t),
            _ => entry.2 = Some(t),
        }
    }
    if a_b.is_empty() {
        return Err(invalid(format!("{} holds no LoRA weights", file.display())));
    }

    let mut layers: Vec<LayerLora> = (0..cfg.num_layers).map(|_| LayerLora::default()).collect();
    let mut modules: Vec<String> = Vec::new();
    let mut rank = 0;
    let mut bytes = 0;
    let mut dora = false;
    let groups: [(&[&'static str], u8); 4] = [
        (&["q_proj", "k_proj", "v_proj"], 0),
        (&["o_proj"], 1),
        (&["gate_proj", "up_proj"], 2),
        (&["down_proj"], 3),
    ];
    for (li, layer) in layers.iter_mut().enumerate() {
        for (projs, slot) in groups {
            let in_features = features(cfg, projs[0]).0;
            let out_total: usize = projs.iter().map(|p| features(cfg, p).1).sum();
            // (A: r × in, scaled B: out × r, output offset)
            let mut parts: Vec<(Tensor, Tensor, usize)> = Vec::new();
            // (output offset, DoRA magnitudes)
            let mut magnitudes: Vec<(usize, Vec<f32>)> = Vec::new();
            let mut offset = 0;
            for p in projs.iter() {
                let (inf, outf) = features(cfg, p);
                if let Some((a, b, m)) = a_b.remove(&(li, *p)) {
                    let name = format!("model.layers.{li}.{}.{p}", group_of(p));
                    let (a, b) = match (a, b) {
                        (Some(a), Some(b)) => (a, b),
                        _ => {
                            return Err(invalid(format!(
                                "`{name}` has only one of lora_A and lora_B"
                            )));
                        }
                    };
                    match m {
                        Some(m) => {
                            if m.dims() != [outf] {
                                return Err(invalid(format!(
                                    "`{name}`: the DoRA magnitude is {:?}; the model needs \
                                     [{outf}]",
                                    m.dims()
                                )));
                            }
                            magnitudes.push((offset, m.to_vec1::<f32>().map_err(internal)?));
                        }
                        None if ac.use_dora => {
                            return Err(invalid(format!(
                                "`{name}` has no DoRA magnitude (`lora_magnitude_vector`), \
                                 though the adapter's config says `use_dora`"
                            )));
                        }
                        None => {}
                    }
                    let (r, scale) = ac.rank_and_scale(&name);
                    if a.dims() != [r, inf] || b.dims() != [outf, r] {
                        return Err(invalid(format!(
                            "`{name}`: lora_A is {:?} and lora_B {:?}; the model needs \
                             [{r}, {inf}] and [{outf}, {r}] (an adapter for another base model?)",
                            a.dims(),
                            b.dims()
                        )));
                    }
                    rank = rank.max(r);
                    if !modules.iter().any(|m| m == p) {
                        modules.push(p.to_string());
                    }
                    let b = (b * scale).map_err(internal)?;
                    parts.push((a, b, offset));
                }
                offset += outf;
            }
            if parts.is_empty() {
                continue;
            }
            let mut pair = fuse_pair(&parts, in_features, out_total).map_err(internal)?;
            if !magnitudes.is_empty() {
                dora = true;
                pair.dora = Some(Dora {
                    magnitude: magnitudes,
                    gains: std::sync::OnceLock::new(),
                    on_device: std::sync::OnceLock::new(),
                });
            }
            bytes += pair.bytes();
            let target = match slot {
                0 => &mut layer.qkv,
                1 => &mut layer.o,
                2 => &mut layer.gate_up,
                _ => &mut layer.down,
            };
            *target = Some(pair);
        }
    }
    modules.sort_by_key(|m| PROJECTIONS.iter().position(|p| p == m));
    Ok(LoraAdapter {
        path: dir.to_path_buf(),
        layers,
        bytes,
        modules,
        rank,
        dora,
    })
}

fn internal(e: candle_core::Error) -> EngineError {
    EngineError::Internal(e.to_string())
}

fn group_of(proj: &str) -> &'static str {
    if proj.ends_with("_proj") && ["q_proj", "k_proj", "v_proj", "o_proj"].contains(&proj) {
        "self_attn"
    } else {
        "mlp"
    }
}

/// The A matrices of a fused group stacked (ΣR × in), and each rank's row of Bᵀ with the
/// offset of its module's outputs in the fused projection.
fn fuse_pair(
    parts: &[(Tensor, Tensor, usize)],
    in_features: usize,
    out_total: usize,
) -> candle_core::Result<LoraPair> {
    let mut a = Vec::new();
    let mut b = Vec::new();
    for (part_a, part_b, offset) in parts {
        let ((_, cols), (out, _)) = (part_a.dims2()?, part_b.dims2()?);
        if cols != in_features || offset + out > out_total {
            candle_core::bail!("a LoRA pair does not fit its projection");
        }
        a.extend(part_a.contiguous()?.flatten_all()?.to_vec1::<f32>()?);
        for row in part_b.t()?.contiguous()?.to_vec2::<f32>()? {
            b.push((*offset, row));
        }
    }
    Ok(LoraPair {
        a,
        b,
        on_device: std::sync::OnceLock::new(),
        dora: None,
    })
}

/// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` →
/// (`model.layers.0.self_attn.q_proj`, 'A'); 'B' for `lora_B`, 'M' for a DoRA magnitude
/// (`lora_magnitude_vector`). Also accepts an adapter name before `weight`.
pub(crate) fn split_name(name: &str) -> Result<(String, char), EngineError> {
    let unsupported = |what: &str| {
        EngineError::Unsupported(format!(
            "adapter tensor `{name}` is {what}, which chat does not support"
        ))
    };
    let stripped = name.strip_prefix("base_model.model.").unwrap_or(name);
    for (marker, which) in [(".lora_A.", 'A'), (".lora_B.", 'B')] {
        if let Some((module, rest)) = stripped.split_once(marker) {
            if rest == "weight" || rest.ends_with(".weight") {
                return Ok((module.to_string(), which));
            }
            if rest.ends_with("bias") {
                return Err(unsupported("a LoRA bias"));
            }
        }
    }
    // PEFT saves DoRA's magnitude as `….lora_magnitude_vector` (older versions with
    // `.weight`, or the adapter's name and `.weight`, after it).
    if let Some((module, rest)) = stripped.split_once(".lora_magnitude_vector")
        && (rest.is_empty() || rest.ends_with("weight"))
    {
        return Ok((module.to_string(), 'M'));
    }
    if stripped.contains("lora_embedding_") {
        return Err(unsupported("an embedding LoRA"));
    }
    Err(unsupported("not a LoRA matrix (a fully trained module?)"))
}

/// `model.layers.3.mlp.down_proj` → (3, "down_proj").
fn parse_module(module: &str) -> Result<(usize, &'static str), EngineError> {
    let bad = || {
        EngineError::Unsupported(format!(
            "the adapter has a LoRA on `{module}`; chat supports LoRA on the attention and MLP \
             projections ({}) only",
            PROJECTIONS.join(", ")
        ))
    };
    let rest = module.strip_prefix("model.layers.").ok_or_else(bad)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(bad)?;
    let layer: usize = layer.parse().map_err(|_| bad())?;
    let proj = rest.rsplit('.').next().ok_or_else(bad)?;
    let proj = PROJECTIONS
        .iter()
        .find(|p| **p == proj)
        .copied()
        .ok_or_else(bad)?;
    let expected = format!("{}.{proj}", group_of(proj));
    if rest != expected {
        return Err(bad());
    }
    Ok((layer, proj))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write_config(dir: &Path, v: Json) {
        std::fs::write(dir.join("adapter_config.json"), v.to_string()).unwrap();
    }

    #[test]
    fn refuses_what_it_cannot_apply() {
        let d = tempfile::tempdir().unwrap();
        for (extra, word) in [
            (json!({"modules_to_save": ["lm_head"]}), "modules_to_save"),
            (json!({"peft_type": "IA3"}), "IA3"),
            (json!({"bias": "all"}), "biases"),
        ] {
            let mut v = json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            write_config(d.path(), v);
            match read_config(d.path()) {
                Err(EngineError::Unsupported(m)) => assert!(m.contains(word), "{m}"),
                other => panic!("{word}: {:?}", other.map(|_| ())),
            }
        }
        write_config(
            d.path(),
            json!({"peft_type": "LORA", "r": 8, "modules_to_save": null}),
        );
        assert!(read_config(d.path()).is_ok());
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_config(empty.path()),
            Err(EngineError::Invalid(_))
        ));
    }

    #[test]
    fn patterns_follow_peft() {
        let c = AdapterConfig {
            r: 8,
            lora_alpha: 16.0,
            use_rslora: false,
            rank_pattern: BTreeMap::from([
                ("q_proj".into(), 4),
                ("layers.1.mlp.down_proj".into(), 2),
            ]),
            alpha_pattern: BTreeMap::from([("v_proj".into(), 4.0)]),
            base_model: None,
            use_dora: false,
        };
        assert_eq!(
            c.rank_and_scale("model.layers.0.self_attn.q_proj"),
            (4, 4.0)
        );
        assert_eq!(
            c.rank_and_scale("model.layers.0.self_attn.v_proj"),
            (8, 0.5)
        );
        assert_eq!(c.rank_and_scale("model.layers.1.mlp.down_proj"), (2, 8.0));
        assert_eq!(c.rank_and_scale("model.layers.11.mlp.down_proj"), (8, 2.0));
        let rs = AdapterConfig {
            use_rslora: true,
            ..c
        };
        assert_eq!(
            rs.rank_and_scale("model.layers.0.mlp.up_proj"),
            (8, 16.0 / 8f64.sqrt())
        );
    }

    #[test]
    fn names() {
        assert_eq!(
            split_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").unwrap(),
            ("model.layers.0.self_attn.q_proj".to_string(), 'A')
        );
        assert_eq!(
            parse_module("model.layers.12.mlp.down_proj").unwrap(),
            (12, "down_proj")
        );
        assert!(matches!(
            parse_module("lm_head"),
            Err(EngineError::Unsupported(_))
        ));
        for name in [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight",
        ] {
            assert_eq!(
                split_name(name).unwrap(),
                ("model.layers.0.self_attn.q_proj".to_string(), 'M')
            );
        }
        assert!(matches!(
            split_name("base_model.model.lm_head.weight"),
            Err(EngineError::Unsupported(_))
        ));
    }

    #[test]
    fn fused_layout_equals_per_module_lora() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 6), &dev).unwrap();
        let a1 = Tensor::randn(0f32, 1.0, (2, 6), &dev).unwrap();
        let b1 = Tensor::randn(0f32, 1.0, (4, 2), &dev).unwrap();
        let a3 = Tensor::randn(0f32, 1.0, (3, 6), &dev).unwrap();
        let b3 = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        // Three projections of 4, 2 and 5 outputs; the middle one has no LoRA.
        let pair = fuse_pair(
            &[(a1.clone(), b1.clone(), 0), (a3.clone(), b3.clone(), 6)],
            6,
            11,
        )
        .unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let mut out = vec![0f32; 3 * 11];
        pair.rows().add_to(&xs, &mut out);
        let fused: Vec<Vec<f32>> = out.chunks(11).map(|r| r.to_vec()).collect();
        // The device-generic form (candle's kernels, the GPU) computes the same.
        let term: Vec<Vec<f32>> = pair.term(&x, 11).unwrap().to_vec2().unwrap();
        for (a, b) in term.iter().flatten().zip(fused.iter().flatten()) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        let d1: Vec<Vec<f32>> = x
            .matmul(&a1.t().unwrap())
            .unwrap()
            .matmul(&b1.t().unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        let d3: Vec<Vec<f32>> = x
            .matmul(&a3.t().unwrap())
            .unwrap()
            .matmul(&b3.t().unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        for r in 0..3 {
            for c in 0..11 {
                let want = if c < 4 {
                    d1[r][c]
                } else if c < 6 {
                    0.0
                } else {
                    d3[r][c - 6]
                };
                assert!((fused[r][c] - want).abs() < 1e-4, "{r},{c}");
            }
        }
    }
}
