#!/usr/bin/env bash
# Install into .venv (CPU torch 2.13 unless a torch is already there) and start the studio.
# Each step says what it does: a first run downloads torch, diffusers and gradio, which takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n==> %s\n' "$*"; }
if [ ! -d .venv ]; then
  say "Creating the virtual environment .venv"
  python3 -m venv .venv
fi
. .venv/bin/activate
if python -c "import torch" 2>/dev/null; then
  say "torch $(python -c 'import torch; print(torch.__version__)') is installed; keeping it"
else
  say "Installing torch 2.13, the largest download (for a particular CUDA build, install it first yourself)"
  pip install --progress-bar on torch==2.13.0
fi
say "Installing the studio's requirements (requirements.txt: diffusers, transformers, gradio, ...)"
pip install --progress-bar on -r requirements.txt
say "Starting the studio (python app.py $*): the address follows; models load in the background"
exec python app.py "$@"
