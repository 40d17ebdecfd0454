#!/usr/bin/env bash
# GPU acceptance check: run once on a CUDA machine (about 9 minutes on one H100/H200); prints one table.
# First run: docs/benchmarks.md, "On a GPU" (every acceptance step passed on an H200, 2026-12-04).
#   ./scripts/gpu-check.sh [WHEEL_DIR]        # WHEEL_DIR: wheels carried beside it (default ./gpu-wheels)
#   ./scripts/gpu-wheels.sh gpu-wheels        # on a connected machine: fetch those wheels first
#
# Installs nothing from the network: packages the GPU box lacks (trl, datasets, bitsandbytes,
# liger-kernel, ragtune itself) come from WHEEL_DIR with `pip install --no-index`.
# Settings (environment):
#   RAGTUNE_GPU_MODEL     model folder for the functional steps (default: the prepared SmolLM2-135M)
#   RAGTUNE_GPU_TOKENIZER a folder with SmolLM2's tokenizer, chat template and config: the benchmarks'
#                         random-weight shapes use it (default: RAGTUNE_GPU_MODEL); with
#                         RAGTUNE_GPU_RANDOM=1 the functional steps also use a random-weight SmolLM2-135M
#   RAGTUNE_GPU_DATA      chat JSONL for the training benchmark (bench/bench_cuda.py make-data writes
#                         4,000 records from Debian's python3.11-doc; default: examples/policies/train_v1.jsonl)
#   RAGTUNE_GPU_OUT       where logs, JSON and summary.tsv go (default runs/gpu-check)
#   RAGTUNE_GPU_BUDGET    seconds for the whole check (default 560): later steps are cut to fit
# Steps:
#   1. at once: the CUDA tests; `ragtune train` in bf16 (the CUDA default), with QLoRA, and through
#      `accelerate launch` with the DDP and FSDP configs (one process per GPU); then merge, greedy
#      parity of merged vs base + adapter (float32, CUDA), `ragtune ask` with the static and the dynamic cache
#   2. bench/bench_cuda.py train: ragtune against TRL (defaults, packing, packing + liger) at 135M, 1.7B, 6.5B
#   3. bench/bench_cuda.py decode: static cache + compile against plain generate at batch 1 (135M, 8B)
#   4. QLoRA peak memory at 6.5B against bf16 LoRA with the same settings
# Each step's result and seconds go to $OUT/summary.tsv; a failed step is reported and the rest go on.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
WHEELS="$(realpath -m "${1:-gpu-wheels}")"
OUT="$(realpath -m "${RAGTUNE_GPU_OUT:-runs/gpu-check}")"
PY="${PYTHON:-python3}"
T_END=$(( $(date +%s) + ${RAGTUNE_GPU_BUDGET:-560} ))
mkdir -p "$OUT"
: > "$OUT/summary.tsv"

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu-check: torch sees no CUDA GPU here (python: $PY); run this on the GPU machine" >&2
    exit 2
fi
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"

if [ -d "$WHEELS" ]; then
    echo "gpu-check: installing carried wheels from $WHEELS (no network)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl > "$OUT/pip.log" 2>&1 || {
        cat "$OUT/pip.log" >&2; echo "gpu-check: installing the wheels in $WHEELS failed (see above)" >&2; exit 2; }
fi
"$PY" -c 'import ragtune' 2>/dev/null || { echo "gpu-check: ragtune is not installed; carry its wheel in $WHEELS" >&2; exit 2; }
"$PY" - > "$OUT/versions.txt" 2>&1 <<'PY'
import importlib.metadata as md, torch
print(torch.cuda.get_device_name(0), "x", torch.cuda.device_count(), "| CUDA", torch.version.cuda)
for p in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel", "triton", "ragtune"):
    try: print(p, md.version(p))
    except md.PackageNotFoundError: print(p, "missing")
PY
cat "$OUT/versions.txt"

# Every step runs outside the repository: its ragtune/ folder is not the installed package (train/,
# eval/, serve/ install inside it), and Python puts the working directory first on sys.path.
for v in RAGTUNE_GPU_TOKENIZER RAGTUNE_GPU_MODEL RAGTUNE_GPU_DATA; do
    [ -n "${!v:-}" ] && export "$v=$(realpath -m "${!v}")"
done
WORK="$(mktemp -d)"
cp -r "$REPO/tests" "$WORK/tests"
cd "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export RAGTUNE_HOME="${RAGTUNE_HOME:-$OUT/home}"
RT=("$PY" -m ragtune)
DATA="$REPO/examples/policies/train_v1.jsonl"

left() { echo $(( T_END - $(date +%s) )); }
record() {  # record NAME RC SECONDS LOG
    local last; last="$(grep -v '^\s*$' "$4" | tail -n 1 | cut -c1-110)"
    local res; res=$([ "$2" -eq 0 ] && echo ok || { [ "$2" -eq 124 ] && echo "TIMEOUT" || echo "FAIL($2)"; })
    printf '%s\t%s\t%s\t%s\n' "$1" "$res" "$3" "$last" >> "$OUT/summary.tsv"
    echo "gpu-check: $1: $res in ${3}s$([ "$2" -eq 0 ] || echo ", see $4")"
}
step() {  # step NAME MAX_SECONDS COMMAND...: run with a time limit (cut to the budget left), record it
    local name="$1" cap="$2"; shift 2
    if [[ ",${RAGTUNE_GPU_SKIP:-}," == *",$name,"* ]]; then
        printf '%s\tskipped\t0\tRAGTUNE_GPU_SKIP\n' "$name" >> "$OUT/summary.tsv"; return 0
    fi
    local lim; lim=$(left); [ "$lim" -gt "$cap" ] && lim=$cap
    if [ "$lim" -lt 20 ]; then
        printf '%s\tskipped\t0\tno time left in RAGTUNE_GPU_BUDGET\n' "$name" >> "$OUT/summary.tsv"; return 0
    fi
    local t0=$SECONDS
    timeout -k 10 "$lim" "$@" > "$OUT/$name.log" 2>&1
    record "$name" $? $(( SECONDS - t0 )) "$OUT/$name.log"
}

TOKDIR="${RAGTUNE_GPU_TOKENIZER:-${RAGTUNE_GPU_MODEL:-}}"
if [ "${RAGTUNE_GPU_RANDOM:-0}" = 1 ]; then
    MODEL="$OUT/smollm2-random"
    step make-model 120 "$PY" "$REPO/bench/bench_cuda.py" make-model --shape 135m --tokenizer "$TOKDIR" --out "$MODEL" --dtype float32
elif [ -n "${RAGTUNE_GPU_MODEL:-}" ]; then
    MODEL="$RAGTUNE_GPU_MODEL"
else
    step models-prepare 300 "${RT[@]}" models prepare
    MODEL="$("$PY" -c 'from ragtune.modeling import default_chat_model_dir as d; print(d())')"
fi
TOKDIR="${TOKDIR:-$MODEL}"
QUICK=(train.max_steps=30 train.save_steps=0 "data.train_file=$DATA" "model.path=$MODEL")

# 1. functional checks, side by side (each is small; the GPU has room for all of them)
step cuda-tests 240 "$PY" -m pytest -q -p no:cacheprovider -o cache_dir="$WORK/.pc" tests/train/test_cuda.py &
step train-bf16 240 "${RT[@]}" train "${QUICK[@]}" "train.output_dir=$OUT/bf16" --overwrite &
step train-qlora 240 "${RT[@]}" --config "$REPO/configs/train/qlora-cuda.yaml" train "${QUICK[@]}" \
    "train.output_dir=$OUT/qlora" --overwrite &
step accelerate-ddp 240 accelerate launch --config_file "$REPO"/configs/accelerate/multi-gpu-ddp.yaml --num_processes "$NGPU" \
    --main_process_port 29502 -m ragtune train "${QUICK[@]}" "train.output_dir=$OUT/ddp" --overwrite &
# FSDP on one GPU too: accelerate launches FSDP through torchrun at any process count, so the sharded
# checkpoints and the gathered adapter run for real (tests/train/test_train.py runs it on CPU). Its own port:
# it starts beside the DDP launch.
step accelerate-fsdp 240 accelerate launch --config_file "$REPO"/configs/accelerate/fsdp.yaml --num_processes "$NGPU" \
    --main_process_port 29512 -m ragtune train "${QUICK[@]}" "train.output_dir=$OUT/fsdp" train.save_steps=10 --overwrite &
step ask-dynamic 180 "${RT[@]}" ask "How many days per week can I work remotely?" --no-rag "model.path=$MODEL" \
    generation.cache=dynamic generation.max_new_tokens=128 --json &
step ask-static 240 "${RT[@]}" ask "How many days per week can I work remotely?" --no-rag "model.path=$MODEL" \
    generation.cache=static generation.max_new_tokens=128 --json &
wait
step merge 120 "${RT[@]}" merge "$OUT/bf16" --out "$OUT/merged" --force --dtype float32
step merge-parity 120 "$PY" - "$MODEL" "$OUT/bf16" "$OUT/merged" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base, adapter, merged = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(base)
ids = tok.apply_chat_template([{"role": "user", "content": "How many days per week can I work remotely?"}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"].cuda()
kw = dict(max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=0)
a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).cuda(), adapter).eval()
m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).cuda().eval()
with torch.inference_mode():
    ga = a.generate(ids, **kw)[0].tolist()
    gm = m.generate(ids, **kw)[0].tolist()
    d = (a(torch.tensor([ga], device="cuda")).logits - m(torch.tensor([ga], device="cuda")).logits).abs().max().item()
same = ga == gm
print(f"float32 on CUDA: greedy ids {'equal' if same else 'differ at %d' % next(i for i, (x, y) in enumerate(zip(ga, gm)) if x != y)}"
      f" over {len(ga) - ids.shape[1]} new tokens; max |logit difference| {d:.2e}")
sys.exit(0 if same else 1)
PY

# 2-4. benchmarks, one at a time (they time the GPU)
BDATA="${RAGTUNE_GPU_DATA:-$DATA}"
# equal data by default: every run trains one epoch over the same RAGTUNE_GPU_RECORDS records, so the
# held-out losses compare (RAGTUNE_GPU_STEPS=135m=15,... gives equal steps instead)
step bench-train "${RAGTUNE_GPU_TRAIN_CAP:-300}" "$PY" "$REPO/bench/bench_cuda.py" train --data "$BDATA" --tokenizer "$TOKDIR" --warmup 3 \
    --steps "${RAGTUNE_GPU_STEPS:-0}" --train-records "${RAGTUNE_GPU_RECORDS:-320}" --run-timeout 110 --profile \
    --json "$OUT/bench_train.json" --runs "${RAGTUNE_GPU_RUNS:-6.5b:ragtune,6.5b:trl-packing-liger,1.7b:ragtune,1.7b:trl-packing-liger,135m:ragtune,135m:trl-packing-liger,135m:ragtune-packing,1.7b:ragtune-packing}"
step bench-qlora 120 "$PY" "$REPO/bench/bench_cuda.py" train --data "$BDATA" --tokenizer "$TOKDIR" --warmup 1 \
    --steps 4 --run-timeout 100 --json "$OUT/bench_qlora.json" --runs "6.5b:ragtune-qlora,6.5b:ragtune-gc"
step bench-decode 130 "$PY" "$REPO/bench/bench_cuda.py" decode --tokenizer "$TOKDIR" --shapes 135m,8b --tokens 128 \
    --json "$OUT/bench_decode.json"
step bench-train-more 200 "$PY" "$REPO/bench/bench_cuda.py" train --data "$BDATA" --tokenizer "$TOKDIR" --warmup 3 \
    --steps "135m=20,1.7b=16" --run-timeout 60 --json "$OUT/bench_train_more.json" \
    --runs "1.7b:trl-packing-liger-nogc,135m:trl-defaults,135m:trl-packing,135m:ragtune-packing,135m:ragtune-nokernels"

echo
echo "== gpu-check on $(head -n 1 "$OUT/versions.txt"), $(date -u +%F)"
printf '%-16s %-9s %6s  %s\n' step result seconds "last line"
while IFS=$'\t' read -r name res secs last; do
    printf '%-16s %-9s %6s  %s\n' "$name" "$res" "$secs" "$last"
done < "$OUT/summary.tsv"
for f in bench-train bench-qlora bench-decode bench-train-more; do
    [ -f "$OUT/$f.log" ] && { echo; echo "== $f"; grep -A20 -E '^(shape )' "$OUT/$f.log"; }
done
! grep -qE "FAIL|TIMEOUT" "$OUT/summary.tsv"
