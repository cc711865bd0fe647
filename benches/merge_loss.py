#!/usr/bin/env python3
"""Would a merged LoRA (W + scale·B·A, re-quantised to the base's Q4_1) keep the fine-tune?

The chat engine applies adapters unmerged over the quantised base (see README, "Speed"). A
merged path would run at the base model's speed, but merging over a 4-bit base means
re-quantising W + ΔW to 4 bits. This measures, per adapted module, how large ΔW is against a
Q4_1 step and how much of ΔW survives re-quantisation (the de-quantised HF weights of the test
model are exactly on the GGUF's Q4_1 grid, so W itself re-quantises to itself):

    $(target/debug/ferrotune setup --print-python) benches/merge_loss.py [--model DIR] [--adapter DIR]
"""

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ferrotune"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=CACHE / "test-models" / "SmolLM2-135M-Instruct")
    p.add_argument("--adapter", type=Path,
                   default=CACHE / "test-models" / ".ferrotune-test-lora-v1")
    args = p.parse_args()
    base = load_file(args.model / "model.safetensors")
    adapter = load_file(args.adapter / "adapter_model.safetensors")
    cfg = json.loads((args.adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    size, kept, error = [], [], []
    for name, a in adapter.items():
        if ".lora_A." not in name:
            continue
        b = adapter[name.replace(".lora_A.", ".lora_B.")].float()
        module = name.split("base_model.model.", 1)[-1].split(".lora_A.")[0]
        w = base[f"{module}.weight"].float().reshape(-1, 32)
        delta = (scale * (b @ a.float())).reshape(-1, 32)
        step = (w.max(1).values - w.min(1).values) / 15
        size.append((delta.abs().mean(1) / step.clamp_min(1e-12)).median().item())
        # Q4_1 of W + ΔW: per block of 32, 16 levels from its min to its max.
        merged = w + delta
        lo, hi = merged.min(1, keepdim=True).values, merged.max(1, keepdim=True).values
        st = ((hi - lo) / 15).clamp_min(1e-12)
        applied = ((merged - lo) / st).round().clamp(0, 15) * st + lo - w
        kept.append(((applied * delta).sum() / (delta ** 2).sum()).item())
        error.append(((applied - delta).norm() / delta.norm()).item())
    print(f"{len(size)} adapted modules (medians):")
    print(f"  |ΔW| per weight / Q4_1 step:                  {statistics.median(size):.3f}")
    print(f"  share of ΔW kept by a re-quantised merge:     {statistics.median(kept):.3f}")
    print(f"  relative error of the merged-in ΔW:           {statistics.median(error):.2f}")


if __name__ == "__main__":
    main()
