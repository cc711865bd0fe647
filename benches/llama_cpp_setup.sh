#!/usr/bin/env bash
# Installs llama.cpp's Python binding apart from the training environment (its own virtual
# environment under ~/.cache/ferrotune/llama-bench-venv, built for this processor) and converts
# the test adapter to llama.cpp's GGUF LoRA format, so that benches/compare.py can measure
# llama.cpp with and without the adapter next to ferrotune and transformers + peft.
#
#     bash benches/llama_cpp_setup.sh [ADAPTER_DIR]
#
# Takes about 10 minutes on 2 cores (llama.cpp is compiled). Not part of `make test`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/ferrotune"
VERSION=0.3.36
VENV="$CACHE/llama-bench-venv"
ADAPTER="${1:-$CACHE/test-models/.ferrotune-test-lora-v1}"
MODEL="$CACHE/test-models/SmolLM2-135M-Instruct"
PY="$("$ROOT/target/debug/ferrotune" setup --print-python 2>/dev/null || true)"
[ -x "$PY" ] || { echo "run 'cargo build && target/debug/ferrotune setup' first" >&2; exit 1; }

if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  "$PY" -m venv "$VENV"
  CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/pip" install "llama-cpp-python==$VERSION"
fi

if [ -f "$ADAPTER/adapter_model.safetensors" ] && [ ! -f "$ADAPTER/adapter.gguf" ]; then
  # The converter ships in the sdist (vendor/llama.cpp); it runs on the training
  # environment's torch/transformers with the sdist's own gguf-py.
  SRC="$CACHE/llama-cpp-src"
  if [ ! -f "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_lora_to_gguf.py" ]; then
    mkdir -p "$SRC"
    # Only this package as source (`:all:` would build cmake itself from source too).
    "$VENV/bin/pip" download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$SRC"
    tar xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC" \
      "llama_cpp_python-$VERSION/vendor/llama.cpp"
  fi
  LC="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
  PYTHONPATH="$LC/gguf-py:$LC" "$PY" "$LC/convert_lora_to_gguf.py" --base "$MODEL" \
    --outtype f32 --outfile "$ADAPTER/adapter.gguf" "$ADAPTER"
fi
echo "llama.cpp: $VENV/bin/python; adapter: $ADAPTER/adapter.gguf"
