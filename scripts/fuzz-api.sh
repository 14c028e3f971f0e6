#!/usr/bin/env bash
# Runs Schemathesis, a fuzzer driven by docs/openapi.json, against a live `corral up` (the debug
# build): every check on (no 5xx, no undocumented status or body, no schema-valid request refused
# but where scripts/schemathesis.toml says the document cannot state the rule, no schema-violating
# request accepted), fixed seeds so a finding reproduces. Schemathesis comes from PyPI into
# target/fuzz-venv. Usage: scripts/fuzz-api.sh [EXAMPLES_PER_OPERATION [PHASES]]. The test command
# runs the phases whose requests the seed alone decides; the stateful phase (requests built from
# the server's answers: ids, times) varies from run to run, so it runs by hand with PHASES=all.
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-40}
phases=${2:-examples,coverage,fuzzing}
venv=target/fuzz-venv
if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'schemathesis>=4.3,<5'
fi
cargo build --quiet -p corral
dir=$(mktemp -d /tmp/corral-fuzz-XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target/debug/corral up --accel tcg --host-name fuzz-host --listen "127.0.0.1:$port" \
  --data-dir "$dir/data" >"$dir/up.log" 2>&1 &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 150); do
  curl -sf "http://127.0.0.1:$port/api/v1/health" >/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$dir/up.log"; echo "fuzz: corral up exited" >&2; exit 1; }
  sleep 0.2
done
curl -sf "http://127.0.0.1:$port/api/v1/health" >/dev/null ||
  { cat "$dir/up.log"; echo "fuzz: corral up did not answer within 30 s" >&2; exit 1; }
token=$(cat "$dir/data/admin-token")
for seed in 1 2; do
  echo "fuzz: seed $seed, $examples examples per operation"
  timeout 600 "$venv/bin/schemathesis" --config-file scripts/schemathesis.toml --no-color \
    run docs/openapi.json --url "http://127.0.0.1:$port" \
    -H "Authorization: Bearer $token" --checks all --max-examples "$examples" --seed "$seed" \
    ${phases:+$([ "$phases" = all ] || echo --phases "$phases")} ||
    { echo "fuzz: schemathesis found the failures above (seed $seed); replay with scripts/fuzz-api.sh" >&2; exit 1; }
done
