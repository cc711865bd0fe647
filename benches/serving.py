#!/usr/bin/env python3
"""Serving throughput under concurrency: ferrotune's server beside llama.cpp's, in one run.

    cargo build --release
    python3 benches/serving.py [--llama-server PATH] [--streams 1,4,8,16] [--tokens 128]

Starts each server on loopback over the same SmolLM2 GGUF (the test models; the adapters are
the test LoRA at four scales, made and converted by `benches/llama_cpp_setup.sh --serving`),
then for each number of concurrent streams, with every stream on one adapter and with the
streams spread over four adapters, sends that many streaming greedy chat requests at once (`ignore_eos`: every stream
generates exactly `--tokens` tokens)
and reports: aggregate decode tokens/s (all tokens over the wall time), the slowest and the
median stream's tokens/s (after its first token), and the worst time to first token.
llama.cpp's server runs with `-np N` (N slots, continuous batching) and the adapters loaded
unapplied (`--lora-init-without-apply`), each request naming its own (`"lora"`). Both use
the same number of threads. The ratio column is ferrotune / llama.cpp aggregate tokens/s.

    python3 benches/serving.py --models-dir DIR --model NAME --adapter A --adapter B … \
        [--weights q4_1]

ferrotune alone on another model folder and its adapters (at least one; stream i of the
spread runs uses adapter i mod their number), its weights quantised as `--weights` says (the
server's `inference_weights`): e.g. the 1.17B random-weight model and LoRAs that
`benches/real_models.py --batch 8` makes under ~/.cache/ferrotune/bench-models.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fairness import post, user  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ferrotune"
MODELS = CACHE / "test-models"
MODEL = "SmolLM2-135M-Instruct"
SCALES = ["1", "3", "0.5", "2"]
PROMPTS = [
    "Write a long story about a robot who learns to paint.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy market in a large city.",
    "Write a long letter to a friend about your summer holidays.",
]


def adapter_dirs():
    if ADAPTERS:
        return ADAPTERS
    return [MODELS / f".ferrotune-serving-lora-x{s}" for s in SCALES]


# Set from the command line (another model and its adapters).
ADAPTERS = []
WEIGHTS = None


def wait_http(url, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer")


def stream(url, body, token, out):
    """One streaming chat request; appends (t_start, t_first, t_last, tokens) to `out`."""
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = "Bearer " + token
    req = urllib.request.Request(url, json.dumps(body).encode(), headers)
    start = time.time()
    first = last = None
    pieces = 0
    usage = None
    with urllib.request.urlopen(req, timeout=900) as resp:
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices", []):
                if ch.get("delta", {}).get("content"):
                    now = time.time()
                    first = first or now
                    last = now
                    pieces += 1
    tokens = usage["completion_tokens"] if usage else pieces
    out.append((start, first or start, last or start, tokens))


def burst(url, n, bodies, token):
    out = []
    threads = [threading.Thread(target=stream, args=(url, bodies[i], token, out)) for i in range(n)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    total = sum(r[3] for r in out)
    per = [(r[3] - 1) / (r[2] - r[1]) if r[2] > r[1] else 0.0 for r in out]
    ttft = max(r[1] - r[0] for r in out)
    return {"aggregate": total / wall, "slowest": min(per), "median": statistics.median(per),
            "ttft": ttft, "tokens": total}


def ferrotune_server(port, threads, data):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), FERROTUNE_AUTO_SETUP="false",
               FERROTUNE_DEFAULT_MODEL="", FERROTUNE_MAX_GENERATIONS_PER_USER="64",
               FERROTUNE_MAX_CONCURRENT_GENERATIONS="64", RUST_LOG="warn")
    if WEIGHTS:
        env["FERROTUNE_INFERENCE_WEIGHTS"] = WEIGHTS
    proc = subprocess.Popen(
        [str(ROOT / "target/release/ferrotune"), "serve", "--bind", f"127.0.0.1:{port}",
         "--data-dir", data, "--models-dir", str(MODELS)], env=env)
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc


def upload_adapter(base, token, folder, name):
    """POST /api/files/models/adapters with the folder as a .tar.gz (multipart)."""
    import tarfile
    with tempfile.NamedTemporaryFile(suffix=".tar.gz") as f:
        with tarfile.open(f.name, "w:gz") as tar:
            for p in ("adapter_config.json", "adapter_model.safetensors"):
                tar.add(folder / p, arcname=p)
        data = Path(f.name).read_bytes()
    b = uuid.uuid4().hex
    body = b"".join([
        f"--{b}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n".encode(),
        f"--{b}\r\nContent-Disposition: form-data; name=\"base_model\"\r\n\r\n{MODEL}\r\n".encode(),
        f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.tar.gz\"\r\n"
        "Content-Type: application/gzip\r\n\r\n".encode(), data, f"\r\n--{b}--\r\n".encode()])
    req = urllib.request.Request(base + "/api/files/models/adapters", body, {
        "content-type": f"multipart/form-data; boundary={b}", "authorization": "Bearer " + token})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())["model_id"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary (none: ferrotune only)")
    ap.add_argument("--streams", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--models-dir", type=Path, help="another models folder (ferrotune only)")
    ap.add_argument("--model", help="the base model's folder name in --models-dir")
    ap.add_argument("--adapter", type=Path, action="append", default=[],
                    help="an adapter folder for --model (repeat; stream i uses i mod their number)")
    ap.add_argument("--weights", help="what the weights become at load (inference_weights)")
    args = ap.parse_args()
    global MODELS, MODEL, ADAPTERS, WEIGHTS
    if args.models_dir or args.model or args.adapter:
        if not (args.models_dir and args.model and args.adapter):
            sys.exit("--models-dir, --model and --adapter go together")
        if args.llama_server:
            sys.exit("--llama-server runs on the test model only")
        MODELS, MODEL, ADAPTERS = args.models_dir, args.model, args.adapter
    WEIGHTS = args.weights
    counts = [int(x) for x in args.streams.split(",")]
    n_ad = len(adapter_dirs())
    spread = f"{n_ad} adapters"
    gguf = next((MODELS / MODEL).glob("*.gguf"), MODELS / MODEL)
    need = ["adapter_config.json", "adapter_model.safetensors"]
    if args.llama_server:
        need.append("adapter.gguf")
    missing = [d / n for d in adapter_dirs() for n in need if not (d / n).is_file()]
    if missing and ADAPTERS:
        sys.exit(f"{missing[0]} is missing (benches/real_models.py --batch makes the 1.17B "
                 "model's adapters)")
    if missing:
        sys.exit(f"run `bash benches/llama_cpp_setup.sh --serving` first ({missing[0]} is missing)")
    if len({d.name for d in adapter_dirs()}) < len(adapter_dirs()):
        sys.exit("the adapter folders need different names (they are uploaded by name)")
    results = {}

    def bodies(model_of, lora_of):
        out = []
        for i in range(max(counts)):
            b = {"model": model_of(i), "stream": True, "temperature": 0, "ignore_eos": True,
                 "max_tokens": args.tokens, "stream_options": {"include_usage": True},
                 "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
            lora = lora_of(i)
            if lora is not None:
                b["lora"] = lora
            out.append(b)
        return out

    with tempfile.TemporaryDirectory() as data:
        port = 18391
        proc = ferrotune_server(port, args.threads, data)
        try:
            base = f"http://127.0.0.1:{port}"
            token = user(base, "bench")
            ids = [upload_adapter(base, token, d, d.name.lstrip(".")) for d in adapter_dirs()]
            url = base + "/v1/chat/completions"
            for mode, pick in (("one adapter", lambda i: ids[0]),
                               (spread, lambda i: ids[i % n_ad])):
                b = bodies(pick, lambda i: None)
                burst(url, 1, b, token)  # loads the model and the adapters
                burst(url, 4, b, token)
                for n in counts:
                    results[("ferrotune", mode, n)] = burst(url, n, b, token)
        finally:
            proc.terminate()
            proc.wait()

    if args.llama_server:
        port = 18392
        nmax = max(counts)
        cmd = [args.llama_server, "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1",
               "-np", str(nmax), "-c", str(nmax * 2048), "-t", str(args.threads),
               "-tb", str(args.threads), "--lora-init-without-apply", "--no-webui"]
        for d in adapter_dirs():
            cmd += ["--lora", str(d / "adapter.gguf")]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_http(f"http://127.0.0.1:{port}/health")
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            for mode, pick in (("one adapter", lambda i: 0), (spread, lambda i: i % 4)):
                b = bodies(lambda i: MODEL,
                           lambda i, pick=pick: [{"id": j, "scale": 1.0 if j == pick(i) else 0.0}
                                                 for j in range(4)])
                burst(url, 1, b, None)
                burst(url, 4, b, None)
                for n in counts:
                    results[("llama.cpp", mode, n)] = burst(url, n, b, None)
        finally:
            proc.terminate()
            proc.wait()

    if args.json:
        print(json.dumps({" / ".join(map(str, k)): v for k, v in results.items()}, indent=1))
        return
    single = {mode: results[("ferrotune", mode, counts[0])]["aggregate"]
              for mode in ("one adapter", spread)}
    print(f"{gguf.name}, {args.tokens} greedy tokens per stream, {args.threads} threads")
    print("| adapters | streams | ferrotune tok/s (× 1 stream) | slowest stream | median stream "
          "| worst TTFT s | llama.cpp tok/s | slowest | worst TTFT s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in ("one adapter", spread):
        for n in counts:
            f = results[("ferrotune", mode, n)]
            ll = results.get(("llama.cpp", mode, n))
            row = (f"| {mode} | {n} | {f['aggregate']:.1f} ({f['aggregate'] / single[mode]:.2f}×) "
                   f"| {f['slowest']:.1f} | {f['median']:.1f} | {f['ttft']:.2f} ")
            if ll:
                row += (f"| {ll['aggregate']:.1f} | {ll['slowest']:.1f} | {ll['ttft']:.2f} "
                        f"| {f['aggregate'] / ll['aggregate']:.2f} |")
            else:
                row += "| – | – | – | – |"
            print(row)


if __name__ == "__main__":
    main()
