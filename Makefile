# ferrotune: `make test` runs every test; `make lint` checks formatting and clippy.
#
# The tests train for real, so `make test` first makes sure the managed Python training
# environment exists (`ferrotune setup`: a few minutes and ~6.6 GB the first time, then
# cached under ~/.cache/ferrotune and reused by every clone).
CARGO ?= cargo
BIN := target/debug/ferrotune

.PHONY: test lint run release fmt setup

test: setup
	# Tests that train run one at a time: they would only compete for the same cores.
	RUST_TEST_THREADS=1 FERROTUNE_TRAIN_PYTHON="$$($(BIN) setup --print-python)" $(CARGO) test --all-targets --locked

setup:
	$(CARGO) build --locked
	$(BIN) setup

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

run:
	$(CARGO) run --release

release:
	$(CARGO) build --release --locked
