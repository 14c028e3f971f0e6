#!/usr/bin/env bash
# Installs what the tests need, then runs every test: unit, store contract, and integration tests
# that boot real guests under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The API document must be one that standard tools (validators, client generators) take. The
# validator comes from PyPI into a virtual environment of its own (Debian's Python takes no pip
# installs of its own).
venv=target/openapi-venv
if [ ! -x "$venv/bin/openapi-spec-validator" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check openapi-spec-validator
fi
"$venv/bin/openapi-spec-validator" docs/openapi.json
# And the server keeps to it: a schema-driven fuzzer against a live `corral up`.
./scripts/fuzz-api.sh
# The controller drives no hypervisor (docs/ARCHITECTURE.md): it links no agent, QEMU driver, host
# networking or image builder, not even for its tests.
if cargo tree -p corral-controller --prefix none | grep -E '^corral-(agent|hypervisor|network|jeos) '; then
  echo "test: corral-controller links the crates above; it must reach hosts only through the host protocol" >&2
  exit 1
fi
# No crate's modules import each other in a cycle (docs/ARCHITECTURE.md).
python3 scripts/module-cycles.py
if ! command -v cargo-nextest >/dev/null; then
  cargo install cargo-nextest --locked
fi
cargo nextest run --workspace --no-fail-fast
