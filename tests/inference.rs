//! Inference parity and behaviour: ferrotune's candle engine against transformers + peft (the
//! training environment's Python, in `FERROTUNE_TRAIN_PYTHON`), on SmolLM2-135M-Instruct with
//! a LoRA trained here, and on tiny random models of every supported family.
//!
//! Tolerances (logits, float32): safetensors path vs transformers ≤ 2e-3 absolute (observed
//! ~1e-4: summation order only); GGUF path (Q4_1 re-quantised to Q8_0, activations quantised
//! to 8 bits inside the matmul, as llama.cpp does) vs transformers on the de-quantised
//! weights ≤ 1.0 absolute on logits of magnitude ~20, same top token; 32 greedy tokens equal
//! in both cases.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use ferrotune::inference::text::{ChatAssets, tokenizer_from_gguf};
use ferrotune::inference::{
    ChatMessage, Engine, EngineError, EngineOptions, FinishReason, GenEvent, GenerateRequest,
    InferenceDevice, KvPrecision, Model, Placement, Requantize, SamplingParams, WeightsFormat,
    WeightsSource, lora,
};
use serde_json::{Value, json};

const MODEL: &str = "SmolLM2-135M-Instruct";

fn python() -> PathBuf {
    match std::env::var_os("FERROTUNE_TRAIN_PYTHON").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "FERROTUNE_TRAIN_PYTHON is not set: the inference parity tests compare with \
             transformers + peft in the training environment. Run them through `make test`, or \
             set FERROTUNE_TRAIN_PYTHON=$(ferrotune setup --print-python)"
        ),
    }
}

/// Runs tests/python/inference_reference.py with `req`.
fn reference(req: Value) -> Value {
    let tmp = tempfile::tempdir().unwrap();
    let (input, output) = (tmp.path().join("req.json"), tmp.path().join("out.json"));
    std::fs::write(&input, req.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/inference_reference.py");
    let out = std::process::Command::new(python())
        .arg(&script)
        .arg(&input)
        .arg(&output)
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .expect("run the reference script");
    assert!(
        out.status.success(),
        "reference script failed ({}): {}",
        req["op"],
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap()
}

fn test_models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERROTUNE_TEST_MODELS_DIR") {
        return PathBuf::from(dir);
    }
    ferrotune::pyenv::cache_root().join("test-models")
}

/// The model with 32-bit KV caches: the comparisons with transformers then hold to float
/// rounding (the default half-float caches are checked against them apart).
fn full(mut model: Model) -> Model {
    model.set_kv_precision(KvPrecision::Full);
    model
}

/// The largest |Δlogit| allowed against a float reference: `float` where the engine's float
/// kernels ran (float rounding only); 1e-2 where its integer kernels did (AVX-512 VNNI: the
/// activations rounded to 16 bits per block move SmolLM2's logits, max ≈27, by up to ≈5e-3 —
/// the greedy tokens, asserted apart, stay the same).
fn tol(model: &Model, float: f64) -> f64 {
    if model.description.contains("integer activations") {
        1e-2
    } else {
        float
    }
}

/// The SmolLM2 folder (GGUF + its exact de-quantised Hugging Face form), pulled when missing.
/// The GGUF file of the test model (pulled by [`smollm2`] first).
fn smollm2_gguf() -> PathBuf {
    smollm2();
    ferrotune::models::find_base_model(&test_models_dir(), MODEL)
        .unwrap()
        .unwrap()
        .gguf
        .unwrap()
}

fn smollm2() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = test_models_dir();
    if let Ok(Some(m)) = ferrotune::models::find_base_model(&dir, MODEL)
        && m.gguf.is_some()
        && m.hf_dir.is_some()
    {
        return m.path;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = rt
        .block_on(ferrotune::models::pull(
            &dir,
            ferrotune::models::DEFAULT_MODEL,
            &python(),
            |l: &str| eprintln!("pull: {l}"),
        ))
        .expect("pull the test model");
    m.path
}

/// A LoRA trained here with peft on the arithmetic examples (cached beside the test models,
/// in a hidden folder that model discovery skips).
fn trained_adapter() -> PathBuf {
    static ADAPTER: OnceLock<PathBuf> = OnceLock::new();
    ADAPTER
        .get_or_init(|| {
            let model = smollm2();
            let dir = test_models_dir().join(".ferrotune-test-lora-v1");
            if dir.join("adapter_model.safetensors").is_file() {
                return dir;
            }
            let tmp =
                test_models_dir().join(format!(".ferrotune-test-lora-tmp-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            let started = Instant::now();
            let r =
                reference(json!({"op": "train_lora", "model_dir": model, "out": tmp, "steps": 30}));
            let loss: Vec<f64> = serde_json::from_value(r["loss"].clone()).unwrap();
            eprintln!(
                "trained the test LoRA in {:.0} s, loss {:.3} → {:.4}",
                started.elapsed().as_secs_f64(),
                loss[0],
                loss[loss.len() - 1]
            );
            assert!(
                loss[loss.len() - 1] < 0.2 * loss[0],
                "the LoRA learned: {loss:?}"
            );
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).unwrap();
            dir
        })
        .clone()
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - y).abs())
        .fold(0.0, f64::max)
}

/// ferrotune's logits for the prompt (every position), and 32 greedy tokens (EOS is not
/// special), with the raw model API.
fn ours(
    model: &Model,
    adapter: Option<&lora::LoraAdapter>,
    prompt: &[u32],
    n: usize,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut cache = model.new_cache();
    let all: Vec<Vec<f32>> = model
        .forward(prompt, &mut cache, adapter, true)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut tok = ferrotune::inference::sampling::argmax(all.last().unwrap());
    let mut greedy = vec![tok];
    for _ in 1..n {
        let l: Vec<f32> = model
            .forward(&[tok], &mut cache, adapter, false)
            .unwrap()
            .to_vec1()
            .unwrap();
        tok = ferrotune::inference::sampling::argmax(&l);
        greedy.push(tok);
    }
    (all, greedy)
}

/// Where the parity tests run the model: the engine's own CPU kernels, and the
/// device-generic path (candle's kernels, what a GPU runs) on candle's CPU device; plus
/// `FERROTUNE_TEST_DEVICE` (e.g. `cuda:0`, in a build with `--features cuda`) when set —
/// scripts/gpu-check.sh sets it — with float32 weights there so the tolerances hold.
fn placements() -> Vec<(String, Placement)> {
    let mut p = vec![
        ("own kernels".to_string(), Placement::cpu()),
        (
            "device-generic on cpu".to_string(),
            Placement::generic(candle_core::Device::Cpu),
        ),
    ];
    if let Ok(d) = std::env::var("FERROTUNE_TEST_DEVICE") {
        let device = InferenceDevice::parse(&d).unwrap().resolve().unwrap();
        p.push((
            format!("device-generic on {d}"),
            Placement {
                dense: Some(candle_core::DType::F32),
                ..Placement::generic(device)
            },
        ));
    }
    p
}

fn argmaxes(all: &[Vec<f32>]) -> Vec<u32> {
    all.iter()
        .map(|l| ferrotune::inference::sampling::argmax(l))
        .collect()
}

fn poem_prompt(assets: &ChatAssets) -> Vec<u32> {
    let text = assets
        .template
        .render(
            &[
                ChatMessage::new("system", "You are a poet."),
                ChatMessage::new("user", "Write a short poem about the sea and a lighthouse."),
            ],
            true,
        )
        .unwrap();
    assets.encode(&text).unwrap()
}

#[test]
fn tiny_models_of_every_family_match_transformers_with_lora() {
    // Each family alone, with a LoRA, and with a DoRA (magnitudes away from the norms).
    let tmp = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 300).collect();
    let families = ["llama", "mistral", "qwen2", "qwen3"];
    let variants = [None, Some("lora"), Some("dora")];
    let made: Vec<Value> = families
        .iter()
        .map(|f| json!({"op": "make_tiny", "out": tmp.path().join(f), "model_type": f}))
        .collect();
    reference(json!({"op": "batch", "requests": made}));
    let mut requests = Vec::new();
    for family in families {
        let dir = tmp.path().join(family);
        for variant in variants {
            requests.push(json!({
                "op": "reference", "model_dir": dir,
                "adapter": variant.map(|v| dir.join(v)),
                "prompt_ids": prompt, "n": 16,
            }));
        }
    }
    let results = reference(json!({"op": "batch", "requests": requests}));
    let results: Vec<Value> = results["results"].as_array().unwrap().clone();
    for (where_, placement) in placements() {
        let mut results = results.iter();
        for family in families {
            let dir = tmp.path().join(family);
            let model = full(
                Model::load_on(
                    &WeightsSource::Hf(dir.clone()),
                    Requantize::Keep,
                    &placement,
                )
                .unwrap(),
            );
            let lora = lora::load(&dir.join("lora"), &model.config).unwrap();
            assert_eq!(
                lora.modules,
                ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
            );
            assert!(!lora.dora);
            let dora = lora::load(&dir.join("dora"), &model.config).unwrap();
            assert!(dora.dora);
            assert_eq!(dora.modules, ["q_proj", "v_proj", "gate_proj", "down_proj"]);
            for variant in variants {
                let a = match variant {
                    None => None,
                    Some("lora") => Some(&lora),
                    Some(_) => Some(&dora),
                };
                let r = results.next().unwrap();
                let (all, greedy) = ours(&model, a, &prompt, 16);
                let want: Vec<f64> = serde_json::from_value(r["logits"].clone()).unwrap();
                let d = max_abs_diff(all.last().unwrap(), &want);
                eprintln!(
                    "{family} {variant:?} ({where_}: {}): max |Δlogit| {d:.2e}",
                    model.description
                );
                assert!(d < 1e-4, "{family} {variant:?}: logits differ by {d}");
                let want_argmax: Vec<u32> = serde_json::from_value(r["argmax"].clone()).unwrap();
                assert_eq!(
                    argmaxes(&all),
                    want_argmax,
                    "{family} {variant:?}: top token of every position"
                );
                let want_greedy: Vec<u32> = serde_json::from_value(r["greedy"].clone()).unwrap();
                assert_eq!(greedy, want_greedy, "{family} {variant:?}: greedy tokens");
            }
        }
    }

    // Merged for export, a DoRA's weights are peft's `merge_and_unload`.
    use ferrotune::models::export::{ExportFormat, ExportSource, Quantization, export};
    let dir = tmp.path().join("qwen2");
    let out = tmp.path().join("dora-export");
    std::fs::create_dir(&out).unwrap();
    let src = ExportSource {
        base: ferrotune::models::inspect_folder(&dir, "qwen2".into())
            .unwrap()
            .unwrap(),
        adapter: Some(dir.join("dora")),
        full: None,
        name: "tiny-dora".into(),
        system: None,
    };
    export(
        &src,
        ExportFormat::Safetensors,
        Quantization::F32,
        &out,
        &|_, _| true,
    )
    .unwrap();
    let check = reference(json!({
        "op": "export_check", "model_dir": dir, "adapter": dir.join("dora"),
        "safetensors": out, "ggufs": [],
    }));
    let rel = check["safetensors"]["max_rel"].as_f64().unwrap();
    eprintln!("DoRA merged for export vs peft: max relative difference {rel:.2e}");
    assert!(rel < 1e-5, "{check}");
}

#[test]
fn safetensors_path_matches_transformers_and_peft() {
    let dir = smollm2();
    let adapter_dir = trained_adapter();
    let source = WeightsSource::Hf(dir.clone());
    let assets = ChatAssets::load(&dir, source.clone()).unwrap();
    let model = full(Model::load(&source, Requantize::Keep).unwrap());
    let adapter = lora::load(&adapter_dir, &model.config).unwrap();
    let prompt = poem_prompt(&assets);
    let r = reference(json!({
        "op": "reference", "model_dir": dir, "adapter": adapter_dir, "prompt_ids": prompt, "n": 32,
    }));
    let (all, greedy) = ours(&model, Some(&adapter), &prompt, 32);
    let want: Vec<f64> = serde_json::from_value(r["logits"].clone()).unwrap();
    let d = max_abs_diff(all.last().unwrap(), &want);
    let want_argmax: Vec<u32> = serde_json::from_value(r["argmax"].clone()).unwrap();
    let want_greedy: Vec<u32> = serde_json::from_value(r["greedy"].clone()).unwrap();
    eprintln!(
        "safetensors f32 + LoRA vs transformers + peft: max |Δlogit| {d:.2e} (last prompt position), \
         greedy {:?}",
        assets.tokenizer.decode(&greedy, false).unwrap()
    );
    assert!(d < 2e-3, "logits differ by {d}");
    assert_eq!(argmaxes(&all), want_argmax);
    assert_eq!(greedy, want_greedy, "32 greedy tokens");
}

/// Every file of `from` as a symbolic link in a new folder `to` (a Hugging Face cache
/// snapshot is laid out this way).
fn link_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y.powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    out.retain(|p| p.extension().is_some_and(|x| x == "safetensors"));
    out.sort();
    out
}

#[test]
fn bf16_checkpoint_is_quantised_at_load_cached_and_mapped() {
    // SmolLM2 as checkpoints are published (bfloat16, sharded with an index), used through
    // symbolic links as a Hugging Face cache snapshot is; each format against transformers +
    // peft on the same bf16 weights, with the trained LoRA applied unmerged on top.
    let src = smollm2();
    let adapter_dir = trained_adapter();
    let tmp = tempfile::tempdir().unwrap();
    let blobs = tmp.path().join("blobs");
    let made = reference(
        json!({"op": "to_bf16", "model_dir": src, "out": blobs, "max_shard_size": "100MB"}),
    );
    let files: Vec<String> = serde_json::from_value(made["files"].clone()).unwrap();
    assert!(
        files.contains(&"model.safetensors.index.json".to_string()),
        "{files:?}"
    );
    let snap = tmp.path().join("snapshot");
    link_folder(&blobs, &snap);
    let source = WeightsSource::Hf(snap.clone());
    let assets = ChatAssets::load(&snap, source.clone()).unwrap();
    let prompt = poem_prompt(&assets);
    // transformers + peft on the bf16 weights, and on them rounded through each format.
    let formats = [None, Some("q8_0"), Some("q4_0")];
    let requests: Vec<Value> = formats
        .iter()
        .map(|f| {
            json!({
                "op": "reference", "model_dir": snap, "adapter": adapter_dir, "prompt_ids": prompt,
                "n": 32, "quantize": f,
            })
        })
        .collect();
    let refs = reference(json!({"op": "batch", "requests": requests}));
    let refs: Vec<(Vec<f64>, Vec<u32>)> = refs["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                serde_json::from_value(r["logits"].clone()).unwrap(),
                serde_json::from_value(r["greedy"].clone()).unwrap(),
            )
        })
        .collect();
    let bf16 = &refs[0].0;
    let scale = bf16.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    // `matched`: the reference on the same rounded weights, which the engine must reproduce
    // (to float rounding); the bf16 reference measures what the format itself costs.
    let logits_of = |requant: Requantize, matched: usize, max_diff: f64| -> (Model, Vec<f32>) {
        let started = Instant::now();
        let model = full(Model::load(&source, requant).unwrap());
        let load = started.elapsed();
        let adapter = lora::load(&adapter_dir, &model.config).unwrap();
        let (all, greedy) = ours(&model, Some(&adapter), &prompt, 32);
        let last = all.last().unwrap().clone();
        let (want, want_greedy) = &refs[matched];
        let d = max_abs_diff(&last, want);
        let same = greedy
            .iter()
            .zip(want_greedy)
            .take_while(|(a, b)| a == b)
            .count();
        let cost = max_abs_diff(&last, bf16);
        let mean = last
            .iter()
            .zip(bf16)
            .map(|(a, b)| (*a as f64 - b).abs())
            .sum::<f64>()
            / bf16.len() as f64;
        eprintln!(
            "bf16 checkpoint as {} + LoRA: vs transformers + peft on the same rounded weights \
             max |Δlogit| {d:.2e}, greedy tokens equal {same}/32; vs the bf16 weights |Δlogit| \
             max {cost:.3} mean {mean:.3}, cosine {:.5} (max |logit| {scale:.1}); load {:.2} s, \
             weights {:.0} MB",
            model.description,
            cosine(&last, bf16),
            load.as_secs_f64(),
            model.weight_bytes() as f64 / 1e6
        );
        assert!(
            d < tol(&model, max_diff),
            "{requant:?}: logits differ by {d}"
        );
        assert_eq!(
            ferrotune::inference::sampling::argmax(&last) as u32,
            want_greedy[0],
            "{requant:?}: the next token"
        );
        (model, last)
    };
    let (f32_model, _) = logits_of(Requantize::Keep, 0, 2e-3);
    let f32_bytes = f32_model.weight_bytes();
    drop(f32_model);
    assert!(
        cache_files(&snap.join(".ferrotune")).is_empty(),
        "float32 is not cached"
    );

    // Q8_0 by default: quantised as read, cached beside the model.
    let (q8, first) = logits_of(Requantize::Auto, 1, 1e-3);
    assert!(q8.description.contains("as Q8_0"), "{}", q8.description);
    assert!(!q8.description.contains("cached"), "{}", q8.description);
    let ratio = q8.weight_bytes() as f64 / f32_bytes as f64;
    assert!(ratio < 0.3, "Q8_0 weights are {ratio:.2} of float32");
    drop(q8);
    let cached = cache_files(&snap.join(".ferrotune"));
    assert_eq!(cached.len(), 1, "{cached:?}");
    // The second load maps the cache and computes exactly what the first did.
    let (again, second) = logits_of(Requantize::Auto, 1, 1e-3);
    assert!(
        again.description.contains("cached"),
        "{}",
        again.description
    );
    assert_eq!(
        first, second,
        "the cached weights are the quantised weights"
    );
    drop(again);

    let (q4, _) = logits_of(Requantize::To(GgmlDType::Q4_0), 2, 1e-3);
    assert!(q4.description.contains("as Q4_0"), "{}", q4.description);
    drop(q4);
    assert_eq!(
        cache_files(&snap.join(".ferrotune")).len(),
        2,
        "one cache per format"
    );

    // New weights (a shard rewritten) never read the stale cache, which goes.
    let shard = blobs.join(files.iter().find(|f| f.ends_with(".safetensors")).unwrap());
    let bytes = std::fs::read(&shard).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&shard, bytes).unwrap();
    let model = Model::load(&source, Requantize::Auto).unwrap();
    assert!(
        !model.description.contains("cached"),
        "{}",
        model.description
    );
    let now = cache_files(&snap.join(".ferrotune"));
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(!now.contains(&cached[0]), "the stale cache was removed");
    drop(model);

    // A folder that cannot take the cache (here `.ferrotune` is a file; a read-only hub
    // snapshot in real life): the cache goes under the user's cache folder instead.
    let ro = tmp.path().join("read-only-snapshot");
    link_folder(&blobs, &ro);
    std::fs::write(ro.join(".ferrotune"), b"not a folder").unwrap();
    let first = Model::load(&WeightsSource::Hf(ro.clone()), Requantize::Auto).unwrap();
    assert!(
        !first.description.contains("cached"),
        "{}",
        first.description
    );
    drop(first);
    let second = Model::load(&WeightsSource::Hf(ro.clone()), Requantize::Auto).unwrap();
    assert!(
        second.description.contains("cached"),
        "{}",
        second.description
    );
    let key = {
        use sha2::Digest;
        let k = format!(
            "{:x}",
            sha2::Sha256::digest(ro.canonicalize().unwrap().to_string_lossy().as_bytes())
        );
        k[..16].to_string()
    };
    let elsewhere = ferrotune::pyenv::cache_root().join("quantized").join(key);
    assert_eq!(cache_files(&elsewhere).len(), 1, "{}", elsewhere.display());
    std::fs::remove_dir_all(&elsewhere).unwrap();
}

#[test]
fn chunked_runs_agree_with_one_pass_across_cache_growth() {
    // The KV cache starts at 256 positions and grows (copying what it holds); prompts are run
    // in chunks. 300 positions in uneven chunks, then one at a time, must give the logits
    // one pass over all 300 gives, with and without an adapter.
    let adapter_dir = trained_adapter();
    let model = Model::load(&WeightsSource::Gguf(smollm2_gguf()), Requantize::Auto).unwrap();
    let adapter = lora::load(&adapter_dir, &model.config).unwrap();
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % 49000).collect();
    for a in [None, Some(&adapter)] {
        let mut cache = model.new_cache();
        let one: Vec<Vec<f32>> = model
            .forward(&ids, &mut cache, a, true)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut cache = model.new_cache();
        let mut at = 0;
        let mut worst = 0f32;
        let chunks = [1, 37, 100, 117]
            .into_iter()
            .chain(std::iter::repeat_n(1, 45));
        for len in chunks {
            let got: Vec<Vec<f32>> = model
                .forward(&ids[at..at + len], &mut cache, a, true)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (i, row) in got.iter().enumerate() {
                for (g, w) in row.iter().zip(&one[at + i]) {
                    worst = worst.max((g - w).abs());
                }
            }
            at += len;
        }
        assert_eq!(at, ids.len());
        assert_eq!(cache.len(), ids.len());
        eprintln!(
            "chunked vs one pass (lora={}): max |Δlogit| {worst:.2e}",
            a.is_some()
        );
        assert!(worst < 1e-3, "chunked runs differ from one pass by {worst}");
    }
}

/// A second adapter: the trained one at three times its scale (`lora_alpha` ×3), so that
/// its term differs from the first one's.
fn second_adapter() -> PathBuf {
    let from = trained_adapter();
    let dir = test_models_dir().join(".ferrotune-test-lora-v1-x3");
    if dir.join("adapter_model.safetensors").is_file() {
        return dir;
    }
    let tmp = test_models_dir().join(format!(".ferrotune-test-lora-x3-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(
        from.join("adapter_model.safetensors"),
        tmp.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(from.join("adapter_config.json")).unwrap()).unwrap();
    let alpha = config["lora_alpha"].as_f64().unwrap();
    config["lora_alpha"] = json!(alpha * 3.0);
    std::fs::write(tmp.join("adapter_config.json"), config.to_string()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).unwrap();
    dir
}

#[test]
fn batched_steps_compute_what_each_sequence_computes_alone() {
    // On the engine's own kernels (the Q8_0 GGUF) and on the device-generic path (what a GPU
    // runs), which batches the same way. The latter on dense weights: candle's own Q8_0
    // kernels round the activations to 8 bits, and a prompt run in two chunks already differs
    // from one pass there by about half a logit (batched or not), which would hide what this
    // test is about.
    for (where_, placement) in placements() {
        let source = if placement.own_kernels {
            (WeightsSource::Gguf(smollm2_gguf()), Requantize::Auto)
        } else {
            (WeightsSource::Hf(smollm2()), Requantize::Keep)
        };
        let model = Model::load_on(&source.0, source.1, &placement).unwrap();
        batched_step_matches_alone(&model, &where_);
    }
}

fn batched_step_matches_alone(model: &Model, where_: &str) {
    // Four sequences, with no adapter, adapter A, adapter B and A again, run alone (prompt in
    // one pass, then greedy decode steps) and then together: one batched step per token, the
    // last one's prompt arriving in two chunks while the others already decode. Every logit
    // the batch returns must be what the same sequence gives alone.
    use ferrotune::inference::{BatchItem, Want};
    let a = lora::load(&trained_adapter(), &model.config).unwrap();
    let b = lora::load(&second_adapter(), &model.config).unwrap();
    let adapters = [None, Some(&a), Some(&b), Some(&a)];
    let prompts: Vec<Vec<u32>> = (0..4u32)
        .map(|n| {
            (0..(20 + 9 * n))
                .map(|i| (i * 7919 + 13 * n + 5) % 49000)
                .collect()
        })
        .collect();
    const STEPS: usize = 6;
    // Alone: logits after the prompt, then after each greedy token.
    let mut alone: Vec<Vec<Vec<f32>>> = Vec::new();
    let mut chosen: Vec<Vec<u32>> = Vec::new();
    for (p, ad) in prompts.iter().zip(adapters) {
        let mut cache = model.new_cache();
        let mut rows = vec![
            model
                .forward(p, &mut cache, ad, false)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        ];
        let mut toks = Vec::new();
        for _ in 0..STEPS {
            let t = argmaxes(&rows[rows.len() - 1..])[0];
            toks.push(t);
            rows.push(
                model
                    .forward(&[t], &mut cache, ad, false)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
        }
        alone.push(rows);
        chosen.push(toks);
    }
    // Together. Step 0: sequences 0–2 run their prompts, 3 the first half of its prompt.
    let mut caches: Vec<_> = (0..4).map(|_| model.new_cache()).collect();
    let half = prompts[3].len() / 2;
    let mut next = [0usize; 4]; // logits rows of `alone` compared so far
    let mut worst = 0f32;
    for step in 0..=STEPS + 1 {
        let mut items = Vec::new();
        let mut who = Vec::new();
        for (n, cache) in caches.iter_mut().enumerate() {
            let tokens: &[u32] = match (n, step) {
                (3, 0) => &prompts[3][..half],
                (3, 1) => &prompts[3][half..],
                (3, s) => &chosen[3][s - 2..s - 1],
                (_, 0) => &prompts[n],
                (_, s) if s <= STEPS => &chosen[n][s - 1..s],
                _ => continue,
            };
            who.push(n);
            items.push(BatchItem {
                tokens,
                cache,
                adapter: adapters[n],
                want: if (n, step) == (3, 0) {
                    Want::Nothing
                } else {
                    Want::Last
                },
            });
        }
        let out = model.forward_batch(&mut items).unwrap();
        for (n, logits) in who.into_iter().zip(out) {
            if (n, step) == (3, 0) {
                assert!(
                    logits.is_empty(),
                    "a prompt chunk that wants nothing gets nothing"
                );
                continue;
            }
            let want = &alone[n][next[n]];
            next[n] += 1;
            assert_eq!(logits.len(), want.len());
            for (g, w) in logits.iter().zip(want) {
                worst = worst.max((g - w).abs());
            }
        }
    }
    assert_eq!(next, [STEPS + 1; 4], "every row compared");
    eprintln!("{where_}: batched vs alone, 4 sequences on 3 adapters: max |Δlogit| {worst:.2e}");
    assert!(
        worst < 1e-3,
        "{where_}: a batch differs from its sequences alone by {worst}"
    );
    // The adapters matter: the same prompt with A and with B gives other logits.
    let mut c1 = model.new_cache();
    let mut c2 = model.new_cache();
    let la: Vec<f32> = model
        .forward(&prompts[0], &mut c1, Some(&a), false)
        .unwrap()
        .to_vec1()
        .unwrap();
    let lb: Vec<f32> = model
        .forward(&prompts[0], &mut c2, Some(&b), false)
        .unwrap()
        .to_vec1()
        .unwrap();
    let d = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(d > 0.1, "adapters A and B differ ({d})");
}

#[test]
fn gguf_path_matches_its_dequantised_form_with_lora() {
    let dir = smollm2();
    let adapter_dir = trained_adapter();
    let source = WeightsSource::Gguf(smollm2_gguf());
    let assets = ChatAssets::load(&dir, source.clone()).unwrap();
    let prompt = poem_prompt(&assets);
    let r = reference(json!({
        "op": "reference", "model_dir": dir, "adapter": adapter_dir, "prompt_ids": prompt, "n": 32,
    }));
    let want: Vec<f64> = serde_json::from_value(r["logits"].clone()).unwrap();
    let want_greedy: Vec<u32> = serde_json::from_value(r["greedy"].clone()).unwrap();
    // The engine's kernels multiply the quantised weights with float activations: the GGUF
    // path computes what its de-quantised form computes, to float rounding.
    for requant in [Requantize::Auto, Requantize::Keep] {
        let model = full(Model::load(&source, requant).unwrap());
        let adapter = lora::load(&adapter_dir, &model.config).unwrap();
        let (all, greedy) = ours(&model, Some(&adapter), &prompt, 32);
        let last = all.last().unwrap();
        let d = max_abs_diff(last, &want);
        let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let same = greedy
            .iter()
            .zip(&want_greedy)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "GGUF ({}) + LoRA vs transformers + peft on the de-quantised weights: max |Δlogit| \
             {d:.2e} (max |logit| {scale:.1}), greedy tokens equal: {same}/32",
            model.description
        );
        assert!(d < tol(&model, 1e-3), "{requant:?}: logits differ by {d}");
        assert_eq!(
            ferrotune::inference::sampling::argmax(last) as u64,
            want_greedy[0] as u64,
            "same next token"
        );
        assert_eq!(greedy, want_greedy, "{requant:?}: 32 greedy tokens");
        // The default cache (half floats, what the server runs): close to the 32-bit one, and
        // the same answer.
        let mut half = model;
        half.set_kv_precision(KvPrecision::Half);
        let (all_half, greedy_half) = ours(&half, Some(&adapter), &prompt, 32);
        let d_half = max_abs_diff(all_half.last().unwrap(), &want);
        eprintln!(
            "  with a half-float KV cache: max |Δlogit| {d_half:.2e} vs transformers + peft, \
             {:.2e} vs the 32-bit cache",
            all_half
                .last()
                .unwrap()
                .iter()
                .zip(last)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        );
        assert!(
            d_half < 3e-2,
            "{requant:?}: half-float cache: logits differ by {d_half}"
        );
        assert_eq!(
            greedy_half, want_greedy,
            "{requant:?}: half-float cache: 32 greedy tokens"
        );
    }
    // Other quantised formats (Q5_0 here, the K-quants) run on candle's kernels (8-bit
    // activations), with the LoRA term added apart: the adapter must move the logits toward
    // the reference, which has it.
    let model = Model::load(&source, Requantize::To(GgmlDType::Q5_0)).unwrap();
    let adapter = lora::load(&adapter_dir, &model.config).unwrap();
    let with = max_abs_diff(
        ours(&model, Some(&adapter), &prompt, 1).0.last().unwrap(),
        &want,
    );
    let without = max_abs_diff(ours(&model, None, &prompt, 1).0.last().unwrap(), &want);
    eprintln!(
        "GGUF as Q5_0 ({}): max |Δlogit| {with:.2e} with the LoRA, {without:.2e} without",
        model.description
    );
    assert!(
        with < 0.5 * without,
        "the LoRA is not applied on candle's kernels"
    );
    // The device-generic path (what a GPU runs; candle's kernels quantise the activations
    // to 8 bits): the same weights, the LoRA applied as a tensor term.
    for (where_, placement) in placements().into_iter().skip(1) {
        let model = Model::load_on(&source, Requantize::Auto, &placement).unwrap();
        let adapter = lora::load(&adapter_dir, &model.config).unwrap();
        let (all, greedy) = ours(&model, Some(&adapter), &prompt, 32);
        let with = max_abs_diff(all.last().unwrap(), &want);
        let without = max_abs_diff(ours(&model, None, &prompt, 1).0.last().unwrap(), &want);
        let same = greedy
            .iter()
            .zip(&want_greedy)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "GGUF {where_} ({}) + LoRA vs transformers + peft: max |Δlogit| {with:.2e} \
             ({without:.2e} without the LoRA), greedy tokens equal: {same}/32",
            model.description
        );
        assert!(with < 1.0, "{where_}: logits differ by {with}");
        assert!(with < 0.5 * without, "{where_}: the LoRA is not applied");
        assert_eq!(greedy[0], want_greedy[0], "{where_}: the next token");
    }
}

/// SmolLM2's GGUF with its `ffn_down` matrices (1536 columns: whole 256-value super-blocks;
/// the others have 576) re-quantised to the K-quants, layer by layer Q4_K, Q5_K, Q6_K — a
/// Q4_K_M-like file.
fn k_quant_gguf(out: &Path) {
    use candle_core::quantized::{QTensor, gguf_file};
    let path = smollm2_gguf();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let kinds = [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let q = content
            .tensor(&mut file, name, &candle_core::Device::Cpu)
            .unwrap();
        let q = match name
            .strip_prefix("blk.")
            .and_then(|r| r.strip_suffix(".ffn_down.weight"))
        {
            Some(layer) => {
                let kind = kinds[layer.parse::<usize>().unwrap() % 3];
                let dense = q.dequantize(&candle_core::Device::Cpu).unwrap();
                QTensor::quantize(&dense, kind).unwrap()
            }
            None => q,
        };
        tensors.push((name.clone(), q));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut w = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
    gguf_file::write(&mut w, &metadata, &tensors).unwrap();
}

#[test]
fn k_quants_run_on_the_engines_kernels_like_their_dequantised_form() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("SmolLM2-K.gguf");
    k_quant_gguf(&file);
    let source = WeightsSource::Gguf(file);
    let dir = smollm2();
    let assets = ChatAssets::load(&dir, WeightsSource::Gguf(smollm2_gguf())).unwrap();
    let prompt = poem_prompt(&assets);
    let adapter_dir = trained_adapter();
    // The reference: the same file with every matrix de-quantised to float32 (exactly what
    // the K-quant blocks hold), on the same kernels.
    let dense = full(Model::load(&source, Requantize::To(GgmlDType::F32)).unwrap());
    let adapter = lora::load(&adapter_dir, &dense.config).unwrap();
    // Prefill (several positions: rows expanded, then blocked dots) and one decode step (one
    // position: the K-quant dot itself) after it.
    let step = |m: &Model| -> (Vec<f32>, Vec<f32>) {
        let mut cache = m.new_cache();
        let pre: Vec<f32> = m
            .forward(&prompt, &mut cache, Some(&adapter), false)
            .unwrap()
            .to_vec1()
            .unwrap();
        let next = ferrotune::inference::sampling::argmax(&pre);
        let dec: Vec<f32> = m
            .forward(&[next], &mut cache, Some(&adapter), false)
            .unwrap()
            .to_vec1()
            .unwrap();
        (pre, dec)
    };
    let (want_all, want_greedy) = ours(&dense, Some(&adapter), &prompt, 32);
    let want: Vec<f64> = want_all.last().unwrap().iter().map(|v| *v as f64).collect();
    let (_, want_step) = step(&dense);
    let want_step: Vec<f64> = want_step.iter().map(|v| *v as f64).collect();
    drop(dense);
    let model = full(Model::load(&source, Requantize::Auto).unwrap());
    for k in ["Q4K", "Q5K", "Q6K"] {
        assert!(
            model.description.contains(k),
            "{k} kept: {}",
            model.description
        );
    }
    assert!(
        model.on_own_kernels(),
        "every matmul on the engine's kernels, the plain layer loop"
    );
    let (all, greedy) = ours(&model, Some(&adapter), &prompt, 32);
    let d = max_abs_diff(all.last().unwrap(), &want);
    let d_step = max_abs_diff(&step(&model).1, &want_step);
    eprintln!(
        "K-quant GGUF ({}) + LoRA vs its de-quantised form: max |Δlogit| {d:.2e} after the \
         prompt, {d_step:.2e} at a decode step; weights {:.0} MB",
        model.description,
        model.weight_bytes() as f64 / 1e6
    );
    assert!(d < tol(&model, 1e-3), "logits differ by {d}");
    assert!(
        d_step < tol(&model, 1e-3),
        "decode-step logits differ by {d_step}"
    );
    assert_eq!(greedy, want_greedy, "32 greedy tokens");
}

#[test]
fn chat_template_renders_like_transformers() {
    let dir = smollm2();
    let assets = ChatAssets::load(&dir, WeightsSource::Hf(dir.clone())).unwrap();
    let conversations: Vec<Vec<ChatMessage>> = vec![
        vec![ChatMessage::new("user", "Hi!")],
        vec![
            ChatMessage::new("system", "You answer in French."),
            ChatMessage::new("user", "What is the capital of France?"),
        ],
        vec![
            ChatMessage::new("user", "What is 2 plus 2?"),
            ChatMessage::new("assistant", "2 plus 2 is 4."),
            ChatMessage::new(
                "user",
                "  And 3 plus 3?\n\nThink   step by step. ünïcödé ✓ \"quotes\" {{ not jinja }}",
            ),
        ],
        vec![
            ChatMessage::new("system", ""),
            ChatMessage::new("user", "a"),
            ChatMessage::new("assistant", "b"),
            ChatMessage::new("user", "c"),
            ChatMessage::new("assistant", "d"),
        ],
    ];
    // Templates in the styles of other families (features HF templates rely on).
    let llama3_style = "{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n";
    let mistral_style = "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- endif %}\n{%- endfor %}\n";
    let qwen_style = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() }}{% if message.role == 'assistant' and not loop.last %}{{ '<|im_end|>' }}{% else %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let tojson_style = "{% for m in messages %}{{ m | tojson }}|{{ m['content'] | tojson(indent=2) }}|{{ {'n': loop.index, 'last': loop.last, 'x': none} | tojson }}\n{% endfor %}";
    let mut cases = Vec::new();
    let mut ours_rendered = Vec::new();
    for template in [
        None,
        Some(llama3_style),
        Some(mistral_style),
        Some(qwen_style),
        Some(tojson_style),
    ] {
        let t = template.map(|src| {
            ferrotune::inference::template::ChatTemplate::new(
                src,
                vec![
                    ("bos_token".into(), "<|im_start|>".into()),
                    ("eos_token".into(), "<|im_end|>".into()),
                ],
            )
            .unwrap()
        });
        for conv in &conversations {
            for gen_prompt in [true, false] {
                let r = match &t {
                    None => assets.template.render(conv, gen_prompt),
                    Some(t) => t.render(conv, gen_prompt),
                };
                let Ok(r) = r else {
                    // Only the alternating-roles rule may refuse (the system-first conversation
                    // with an empty system turn is fine; none here breaks alternation).
                    panic!("render failed: {:?}", r.err());
                };
                ours_rendered.push(r);
                cases.push(json!({
                    "messages": conv, "add_generation_prompt": gen_prompt, "chat_template": template,
                }));
            }
        }
    }
    let r = reference(json!({"op": "template", "model_dir": dir, "cases": cases}));
    let theirs: Vec<String> = serde_json::from_value(r["rendered"].clone()).unwrap();
    assert_eq!(theirs.len(), ours_rendered.len());
    for (i, (a, b)) in ours_rendered.iter().zip(&theirs).enumerate() {
        assert_eq!(a, b, "case {i}: {}", cases[i]);
    }
    eprintln!(
        "{} renderings byte-identical to apply_chat_template",
        theirs.len()
    );

    // A template's own refusal is an Invalid request.
    let engine = Engine::new(test_models_dir(), EngineOptions::default());
    let bad = ferrotune::inference::template::ChatTemplate::new(mistral_style, vec![]).unwrap();
    assert!(
        bad.render(&[ChatMessage::new("assistant", "x")], true)
            .is_err()
    );
    let rendered = engine.render_prompt(MODEL, &conversations[1]).unwrap();
    assert_eq!(
        rendered, theirs[2],
        "the engine renders with the model's template"
    );
}

#[test]
fn gguf_tokenizer_matches_tokenizer_json() {
    let dir = smollm2();
    let from_gguf = tokenizer_from_gguf(&smollm2_gguf()).unwrap();
    let from_json = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let texts = [
        "Hello, world!",
        "What is 12345 plus 678?",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "  leading and trailing spaces  \n\n\ttabs",
        "ünïcödé — “quotes” ✓ 日本語 😀",
        "def f(x):\n    return x ** 2  # comment",
        "",
    ];
    let mut ids_gguf = Vec::new();
    for t in texts {
        let a = from_gguf.encode(t, false).unwrap().get_ids().to_vec();
        let b = from_json.encode(t, false).unwrap().get_ids().to_vec();
        assert_eq!(a, b, "{t:?}");
        assert_eq!(from_gguf.decode(&a, false).unwrap(), t, "round trip {t:?}");
        ids_gguf.push(a);
    }
    let r = reference(json!({"op": "tokens", "model_dir": dir, "texts": texts}));
    let theirs: Vec<Vec<u32>> = serde_json::from_value(r["ids"].clone()).unwrap();
    assert_eq!(
        ids_gguf, theirs,
        "transformers' tokenizer gives the same ids"
    );
}

fn request(adapter: Option<PathBuf>, user: &str, params: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        base_model: MODEL.into(),
        model_dir: None,
        adapter,
        messages: vec![ChatMessage::new("user", user)],
        tools: Vec::new(),
        params,
        prompt: None,
    }
}

#[test]
fn engine_streams_answers_that_show_the_training() {
    smollm2();
    let adapter = trained_adapter();
    let engine = Engine::new(test_models_dir(), EngineOptions::default());

    // The adapter's training shows; the base model alone answers differently.
    let c = engine
        .generate(request(
            Some(adapter.clone()),
            "What is 3 plus 4?",
            SamplingParams::greedy(32),
        ))
        .unwrap()
        .collect_blocking()
        .unwrap();
    assert_eq!(c.text, "3 plus 4 is 7.");
    assert_eq!(c.finish_reason, FinishReason::Stop);
    let base = engine
        .generate(request(
            None,
            "What is the capital of France?",
            SamplingParams::greedy(32),
        ))
        .unwrap()
        .collect_blocking()
        .unwrap();
    assert!(base.text.contains("Paris"), "{base:?}");

    // Streaming: several pieces, whole UTF-8, then Done with usage.
    let mut g = engine
        .generate(request(
            None,
            "Write a poem about the sea.",
            SamplingParams::greedy(24),
        ))
        .unwrap();
    let mut pieces = Vec::new();
    let done = loop {
        match g.events.blocking_recv().unwrap() {
            GenEvent::Text(t) => pieces.push(t),
            other => break other,
        }
    };
    assert!(pieces.len() > 5, "{pieces:?}");
    // (Earlier requests of this test may have left the prompt's start in the prefix cache.)
    let GenEvent::Done { cached_tokens, .. } = done else {
        panic!("{done:?}")
    };
    assert!(cached_tokens < g.prompt_tokens, "{done:?}");
    assert_eq!(
        done,
        GenEvent::Done {
            finish_reason: FinishReason::Length,
            prompt_tokens: g.prompt_tokens,
            completion_tokens: 24,
            cached_tokens
        }
    );
    let full: String = pieces.concat();

    // A stop string (spanning tokens) ends the answer before it.
    let words: Vec<&str> = full.split_whitespace().collect();
    let stop = format!("{} {}", words[2], &words[3][..words[3].len().min(3)]);
    let mut p = SamplingParams::greedy(24);
    p.stop = vec![stop.clone()];
    let c = engine
        .generate(request(None, "Write a poem about the sea.", p))
        .unwrap()
        .collect_blocking()
        .unwrap();
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(c.text, full[..full.find(&stop).unwrap()], "stop {stop:?}");

    // Same seed, same text; sampling differs from greedy somewhere with another seed.
    let sampled = |seed| {
        let p = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            top_k: Some(50),
            seed: Some(seed),
            max_tokens: 20,
            ..SamplingParams::default()
        };
        engine
            .generate(request(None, "Tell me a story.", p))
            .unwrap()
            .collect_blocking()
            .unwrap()
            .text
    };
    let (a, b, c2) = (sampled(5), sampled(5), sampled(6));
    assert_eq!(a, b);
    assert_ne!(a, c2);

    // Concurrent requests are all served (round robin on the model's thread).
    let gens: Vec<_> = (0..3)
        .map(|i| {
            engine
                .generate(request(
                    Some(adapter.clone()),
                    &format!("What is {} plus 2?", i + 1),
                    SamplingParams::greedy(16),
                ))
                .unwrap()
        })
        .collect();
    let answers: Vec<String> = gens
        .into_iter()
        .map(|g| g.collect_blocking().unwrap().text)
        .collect();
    assert_eq!(
        answers,
        ["1 plus 2 is 3.", "2 plus 2 is 4.", "3 plus 2 is 5."]
    );

    // Dropping the receiver cancels; the engine keeps serving.
    let g = engine
        .generate(request(
            None,
            "Count to one thousand.",
            SamplingParams::greedy(2000),
        ))
        .unwrap();
    drop(g);
    let t = Instant::now();
    engine
        .generate(request(None, "Hi", SamplingParams::greedy(4)))
        .unwrap()
        .collect_blocking()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(60));
    assert_eq!(
        engine.adapter_cache_usage().1,
        1,
        "the adapter was loaded once"
    );
}

/// A cache's first positions copied into a new cache continue like a fresh run of the same
/// tokens, on the engine's kernels and on the device-generic path (what the prefix cache
/// relies on), across a KV block boundary.
#[test]
fn a_copied_prefix_continues_like_a_fresh_run() {
    for (where_, placement) in placements() {
        let model =
            Model::load_on(&WeightsSource::Hf(smollm2()), Requantize::Keep, &placement).unwrap();
        let first: Vec<u32> = (0..300).map(|i| (i * 7919 + 5) % 49000).collect();
        let mut second = first[..280].to_vec();
        second.extend((0..20).map(|i| (i * 31 + 7) % 49000));
        let mut cache = model.new_cache();
        model.forward(&first, &mut cache, None, false).unwrap();
        let mut copied = model.copy_prefix(&cache, 280).unwrap();
        assert_eq!(copied.len(), 280);
        let got: Vec<f32> = model
            .forward(&second[280..], &mut copied, None, false)
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut fresh = model.new_cache();
        let want: Vec<f32> = model
            .forward(&second, &mut fresh, None, false)
            .unwrap()
            .to_vec1()
            .unwrap();
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{where_}: copied prefix vs fresh run: max |Δlogit| {d:.2e}");
        assert!(d < 1e-3, "{where_}: {d}");
    }
}

/// The prefix cache: prompts that begin like an earlier sequence (a shared system prompt, a
/// conversation's earlier turns) on the same adapter start from its keys and values, and
/// answer exactly what they answer without it.
#[test]
fn prefix_cache_reuses_a_shared_start_and_changes_no_answer() {
    smollm2();
    let adapter = trained_adapter();
    let system = "You are a careful assistant for a team of researchers. ".repeat(6);
    // The answer, and how many of its prompt tokens came from the cache (its usage).
    let ask = |engine: &Engine, adapter: Option<PathBuf>, turns: &[&str]| -> (String, usize) {
        let mut req = request(adapter, "", SamplingParams::greedy(24));
        req.messages = vec![ChatMessage::new("system", &system)];
        for (i, t) in turns.iter().enumerate() {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            req.messages.push(ChatMessage::new(role, *t));
        }
        let c = engine.generate(req).unwrap().collect_blocking().unwrap();
        (c.text, c.cached_tokens)
    };
    let cached = Engine::new(test_models_dir(), EngineOptions::default());
    let plain = Engine::new(
        test_models_dir(),
        EngineOptions {
            prefix_cache_bytes: 0,
            ..EngineOptions::default()
        },
    );
    let questions = ["What is 3 plus 4?", "Name a colour.", "What is 2 plus 5?"];
    for a in [None, Some(adapter.clone())] {
        for (i, q) in questions.into_iter().enumerate() {
            let (with, without) = (ask(&cached, a.clone(), &[q]), ask(&plain, a.clone(), &[q]));
            assert_eq!(with.0, without.0, "{q} (adapter: {})", a.is_some());
            assert_eq!(without.1, 0, "nothing is cached without the cache");
            if i == 0 {
                assert_eq!(with.1, 0, "the first question runs whole");
            } else {
                assert!(with.1 > 60, "the system prompt is reused: {}", with.1);
            }
        }
    }
    // Per adapter, the first question runs whole and the next two reuse the system prompt;
    // nothing is shared across adapters, and nothing without the cache.
    let hits = || cached.metrics().prefix_hits.get();
    let reused = || cached.metrics().prefix_tokens.get();
    assert_eq!(hits(), 4);
    assert!(reused() >= 4 * 60, "{} tokens reused", reused());
    assert_eq!(plain.metrics().prefix_hits.get(), 0);
    // A conversation's next turn reuses its earlier turns.
    let first = ask(&cached, None, &["What is 3 plus 4?"]).0;
    let before = reused();
    let turns = ["What is 3 plus 4?", first.as_str(), "And 5 plus 5?"];
    let next = ask(&cached, None, &turns);
    assert_eq!(next.0, ask(&plain, None, &turns).0);
    assert_eq!(hits(), 6);
    assert!(
        reused() - before > 60 + 8,
        "the earlier turn was reused too: {}",
        reused() - before
    );
    assert_eq!(
        next.1 as u64,
        reused() - before,
        "usage counts what was reused"
    );
}

#[test]
fn engine_refuses_bad_requests_with_the_right_error() {
    let dir = smollm2();
    let engine = Engine::new(test_models_dir(), EngineOptions::default());
    let err = |r: GenerateRequest| engine.generate(r).unwrap_err();
    assert!(matches!(
        err(GenerateRequest {
            base_model: "nope".into(),
            ..request(None, "x", SamplingParams::greedy(1))
        }),
        EngineError::NotFound(_)
    ));
    for p in [
        SamplingParams {
            temperature: -1.0,
            ..SamplingParams::greedy(4)
        },
        SamplingParams {
            top_p: 0.0,
            ..SamplingParams::greedy(4)
        },
        SamplingParams {
            max_tokens: 0,
            ..SamplingParams::greedy(4)
        },
        SamplingParams {
            presence_penalty: 2.5,
            ..SamplingParams::greedy(4)
        },
        SamplingParams {
            frequency_penalty: f32::NAN,
            ..SamplingParams::greedy(4)
        },
    ] {
        assert!(matches!(
            err(request(None, "x", p)),
            EngineError::Invalid(_)
        ));
    }
    let tmp = tempfile::tempdir().unwrap();
    // Not an adapter.
    assert!(matches!(
        err(request(
            Some(tmp.path().into()),
            "x",
            SamplingParams::greedy(1)
        )),
        EngineError::Invalid(_)
    ));
    // Fully trained modules (chat applies LoRA and DoRA terms only).
    std::fs::write(
        tmp.path().join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"modules_to_save":["lm_head"]}"#,
    )
    .unwrap();
    assert!(matches!(
        err(request(
            Some(tmp.path().into()),
            "x",
            SamplingParams::greedy(1)
        )),
        EngineError::Unsupported(_)
    ));
    // An adapter for another shape.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    reference(json!({"op": "make_tiny", "out": other, "model_type": "llama"}));
    match err(request(
        Some(other.join("lora")),
        "x",
        SamplingParams::greedy(1),
    )) {
        EngineError::Invalid(m) => assert!(m.contains("another base model"), "{m}"),
        e => panic!("{e:?}"),
    }
    // Safetensors-only engines still find the model; a GGUF-only request for a model without
    // one is unsupported.
    let hf_engine = Engine::new(
        test_models_dir(),
        EngineOptions {
            format: WeightsFormat::Safetensors,
            ..Default::default()
        },
    );
    assert!(
        hf_engine
            .render_prompt(MODEL, &[ChatMessage::new("user", "x")])
            .is_ok()
    );
    let only_hf = tempfile::tempdir().unwrap();
    let m = only_hf.path().join("M");
    std::fs::create_dir(&m).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.join(f), m.join(f)).unwrap();
    }
    let gguf_engine = Engine::new(
        only_hf.path().into(),
        EngineOptions {
            format: WeightsFormat::Gguf,
            ..Default::default()
        },
    );
    assert!(matches!(
        gguf_engine.render_prompt("M", &[]),
        Err(EngineError::Unsupported(_))
    ));
}

/// Export (issue 15): the trained adapter merged into SmolLM2 and written as a safetensors
/// folder and as GGUF files. peft's `merge_and_unload` is the reference for the weights; the
/// GGUFs are read back by the `gguf` package (llama.cpp's reader and de-quantisers, an
/// implementation independent of candle's), which also re-measures the retention of ΔW the
/// export reports; and the exports, loaded as models by the engine, still answer the training.
#[test]
fn exports_merge_like_peft_and_still_answer_the_training() {
    use ferrotune::models::export::{ExportFormat, ExportSource, Quantization, export};
    let model_dir = smollm2();
    let adapter = trained_adapter();
    let base = ferrotune::models::find_base_model(&test_models_dir(), MODEL)
        .unwrap()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let src = ExportSource {
        base,
        adapter: Some(adapter.clone()),
        full: None,
        name: "smollm2-arithmetic".into(),
        system: Some("You add numbers.".into()),
    };
    let mut reports = Vec::new();
    let cases = [
        (ExportFormat::Safetensors, Quantization::F16),
        (ExportFormat::Gguf, Quantization::F16),
        (ExportFormat::Gguf, Quantization::Q8_0),
        (ExportFormat::Gguf, Quantization::Q4KM),
    ];
    for (format, quant) in cases {
        let out = tmp.path().join(format!("{format:?}-{}", quant.name()));
        std::fs::create_dir(&out).unwrap();
        let steps = Mutex::new(Vec::<f64>::new());
        let r = export(&src, format, quant, &out, &|f, _| {
            steps.lock().unwrap().push(f);
            true
        })
        .unwrap();
        let steps = steps.into_inner().unwrap();
        assert!(steps.windows(2).all(|w| w[0] <= w[1]) && steps.last() == Some(&1.0));
        eprintln!(
            "export {format:?} {}: {:.1} s, {:?}, retention {:?}",
            quant.name(),
            r.seconds,
            r.files
                .iter()
                .map(|f| format!("{} {:.1} MB", f.name, f.size as f64 / 1e6))
                .collect::<Vec<_>>(),
            r.retention
        );
        reports.push((out, r));
    }
    // Nothing half-written: only the finished files.
    let names: Vec<&str> = reports[2].1.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["Modelfile", "smollm2-arithmetic.Q8_0.gguf"]);
    let modelfile = std::fs::read_to_string(reports[2].0.join("Modelfile")).unwrap();
    assert!(
        modelfile.contains("FROM ./smollm2-arithmetic.Q8_0.gguf"),
        "{modelfile}"
    );
    assert!(
        modelfile.contains("PARAMETER stop \"<|im_end|>\""),
        "{modelfile}"
    );
    assert!(
        modelfile.contains("SYSTEM \"\"\"You add numbers.\"\"\""),
        "{modelfile}"
    );
    let st_names: Vec<&str> = reports[0].1.files.iter().map(|f| f.name.as_str()).collect();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(st_names.contains(&f), "{f} in {st_names:?}");
    }

    // A cancelled export stops and says so.
    let out = tmp.path().join("cancelled");
    std::fs::create_dir(&out).unwrap();
    let e = export(
        &src,
        ExportFormat::Gguf,
        Quantization::Q8_0,
        &out,
        &|f, _| f < 0.3,
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "cancelled");

    let gguf_path = |i: usize| {
        let r: &ferrotune::models::export::ExportReport = &reports[i].1;
        let f = r.files.iter().find(|f| f.name.ends_with(".gguf")).unwrap();
        reports[i].0.join(&f.name)
    };
    let check = reference(json!({
        "op": "export_check",
        "model_dir": model_dir,
        "adapter": adapter,
        "safetensors": reports[0].0,
        "ggufs": [gguf_path(1), gguf_path(2), gguf_path(3)],
    }));
    eprintln!("reference: {check}");
    let rel = |v: &Value| v["max_rel"].as_f64().unwrap();
    // f16 rounds to 2⁻¹¹ of a value; Q8_0 to half a step of its block (max/254); Q4_K_M's
    // 4–6 bit blocks much more.
    assert!(rel(&check["safetensors"]) < 1e-3, "{check}");
    let g = &check["ggufs"];
    assert!(rel(&g[0]) < 1e-3, "{check}");
    assert!(rel(&g[1]) < 5e-3, "{check}");
    assert!(rel(&g[2]) < 0.15, "{check}");
    assert_eq!(g[0]["types"]["F16"].as_u64(), Some(30 * 7 + 1), "{check}");
    assert_eq!(g[1]["types"]["Q8_0"].as_u64(), Some(30 * 7 + 1), "{check}");
    assert!(g[2]["types"]["Q6_K"].as_u64() > Some(0), "{check}");
    assert!(g[2]["types"]["Q4_K"].as_u64() > Some(0), "{check}");
    assert_eq!(g[1]["name"], "smollm2-arithmetic");
    for (i, j) in [(1, 0), (2, 1), (3, 2)] {
        let ours = reports[i].1.retention.unwrap();
        let theirs = g[j]["retention"].as_f64().unwrap();
        assert!((ours - theirs).abs() < 2e-3, "retention {ours} vs {theirs}");
    }
    assert!(reports[2].1.retention.unwrap() > 0.98);

    // A full fine-tune (here: the merged safetensors folder, whole weights of its own) to
    // GGUF: its weights, the base's metadata.
    let full = tmp.path().join("full-gguf");
    std::fs::create_dir(&full).unwrap();
    let full_src = ExportSource {
        adapter: None,
        full: Some(reports[0].0.clone()),
        ..src.clone()
    };
    let r = export(
        &full_src,
        ExportFormat::Gguf,
        Quantization::Q8_0,
        &full,
        &|_, _| true,
    )
    .unwrap();
    assert_eq!(r.retention, None);
    reports.push((full, r));

    // Loaded as models, the merged exports answer what the adapter was trained on.
    let engine = Engine::new(test_models_dir(), EngineOptions::default());
    for i in [0, 2, 4] {
        let mut req = request(None, "What is 3 plus 4?", SamplingParams::greedy(32));
        req.base_model = format!("export-{i}");
        req.model_dir = Some(reports[i].0.clone());
        let c = engine.generate(req).unwrap().collect_blocking().unwrap();
        assert_eq!(c.text, "3 plus 4 is 7.", "export {i}");
    }
}
