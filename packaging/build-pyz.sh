#!/bin/sh
# Build fluxrt.pyz: one file holding fluxrt and every dependency, runnable with `python3 fluxrt.pyz`.
# Usage: packaging/build-pyz.sh [PYTHON]; the target hosts need the same Python minor version and architecture.
set -eu
PYTHON="${1:-python3}"
cd "$(dirname "$0")/.."
"$PYTHON" -m shiv --compressed --reproducible -c fluxrt -o fluxrt.pyz -p '/usr/bin/env python3' .
echo "built fluxrt.pyz ($(du -h fluxrt.pyz | cut -f1))"
