//! Decode speed and time to first token of ferrotune's engine on one model (+ adapter), the
//! way a chat request runs: chat template, prefill, then decode (greedy, or seeded sampling
//! with `--temperature`/`--top-p`) with the sampler and the detokenizer in the loop. `benches/compare.py` runs this beside transformers + peft.
//!
//! ```sh
//! cargo bench --bench throughput -- [--models-dir DIR] [--model NAME] [--adapter DIR]…
//!     [--format gguf|safetensors] [--requant auto|keep|q8_0|q4_0|…] [--tokens 128]
//!     [--runs 3] [--threads N] [--temperature 0] [--top-p 1] [--json]
//! ```
//! `--batch N`: the decode step of N sequences batched (one `Model::forward_batch` per step)
//! against N = 1, as ms per step and aggregate tokens/s.
//!
//! Without `--models-dir` the test models (`~/.cache/ferrotune/test-models`) are used.

use std::path::PathBuf;
use std::time::Instant;

use ferrotune::inference::sampling::Sampler;
use ferrotune::inference::text::{ChatAssets, Detokenizer};
use ferrotune::inference::{ChatMessage, Model, Requantize, SamplingParams, WeightsSource, lora};

struct Args {
    models_dir: PathBuf,
    model: String,
    adapters: Vec<PathBuf>,
    format: String,
    requant: String,
    tokens: usize,
    runs: usize,
    json: bool,
    prompt: String,
    /// 0: greedy (the default); otherwise seeded sampling at this temperature.
    temperature: f64,
    top_p: f64,
    /// With N > 1: time batched decode steps of N sequences (`Model::forward_batch`) instead.
    batch: usize,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        models_dir: ferrotune::pyenv::cache_root().join("test-models"),
        model: "SmolLM2-135M-Instruct".into(),
        adapters: Vec::new(),
        format: "gguf".into(),
        requant: "auto".into(),
        tokens: 128,
        runs: 3,
        json: false,
        prompt: "Write a long story about a robot who learns to paint.".into(),
        temperature: 0.0,
        top_p: 1.0,
        batch: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--bench" => {}
            "--models-dir" => a.models_dir = val()?.into(),
            "--model" => a.model = val()?,
            "--adapter" => a.adapters.push(val()?.into()),
            "--format" => a.format = val()?,
            "--requant" => a.requant = val()?,
            "--tokens" => a.tokens = val()?.parse()?,
            "--runs" => a.runs = val()?.parse()?,
            "--prompt" => a.prompt = val()?,
            "--temperature" => a.temperature = val()?.parse()?,
            "--top-p" => a.top_p = val()?.parse()?,
            "--batch" => a.batch = val()?.parse()?,
            "--threads" => {
                // candle reads this when its thread pool starts (first use).
                // SAFETY: set before any other thread exists.
                unsafe { std::env::set_var("RAYON_NUM_THREADS", val()?) };
            }
            "--json" => a.json = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let a = parse()?;
    // SAFETY: still single-threaded (the model has not been touched yet).
    unsafe { ferrotune::inference::pin_thread_count() };
    let found = ferrotune::models::find_base_model(&a.models_dir, &a.model)?
        .ok_or_else(|| anyhow::anyhow!("no model {} in {}", a.model, a.models_dir.display()))?;
    let source = match a.format.as_str() {
        "gguf" => WeightsSource::Gguf(
            found
                .gguf
                .clone()
                .ok_or_else(|| anyhow::anyhow!("no GGUF"))?,
        ),
        _ => WeightsSource::Hf(found.path.clone()),
    };
    let requant = Requantize::parse(&a.requant)?;
    let t = Instant::now();
    let assets = ChatAssets::load(&found.path, source.clone())?;
    let model = Model::load(&source, requant)?;
    let load_s = t.elapsed().as_secs_f64();
    let adapters = a
        .adapters
        .iter()
        .map(|d| lora::load(d, &assets.config).map_err(|e| anyhow::anyhow!("{e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let adapter = adapters.first();
    let text = assets
        .template
        .render(&[ChatMessage::new("user", a.prompt.clone())], true)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let prompt = assets.encode(&text)?;
    if a.batch > 1 {
        return batched(&model, &prompt, &adapters, &a);
    }

    let mut ttfts = Vec::new();
    let mut decode_rates = Vec::new();
    let mut totals = Vec::new();
    let mut sample_text = String::new();
    for run in 0..a.runs + 1 {
        let mut cache = model.new_cache();
        let mut sampler = Sampler::new(&SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: Some(1),
            ..SamplingParams::greedy(a.tokens)
        });
        let mut detok = Detokenizer::new();
        let mut history = prompt.clone();
        let mut out = String::new();
        let start = Instant::now();
        let logits = model.forward(&prompt, &mut cache, adapter, false)?;
        let mut logits: Vec<f32> = logits.to_vec1()?;
        let mut tok = sampler.sample(&mut logits, &history);
        let ttft = start.elapsed().as_secs_f64();
        history.push(tok);
        if let Some(p) = detok.push(&assets.tokenizer, tok)? {
            out.push_str(&p);
        }
        let decode_start = Instant::now();
        for _ in 1..a.tokens {
            let logits = model.forward(&[tok], &mut cache, adapter, false)?;
            let mut logits: Vec<f32> = logits.to_vec1()?;
            tok = sampler.sample(&mut logits, &history);
            history.push(tok);
            if let Some(p) = detok.push(&assets.tokenizer, tok)? {
                out.push_str(&p);
            }
        }
        let decode = decode_start.elapsed().as_secs_f64();
        let total = start.elapsed().as_secs_f64();
        if run == 0 {
            continue; // warm-up (thread pool, caches, page faults)
        }
        ttfts.push(ttft);
        decode_rates.push((a.tokens - 1) as f64 / decode);
        totals.push(a.tokens as f64 / total);
        sample_text = out;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
        v[v.len() / 2]
    };
    // Memory: resident now and at its peak (the first load's quantisation included), against
    // the weights and the KV cache at the positions used (in the model's KV precision).
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (rss, peak) = (kb("VmRSS:") * 1024.0, kb("VmHWM:") * 1024.0);
    let kv = (model.kv_bytes_per_token() * (prompt.len() + a.tokens)) as f64;
    let weights = model.weight_bytes() as f64;
    let ttft = median(&mut ttfts);
    let decode = median(&mut decode_rates);
    let total = median(&mut totals);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "engine": "ferrotune",
                "weights": model.description,
                "adapters": a.adapters.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                "prompt_tokens": prompt.len(),
                "new_tokens": a.tokens,
                "load_s": load_s,
                "weight_bytes": weights,
                "kv_bytes": kv,
                "rss_bytes": rss,
                "peak_rss_bytes": peak,
                "ttft_s": ttft,
                "decode_tok_s": decode,
                "total_tok_s": total,
                "threads": candle_core::utils::get_num_threads(),
                "text": sample_text,
            })
        );
    } else {
        println!(
            "ferrotune [{}{}]: load {load_s:.2} s, prompt {} tokens, TTFT {:.1} ms, decode {decode:.1} tok/s, \
             {} tokens incl. prefill {total:.1} tok/s ({} threads); resident {:.0} MB (peak {:.0}) \
             = {:.2}× weights {:.0} MB + KV {:.1} MB",
            model.description,
            if adapter.is_some() { " + LoRA" } else { "" },
            prompt.len(),
            ttft * 1e3,
            a.tokens,
            candle_core::utils::get_num_threads(),
            rss / 1e6,
            peak / 1e6,
            rss / (weights + kv),
            weights / 1e6,
            kv / 1e6,
        );
        println!(
            "text: {:?}",
            sample_text.chars().take(160).collect::<String>()
        );
    }
    Ok(())
}

/// Decode steps of `a.batch` sequences batched (and of one, for the ratio), greedy.
fn batched(
    model: &Model,
    prompt: &[u32],
    adapters: &[lora::LoraAdapter],
    a: &Args,
) -> anyhow::Result<()> {
    // Sequence i uses adapter i mod the number given (none: the base alone).
    let adapter_of = |i: usize| (!adapters.is_empty()).then(|| &adapters[i % adapters.len()]);
    use ferrotune::inference::{BatchItem, Want, sampling::argmax};
    let mut report = Vec::new();
    for n in [1, a.batch] {
        let mut caches: Vec<_> = (0..n).map(|_| model.new_cache()).collect();
        let mut last = vec![0u32; n];
        for (i, (c, l)) in caches.iter_mut().zip(last.iter_mut()).enumerate() {
            let logits: Vec<f32> = model.forward(prompt, c, adapter_of(i), false)?.to_vec1()?;
            *l = argmax(&logits);
        }
        let steps = a.tokens;
        let t = Instant::now();
        for _ in 0..steps {
            let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
            let mut items: Vec<BatchItem<'_>> = caches
                .iter_mut()
                .zip(&toks)
                .enumerate()
                .map(|(i, (cache, t))| BatchItem {
                    tokens: t,
                    cache,
                    adapter: adapter_of(i),
                    want: Want::Last,
                })
                .collect();
            let out = model.forward_batch(&mut items)?;
            for (l, logits) in last.iter_mut().zip(out) {
                *l = argmax(&logits);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        report.push((n, secs * 1000.0 / steps as f64, (n * steps) as f64 / secs));
    }
    for (n, ms, rate) in &report {
        println!("batch {n}: {ms:.1} ms per step, {rate:.1} tok/s in all");
    }
    println!(
        "batched {}: {:.2}× the tokens/s of one sequence",
        a.batch,
        report[1].2 / report[0].2
    );
    Ok(())
}
