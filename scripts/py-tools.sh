#!/usr/bin/env bash
# Installs the Python tools the tests run into a virtualenv under target/py (kept beside the
# build, never on the system Python): schemathesis, which tests/openapi.rs runs against the
# real server with docs/openapi.yaml. Idempotent: when the venv already has the pinned
# version it changes nothing and reaches no registry.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned: the 4.x CLI (`st run`, --include-tag, --checks, --max-examples) is what
# tests/openapi.rs speaks; 3.x differs.
SCHEMATHESIS_VERSION=4.32.5
venv="${ENROLLD_PY_VENV:-target/py}"

log() { echo "py-tools: $*" >&2; }

if [ -x "$venv/bin/st" ] &&
  [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" = "$SCHEMATHESIS_VERSION" ]; then
  exit 0
fi

if ! command -v python3 >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  # Debian splits venv (and its pip) out of python3.
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi

log "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
"$venv/bin/st" --version >&2
