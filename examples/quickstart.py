"""Load the prepared default chat model with plain transformers and answer one question, offline.

    ragtune models prepare
    python examples/quickstart.py "What is the capital of France?"
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from ragtune.modeling import default_chat_model_dir  # noqa: E402

path = default_chat_model_dir()  # ~/.cache/ragtune/models/SmolLM2-135M-Instruct (or $RAGTUNE_HOME/...)
tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
question = sys.argv[1] if len(sys.argv) > 1 else "What is the capital of France?"
inputs = tok.apply_chat_template(
    [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
)
out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
