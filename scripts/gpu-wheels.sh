#!/usr/bin/env bash
# Fetch the wheels scripts/gpu-check.sh installs on a GPU box that has torch but no registry.
#   ./scripts/gpu-wheels.sh [DIR] [PYTHON_VERSION]     # default: gpu-wheels, the local python's version
#   MINIMAL=1 ./scripts/gpu-wheels.sh .whl 312          # only what a CUDA image with transformers lacks
# Run it on a connected x86_64 Linux machine, then carry DIR (and the repository) to the GPU box.
# The GPU box keeps its own torch; the rest is what ragtune's .venv holds (made by scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-gpu-wheels}"
PYV="${2:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')}"
mkdir -p "$DIR"
# everything ragtune's own venv holds (what the test suite ran with), except torch and its CUDA stack,
# plus the GPU-only packages; --no-deps so nothing pulls another torch
reqs="$DIR/requirements.txt"
if [ "${MINIMAL:-0}" = 1 ]; then
    # a box that already has torch, transformers, accelerate, pyarrow and pandas (a CUDA image such as the
    # one the first GPU run used): only what the training path and the benchmark add, about 46 MB
    "${RAGTUNE_VENV:-.venv}/bin/python" -m pip freeze \
        | grep -iE '^(trl|datasets|dill|multiprocess|peft)==' > "$reqs"
else
    "${RAGTUNE_VENV:-.venv}/bin/python" -m pip freeze --exclude-editable \
        | grep -viE '^(torch|triton|nvidia-|llama[-_]cpp[-_]python)' > "$reqs"
fi
printf '%s\n' bitsandbytes liger-kernel >> "$reqs"
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64)
# one requirement at a time: a package published only as an sdist (kiwipiepy_model is one) is built
# into a wheel here instead, so the GPU box never builds anything
while read -r req; do
    [ -n "$req" ] || continue
    if ! python3 -m pip download -q --no-deps --only-binary :all: "${platforms[@]}" --python-version "$PYV" \
            -d "$DIR" "$req" 2>/dev/null; then
        echo "gpu-wheels: $req has no binary wheel for Python $PYV; building one from its sdist"
        python3 -m pip wheel -q --no-deps -w "$DIR" "$req"
    fi
done < "$reqs"
rm -rf build  # a stale build/lib would go into the wheel
python3 -m pip wheel -q --no-deps -w "$DIR" .
echo "gpu-wheels: $(ls "$DIR" | wc -l) wheels in $DIR for Python $PYV"
