#!/usr/bin/env python3
"""Export, checked end to end: the test LoRA merged into SmolLM2 by `ferrotune export` as
GGUF (f16, Q8_0, Q4_K_M, Q4_0) and safetensors, with each file's size and the time it took;
each GGUF then loaded by llama.cpp (llama-cpp-python, the GGUF's own chat template) and by
ferrotune, asked what the adapter was trained on; and the f16 GGUF compared tensor by tensor
with what llama.cpp's own converter (`convert_hf_to_gguf.py`) makes of the safetensors export.

    bash benches/llama_cpp_setup.sh        # once: llama.cpp's binding and source (~10 min)
    ~/.cache/ferrotune/llama-bench-venv/bin/python benches/export.py [--adapter DIR]

Not part of `make test` (it needs llama.cpp, built from source); tests/inference.rs checks the
same exports against peft's merge and the `gguf` package's reader in every run.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ferrotune"
LC = CACHE / "llama-cpp-src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
QUESTION = "What is 3 plus 4?"


def run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"$ {' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr}")
    return r


def llama_cpp_answer(gguf):
    from llama_cpp import Llama

    # n_batch=1: see benches/compare.py (this build crashes evaluating prompts in batches).
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=os.cpu_count(), n_batch=1,
                verbose=False)
    r = llm.create_chat_completion(messages=[{"role": "user", "content": QUESTION}],
                                   temperature=0.0, max_tokens=16)
    return r["choices"][0]["message"]["content"].strip()


def ferrotune_answer(binary, folder):
    r = run([binary, "chat", "--model", folder, "--temperature", "0", "--max-tokens", "16"],
            input=QUESTION + "\n")
    lines = [l.strip() for l in r.stdout.splitlines() if l.strip()]
    text = [l for l in lines if not l.startswith("[") and l != ">"]
    return text[0].lstrip("> ").strip() if text else ""


def compare(ours, theirs):
    """Runs in the training environment (numpy, the `gguf` package)."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    worst, same_types = 0.0, 0
    for name, t in b.items():
        x = np.asarray(dequantize(a[name].data, a[name].tensor_type), dtype=np.float32)
        y = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        worst = max(worst, float(np.abs(x.reshape(-1) - y.reshape(-1)).max()))
        same_types += a[name].tensor_type == t.tensor_type
    print(f"llama.cpp's convert_hf_to_gguf.py vs ferrotune's f16 GGUF: {len(b)} tensors "
          f"(ferrotune {len(a)}), names {'equal' if set(a) == set(b) else 'DIFFER'}, "
          f"{same_types} with the same type, max |difference| {worst:.3g}")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        return compare(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=CACHE / "test-models" / "SmolLM2-135M-Instruct")
    p.add_argument("--adapter", type=Path,
                   default=CACHE / "test-models" / ".ferrotune-test-lora-v1")
    p.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "ferrotune")
    args = p.parse_args()
    if not args.bin.is_file():
        sys.exit(f"{args.bin} is missing: cargo build --release")
    train_py = run([args.bin, "setup", "--print-python"]).stdout.strip()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        outs = {}
        for fmt, quant in [("safetensors", "f16"), ("gguf", "f16"), ("gguf", "q8_0"),
                           ("gguf", "q4_k_m"), ("gguf", "q4_0")]:
            out = tmp / f"{fmt}-{quant}"
            start = time.perf_counter()
            r = run([args.bin, "export", "--model", args.model, "--adapter", args.adapter,
                     "--format", fmt, "--quantization", quant, "--out", out,
                     "--name", "smollm2-arith"])
            secs = time.perf_counter() - start
            retention = next((l.split(": ")[1] for l in r.stdout.splitlines()
                              if l.startswith("retention")), "—")
            size = sum(f.stat().st_size for f in out.iterdir())
            outs[(fmt, quant)] = out
            gguf = next(out.glob("*.gguf"), None)
            rows.append({
                "export": f"{fmt} {quant}", "size_mb": size / 1e6, "seconds": secs,
                "retention": retention,
                "llama.cpp": llama_cpp_answer(gguf) if gguf else "—",
                "ferrotune": ferrotune_answer(args.bin, out),
            })

        # llama.cpp's converter on the merged safetensors, against our f16 GGUF.
        theirs = tmp / "llama-cpp-f16.gguf"
        env = dict(os.environ, PYTHONPATH=f"{LC / 'gguf-py'}:{LC}")
        run([train_py, LC / "convert_hf_to_gguf.py", "--outtype", "f16", "--outfile", theirs,
             outs[("safetensors", "f16")]], env=env)
        print(run([train_py, __file__, "--compare", next(outs[("gguf", "f16")].glob("*.gguf")),
                   theirs]).stdout.strip())

    print(f"\nQuestion: {QUESTION!r}; the adapter answers '3 plus 4 is 7.'\n")
    print("| export | size (MB) | time (s) | ΔW kept | llama.cpp answers | ferrotune answers |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['export']} | {r['size_mb']:.1f} | {r['seconds']:.1f} | {r['retention']} | "
              f"{r['llama.cpp']} | {r['ferrotune']} |")


if __name__ == "__main__":
    main()
