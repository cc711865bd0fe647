# ferrotune: `make test` runs every test; `make lint` checks formatting and clippy.
CARGO ?= cargo

.PHONY: test lint run release fmt

test:
	$(CARGO) test --all-targets --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

run:
	$(CARGO) run --release

release:
	$(CARGO) build --release --locked
