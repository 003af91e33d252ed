#!/usr/bin/env bash
# Thin wrapper kept for old instructions: the demo is `samflare demo` (see `samflare demo -h` and the README).
#   bash scripts/demo.sh [samflare demo options, e.g. --quick --keep --work DIR --data DIR -device cpu]
set -euo pipefail
exec samflare demo "$@"
