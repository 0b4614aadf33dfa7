#!/usr/bin/env bash
# Every check, locally and in CI: formatting, lints, docs, then all tests.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== module cycles (scripts/module_cycles.py)"
python3 scripts/module_cycles.py
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
echo "== libtessera (the C SDK's library, which the C example test links; cargo test builds only its rlib)"
cargo build -p tessera-c --locked
echo "== the Python SDK (bindings/python, built by maturin) in target/python-sdk, for its example's test"
if [ ! -x target/python-sdk/bin/python ]; then
  python3 -m venv target/python-sdk
fi
# A dev build reuses what cargo built above (a release build would compile everything again).
MATURIN_PEP517_ARGS="--profile dev" target/python-sdk/bin/pip install --quiet --disable-pip-version-check ./bindings/python
echo "== schemathesis in target/python-sdk, for the OpenAPI fuzz test (crates/tessera-cli/tests/cli/api_fuzz.rs)"
target/python-sdk/bin/pip install --quiet --disable-pip-version-check schemathesis==4.32.5
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
