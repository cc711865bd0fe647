"""Compare ferrotune's GGUF -> Hugging Face conversion with transformers' own GGUF loader.

usage: python compare_hf_conversion.py OUR_DIR GGUF_PATH

Loads transformers' conversion (`from_pretrained(dir_of_gguf, gguf_file=...)`) and ours
(`from_pretrained(OUR_DIR)`) and checks:
  * every weight equal (max abs diff <= 1e-6), same parameter names;
  * the config essentials;
  * tokenizer ids on English, Chinese, emoji, whitespace and special-token strings. Strings
    with digits are checked separately: transformers ignores the GGUF's `tokenizer.ggml.pre`
    (SmolLM's `smollm` splits every digit on its own, as llama.cpp and the original tokenizer
    do); ours must equal transformers' tokenizer with that digit split added, and nothing else;
  * the chat template renders identically;
  * greedy generation for "What is the capital of France?" gives the same tokens and text,
    and the text names Paris.
Prints a summary (last line: `SUMMARY {json}`) and exits 1 on any mismatch.
"""

import json
import os
import shutil
import sys
import tempfile
import time
import warnings

MAX_WEIGHT_DIFF = 1e-6


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    ours_dir, gguf_path = sys.argv[1], os.path.abspath(sys.argv[2])
    import torch
    import transformers
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    failures: list[str] = []
    summary: dict = {"transformers": transformers.__version__}

    def check(ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAIL  ") + what, flush=True)
        if not ok:
            failures.append(what)

    t0 = time.time()
    # transformers must see the GGUF alone: next to our files it would read our tokenizer.
    gdir = tempfile.mkdtemp(prefix="gguf-ref-")
    gfile = os.path.basename(gguf_path)
    os.symlink(gguf_path, os.path.join(gdir, gfile))
    try:
        ref_tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
        ref = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
    finally:
        shutil.rmtree(gdir, ignore_errors=True)
    summary["reference_load_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        our_tok = AutoTokenizer.from_pretrained(ours_dir)
        ours = AutoModelForCausalLM.from_pretrained(ours_dir)
    summary["ours_load_s"] = round(time.time() - t0, 1)
    for w in caught:
        print(f"note  warning while loading ours: {w.category.__name__}: {w.message}")
    ref.eval()
    ours.eval()
    check(ours.dtype == torch.float32, f"our model loads as float32 ({ours.dtype})")
    print(f"note  tokenizer classes: ours {type(our_tok).__name__}, reference {type(ref_tok).__name__}")

    # ---- weights ----
    rs, os_ = ref.state_dict(), ours.state_dict()
    check(set(rs) == set(os_), f"same {len(rs)} parameter names")
    worst, worst_name, n_params = 0.0, "", 0
    for name, r in rs.items():
        o = os_.get(name)
        if o is None or o.shape != r.shape:
            check(False, f"{name}: shape {None if o is None else tuple(o.shape)} vs {tuple(r.shape)}")
            continue
        d = (o.float() - r.float()).abs().max().item() if r.numel() else 0.0
        n_params += r.numel() if name != "lm_head.weight" or not ours.config.tie_word_embeddings else 0
        if d > worst:
            worst, worst_name = d, name
    summary["weights_max_abs_diff"] = worst
    summary["parameters"] = n_params
    check(worst <= MAX_WEIGHT_DIFF, f"all weights equal: max |diff| = {worst:g} ({worst_name or 'every tensor identical'})")

    # ---- config ----
    rc, oc = ref.config, ours.config
    # A config built from a GGUF names no architectures until saved; the class does.
    check(oc.architectures == [type(ref).__name__], f"config.architectures: ours {oc.architectures}, reference class {type(ref).__name__}")
    keys = [
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "vocab_size", "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id",
        "pad_token_id", "attention_bias", "mlp_bias",
    ]
    for k in keys:
        a, b = getattr(oc, k, None), getattr(rc, k, None)
        check(a == b, f"config.{k}: ours {a!r}, reference {b!r}")
    a, b = oc.rms_norm_eps, rc.rms_norm_eps
    check(abs(a - b) <= 1e-6 * abs(b), f"config.rms_norm_eps: ours {a!r}, reference {b!r}")
    a, b = getattr(oc, "rope_parameters", None), getattr(rc, "rope_parameters", None)
    check(a == b, f"config.rope_parameters: ours {a}, reference {b}")

    # ---- tokenizer ----
    texts = [
        "Hello, world! How are you today?",
        "The quick brown fox jumps over the lazy dog.",
        "你好，世界！今天天气很好，我们去公园散步吧。",
        "Emoji: 🤖🚀👍🏽❤️‍🔥 and 🇫🇷 flags",
        "  leading spaces\nnew line\ttab   trailing  ",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "naïve café — déjà vu; Ελληνικά; русский;日本語のテキスト",
        "def f(x):\n    return x ** 2  # square\n",
    ]
    same = 0
    for t in texts:
        a, b = our_tok.encode(t, add_special_tokens=True), ref_tok.encode(t, add_special_tokens=True)
        ok = a == b
        same += ok
        check(ok, f"token ids equal for {t[:40]!r} ({len(a)} tokens)")
        rt = our_tok.decode(a, skip_special_tokens=False)
        check(rt == t, f"ours decodes back to the text for {t[:40]!r}")
    summary["tokenizer_strings_equal"] = f"{same}/{len(texts)}"

    # Digits: ours = transformers' tokenizer + SmolLM's individual-digit split, exactly.
    digit_texts = ["In 2024, 12345 people paid $3.50 each.", "Call 555-0199 or 1-800-123-4567!"]
    pre = json.loads(open(os.path.join(ours_dir, "tokenizer.json"), encoding="utf-8").read())["pre_tokenizer"]
    summary["our_pre_tokenizer"] = pre
    if isinstance(pre, dict) and any(p.get("type") == "Digits" for p in pre.get("pretokenizers", [])):
        fixed = Tokenizer.from_str(ref_tok.backend_tokenizer.to_str())
        fixed.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), fixed.pre_tokenizer]
        )
        for t in digit_texts:
            a, b = our_tok.encode(t), ref_tok.encode(t)
            c = fixed.encode(t).ids
            print(f"note  {t!r}: ours {len(a)} tokens, transformers' GGUF tokenizer {len(b)}")
            check(a == c, f"digits split one by one, otherwise equal, for {t!r}")
            check(our_tok.decode(a) == t, f"ours decodes back to {t!r}")
    else:
        for t in digit_texts:
            check(our_tok.encode(t) == ref_tok.encode(t), f"token ids equal for {t!r}")

    # Special tokens by role: ours must agree with the GGUF ids in config.json.
    summary["special_tokens"] = {
        "ours": {k: getattr(our_tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "reference": {k: getattr(ref_tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
    }
    check(our_tok.eos_token_id == oc.eos_token_id, f"tokenizer eos {our_tok.eos_token!r} = config eos id {oc.eos_token_id}")
    check(our_tok.bos_token_id == oc.bos_token_id, f"tokenizer bos {our_tok.bos_token!r} = config bos id {oc.bos_token_id}")
    if ref_tok.eos_token_id != rc.eos_token_id:
        print(f"note  transformers' GGUF tokenizer names eos {ref_tok.eos_token!r} (id {ref_tok.eos_token_id}), "
              f"its config says eos id {rc.eos_token_id}; ours follows the GGUF metadata")

    # ---- chat template ----
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 🤖"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
    ]
    for conv in conversations:
        for gen in (True, False):
            a = our_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            b = ref_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            check(a == b, f"chat template renders identically ({len(conv)} messages, generation prompt {gen})")

    # ---- generation ----
    conv = conversations[0]
    prompt_ours = our_tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt_ref = ref_tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    check(prompt_ours["input_ids"].tolist() == prompt_ref["input_ids"].tolist(), "chat prompt token ids equal")
    with torch.no_grad():
        lo = ours(**prompt_ours).logits
        lr = ref(**prompt_ref).logits
    logit_diff = (lo - lr).abs().max().item()
    summary["prompt_logits_max_abs_diff"] = logit_diff
    check(logit_diff <= 1e-4, f"prompt logits equal: max |diff| = {logit_diff:g}")
    kw = dict(max_new_tokens=40, do_sample=False)
    t0 = time.time()
    with torch.no_grad():
        go = ours.generate(**prompt_ours, **kw, pad_token_id=our_tok.pad_token_id or oc.eos_token_id)
        gr = ref.generate(**prompt_ref, **kw, pad_token_id=ref_tok.pad_token_id or rc.eos_token_id)
    summary["generation_s"] = round(time.time() - t0, 1)
    n = prompt_ours["input_ids"].shape[1]
    new_o, new_r = go[0, n:].tolist(), gr[0, n:].tolist()
    text_o = our_tok.decode(new_o, skip_special_tokens=True)
    text_r = ref_tok.decode(new_r, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    summary["generated_ours"] = text_o
    summary["generated_reference"] = text_r
    print(f"note  ours:      {text_o!r}")
    print(f"note  reference: {text_r!r}")
    check(new_o == new_r, f"greedy generation gives the same {len(new_o)} tokens")
    check(text_o == text_r, "and the same text")
    check("Paris" in text_o, "the answer names Paris")

    summary["failures"] = failures
    print(f"{'PASS' if not failures else 'FAIL'}: {len(failures)} mismatches")
    print("SUMMARY " + json.dumps(summary, ensure_ascii=False))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
