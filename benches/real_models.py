#!/usr/bin/env python3
"""A 1B-class checkpoint, as people bring it: load time (first, and from the quantised-weights
cache), resident memory and decode tokens/s of ferrotune's engine on a bf16 Hugging Face folder
quantised at load (f32 / Q8_0 / Q4_0 / Q4_K), side by side with llama.cpp on the same weights
converted by llama.cpp's own converter and quantiser, as ratios from one run.

    bash benches/llama_cpp_setup.sh          # once: llama-cpp-python and llama.cpp's converter
    $(target/debug/ferrotune setup --print-python) benches/real_models.py \\
        [--formats f32,q8_0,q4_0,q4_k] [--tokens 32] [--runs 2] [--threads N]

The model: random weights in TinyLlama-1.1B's shape (22 layers, hidden 2048, MLP 5632, 32
heads, 4 KV heads) with SmolLM2's tokenizer and chat template (vocabulary 49152, so 1.17 B
parameters, untied head), saved in bfloat16 and sharded the way published checkpoints are.
Random weights decode as fast as trained ones; the text is noise. It is made once with
transformers under ~/.cache/ferrotune/bench-models (2.3 GB), the GGUFs beside it (~7 GB).

Both engines: greedy, EOS ignored, the same chat-templated prompt, median of --runs after a
warm-up run. ferrotune's side is `cargo bench --bench throughput` (release) on the folder;
llama.cpp's runs in its own virtual environment (a subprocess: its resident memory is its own).

    $(target/debug/ferrotune setup --print-python) benches/real_models.py --batch 8 \
        [--formats q4_1] [--tokens 64] [--adapters 4]

`--batch N` (no llama.cpp needed): ferrotune alone, N sequences decoded in one batched step
each on `--adapters` different random rank-8 LoRAs (every projection), against one sequence on
one of them: the serving case of issue 14 on a model whose weights do not fit the processor's
caches, where decoding one sequence is bound by reading them.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ferrotune"
LLAMA_VERSION = "0.3.36"
LLAMA_SRC = CACHE / "llama-cpp-src" / f"llama_cpp_python-{LLAMA_VERSION}" / "vendor" / "llama.cpp"
NAME = "Llama-1.17B-random-bf16"
PROMPT = "Write a long story about a robot who learns to paint."
# llama.cpp's file types (llama.h): what its quantiser makes of each format. `pure`: every
# matrix in that format (by default llama.cpp keeps the output matrix at Q6_K), as ferrotune
# quantises every matrix to the chosen format.
LLAMA_FTYPES = {"q4_0": 2, "q4_k": 14}


def make_model(models, tokenizer_from):
    out = models / NAME
    if (out / "model.safetensors.index.json").is_file():
        return out
    import torch
    import transformers

    print(f"making {out} (random weights, TinyLlama's shape, bf16)", file=sys.stderr)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = models / f".{NAME}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    for name in os.listdir(tokenizer_from):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(tokenizer_from / name, tmp)
    tmp.rename(out)
    return out


def make_gguf(hf_dir, ggufs, fmt, llama_python):
    """The folder as llama.cpp would make it: its converter (f32, Q8_0), then its quantiser
    (Q4_0, Q4_K) from the f32 file."""
    path = ggufs / f"{NAME}-{fmt}.gguf"
    if path.is_file():
        return path
    ggufs.mkdir(parents=True, exist_ok=True)
    if fmt in ("f32", "q8_0"):
        env = dict(os.environ, PYTHONPATH=f"{LLAMA_SRC / 'gguf-py'}:{LLAMA_SRC}")
        subprocess.run([sys.executable, str(LLAMA_SRC / "convert_hf_to_gguf.py"), "--outtype",
                        fmt, "--outfile", str(path) + ".partial", str(hf_dir)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    else:
        src = make_gguf(hf_dir, ggufs, "f32", llama_python)
        subprocess.run([str(llama_python), __file__, "--quantize", str(src), str(path) + ".partial",
                        str(LLAMA_FTYPES[fmt])], check=True)
    os.rename(str(path) + ".partial", path)
    return path


def quantize(src, dst, ftype):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = True
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize failed ({rc})")


def memory():
    status = Path("/proc/self/status").read_text()
    kb = {l.split(":")[0]: float(l.split()[1]) for l in status.splitlines()
          if l.startswith(("VmRSS", "VmHWM"))}
    return kb["VmRSS"] * 1024, kb["VmHWM"] * 1024


def llama_cpp_run(args):
    """In llama.cpp's environment: load the GGUF, decode, print one JSON line."""
    from llama_cpp import Llama

    started = time.perf_counter()
    # n_batch=1: llama-cpp-python 0.3.36 built for this processor (AMX) crashes evaluating a
    # prompt in batches (see benches/compare.py); decode is one token at a time anyway.
    llm = Llama(model_path=args.llama_run, n_threads=args.threads, n_ctx=512, verbose=False,
                n_batch=1)
    load = time.perf_counter() - started
    eos = llm.token_eos()
    rates = []
    for run in range(args.runs + 1):
        llm.reset()
        first, n = None, 0
        for _ in llm.create_completion(args.prompt_text, max_tokens=args.tokens, temperature=0.0,
                                       stream=True, logit_bias={eos: -1e9}):
            n += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        if run:
            rates.append((n - 1) / (end - first))
    rss, peak = memory()
    print(json.dumps({"load_s": load, "decode_tok_s": statistics.median(rates),
                      "rss_bytes": rss, "peak_rss_bytes": peak,
                      "file_bytes": os.path.getsize(args.llama_run)}))


def make_adapters(hf_dir, n):
    """`n` random rank-8 PEFT LoRAs on every projection of the model in `hf_dir`."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
              "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
              "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    dirs = []
    for k in range(n):
        out = hf_dir.parent / f".{NAME}-lora-{k}"
        dirs.append(out)
        if out.is_dir():
            continue
        g = torch.Generator().manual_seed(k)
        tensors = {}
        for layer in range(layers):
            for name, (o, i) in shapes.items():
                p = f"base_model.model.model.layers.{layer}.{name}"
                tensors[f"{p}.lora_A.weight"] = torch.randn(8, i, generator=g) * 0.02
                tensors[f"{p}.lora_B.weight"] = torch.randn(o, 8, generator=g) * 0.02
        # Written whole under a temporary name, then renamed: an interrupted run leaves none.
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 8, "lora_alpha": 16, "bias": "none",
            "base_model_name_or_path": str(hf_dir), "task_type": "CAUSAL_LM",
            "target_modules": [m.split(".")[1] for m in shapes]}))
        tmp.rename(out)
    return dirs


def batched(args, models, hf_dir):
    adapters = make_adapters(hf_dir, args.adapters)
    fmt = args.formats or "q4_1"
    if "," in fmt:
        sys.exit("--batch runs one format")
    cmd = ["cargo", "bench", "--quiet", "--bench", "throughput", "--", "--models-dir",
           str(models), "--model", NAME, "--format", "safetensors", "--requant", fmt,
           "--tokens", str(args.tokens), "--threads", str(args.threads), "--batch",
           str(args.batch)]
    for a in adapters:
        cmd += ["--adapter", str(a)]
    print(f"{NAME}, {fmt}, {args.batch} sequences on {len(adapters)} adapters, "
          f"{args.tokens} steps, {args.threads} threads:", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def ferrotune_run(args, models, fmt):
    cmd = ["cargo", "bench", "--quiet", "--bench", "throughput", "--", "--models-dir",
           str(models), "--model", NAME, "--format", "safetensors",
           "--requant", "keep" if fmt == "f32" else fmt, "--tokens", str(args.tokens),
           "--runs", str(args.runs), "--threads", str(args.threads), "--json",
           "--prompt", PROMPT]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", help="default: f32,q8_0,q4_0,q4_k (with --batch: q4_1)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=0,
                   help="ferrotune alone: N sequences batched on --adapters LoRAs against one")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--llama-python", type=Path,
                   default=os.environ.get("FERROTUNE_LLAMA_PYTHON",
                                          CACHE / "llama-bench-venv" / "bin" / "python"))
    p.add_argument("--quantize", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--llama-run", help=argparse.SUPPRESS)
    p.add_argument("--prompt-text", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quantize:
        quantize(args.quantize[0], args.quantize[1], int(args.quantize[2]))
        return
    if args.llama_run:
        llama_cpp_run(args)
        return
    if args.batch:
        models = CACHE / "bench-models"
        batched(args, models, make_model(models, CACHE / "test-models" / "SmolLM2-135M-Instruct"))
        return
    if not Path(args.llama_python).is_file() or not (LLAMA_SRC / "convert_hf_to_gguf.py").is_file():
        sys.exit("llama.cpp is not set up: run `bash benches/llama_cpp_setup.sh` first")
    models = CACHE / "bench-models"
    ggufs = CACHE / "bench-ggufs"
    hf_dir = make_model(models, CACHE / "test-models" / "SmolLM2-135M-Instruct")
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(hf_dir).apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    subprocess.run(["cargo", "bench", "--quiet", "--bench", "throughput", "--no-run"], cwd=ROOT,
                   check=True)
    rows = []
    for fmt in (args.formats or "f32,q8_0,q4_0,q4_k").split(","):
        gguf = make_gguf(hf_dir, ggufs, fmt, args.llama_python)
        cache = hf_dir / ".ferrotune"
        shutil.rmtree(cache, ignore_errors=True)
        first = ferrotune_run(args, models, fmt)
        ours = ferrotune_run(args, models, fmt) if fmt != "f32" else first
        out = subprocess.run([str(args.llama_python), __file__, "--llama-run", str(gguf),
                              "--prompt-text", text, "--tokens", str(args.tokens), "--runs",
                              str(args.runs), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        theirs = json.loads(out.strip().splitlines()[-1])
        rows.append((fmt, first, ours, theirs))
        print(f"{fmt}: ferrotune {json.dumps(ours)}\n{fmt}: llama.cpp {json.dumps(theirs)}",
              file=sys.stderr)
    mb = 1e6
    print(f"\n{NAME} (1.17 B parameters), {args.tokens} greedy tokens, {args.threads} threads, "
          f"median of {args.runs} runs after a warm-up\n")
    print(f"{'format':<6} | {'ferrotune load s':>16} {'cached':>7} {'RSS MB':>7} {'(×w+kv)':>8} "
          f"{'peak MB':>8} {'tok/s':>6} | {'llama.cpp load s':>16} {'RSS MB':>7} {'tok/s':>6} "
          f"| {'decode ×':>8} {'RSS ×':>6}")
    for fmt, first, ours, theirs in rows:
        ratio = ours["rss_bytes"] / (ours["weight_bytes"] + ours["kv_bytes"])
        peak = max(first["peak_rss_bytes"], ours["peak_rss_bytes"])
        print(f"{fmt:<6} | {first['load_s']:>16.1f} {ours['load_s']:>7.2f} "
              f"{ours['rss_bytes'] / mb:>7.0f} {ratio:>8.2f} {peak / mb:>8.0f} "
              f"{ours['decode_tok_s']:>6.2f} | {theirs['load_s']:>16.2f} "
              f"{theirs['rss_bytes'] / mb:>7.0f} {theirs['decode_tok_s']:>6.2f} | "
              f"{ours['decode_tok_s'] / theirs['decode_tok_s']:>7.2f}× "
              f"{ours['rss_bytes'] / theirs['rss_bytes']:>5.2f}×")
    print("\nferrotune: `load s` quantises the bf16 folder and writes the cache; `cached` maps "
          "it (f32: no cache). RSS at the end; ×w+kv: over the weights plus the KV cache.")


if __name__ == "__main__":
    main()
