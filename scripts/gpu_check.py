"""The server half of scripts/gpu-check.sh: a ferrotune server with `inference_device =
cuda:0` on a loopback port and a temporary data dir; one short LoRA run on the GPU through the
API; chat with the result through the CUDA engine; tokens/s of the base and the adapter, and
the same base on the CPU for the ratio. Prints what it measures; exits non-zero on a failure."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import threading
import time

import ferrotune

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is 3 plus 4?"


def rows():
    out = []
    for i in range(1, 17):
        a, b = i % 7 + 1, i % 5 + 2
        out.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."})
    return out


def serve(binary, data_dir, models_dir, device):
    env = {k: v for k, v in os.environ.items() if k != "FERROTUNE_CONFIG"}
    env.update(RUST_LOG="info", FERROTUNE_AUTO_SETUP="true", FERROTUNE_INFERENCE_DEVICE=device,
               FERROTUNE_DEFAULT_MODEL="smollm2-135m-instruct")
    proc = subprocess.Popen(
        [binary, "serve", "--bind", "127.0.0.1:0", "--data-dir", data_dir, "--models-dir", models_dir],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True,
    )
    lines, url = [], None
    deadline = time.time() + 300
    while url is None and time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"http://127\.0\.0\.1:\d+", line)
        if m and "listening" in line:
            url = m.group(0)
    if url is None:
        proc.kill()
        sys.exit("the server did not start:\n" + "".join(lines[-30:]))
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, url, lines


def speed(client, model, n=128):
    client.chat(model, "Hi", temperature=0, max_tokens=4)  # load the model first
    started = time.time()
    r = client._json("POST", "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "Write a long story about the sea."}],
        "temperature": 0, "max_tokens": n,
    }, timeout=600)
    secs = time.time() - started
    return r["usage"]["completion_tokens"] / secs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--device", default="cuda:0", help="where chat runs (cpu: try the script without a GPU)")
    ap.add_argument("--models-dir", default=str(pathlib.Path.home() / ".cache" / "ferrotune" / "test-models"))
    args = ap.parse_args()
    os.makedirs(args.models_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, log = serve(args.bin, os.path.join(tmp, "data"), args.models_dir, args.device)
        try:
            client = ferrotune.Client(url)
            client.register("gpu", "gpu@example.com", "gpu-check-password-1")
            client.login("gpu", "gpu-check-password-1")
            resources = client._json("GET", "/api/system/resources")
            print("server resources:", json.dumps(resources)[:600])
            data = pathlib.Path(tmp) / "arith.json"
            data.write_text(json.dumps(rows()))
            ds = client.upload_dataset(data)
            task = client.create_task(
                name="gpu-check", model_name=MODEL, dataset_id=ds["file_id"], epochs=2,
                learning_rate=0.001, batch_size=4, cutoff_len=128, lora_rank=8, save_steps=100,
                logging_steps=1, gpus=1,
            )
            started = time.time()
            done = client.wait(task["task_id"], progress=False, timeout=1800)
            print(f"training: {done['status']} in {time.time() - started:.0f} s")
            logs = client.logs(task["task_id"])
            print("  device lines:", [l for l in logs.splitlines() if re.search(r"cuda|device|bf16|fp16", l, re.I)][:5])
            if done["status"] != "completed":
                print(logs[-3000:])
                sys.exit(1)
            model_id = done["model_id"]
            answer = client.chat(model_id, QUESTION, temperature=0, max_tokens=16)
            print(f"adapter on the GPU answers {answer!r}")
            loaded = [l.strip() for l in log if "model loaded" in l]
            print("  engine:", loaded[-1] if loaded else "(no load line)")
            base_gpu = speed(client, MODEL)
            adapter_gpu = speed(client, model_id)
            print(f"decode on {args.device}, up to 128 greedy tokens: base {base_gpu:.1f} tok/s, with the LoRA {adapter_gpu:.1f} tok/s")
            ok = answer.strip() == "3 plus 4 is 7." and (args.device == "cpu" or any("cuda" in l for l in loaded))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        proc, url, log = serve(args.bin, os.path.join(tmp, "data"), args.models_dir, "cpu")
        try:
            client = ferrotune.Client(url)
            client.login("gpu", "gpu-check-password-1")
            base_cpu = speed(client, MODEL)
            print(f"decode on the CPU, same request: {base_cpu:.1f} tok/s (GPU/CPU {base_gpu / base_cpu:.2f}x)")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
