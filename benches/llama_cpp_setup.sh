#!/usr/bin/env bash
# Installs llama.cpp's Python binding apart from the training environment (its own virtual
# environment under ~/.cache/ferrotune/llama-bench-venv, built for this processor) and converts
# the test adapter to llama.cpp's GGUF LoRA format, so that benches/compare.py can measure
# llama.cpp with and without the adapter next to ferrotune and transformers + peft.
#
#     bash benches/llama_cpp_setup.sh [ADAPTER_DIR]
#     bash benches/llama_cpp_setup.sh --serving
#
# `--serving` (for benches/serving.py) also builds llama.cpp's `llama-server` from the same
# source release (cmake from PyPI), and makes four adapters from the test LoRA at scales 1, 3,
# 0.5 and 2 (`lora_alpha` scaled), each converted to GGUF.
#
# Takes about 10 minutes on 2 cores (llama.cpp is compiled), 15 more with --serving. Not
# part of `make test`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/ferrotune"
VERSION=0.3.36
VENV="$CACHE/llama-bench-venv"
SERVING=0
if [ "${1:-}" = "--serving" ]; then SERVING=1; shift; fi
ADAPTER="${1:-$CACHE/test-models/.ferrotune-test-lora-v1}"
MODEL="$CACHE/test-models/SmolLM2-135M-Instruct"
PY="$("$ROOT/target/debug/ferrotune" setup --print-python 2>/dev/null || true)"
[ -x "$PY" ] || { echo "run 'cargo build && target/debug/ferrotune setup' first" >&2; exit 1; }

if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  "$PY" -m venv "$VENV"
  CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/pip" install "llama-cpp-python==$VERSION"
fi

# llama.cpp's source as released with the binding (vendor/llama.cpp): its converters and,
# for --serving, its server.
SRC="$CACHE/llama-cpp-src"
LC="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -f "$LC/convert_lora_to_gguf.py" ]; then
  mkdir -p "$SRC"
  # Only this package as source (`:all:` would build cmake itself from source too).
  "$VENV/bin/pip" download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$SRC"
  tar xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi

# A PEFT folder to GGUF: the converter runs on the training environment's torch/transformers
# with the source's own gguf-py.
convert() {
  if [ -f "$1/adapter_model.safetensors" ] && [ ! -f "$1/adapter.gguf" ]; then
    PYTHONPATH="$LC/gguf-py:$LC" "$PY" "$LC/convert_lora_to_gguf.py" --base "$MODEL" \
      --outtype f32 --outfile "$1/adapter.gguf" "$1"
  fi
}
convert "$ADAPTER"
echo "llama.cpp: $VENV/bin/python; adapter: $ADAPTER/adapter.gguf"

if [ "$SERVING" = 1 ]; then
  SERVER="$CACHE/llama-server-build/bin/llama-server"
  if [ ! -x "$SERVER" ]; then
    "$VENV/bin/pip" install -q "cmake>=3.28,<4"
    "$VENV/bin/cmake" -S "$LC" -B "$CACHE/llama-server-build" -DGGML_NATIVE=ON \
      -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=ON -DCMAKE_BUILD_TYPE=Release
    "$VENV/bin/cmake" --build "$CACHE/llama-server-build" --target llama-server -j "$(nproc)"
  fi
  for scale in 1 3 0.5 2; do
    out="$CACHE/test-models/.ferrotune-serving-lora-x$scale"
    if [ ! -f "$out/adapter.gguf" ]; then
      mkdir -p "$out"
      cp "$ADAPTER/adapter_model.safetensors" "$out/"
      "$PY" - "$ADAPTER/adapter_config.json" "$out/adapter_config.json" "$scale" <<'PYEOF'
import json, sys
c = json.load(open(sys.argv[1]))
c["lora_alpha"] = c["lora_alpha"] * float(sys.argv[3])
json.dump(c, open(sys.argv[2], "w"))
PYEOF
      convert "$out"
    fi
  done
  echo "llama-server: $SERVER"
fi
