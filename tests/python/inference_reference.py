"""Reference side of the inference parity tests (tests/inference.rs): transformers + peft.

Usage: python inference_reference.py REQUEST.json OUTPUT.json

REQUEST is one of
  {"op": "template", "model_dir": D, "cases": [{"messages": [...], "add_generation_prompt": b,
                                                "chat_template": T or null}, ...]}
      -> {"rendered": [str, ...]}
  {"op": "tokens", "model_dir": D, "texts": [str, ...]}
      -> {"ids": [[int, ...], ...]}
  {"op": "reference", "model_dir": D, "adapter": A or null, "prompt_ids": [int, ...], "n": 32,
   "quantize": null | "q8_0" | "q4_0" | "q4_1"}
      -> {"logits": [float] (last prompt position), "argmax": [int] (every prompt position),
          "greedy": [int] (n tokens, EOS not special)}
      with "quantize", the base's matrices (projections, embedding, head) are first rounded
      through that GGML format (ggml's reference quantiser, written out below in torch)
  {"op": "train_lora", "model_dir": D, "out": O, "steps": N}
      -> {"loss": [float, ...]}      trains a real LoRA on "What is A plus B?" -> "A plus B is C."
  {"op": "make_tiny", "out": O, "model_type": "llama"|"mistral"|"qwen2"|"qwen3"}
      -> {}                           random tiny model (+ random LoRA in O/lora, DoRA in
                                      O/dora) for shape tests
  {"op": "to_bf16", "model_dir": D, "out": O, "max_shard_size": "100MB"}
      -> {"files": [str, ...]}        the model in bfloat16, sharded with an index, + tokenizer
  {"op": "export_check", "model_dir": D, "adapter": A, "safetensors": S, "ggufs": [G, ...]}
      -> {"safetensors": {"max_rel": float}, "ggufs": [{"types": {...}, "max_rel": float,
          "retention": float, "n_tensors": int}, ...]}
                                      peft's merge_and_unload against ferrotune's exports: the
                                      safetensors folder, and each GGUF read and de-quantised by
                                      the `gguf` package (llama.cpp's own Python reader)
  {"op": "batch", "requests": [REQUEST, ...]}
      -> {"results": [RESULT, ...]}   several in one process
"""

import json
import os
import sys

import torch


def load(model_dir, adapter):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model


def op_template(req):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(req["model_dir"])
    out = []
    for case in req["cases"]:
        kwargs = {}
        if case.get("chat_template"):
            kwargs["chat_template"] = case["chat_template"]
        # Role first, as chat clients send it (the JSON this arrives in has sorted keys).
        messages = [
            {"role": m["role"], "content": m["content"], **m} for m in case["messages"]
        ]
        out.append(
            tok.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=case["add_generation_prompt"],
                **kwargs,
            )
        )
    return {"rendered": out}


def op_tokens(req):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(req["model_dir"])
    return {"ids": [tok(t, add_special_tokens=False)["input_ids"] for t in req["texts"]]}


def round_away(x):
    """C's roundf (ties away from zero), which ggml uses; torch.round rounds ties to even."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def ggml_round_trip(w, fmt):
    """`w` (rows x cols, float32) quantised in blocks of 32 along a row as ggml's
    quantize_row_*_ref does, and de-quantised again (block scales stored as float16)."""
    rows, cols = w.shape
    x = w.reshape(rows, cols // 32, 32)
    f16 = lambda t: t.to(torch.float16).to(torch.float32)
    if fmt == "q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        idv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        q = round_away(x * idv)
        y = q * f16(d)
    elif fmt == "q4_0":
        # The value of largest magnitude, with its sign.
        i = x.abs().argmax(-1, keepdim=True)
        mx = torch.gather(x, -1, i)
        d = mx / -8
        idv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        q = torch.clamp(torch.trunc(x * idv + 8.5), max=15)
        y = (q - 8) * f16(d)
    elif fmt == "q4_1":
        mn = x.amin(-1, keepdim=True)
        mx = x.amax(-1, keepdim=True)
        d = (mx - mn) / 15
        idv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        q = torch.clamp(torch.trunc((x - mn) * idv + 0.5), max=15)
        y = q * f16(d) + f16(mn)
    else:
        raise ValueError(fmt)
    return y.reshape(rows, cols)


@torch.no_grad()
def quantize_base(model, fmt):
    for name, p in model.named_parameters():
        if "lora_" in name or p.dim() != 2 or p.shape[1] % 32:
            continue
        if name.endswith(("_proj.weight", "embed_tokens.weight", "lm_head.weight")) or name.endswith("_proj.base_layer.weight"):
            p.copy_(ggml_round_trip(p.float(), fmt))


# Where the reference runs: the CPU, or the GPU the engine is checked on
# (scripts/gpu-check.sh sets `cuda`).
DEVICE = os.environ.get("FERROTUNE_REFERENCE_DEVICE", "cpu")


@torch.no_grad()
def op_reference(req):
    torch.manual_seed(0)
    model = load(req["model_dir"], req.get("adapter"))
    if req.get("quantize"):
        quantize_base(model, req["quantize"])
    model.to(DEVICE)
    ids = torch.tensor([req["prompt_ids"]], device=DEVICE)
    out = model(input_ids=ids, use_cache=True)
    logits = out.logits[0].float().cpu()
    result = {
        "logits": logits[-1].tolist(),
        "argmax": logits.argmax(-1).tolist(),
    }
    pkv = out.past_key_values
    tok = int(logits[-1].argmax())
    greedy = [tok]
    for _ in range(req["n"] - 1):
        out = model(
            input_ids=torch.tensor([[tok]], device=DEVICE), past_key_values=pkv, use_cache=True
        )
        pkv = out.past_key_values
        tok = int(out.logits[0, -1].argmax())
        greedy.append(tok)
    result["greedy"] = greedy
    return result


def op_train_lora(req):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(req["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(req["model_dir"], dtype=torch.float32)
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    rows = []
    for i in range(1, 17):
        a, b = i % 7 + 1, i % 5 + 2
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": f"What is {a} plus {b}?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        t = tok(f"{a} plus {b} is {a + b}.<|im_end|>\n", add_special_tokens=False)["input_ids"]
        rows.append((p + t, [-100] * len(p) + t))
    width = max(len(r[0]) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    model.train()
    for _ in range(req.get("steps", 30)):
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss))
    model.save_pretrained(req["out"])
    return {"loss": losses}


def op_make_tiny(req):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    mt = req["model_type"]
    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if mt == "llama":
        cfg = transformers.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif mt == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=8)
    elif mt == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif mt == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=32)
    else:
        raise ValueError(mt)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    # Norm weights away from 1 and non-zero biases, so every term is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(req["out"])
    adapters = [
        ("lora", dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj", "o_proj"],
                      alpha_pattern={"q_proj": 3})),
        # A DoRA on another set of modules (q and v of the fused q/k/v, gate of gate/up: the
        # other outputs of those groups stay unscaled), its magnitudes away from the norms.
        ("dora", dict(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                      use_dora=True)),
    ]
    for n, (folder, extra) in enumerate(adapters):
        if n:
            model = transformers.AutoModelForCausalLM.from_pretrained(req["out"],
                                                                      dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(
            r=4, lora_alpha=8, rank_pattern={"down_proj": 2}, init_lora_weights=False,
            task_type="CAUSAL_LM", **extra))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.3 * torch.randn_like(p))
                elif "lora_" in name:
                    p.mul_(0.2)
        peft_model.save_pretrained(req["out"] + "/" + folder)
    return {}


def op_to_bf16(req):
    """The model as a checkpoint is published: bfloat16 safetensors, sharded with an index."""
    import os
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(req["model_dir"], dtype=torch.bfloat16)
    model.save_pretrained(req["out"], max_shard_size=req.get("max_shard_size", "100MB"))
    for name in os.listdir(req["model_dir"]):
        if name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(os.path.join(req["model_dir"], name), req["out"])
    return {"files": sorted(os.listdir(req["out"]))}


def op_export_check(req):
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    base = load(req["model_dir"], None)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    merged = load(req["model_dir"], req["adapter"]).merge_and_unload()
    sd = {k: v.detach() for k, v in merged.state_dict().items()}
    cfg = merged.config
    out = {}

    # The safetensors export: every weight, within its number type's rounding.
    st = {}
    for name in os.listdir(req["safetensors"]):
        if name.endswith(".safetensors"):
            st.update(load_file(os.path.join(req["safetensors"], name)))
    max_rel = 0.0
    for k, v in sd.items():
        if k == "lm_head.weight" and k not in st:
            continue  # tied to the embedding
        got = st[k].float()
        max_rel = max(max_rel, float((got - v).abs().max() / v.abs().max().clamp_min(1e-12)))
    out["safetensors"] = {"max_rel": max_rel, "n_tensors": len(st)}

    # llama.cpp's q/k row permutation, undone.
    def unpermute(w, n):
        rows = w.shape[0]
        return w.reshape(n, rows // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
             "output": "lm_head"}
    blk = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
           "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
           "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    results = []
    for path in req["ggufs"]:
        reader = GGUFReader(path)
        types, max_rel, kept, change = {}, 0.0, 0.0, 0.0
        for t in reader.tensors:
            parts = t.name.split(".")
            if parts[0] == "blk":
                module = blk[parts[2]]
                hf = f"model.layers.{parts[1]}.{module}.{parts[3]}"
            else:
                hf = names[parts[0]] + "." + parts[1]
            shape = [int(d) for d in reversed(t.shape.tolist())]
            w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type),
                                          dtype=np.float32).reshape(shape))
            if parts[0] == "blk" and parts[2] == "attn_q":
                w = unpermute(w, cfg.num_attention_heads)
            elif parts[0] == "blk" and parts[2] == "attn_k":
                w = unpermute(w, cfg.num_key_value_heads)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
            ref = sd[hf]
            max_rel = max(max_rel,
                          float((w - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
            delta = ref - base_sd[hf]
            if delta.abs().max() > 0:
                kept += float(((w - base_sd[hf]) * delta).sum())
                change += float((delta * delta).sum())
        results.append({"types": types, "max_rel": max_rel,
                        "retention": kept / change if change else None,
                        "n_tensors": len(reader.tensors),
                        "name": str(reader.fields["general.name"].contents())})
    out["ggufs"] = results
    return out


def op_batch(req):
    """Several requests in one process (one import of torch and transformers)."""
    return {"results": [globals()["op_" + r["op"]](r) for r in req["requests"]]}


def main():
    req = json.load(open(sys.argv[1]))
    result = globals()["op_" + req["op"]](req)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
