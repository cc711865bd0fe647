//! The quantised-weights cache: what a Hugging Face folder's float weights became at load
//! (fused, rows in order, quantised into the kernels' layout), written once as a safetensors
//! file and memory-mapped afterwards, so a second start takes seconds and the weights cost
//! no anonymous memory (the kernels read the mapped pages in place).
//!
//! Where: `<model>/.ferrotune/weights-<format>-<key>.safetensors` (a hidden folder: model
//! discovery does not see it), or, when the model folder is not writable (a read-only hub
//! snapshot), `<cache_root>/quantized/<folder key>/`. The key is a hash of the weight files'
//! names, sizes and modification times, the format and [`VERSION`]: new weights, a new
//! format or a new layout never read a stale cache. Older caches of the same folder go.
//!
//! Layout: per matrix `<name>.qs` (u8), `<name>.d`, `<name>.m`, `<name>.f` (f32; empty parts
//! left out), its format and shape in the file's metadata (`matrices`, JSON); norms and
//! biases as f32 vectors. The writer places f32 data first after an 8-byte-aligned header
//! (safetensors sorts by alignment), so every part maps aligned.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::*;
use crate::inference::kernels::{Buf, Format, Pod};

/// The cache layout's version: a change of layout makes every older cache stale.
const VERSION: &str = "3";

#[derive(Serialize, Deserialize)]
struct Shape {
    format: Format,
    rows: usize,
    cols: usize,
}

/// Where the cache of `dir`'s weights in `format` is (first: beside the model) for the
/// weight files `files`.
pub(super) fn locations(dir: &Path, files: &[PathBuf], format: &str) -> Vec<PathBuf> {
    let mut h = Sha256::new();
    h.update(VERSION);
    h.update(format);
    for f in files {
        h.update(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        if let Ok(meta) = std::fs::metadata(f) {
            h.update(meta.len().to_le_bytes());
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            h.update(mtime.to_le_bytes());
        }
    }
    let key = format!("{:x}", h.finalize());
    let name = format!("weights-{format}-{}.safetensors", &key[..16]);
    let folder_key = {
        let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        let k = format!(
            "{:x}",
            Sha256::digest(canonical.to_string_lossy().as_bytes())
        );
        k[..16].to_string()
    };
    vec![
        dir.join(".ferrotune").join(&name),
        crate::pyenv::cache_root()
            .join("quantized")
            .join(folder_key)
            .join(&name),
    ]
}

fn as_bytes<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: `T` is u8 or f32 (`Pod`): plain data without padding, so its bytes can be read.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Writes `model`'s weights to the first of `locations` that can be written; removes older
/// caches of the same format beside it. `Ok(None)` when the model is not all on the engine's
/// kernels (nothing to cache).
pub(super) fn write(
    model: &Model,
    locations: &[PathBuf],
    format: &str,
) -> anyhow::Result<Option<PathBuf>> {
    let own = |l: &Linear| match &l.w {
        Weight::Own(m) => Some(m.clone()),
        Weight::Candle(_) => None,
    };
    let Embedding::Own(embed) = &model.embed else {
        return Ok(None);
    };
    let mut matrices: Vec<(String, Arc<QuantMatrix>)> = vec![("embed".into(), embed.clone())];
    let head = own(&model.lm_head);
    let tied = head.as_ref().is_some_and(|h| Arc::ptr_eq(h, embed));
    match head {
        Some(h) if !tied => matrices.push(("head".into(), h)),
        Some(_) => {}
        None => return Ok(None),
    }
    let mut vectors: Vec<(String, Vec<f32>)> =
        vec![("norm".into(), plain::plain_vec(&model.norm)?)];
    for (i, l) in model.layers.iter().enumerate() {
        for (name, lin) in [
            ("qkv", &l.qkv),
            ("o", &l.o),
            ("gate_up", &l.gate_up),
            ("down", &l.down),
        ] {
            let Some(m) = own(lin) else {
                return Ok(None);
            };
            matrices.push((format!("l{i}.{name}"), m));
        }
        vectors.push((format!("l{i}.input_norm"), plain::plain_vec(&l.input_norm)?));
        vectors.push((format!("l{i}.post_norm"), plain::plain_vec(&l.post_norm)?));
        if let Some(n) = &l.q_norm {
            vectors.push((format!("l{i}.q_norm"), plain::plain_vec(n)?));
        }
        if let Some(n) = &l.k_norm {
            vectors.push((format!("l{i}.k_norm"), plain::plain_vec(n)?));
        }
        if let Some(b) = &l.qkv.b {
            vectors.push((format!("l{i}.qkv_bias"), plain::plain_vec(b)?));
        }
    }
    let mut shapes: HashMap<String, Shape> = HashMap::new();
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    for (name, m) in &matrices {
        let p = m.parts();
        shapes.insert(
            name.clone(),
            Shape {
                format: p.format,
                rows: p.rows,
                cols: p.cols,
            },
        );
        let parts: [(&str, Dtype, &[u8]); 4] = [
            ("qs", Dtype::U8, p.qs),
            ("d", Dtype::F32, as_bytes(p.d)),
            ("m", Dtype::F32, as_bytes(p.m)),
            ("f", Dtype::F32, as_bytes(p.f)),
        ];
        for (part, dtype, bytes) in parts {
            if bytes.is_empty() {
                continue;
            }
            let len = bytes.len() / if dtype == Dtype::U8 { 1 } else { 4 };
            views.push((
                format!("{name}.{part}"),
                TensorView::new(dtype, vec![len], bytes)?,
            ));
        }
    }
    for (name, v) in &vectors {
        views.push((
            name.clone(),
            TensorView::new(Dtype::F32, vec![v.len()], as_bytes(v))?,
        ));
    }
    let metadata = HashMap::from([
        ("ferrotune_cache".to_string(), VERSION.to_string()),
        ("format".to_string(), format.to_string()),
        ("matrices".to_string(), serde_json::to_string(&shapes)?),
        ("layers".to_string(), model.layers.len().to_string()),
        ("tied".to_string(), tied.to_string()),
    ]);
    let mut last_error = None;
    for path in locations {
        let Some(folder) = path.parent() else {
            continue;
        };
        if let Err(e) = std::fs::create_dir_all(folder) {
            last_error = Some(anyhow::Error::from(e));
            continue;
        }
        // Written under a temporary name and renamed: a reader never maps a half-written
        // cache, and two loads racing each write their own file.
        let tmp = match tempfile::Builder::new()
            .prefix(".weights-")
            .suffix(".partial")
            .tempfile_in(folder)
        {
            Ok(t) => t,
            Err(e) => {
                last_error = Some(e.into());
                continue;
            }
        };
        let written = safetensors::serialize_to_file(
            views.iter().map(|(n, v)| (n.as_str(), v)),
            Some(metadata.clone()),
            tmp.path(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))
        .and_then(|()| tmp.persist(path).map_err(|e| anyhow::Error::from(e.error)));
        match written {
            Ok(_) => {
                remove_older(folder, path, format);
                return Ok(Some(path.clone()));
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no place to write the weights cache")))
}

/// Removes the caches of `format` in `folder` other than `keep`.
fn remove_older(folder: &Path, keep: &Path, format: &str) {
    let prefix = format!("weights-{format}-");
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".safetensors") && e.path() != keep {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A model from its cache file, mapped: `config` from the model's config.json.
pub(super) fn read(path: &Path, config: ModelConfig, description: &str) -> anyhow::Result<Model> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the cache file is written once (to a temporary name, then renamed) and never
    // changed in place; a new cache gets a new name.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file)? });
    let st = SafeTensors::deserialize(&map[..])?;
    let (_, meta) = SafeTensors::read_metadata(&map[..])?;
    let info = meta.metadata().clone().unwrap_or_default();
    if info.get("ferrotune_cache").map(String::as_str) != Some(VERSION) {
        bail!("{} is not a weights cache of this version", path.display());
    }
    let shapes: HashMap<String, Shape> =
        serde_json::from_str(info.get("matrices").map_or("{}", String::as_str))?;
    let tied = info.get("tied").is_some_and(|t| t == "true");
    let base = map.as_ptr() as usize;
    let part = |name: &str| -> anyhow::Result<Option<(usize, usize)>> {
        match st.tensor(name) {
            Ok(v) => Ok(Some((v.data().as_ptr() as usize - base, v.data().len()))),
            Err(safetensors::SafeTensorError::TensorNotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    };
    let buf_u8 = |name: &str| -> anyhow::Result<Buf<u8>> {
        Ok(match part(name)? {
            Some((off, len)) => {
                Buf::mapped(map.clone(), off, len).context("a misplaced cache tensor")?
            }
            None => Buf::Owned(Vec::new()),
        })
    };
    let buf_f32 = |name: &str| -> anyhow::Result<Buf<f32>> {
        Ok(match part(name)? {
            Some((off, len)) => match Buf::mapped(map.clone(), off, len / 4) {
                Some(b) => b,
                // Not aligned (a cache written by another writer): read it into memory.
                None => Buf::Owned(
                    map[off..off + len]
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ),
            },
            None => Buf::Owned(Vec::new()),
        })
    };
    let matrix = |name: &str| -> anyhow::Result<Arc<QuantMatrix>> {
        let s = shapes
            .get(name)
            .with_context(|| format!("the cache has no matrix `{name}`"))?;
        Ok(Arc::new(QuantMatrix::from_parts(
            s.format,
            s.rows,
            s.cols,
            buf_u8(&format!("{name}.qs"))?,
            buf_f32(&format!("{name}.d"))?,
            buf_f32(&format!("{name}.m"))?,
            buf_f32(&format!("{name}.f"))?,
        )?))
    };
    let device = Device::Cpu;
    let vector = |name: &str| -> anyhow::Result<Option<Tensor>> {
        let v = buf_f32(name)?;
        Ok((!v.is_empty())
            .then(|| Tensor::from_slice(&v, v.len(), &device))
            .transpose()?)
    };
    let required = |name: &str| -> anyhow::Result<Tensor> {
        vector(name)?.with_context(|| format!("the cache has no `{name}`"))
    };
    let c = &config;
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let lin = |m: &str, b: Option<Tensor>| -> anyhow::Result<Linear> {
            Ok(Linear {
                w: Weight::Own(matrix(&format!("l{i}.{m}"))?),
                b,
            })
        };
        layers.push(Layer {
            input_norm: required(&format!("l{i}.input_norm"))?,
            post_norm: required(&format!("l{i}.post_norm"))?,
            q_norm: vector(&format!("l{i}.q_norm"))?,
            k_norm: vector(&format!("l{i}.k_norm"))?,
            qkv: lin("qkv", vector(&format!("l{i}.qkv_bias"))?)?,
            o: lin("o", None)?,
            gate_up: lin("gate_up", None)?,
            down: lin("down", None)?,
        });
    }
    let embed = matrix("embed")?;
    let lm_head = Linear {
        w: Weight::Own(if tied { embed.clone() } else { matrix("head")? }),
        b: None,
    };
    let config = ModelConfig {
        vocab_size: embed.rows(),
        ..config
    };
    Model::assemble(
        config,
        Embedding::Own(embed),
        layers,
        required("norm")?,
        lm_head,
        description,
    )
}
