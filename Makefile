# The two quick-start commands: `make demo` and `make test`. Both set up what
# they need (libtorch from PyPI via scripts/setup-libtorch, the build) on a
# fresh machine.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: demo test build lint bench bench-round bench-metrics bench-train bench-dp bench-dp-sgd bench-he bench-serve bench-incremental doc clean setup

setup:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs"; exit 1; }
	@./scripts/setup-libtorch

build: setup
	$(CARGO) build --workspace --bins --examples

demo: build
	./scripts/demo.sh

# Binaries and examples first: the end-to-end tests start the real `confide`,
# `confide-party` and example processes.
test: build
	@./scripts/setup-browser
	$(CARGO) test --workspace --all-targets

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

doc: setup
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

bench-round: setup
	$(CARGO) run --release -p confide-bench -- round --parties 10 --params 1000000 --privacy none --json

# Metrics on (served and scraped every second) against off, same run.
bench-metrics: setup
	$(CARGO) run --release -p confide-bench -- round --parties 10 --params 1000000 --privacy none --metrics off,on --rounds 20 --repeat 3 --json

bench-he: setup
	$(CARGO) run --release -p confide-bench -- he --parties 3,10,50 --values 1000000

bench-train: setup
	$(CARGO) run --release -p confide-bench -- train

bench-dp: setup
	$(CARGO) run --release -p confide-bench -- dp

bench-dp-sgd: setup
	$(CARGO) run --release -p confide-bench -- dp-sgd

bench-serve: setup
	$(CARGO) run --release -p confide-bench -- serve

bench-incremental: setup
	$(CARGO) run --release -p confide-bench -- incremental

bench: setup
	$(CARGO) bench -p confide-bench

clean:
	$(CARGO) clean
