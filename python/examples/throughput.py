"""Decode speed of ferrotune.Engine in this Python process, and of a server's /v1 endpoint on
the same prompt and settings (greedy, streaming), to compare the two.

    python python/examples/throughput.py --models-dir ~/.cache/ferrotune/test-models \
        [--server http://127.0.0.1:8080 --api-key ft-…] [--tokens 128] [--runs 3]

Reported: tokens/s over the whole request (completion tokens / time from the call to the last
piece: prefill + decode, and for the server HTTP), decode tokens/s ((completion tokens - 1) /
time from the first piece to the last), and the time to the first piece. Runs alternate
between the two so that a busy moment of the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request

import ferrotune
from ferrotune.client import _sse

PROMPT = "Write a long story about a robot who learns to paint."


def measure(pieces, usage):
    started = time.perf_counter()
    first = None
    for _ in pieces:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    tokens = usage()["completion_tokens"]
    return {
        "tokens": tokens,
        "tok_s": tokens / (end - started),
        "ttft_s": (first or end) - started,
        "decode_tok_s": (tokens - 1) / (end - first) if first and end > first else 0.0,
    }


def engine_run(engine, model, tokens):
    stream = engine.chat(model, PROMPT, temperature=0, max_tokens=tokens, stream=True)
    return measure(stream, lambda: stream.usage)


def server_run(url, key, model, tokens):
    body = json.dumps({
        "model": model, "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0, "max_tokens": tokens, "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    req = urllib.request.Request(
        url.rstrip("/") + "/v1/chat/completions", data=body, method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    usage = {}

    def pieces():
        with urllib.request.urlopen(req, timeout=600) as resp:
            for _id, _event, data in _sse(resp):
                if data == "[DONE]":
                    return
                if data.get("usage"):
                    usage.update(data["usage"])
                for choice in data.get("choices", []):
                    if (choice.get("delta") or {}).get("content"):
                        yield

    return measure(pieces(), lambda: usage)


def report(name, runs):
    def stats(key, scale=1.0):
        xs = [r[key] * scale for r in runs]
        return statistics.median(xs), max(xs), min(xs)

    whole, decode, ttft = stats("tok_s"), stats("decode_tok_s"), stats("ttft_s", 1000)
    print(f"{name:7s} whole request {whole[0]:6.1f} tok/s (best {whole[1]:.1f}) | decode "
          f"{decode[0]:6.1f} tok/s (best {decode[1]:.1f}) | first piece {ttft[0]:.0f} ms "
          f"(best {ttft[2]:.0f}) | medians of {len(runs)} runs of {runs[0]['tokens']} tokens")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models-dir")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--server")
    p.add_argument("--api-key")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()

    engine = ferrotune.Engine(a.models_dir)
    engine_run(engine, a.model, 8)  # loads the weights
    if a.server:
        server_run(a.server, a.api_key, a.model, 8)
    ours, theirs = [], []
    for _ in range(a.runs):
        ours.append(engine_run(engine, a.model, a.tokens))
        if a.server:
            theirs.append(server_run(a.server, a.api_key, a.model, a.tokens))
    report("python", ours)
    if theirs:
        report("server", theirs)


if __name__ == "__main__":
    main()
