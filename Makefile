# ferrotune: `make test` runs every test; `make lint` checks formatting and clippy.
#
# The tests train for real, so `make test` first makes sure the managed Python training
# environment exists (`ferrotune setup`: a few minutes and ~6.6 GB the first time, then
# cached under ~/.cache/ferrotune and reused by every clone).
CARGO ?= cargo
BIN := target/debug/ferrotune

# The Python package's tests run in their own virtual environment (maturin, pytest, tqdm,
# openai, nbclient), with the extension built in the dev profile into target/ (the profile
# optimises the crate and its kernels' dependencies, see Cargo.toml): it reuses every
# dependency `cargo test` compiled and rebuilds only pyo3 and the crate with the `python`
# feature, about 2 minutes where a separate release build took about 10. `pip install .`
# builds the release wheel users install.
PYTHON ?= python3
PY_VENV ?= $(HOME)/.cache/ferrotune/pytest-venv
PY_TARGET := target/python
PY_TEST_DEPS := "maturin>=1.9.4,<2" pytest tqdm "openai>=1" nbclient ipykernel

# The web UI's browser test drives Debian's chromium (installed by `make chromium` if absent).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test test-python test-notebook python-wheel test-ui chromium lint run release fmt setup fuzz

test: setup
	# Tests that train run one at a time: they would only compete for the same cores.
	RUST_TEST_THREADS=1 FERROTUNE_TRAIN_PYTHON="$$($(BIN) setup --print-python)" $(CARGO) test --all-targets --locked
	$(MAKE) --no-print-directory test-python
	$(MAKE) --no-print-directory test-ui

# The property tests of the dataset parser and the chat-template renderer (tests/properties.rs)
# with many more cases than `make test` runs (256 each there).
FUZZ_CASES ?= 20000
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release --locked --test properties

# The web UI in headless chromium (static/tests/e2e.mjs, Playwright): sign up, upload, train one
# short LoRA while watching it, chat with the adapter; screenshots in target/ui-screenshots/.
test-ui: setup chromium static/node_modules/.package-lock.json
	FERROTUNE_BIN=$(BIN) node --test static/tests/taskspec.test.mjs
	FERROTUNE_BIN=$(BIN) CHROMIUM=$(CHROMIUM) node static/tests/e2e.mjs

static/node_modules/.package-lock.json: static/package-lock.json
	cd static && npm ci --no-audit --no-fund

chromium:
	@test -x $(CHROMIUM) || { echo "installing chromium for the UI test (apt-get)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The Python package: the Engine on SmolLM2, the Client against a real server that trains
# one short LoRA, and python/examples/quickstart.ipynb run top to bottom (a second LoRA).
test-python: setup python-wheel
	FERROTUNE_TEST_NOTEBOOK=1 FERROTUNE_BIN=$(BIN) $(PY_VENV)/bin/python -m pytest python/tests --durations=5

# The notebook alone.
test-notebook: setup python-wheel
	FERROTUNE_TEST_NOTEBOOK=1 FERROTUNE_BIN=$(BIN) $(PY_VENV)/bin/python -m pytest \
		python/tests/test_notebook.py

# Builds the wheel (target/python/wheels) and installs it into $(PY_VENV).
python-wheel: $(PY_VENV)/.ferrotune-ready
	rm -f $(PY_TARGET)/wheels/ferrotune-*.whl
	PATH="$(PY_VENV)/bin:$$PATH" maturin build --profile dev --locked \
		--interpreter $(PY_VENV)/bin/python --out $(PY_TARGET)/wheels
	$(PY_VENV)/bin/pip install --quiet --force-reinstall --no-deps $(PY_TARGET)/wheels/ferrotune-*.whl

$(PY_VENV)/.ferrotune-ready: Makefile
	$(PYTHON) -m venv $(PY_VENV)
	$(PY_VENV)/bin/pip install --quiet $(PY_TEST_DEPS)
	touch $@

setup:
	$(CARGO) build --locked
	$(BIN) setup

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings
	# The Python extension module (feature `python`, no web UI build needed for it).
	FERROTUNE_SKIP_UI=1 $(CARGO) clippy --features python --lib --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

run:
	$(CARGO) run --release

release:
	$(CARGO) build --release --locked
