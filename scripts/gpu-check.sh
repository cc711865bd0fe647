#!/usr/bin/env bash
# The GPU check (issue 13), for a machine with an NVIDIA GPU:
#   1. builds ferrotune with the `cuda` feature (or takes FERROTUNE_BIN, built elsewhere);
#   2. runs the inference parity tests with the model on the GPU (FERROTUNE_TEST_DEVICE) and
#      transformers on the same GPU (FERROTUNE_REFERENCE_DEVICE), printing the logit
#      differences;
#   3. starts the server with `inference_device = cuda:0`, trains a short LoRA on
#      SmolLM2-135M-Instruct through the API on the GPU, chats with it through the CUDA
#      engine and prints tokens/s (scripts/gpu_check.py).
#
# Needs: nvidia-smi, a Rust toolchain (unless FERROTUNE_BIN and FERROTUNE_TEST_BIN are given),
# nvcc (the CUDA toolkit's, or the `nvidia-cuda-nvcc` wheels: see the README's "GPU"), and the
# training environment (`ferrotune setup`, needs the package registry once).
#
#   scripts/gpu-check.sh                 # everything
#   GPU_CHECK_SKIP_TESTS=1 scripts/gpu-check.sh   # only the server round trip
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "GPU"
nvidia-smi --query-gpu=index,name,compute_cap,memory.total,driver_version --format=csv,noheader
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}"

BIN="${FERROTUNE_BIN:-}"
if [ -z "$BIN" ]; then
    step "build with --features cuda (compute capability $CUDA_COMPUTE_CAP)"
    if ! command -v nvcc >/dev/null; then
        echo "nvcc is not on PATH: install the CUDA toolkit, or see the README's \"GPU\" section" >&2
        exit 1
    fi
    nvcc --version | tail -1
    cargo build --release --features cuda
    BIN=target/release/ferrotune
fi

step "training environment"
"$BIN" setup >/dev/null
PY="$("$BIN" setup --print-python)"
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"

if [ -z "${GPU_CHECK_SKIP_TESTS:-}" ]; then
    step "parity on the GPU: the engine on cuda:0 against transformers on cuda"
    export FERROTUNE_TRAIN_PYTHON="$PY" FERROTUNE_TEST_DEVICE=cuda:0 FERROTUNE_REFERENCE_DEVICE=cuda
    if [ -n "${FERROTUNE_TEST_BIN:-}" ]; then
        "$FERROTUNE_TEST_BIN" --test-threads=1 --nocapture tiny_models gguf_path 2>&1 | grep -E "cuda.*Δlogit|^test |test result"
    else
        cargo test --release --features cuda --test inference -- --test-threads=1 --nocapture \
            tiny_models gguf_path 2>&1 | grep -E "cuda.*Δlogit|^test |test result"
    fi
    unset FERROTUNE_TEST_DEVICE FERROTUNE_REFERENCE_DEVICE
fi

step "train on the GPU and chat through the CUDA engine"
PYTHONPATH=python "$PY" scripts/gpu_check.py --bin "$BIN"
