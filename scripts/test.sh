#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, lint included. This is the README's test command and
# what CI runs; it needs nothing outside the repository except Debian's Chromium for the browser test,
# which it installs when it is missing and it can (root + apt-get), or says exactly what to run.
set -euo pipefail
cd "$(dirname "$0")/.."

chromium_path() {
  if [ -n "${SDXL_NODES_CHROMIUM:-}" ]; then echo "$SDXL_NODES_CHROMIUM"; else command -v chromium || true; fi
}
if [ -z "$(chromium_path)" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing Debian's Chromium for the browser test (apt-get install chromium)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
  else
    echo "scripts/test.sh: the browser test needs Chromium and it is not installed. Run:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y chromium" >&2
    echo "or point SDXL_NODES_CHROMIUM at a Chromium binary, then run bash scripts/test.sh again." >&2
    exit 1
  fi
fi

bash scripts/setup.sh
. .venv/bin/activate
ruff check .
python -m pytest -q
