#!/usr/bin/env bash
# Installs what the tests need, then runs every test: unit, store contract, and integration tests
# that boot real guests under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt --all -- --check
if ! command -v cargo-nextest >/dev/null; then
  cargo install cargo-nextest --locked
fi
cargo nextest run --workspace --no-fail-fast
