#!/usr/bin/env bash
# Property-based API fuzzing: schemathesis (PyPI) drives a real pushgate
# from its own /openapi.json. Fails on any 5xx, any status, content type,
# header or body the document does not allow. Bounded: a few dozen examples
# per operation, well under two minutes on a small machine.
#
# Usage: scripts/fuzz-api.sh [extra schemathesis args]
# Streams (/v1/stream, /v1/ws, and /v1/events, a long-poll of up to 60 s)
# stay open by design, so they are covered by tests/it/openapi.rs instead.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${PUSHGATE_FUZZ_VENV:-target/fuzz-venv}
if [ ! -x "$venv/bin/st" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q schemathesis
fi
cargo build -q --bin pushgate

dir=$(mktemp -d)
key=ak_fuzz_$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
cat > "$dir/pushgate.toml" <<TOML
[server]
listen = "127.0.0.1:0"
[store]
url = "sqlite://$dir/log.db"
[auth]
admin_keys = ["$key"]
[[sources]]
name = "fuzz"
kind = "standard"
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
channel = "fuzz"
TOML
PUSHGATE_LOG=warn target/debug/pushgate serve --config "$dir/pushgate.toml" >"$dir/out" 2>"$dir/err" &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
base=
for _ in $(seq 1 100); do
  base=$(sed -n 's/^pushgate listening on \(.*\)$/\1/p' "$dir/out" | tr -d '\r ')
  [ -n "$base" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$dir/err"; exit 1; }
  sleep 0.1
done
[ -n "$base" ] || { echo "pushgate did not start"; cat "$dir/err"; exit 1; }

status=0
timeout 170 "$venv/bin/st" run "$base/openapi.json" \
  --header "Authorization: Bearer $key" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
  --exclude-path /v1/stream --exclude-path /v1/ws --exclude-path /v1/events \
  --phases examples,coverage,fuzzing,stateful \
  --max-examples "${PUSHGATE_FUZZ_EXAMPLES:-25}" \
  --request-timeout 10 \
  --seed "${PUSHGATE_FUZZ_SEED:-1}" \
  "$@" || status=$?
if ! kill -0 "$pid" 2>/dev/null; then
  echo "pushgate died during the fuzz run"; cat "$dir/err"; exit 1
fi
exit "$status"
