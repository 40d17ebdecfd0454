"""OpenAI's fine-tuning tutorial against `ragtune serve`: upload, create a job, poll, then ask the
fine-tuned model and the base the training questions and count the trained answers it gives.

    ragtune serve --port 8000 serve.fine_tuning=true serve.api_key=KEY data.max_length=256
    python examples/openai_fine_tuning.py --file examples/policies/train_v1.jsonl --every 6 \
        --epochs 10 --lr-multiplier 5 --base-url http://127.0.0.1:8000/v1 --api-key KEY

Only `base_url`, `api_key` and `model` (a deployment of the server, `base` by default) differ from
the code written for OpenAI's API.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", default="examples/policies/train_v1.jsonl", help="chat JSONL to train on")
    ap.add_argument("--every", type=int, default=1, help="use every Nth record (a quicker run)")
    ap.add_argument("--epochs", default="auto", help="n_epochs (default: the server's train.epochs)")
    ap.add_argument("--lr-multiplier", default="auto", help="learning_rate_multiplier x train.learning_rate")
    ap.add_argument("--model", default="base", help="the server's deployment to fine-tune")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none")
    args = ap.parse_args()

    with open(args.file, encoding="utf-8") as fh:
        lines = [line for i, line in enumerate(fh) if line.strip() and i % args.every == 0]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as tmp:
        tmp.writelines(lines)
    hp = {k: (v if v == "auto" else float(v) if k == "learning_rate_multiplier" else int(v))
          for k, v in (("n_epochs", args.epochs), ("learning_rate_multiplier", args.lr_multiplier))}

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    t0 = time.time()
    file = client.files.create(file=open(tmp.name, "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=file.id, model=args.model, hyperparameters=hp)
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        time.sleep(5)
    print(f"{job.id}: {job.status} after {time.time() - t0:.0f} s; model {job.fine_tuned_model}, "
          f"{job.trained_tokens} trained tokens")
    if job.status != "succeeded":
        print(job.error.message if job.error else "")
        raise SystemExit(1)

    exact = {"fine-tuned": 0, "base": 0}
    for line in lines:
        messages = json.loads(line)["messages"]
        want = messages[-1]["content"]
        for label, model in (("fine-tuned", job.fine_tuned_model), ("base", args.model)):
            got = client.chat.completions.create(model=model, messages=messages[:-1], temperature=0)
            exact[label] += got.choices[0].message.content.strip() == want
    print(f"trained answers given exactly, of {len(lines)}: fine-tuned {exact['fine-tuned']}, base {exact['base']}")


if __name__ == "__main__":
    main()
