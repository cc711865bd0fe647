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


def llama_cpp(args, gguf, lora=None, text=None):
    """llama.cpp in this interpreter, or through `--llama-python` (another environment,
    e.g. the one `benches/llama_cpp_setup.sh` makes) when this one does not have it."""
    try:
        from llama_cpp import Llama
    except ImportError:
        if not args.llama_python or not Path(args.llama_python).is_file():
            return None
        cmd = [str(args.llama_python), __file__, "--llama-cpp-json", "--models-dir",
               str(args.models_dir), "--model", args.model, "--tokens", str(args.tokens),
               "--runs", str(args.runs), "--threads", str(args.threads),
               "--llama-batch", str(args.llama_batch), "--prompt-text", text]
        if lora:
            cmd += ["--llama-lora", str(lora)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    # n_batch=1: llama-cpp-python 0.3.36 built for this processor (AMX) crashes evaluating a
    # prompt in batches; one token at a time works, and only makes its TTFT pessimistic.
    llm = Llama(model_path=str(gguf), n_threads=args.threads, n_ctx=1024, verbose=False,
                n_batch=args.llama_batch, lora_path=str(lora) if lora else None)
    prompt = text
    eos = llm.token_eos()
    ttfts, rates, totals = [], [], []
    for run in range(args.runs + 1):
        llm.reset()
        start = time.perf_counter()
        first, n = None, 0
        # Greedy, EOS suppressed so every engine makes the same number of tokens.
        for _ in llm.create_completion(prompt, max_tokens=args.tokens, temperature=0.0,
                                       stream=True, logit_bias={eos: -1e9}):
            n += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        if run == 0:
            continue
        ttfts.append(first - start)
        rates.append((n - 1) / (end - first))
        totals.append(n / (end - start))
    return {"name": f"llama.cpp (llama-cpp-python, GGUF{' + LoRA' if lora else ', no adapter'})",
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
    p.add_argument("--llama-python", type=Path,
                   default=os.environ.get("FERROTUNE_LLAMA_PYTHON",
                                          CACHE / "llama-bench-venv" / "bin" / "python"),
                   help="a Python with llama-cpp-python, when this one has none")
    p.add_argument("--llama-lora", type=Path,
                   help="the adapter as a llama.cpp GGUF LoRA (default: adapter.gguf in the "
                        "adapter folder, where benches/llama_cpp_setup.sh writes it)")
    p.add_argument("--llama-batch", type=int, default=1,
                   help="llama.cpp's prompt batch (default 1, see llama_cpp())")
    p.add_argument("--llama-cpp-json", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompt-text", help=argparse.SUPPRESS)
    args = p.parse_args()
    model_dir = args.models_dir / args.model
    gguf = next(model_dir.glob("*.gguf"), None)
    if args.llama_cpp_json:
        print(json.dumps(llama_cpp(args, gguf, args.llama_lora, args.prompt_text)))
        return
    if args.no_adapter:
        args.adapter = None
    elif args.adapter and not (args.adapter / "adapter_model.safetensors").is_file():
        sys.exit(f"no adapter at {args.adapter} (run the inference tests once, or --no-adapter)")
    results = [ferrotune(args), transformers_peft(args, model_dir)]
    # The same templated prompt for llama.cpp as the others get (system line included).
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    if gguf is not None:
        r = llama_cpp(args, gguf, None, text)
        if r is not None:
            results.append(r)
            lora = args.llama_lora or (args.adapter / "adapter.gguf" if args.adapter else None)
            if lora and lora.is_file():
                results.append(llama_cpp(args, gguf, lora, text))
            elif args.adapter:
                print("(no GGUF LoRA for llama.cpp: benches/llama_cpp_setup.sh converts the "
                      "adapter)", file=sys.stderr)
        else:
            print("(llama-cpp-python is not installed: llama.cpp is left out; "
                  "benches/llama_cpp_setup.sh installs it apart)", file=sys.stderr)
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
