//! Criterion benchmark of one decode step (one token through the whole model, with a KV cache
//! holding a chat prompt) of SmolLM2-135M-Instruct: the GGUF as served (Q4_1 re-quantised to
//! Q8_0), the GGUF's Q4_1 kept as is, and the float32 safetensors, each with and without a
//! LoRA adapter.
//!
//! ```sh
//! cargo bench --bench decode                      # models from ~/.cache/ferrotune/test-models
//! FERROTUNE_BENCH_ADAPTER=/path/to/peft/folder cargo bench --bench decode
//! ```
//! Without `FERROTUNE_BENCH_ADAPTER` the adapter is a random rank-8 LoRA on every projection
//! (the same work as a trained one).

use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use ferrotune::inference::text::ChatAssets;
use ferrotune::inference::{ChatMessage, Model, Requantize, WeightsSource, lora};

fn models_dir() -> PathBuf {
    std::env::var_os("FERROTUNE_TEST_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| ferrotune::pyenv::cache_root().join("test-models"))
}

/// A random PEFT adapter (r = 8, every projection) written for `assets`'s model shape.
fn random_adapter(assets: &ChatAssets, dir: &std::path::Path) -> anyhow::Result<()> {
    use candle_core::{Device, Tensor};
    let c = &assets.config;
    let (h, q, kv, i) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
    let mut tensors = std::collections::HashMap::new();
    for l in 0..c.num_layers {
        for (m, inf, outf) in [
            ("self_attn.q_proj", h, q),
            ("self_attn.k_proj", h, kv),
            ("self_attn.v_proj", h, kv),
            ("self_attn.o_proj", q, h),
            ("mlp.gate_proj", h, i),
            ("mlp.up_proj", h, i),
            ("mlp.down_proj", i, h),
        ] {
            let p = format!("base_model.model.model.layers.{l}.{m}");
            tensors.insert(
                format!("{p}.lora_A.weight"),
                Tensor::randn(0f32, 0.02, (8, inf), &Device::Cpu)?,
            );
            tensors.insert(
                format!("{p}.lora_B.weight"),
                Tensor::randn(0f32, 0.02, (outf, 8), &Device::Cpu)?,
            );
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"}"#,
    )?;
    Ok(())
}

fn bench(c: &mut Criterion) {
    let dir = models_dir();
    let Ok(Some(found)) = ferrotune::models::find_base_model(&dir, "SmolLM2-135M-Instruct") else {
        eprintln!(
            "decode bench: no SmolLM2-135M-Instruct in {} (run `ferrotune models pull` there)",
            dir.display()
        );
        return;
    };
    let tmp = tempfile::tempdir().ok();
    let mut variants: Vec<(&str, WeightsSource, Requantize)> = Vec::new();
    if let Some(g) = &found.gguf {
        variants.push((
            "gguf-q8_0",
            WeightsSource::Gguf(g.clone()),
            Requantize::Auto,
        ));
        variants.push((
            "gguf-q4_1-kept",
            WeightsSource::Gguf(g.clone()),
            Requantize::Keep,
        ));
        variants.push((
            "gguf-q4_0",
            WeightsSource::Gguf(g.clone()),
            Requantize::To(candle_core::quantized::GgmlDType::Q4_0),
        ));
    }
    if found.hf_dir.is_some() {
        variants.push((
            "safetensors-f32",
            WeightsSource::Hf(found.path.clone()),
            Requantize::Keep,
        ));
    }
    let mut group = c.benchmark_group("decode_step");
    group.sample_size(20);
    for (name, source, requant) in variants {
        let (assets, model) = match (
            ChatAssets::load(&found.path, source.clone()),
            Model::load(&source, requant),
        ) {
            (Ok(a), Ok(m)) => (a, m),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("decode bench: cannot load {name}: {e:#}");
                continue;
            }
        };
        let adapter_dir = match std::env::var_os("FERROTUNE_BENCH_ADAPTER") {
            Some(d) => Some(PathBuf::from(d)),
            None => tmp.as_ref().and_then(|t| {
                let d = t.path().join("lora");
                std::fs::create_dir_all(&d).ok()?;
                random_adapter(&assets, &d).ok()?;
                Some(d)
            }),
        };
        let adapter = adapter_dir.and_then(|d| lora::load(&d, &assets.config).ok());
        let Ok(text) = assets
            .template
            .render(&[ChatMessage::new("user", "Tell me about the sea.")], true)
        else {
            continue;
        };
        let Ok(prompt) = assets.encode(&text) else {
            continue;
        };
        for (label, lora) in [("", None), ("+lora", adapter.as_ref())] {
            let mut cache = model.new_cache();
            if model.forward(&prompt, &mut cache, lora, false).is_err() {
                continue;
            }
            let at = cache.len();
            group.bench_function(format!("{name}{label}"), |b| {
                b.iter(|| {
                    cache.truncate(at);
                    model
                        .forward(&[42], &mut cache, lora, false)
                        .map(|l| l.dims1().ok())
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
