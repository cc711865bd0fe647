#!/usr/bin/env python3
"""How much a long prompt holds up a short answer, through a running server.

    cargo build --release
    FERROTUNE_AUTO_SETUP=false FERROTUNE_DEFAULT_MODEL= target/release/ferrotune serve \
        --bind 127.0.0.1:18080 --data-dir /tmp/fair-data --models-dir ~/.cache/ferrotune/test-models &
    python3 benches/fairness.py [--url http://127.0.0.1:18080] [--model SmolLM2-135M-Instruct]

Registers two users, then times a 4-token answer alone, and again while the other user's
~2k-token prompt is being read (prefill), and the long request itself.
"""

import argparse
import json
import threading
import time
import urllib.error
import urllib.request


def post(base, path, body, token=None):
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = "Bearer " + token
    req = urllib.request.Request(base + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def user(base, name):
    password = "password-" + name
    post(base, "/api/auth/register", {"username": name, "email": name + "@x.io", "password": password})
    status, body = post(base, "/api/auth/login", {"username_or_email": name, "password": password})
    assert status == 200, body
    return body["access_token"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:18080")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    args = ap.parse_args()
    base = args.url
    a, b = user(base, "fairlong"), user(base, "fairshort")

    def ask(token, content, max_tokens):
        t = time.time()
        status, r = post(base, "/v1/chat/completions", {
            "model": args.model, "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": max_tokens}, token)
        assert status == 200, r
        return time.time() - t, r["usage"]

    ask(b, "Say hi.", 4)  # loads the model
    alone, _ = ask(b, "Say hi.", 4)
    long_prompt = "Repeat after me: the quick brown fox jumps over the lazy dog. " * 150
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("long", ask(a, long_prompt, 4)))
    thread.start()
    time.sleep(0.3)
    beside, _ = ask(b, "Say hi.", 4)
    thread.join()
    long_secs, usage = result["long"]
    print(f"4-token answer alone: {alone:.2f} s")
    print(f"4-token answer beside a {usage['prompt_tokens']}-token prompt: {beside:.2f} s")
    print(f"the long request: {long_secs:.2f} s")


if __name__ == "__main__":
    main()
