//! Loading: GGUF files (kept quantised, re-quantised where candle has no fast kernel) and
//! Hugging Face folders, into the one layout (q/k in Hugging Face order, q/k/v and gate/up
//! fused).

use super::*;

/// A weight as read: quantised (GGUF) or dense (safetensors, or GGUF f32).
pub(super) enum Raw {
    Q(QTensor),
    F(Tensor),
}

impl Raw {
    pub(super) fn rows_cols(&self) -> anyhow::Result<(usize, usize)> {
        Ok(match self {
            Raw::Q(q) => q.shape().dims2()?,
            Raw::F(t) => t.dims2()?,
        })
    }

    pub(super) fn dense(&self) -> anyhow::Result<Tensor> {
        Ok(match self {
            Raw::Q(q) => q.dequantize(&Device::Cpu)?,
            Raw::F(t) => t.to_dtype(DType::F32)?,
        })
    }

    /// 1-D weights (norms, biases) as f32.
    pub(super) fn vector(&self) -> anyhow::Result<Tensor> {
        Ok(self.dense()?.flatten_all()?)
    }
}

/// The row order that undoes llama.cpp's q/k permutation for `n` heads: row `i` of the result
/// is row `order[i]` of the stored matrix. The inverse of
/// `reshape(n, 2, rows/n/2, …).swapaxes(1, 2)`.
pub(super) fn unpermute_order(rows: usize, n: usize) -> anyhow::Result<Vec<usize>> {
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

pub(super) fn reorder_rows(raw: Raw, order: &[usize]) -> anyhow::Result<Raw> {
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
pub(super) fn fuse(parts: Vec<Raw>, requantize: Requantize) -> anyhow::Result<QMatMul> {
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
pub(super) fn dense_as(dense: Tensor, target: GgmlDType) -> anyhow::Result<QMatMul> {
    Ok(match target {
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => QMatMul::Tensor(dense),
        t => QMatMul::from_qtensor(QTensor::quantize(&dense, t)?)?,
    })
}

/// Weights by Hugging Face name, from either source.
pub(super) struct Store {
    pub(super) tensors: HashMap<String, Raw>,
}

impl Store {
    pub(super) fn take(&mut self, name: &str) -> anyhow::Result<Raw> {
        self.tensors
            .remove(name)
            .with_context(|| format!("the weights have no `{name}`"))
    }

    pub(super) fn take_opt(&mut self, name: &str) -> Option<Raw> {
        self.tensors.remove(name)
    }

    pub(super) fn build(
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
        let own_format = |q: &QTensor| Format::from_ggml(q.dtype());
        let (embed, lm_head) = match embed_raw {
            // On the engine's kernels: one matrix for the lookup and, tied, the head.
            Raw::Q(q)
                if own_format(&q).is_some()
                    && requantize.target(q.dtype(), hidden) == q.dtype() =>
            {
                let format = own_format(&q).context("checked above")?;
                let m = std::sync::Arc::new(QuantMatrix::from_bytes(
                    format,
                    &q.data()?,
                    vocab,
                    hidden,
                )?);
                drop(q);
                let head = match lm_head_raw {
                    Some(r) => Linear::new(fuse(vec![r], requantize)?, None)?,
                    None => Linear {
                        w: Weight::Own(m.clone()),
                        b: None,
                    },
                };
                (Embedding::Own(m), head)
            }
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
        let config = ModelConfig {
            vocab_size: vocab,
            ..config
        };
        Model::assemble(config, embed, layers, norm, lm_head, &description)
    }
}

pub(super) fn rope_tables(c: &ModelConfig, device: &Device) -> anyhow::Result<(Tensor, Tensor)> {
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

pub(super) fn load_gguf(path: &Path, requantize: Requantize) -> anyhow::Result<Model> {
    let device = Device::Cpu;
    let mut file = BufReader::with_capacity(
        1 << 20,
        File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
    );
    let content = Content::read(&mut file)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
    let meta = Meta::new(&content.metadata)?;
    let family = crate::inference::config::Family::from_gguf_arch(&meta.arch)?;
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
pub(super) fn gguf_name(
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

/// The weight files of a Hugging Face folder: `model.safetensors`, or the shards its index
/// names.
fn weight_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    Ok(if single.is_file() {
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
    })
}

/// The quantised format a Hugging Face folder's float weights take at load, if any.
fn hf_target(requantize: Requantize) -> Option<GgmlDType> {
    match requantize {
        Requantize::Keep => None,
        Requantize::Auto => Some(GgmlDType::Q8_0),
        Requantize::To(GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => None,
        Requantize::To(t) => Some(t),
    }
}

/// Loads a Hugging Face folder: float32 with `Keep`, else quantised as it is read (Q8_0 for
/// `Auto`) and cached (see `cache`): a later load maps the cache instead.
pub(super) fn load_hf(dir: &Path, requantize: Requantize) -> anyhow::Result<Model> {
    let config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let files = weight_files(dir)?;
    let Some(target) = hf_target(requantize) else {
        return load_hf_f32(&files, config);
    };
    let format = format!("{target:?}").to_lowercase();
    let mut keyed = files.clone();
    keyed.push(dir.join("config.json"));
    let locations = cache::locations(dir, &keyed, &format);
    for path in &locations {
        if !path.is_file() {
            continue;
        }
        let started = std::time::Instant::now();
        match cache::read(
            path,
            config.clone(),
            &format!("safetensors as {target:?} (cached, mapped)"),
        ) {
            Ok(model) => {
                tracing::info!(cache = %path.display(), ms = started.elapsed().as_millis() as u64, "quantised weights mapped from the cache");
                return Ok(model);
            }
            Err(e) => {
                tracing::warn!(cache = %path.display(), error = %format!("{e:#}"), "unreadable weights cache: quantising again")
            }
        }
    }
    let started = std::time::Instant::now();
    let model = quantize_hf(&files, config, target)?;
    tracing::info!(secs = format!("{:.1}", started.elapsed().as_secs_f64()), format = %format, "float weights quantised at load");
    match cache::write(&model, &locations, &format) {
        Ok(Some(path)) => tracing::info!(cache = %path.display(), "quantised weights cached"),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "could not cache the quantised weights")
        }
    }
    Ok(model)
}

/// Whether a Hugging Face tensor is a matrix the model multiplies by (quantised at load).
fn is_matmul_weight(name: &str) -> bool {
    name.ends_with("_proj.weight")
        || name == "model.embed_tokens.weight"
        || name == "lm_head.weight"
}

/// One tensor's place in a safetensors file (its header entry).
#[derive(serde::Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// The tensors of a safetensors file: name → entry, offsets from the file's start.
fn safetensors_entries(file: &File) -> anyhow::Result<Vec<(String, Entry)>> {
    use std::os::unix::fs::FileExt;
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0)?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 {
        bail!("a safetensors header of {n} bytes");
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8)?;
    let map: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)?;
    let mut out = Vec::new();
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let mut e: Entry =
            serde_json::from_value(v).with_context(|| format!("the header entry of `{name}`"))?;
        e.data_offsets = [e.data_offsets[0] + 8 + n, e.data_offsets[1] + 8 + n];
        out.push((name, e));
    }
    // In file order: the reads go forward through the file.
    out.sort_by_key(|(_, e)| e.data_offsets[0]);
    Ok(out)
}

/// Reads one tensor into float32 (bf16, f16 and f32 weights).
fn read_f32(file: &File, e: &Entry, name: &str) -> anyhow::Result<Tensor> {
    use std::os::unix::fs::FileExt;
    let len = (e.data_offsets[1] - e.data_offsets[0]) as usize;
    let count: usize = e.shape.iter().product();
    let width = match e.dtype.as_str() {
        "BF16" | "F16" => 2,
        "F32" => 4,
        other => bail!("`{name}` is {other}: only BF16, F16 and F32 weights are read"),
    };
    if count * width != len {
        bail!("`{name}`: {len} bytes for {count} values of {}", e.dtype);
    }
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, e.data_offsets[0])
        .with_context(|| format!("cannot read `{name}`"))?;
    let values: Vec<f32> = match e.dtype.as_str() {
        "BF16" => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        "F16" => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    drop(bytes);
    Ok(Tensor::from_vec(values, e.shape.clone(), &Device::Cpu)?)
}

/// Reads the folder's weights tensor by tensor (positioned reads, not a mapping: the float
/// file never becomes resident), quantising each matrix as it comes: one tensor's float32
/// form is in memory at a time, never the model's.
fn quantize_hf(files: &[PathBuf], config: ModelConfig, target: GgmlDType) -> anyhow::Result<Model> {
    let mut dtypes: Vec<String> = Vec::new();
    let mut tensors = HashMap::new();
    for path in files {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        for (name, e) in safetensors_entries(&file)
            .with_context(|| format!("cannot read the header of {}", path.display()))?
        {
            if !dtypes.contains(&e.dtype) {
                dtypes.push(e.dtype.clone());
            }
            let t = read_f32(&file, &e, &name)?;
            let raw = match t.dims2() {
                Ok((_, cols))
                    if is_matmul_weight(&name) && cols.is_multiple_of(target.block_size()) =>
                {
                    Raw::Q(QTensor::quantize(&t, target)?)
                }
                _ => Raw::F(t),
            };
            tensors.insert(name, raw);
        }
    }
    let description = format!("safetensors ({}) as {target:?}", dtypes.join("+"));
    Store { tensors }.build(config, Requantize::Keep, description)
}

/// The folder's weights as float32 (`Keep`: the parity tests' reference).
fn load_hf_f32(files: &[PathBuf], config: ModelConfig) -> anyhow::Result<Model> {
    let device = Device::Cpu;
    let mut tensors = HashMap::new();
    let mut dtypes = Vec::new();
    for f in files {
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
