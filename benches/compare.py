#!/usr/bin/env python3
"""Side by side, in one run: decode tokens/s and time to first token of ferrotune's engine,
HF transformers + peft, and llama.cpp (llama-cpp-python, where it is installed), on the same
model, adapter, prompt and number of greedy tokens. Prints the ratios.

    python benches/compare.py [--adapter DIR] [--tokens 128] [--runs 3] [--threads N]

Run it with the managed training environment's Python (it has torch, transformers and
peft): `$(target/debug/ferrotune setup --print-python) benches/compare.py`. ferrotune's side
is `cargo bench --bench throughput` (release profile). The default model folder is the test
models' SmolLM2-135M-Instruct (GGUF + its exact de-quantised HF form); the default adapter
is the LoRA the inference tests train.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ferrotune"
PROMPT = "Write a long story about a robot who learns to paint."


def ferrotune(args):
    cmd = [
        "cargo", "bench", "--quiet", "--bench", "throughput", "--",
        "--models-dir", str(args.models_dir), "--model", args.model,
        "--tokens", str(args.tokens), "--runs", str(args.runs), "--json",
        "--threads", str(args.threads), "--prompt", PROMPT,
    ]
    if args.adapter:
        cmd += ["--adapter", str(args.adapter)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return {"name": f"ferrotune ({r['weights']}{' + LoRA' if args.adapter else ''})",
            "ttft_s": r["ttft_s"], "decode_tok_s": r["decode_tok_s"], "total_tok_s": r["total_tok_s"]}


def transformers_peft(args, model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(args.adapter))
    model.eval()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok(text)["input_ids"]])
    ttfts, rates, totals = [], [], []
    with torch.inference_mode():
        for run in range(args.runs + 1):
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            pkv, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            ttft = time.perf_counter() - start
            t0 = time.perf_counter()
            for _ in range(args.tokens - 1):
                out = model(input_ids=torch.tensor([[nxt]]), past_key_values=pkv, use_cache=True)
                pkv, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            decode = time.perf_counter() - t0
            if run == 0:
                continue
            ttfts.append(ttft)
            rates.append((args.tokens - 1) / decode)
            totals.append(args.tokens / (time.perf_counter() - start))
    return {"name": f"transformers + peft (fp32{' + LoRA' if args.adapter else ''})",
            "ttft_s": statistics.median(ttfts), "decode_tok_s": statistics.median(rates),
            "total_tok_s": statistics.median(totals)}


def llama_cpp(args, gguf):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_threads=args.threads, n_ctx=1024, verbose=False,
                lora_path=None)
    text = PROMPT
    ids = llm.tokenize(
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n".encode(), special=True)
    ttfts, rates, totals = [], [], []
    for run in range(args.runs + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        nxt = llm.sample(temp=0.0)
        ttft = time.perf_counter() - start
        t0 = time.perf_counter()
        for _ in range(args.tokens - 1):
            llm.eval([nxt])
            nxt = llm.sample(temp=0.0)
        decode = time.perf_counter() - t0
        if run == 0:
            continue
        ttfts.append(ttft)
        rates.append((args.tokens - 1) / decode)
        totals.append(args.tokens / (time.perf_counter() - start))
    return {"name": "llama.cpp (llama-cpp-python, GGUF, no adapter)",
            "ttft_s": statistics.median(ttfts), "decode_tok_s": statistics.median(rates),
            "total_tok_s": statistics.median(totals)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", type=Path, default=CACHE / "test-models")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--adapter", type=Path,
                   default=CACHE / "test-models" / ".ferrotune-test-lora-v1")
    p.add_argument("--no-adapter", action="store_true")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    if args.no_adapter:
        args.adapter = None
    elif args.adapter and not (args.adapter / "adapter_model.safetensors").is_file():
        sys.exit(f"no adapter at {args.adapter} (run the inference tests once, or --no-adapter)")
    model_dir = args.models_dir / args.model
    gguf = next(model_dir.glob("*.gguf"), None)

    results = [ferrotune(args), transformers_peft(args, model_dir)]
    if gguf is not None:
        r = llama_cpp(args, gguf)
        if r is not None:
            results.append(r)
        else:
            print("(llama-cpp-python is not installed: llama.cpp is left out)", file=sys.stderr)
    ours = results[0]
    print(f"\n{args.model}, prompt {PROMPT!r}, {args.tokens} greedy tokens, "
          f"{args.threads} threads, median of {args.runs} runs\n")
    print(f"{'engine':<72} {'TTFT ms':>8} {'decode tok/s':>13} {'ferrotune ×':>12}")
    for r in results:
        ratio = ours["decode_tok_s"] / r["decode_tok_s"]
        print(f"{r['name']:<72} {r['ttft_s'] * 1e3:>8.1f} {r['decode_tok_s']:>13.1f} "
              f"{ratio:>11.2f}×")


if __name__ == "__main__":
    main()
