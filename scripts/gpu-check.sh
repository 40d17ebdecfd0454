#!/usr/bin/env bash
# GPU acceptance check: run once on a CUDA machine (about 8 minutes on one H100/H200); prints one table.
#   ./scripts/gpu-check.sh [WHEEL_DIR]        # WHEEL_DIR: wheels carried beside it (default ./gpu-wheels)
#   ./scripts/gpu-wheels.sh gpu-wheels        # on a connected machine: fetch those wheels first
#
# Installs nothing from the network: packages the GPU box lacks (trl, datasets, bitsandbytes,
# liger-kernel, ragtune itself) come from WHEEL_DIR with `pip install --no-index`. Steps:
#   1. the CUDA tests (tests/train/test_cuda.py and every test marked cuda)
#   2. `ragtune train` in bf16 (the CUDA default) and with QLoRA (4-bit base)
#   3. `accelerate launch` with the DDP and FSDP configs, num_processes = the GPUs present
#   4. merge, and greedy parity of the merged model against base + adapter on CUDA
#   5. `ragtune ask` with generation.cache static against dynamic (tokens/s at batch 1)
#   6. bench/bench_train.py on CUDA: ragtune against TRL (defaults, packing, packing + liger)
# Each step's result and seconds go to $OUT/summary.tsv; a failed step is reported and the rest go on.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-gpu-wheels}"
OUT="${RAGTUNE_GPU_OUT:-runs/gpu-check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
: > "$OUT/summary.tsv"

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu-check: torch sees no CUDA GPU here (python: $PY); run this on the GPU machine" >&2
    exit 2
fi
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"

if [ -d "$WHEELS" ]; then
    echo "gpu-check: installing carried wheels from $WHEELS (no network)"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl || {
        echo "gpu-check: installing the wheels in $WHEELS failed (see above)" >&2; exit 2; }
fi
"$PY" -c 'import ragtune' 2>/dev/null || { echo "gpu-check: ragtune is not installed; carry its wheel in $WHEELS" >&2; exit 2; }

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export RAGTUNE_HOME="${RAGTUNE_HOME:-$PWD/$OUT/home}"
DATA=examples/policies/train_v1.jsonl

step() {  # step NAME COMMAND...: run, time, record ok/FAIL and the last line of its output
    local name="$1"; shift
    local t0 rc last
    t0=$(date +%s.%N)
    "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    last="$(tail -n 1 "$OUT/$name.log" | cut -c1-100)"
    printf '%s\t%s\t%.0f\t%s\n' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAIL($rc)")" \
        "$(echo "$(date +%s.%N) - $t0" | bc)" "$last" >> "$OUT/summary.tsv"
    echo "gpu-check: $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED, see $OUT/$name.log")"
}

step models-prepare ragtune models prepare
MODEL="$("$PY" -c 'from ragtune.modeling import default_chat_model_dir as d; print(d())')"
QUICK=(train.epochs=1 train.save_steps=0 "data.train_file=$DATA" "model.path=$MODEL")

step cuda-tests "$PY" -m pytest -q -m cuda tests
step train-bf16 ragtune train "${QUICK[@]}" "train.output_dir=$OUT/bf16" --overwrite --json
step train-qlora ragtune --config configs/train/qlora-cuda.yaml train "${QUICK[@]}" \
    "train.output_dir=$OUT/qlora" --overwrite --json
step accelerate-ddp accelerate launch --config_file configs/accelerate/multi-gpu-ddp.yaml --num_processes "$NGPU" \
    "$(command -v ragtune)" train "${QUICK[@]}" "train.output_dir=$OUT/ddp" --overwrite
if [ "$NGPU" -ge 2 ]; then
    step accelerate-fsdp accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes "$NGPU" \
        "$(command -v ragtune)" train "${QUICK[@]}" "train.output_dir=$OUT/fsdp" --overwrite
else
    printf 'accelerate-fsdp\tskipped\t0\tone GPU: FSDP needs two or more\n' >> "$OUT/summary.tsv"
fi
step merge ragtune merge "$OUT/bf16" --out "$OUT/merged" --force
step merge-parity "$PY" - "$MODEL" "$OUT/bf16" "$OUT/merged" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base, adapter, merged = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(base)
ids = tok.apply_chat_template([{"role": "user", "content": "How many days per week can I work remotely?"}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"].cuda()
a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).cuda(), adapter)
m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).cuda()
ga = a.generate(ids, max_new_tokens=24, do_sample=False)[0].tolist()
gm = m.generate(ids, max_new_tokens=24, do_sample=False)[0].tolist()
print("greedy ids equal" if ga == gm else f"greedy ids differ at {next(i for i, (x, y) in enumerate(zip(ga, gm)) if x != y)}")
sys.exit(0 if ga == gm else 1)
PY
step ask-dynamic ragtune ask "How many days per week can I work remotely?" --no-rag generation.cache=dynamic \
    generation.max_new_tokens=128 --json
step ask-static ragtune ask "How many days per week can I work remotely?" --no-rag generation.cache=static \
    generation.max_new_tokens=128 --json
step bench-train "$PY" bench/bench_train.py --json "$OUT/bench_train.json"

echo
echo "== gpu-check on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))') x$NGPU, $(date -u +%F)"
printf '%-16s %-8s %6s  %s\n' step result seconds "last line"
while IFS=$'\t' read -r name res secs last; do
    printf '%-16s %-8s %6s  %s\n' "$name" "$res" "$secs" "$last"
done < "$OUT/summary.tsv"
! grep -q "FAIL" "$OUT/summary.tsv"
