#!/usr/bin/env bash
# Runs every test pushgate has, on a fresh machine too: installs what the
# tests need, starts the services they talk to, then runs the suites.
# Services that a test needs and cannot reach make that test fail, not skip.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

# --- PostgreSQL on localhost (the store suite and multi-node tests use it) --
# Tests connect as postgres@127.0.0.1 without a password and create a fresh
# database each; the restart test runs private clusters with initdb/pg_ctl.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  log "installing PostgreSQL"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -1)
  # A fresh install asks local TCP clients for a password; the tests use trust.
  sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main reload 2>/dev/null || true
fi
if command -v pg_lsclusters >/dev/null 2>&1; then
  if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    log "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 1 50); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.2; done
  fi
fi

# --- openssl CLI (the auth tests generate RSA and EC keys with it) ----------
if ! command -v openssl >/dev/null 2>&1; then
  log "installing openssl"
  apt-get update -qq && apt-get install -y -qq openssl
fi

# --- Browser tests: Debian's Chromium, and nginx as a buffering proxy ------
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- Node.js packages for interop and browser tests -------------------------
if [ -f tests/js/package.json ]; then
  log "installing test JavaScript packages"
  # playwright-core drives /usr/bin/chromium; it must never fetch a browser.
  (cd tests/js && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --loglevel=error)
fi

log "cargo test"
cargo test --all-targets 2>&1

if [ -f tests/js/package.json ] && [ -d clients/js ]; then
  log "client library unit tests (node --test)"
  node --test clients/js/test/
fi

log "API fuzzing against /openapi.json (schemathesis, bounded)"
scripts/fuzz-api.sh
