#!/usr/bin/env bash
# Install into .venv (CPU torch 2.13 unless a torch is already there) and start the studio.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -r requirements.txt
exec python app.py "$@"
