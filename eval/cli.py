"""Argument parser for `ragtune eval` (imports stay light: the work is in ragtune.eval.run)."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = """Answer held-out questions in every mode -- base model, RAG (base + retrieved sources),
and for each adapter NAME (base + adapter) and NAME+rag -- with identical greedy decoding through
one engine, and compare them: exact match, token F1, ROUGE-L, contains-reference, retrieval
recall/MRR/nDCG, citation and abstention accuracy, latency, tokens and each mode's time, with 95%
bootstrap intervals and paired differences between every pair of modes; plus a cost table
measured on this machine (training time from each adapter's run card, and any saved
'ragtune index add/sync --json' results passed with --cost). Each adapter's training recipe
(plain, or trained with retrieval) is read from its run card. Writes report.md, report.json and
report.png into --out."""

EXAMPLE = """example (the policies changed: docs_v2 copied over the indexed folder work/docs):
  ragtune index sync work/docs --index policies --json > runs/sync.json
  ragtune eval --questions examples/policies/questions.jsonl \\
      --adapter plain=runs/plain --adapter rag-trained=runs/rag-trained \\
      --index policies --cost runs/sync.json --out runs/eval \\
      eval.system_prompt="You are the Northwind Robotics policy assistant. Answer in one short sentence."
score the OpenAI-compatible server you will run in production (base and rag modes on its model):
  ragtune eval --questions examples/policies/questions.jsonl --index policies --modes base,rag \\
      --engine openai --url http://gpu-box:8000/v1 --model policies-merged
modes: base, rag, NAME and NAME+rag per adapter (a bare --adapter DIR is named ft); in --modes,
ft and ft+rag stand for every adapter's modes, so the default base,ft,rag,ft+rag compares all.
questions: JSONL, {"question", "answer", "sources"?: [path], "answerable"?: false} per line,
or chat records {"messages": [...]} (last user turn = question, last assistant turn = answer)."""


def _run_eval(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.cli import print_json, print_table
    from ragtune.eval.report import human_seconds
    from ragtune.eval.run import run_eval

    cfg = _remote_flags(cfg, args)
    res = run_eval(cfg, questions=args.questions, adapter=args.adapter, index=args.index, modes=args.modes,
                   out_dir=args.out, cost_files=args.cost or (), progress=not (args.no_progress or args.json),
                   engine=args.engine)
    rep = res.report
    if args.json:
        print_json({"out": str(res.out_dir), "files": {k: str(v) for k, v in res.paths.items()},
                    "errors": res.errors, "modes": rep["modes"], "adapters": rep["adapters"],
                    "engine": rep["meta"].get("engine"), "modes_refused": rep["meta"].get("modes refused"),
                    "summary": rep["summary"],
                    "speed": rep["speed"], "best": rep["best"], "cost": rep["cost"]})
        return res.exit_code
    rows = []
    for mode in rep["modes"]:
        s, sp = rep["summary"][mode], rep["speed"][mode]

        def pct(key: str) -> str:
            ci = s.get(key)
            return "–" if not ci else f"{100 * ci['mean']:.0f}"

        rows.append({"mode": mode, "correct%": pct("correct"), "F1%": pct("token_f1"), "ROUGE-L%": pct("rouge_l"),
                     "recall@k%": pct("recall_at_k"), "old answer%": pct("stale_answer"),
                     "p50": human_seconds(sp["latency_p50_s"]), "time": human_seconds(sp.get("mode_s"))})
    print_table(rows, ["mode", "correct%", "F1%", "ROUGE-L%", "recall@k%", "old answer%", "p50", "time"])
    print(f"engine: {rep['meta'].get('engine', '?')}")
    if rep["meta"].get("modes refused"):
        print(f"modes refused: {rep['meta']['modes refused']}")
    if res.errors:
        print(f"{res.errors} answer(s) failed; see report.md")
    print(f"report: {res.paths['md']} (+ report.json, report.png)")
    return res.exit_code


def _remote_flags(cfg: Any, args: argparse.Namespace) -> Any:
    """--url, --model, --api-key as generation.url/model/api_key, for engine openai only."""
    from ragtune.errors import UsageError

    flags = {"url": args.url or "", "model": args.model or "", "api_key": args.api_key or ""}
    given = {k: v for k, v in flags.items() if v}
    if not given:
        return cfg
    if (args.engine or cfg.eval.engine) != "openai":
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(f"{names} name a remote server: add --engine openai (or set eval.engine: openai)")
    from ragtune.config import replace

    return replace(cfg, generation=replace(cfg.generation, **given))


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="base vs fine-tuned vs RAG vs fine-tuned+RAG, side by side",
                       description=DESCRIPTION, epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", default=None, metavar="FILE.jsonl", help="held-out questions (default eval.questions)")
    p.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                   help="adapter from 'ragtune train', repeatable: NAME=DIR gives modes NAME and NAME+rag; "
                        "a bare DIR is named ft (default model.adapter)")
    p.add_argument("--index", default=None, metavar="NAME", help="index for the rag modes (default index.name)")
    p.add_argument("--modes", default=None, metavar="LIST",
                   help="comma-separated modes: base, rag, NAME, NAME+rag; ft / ft+rag = every adapter's "
                        "(default eval.modes: base,ft,rag,ft+rag)")
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (default eval.out_dir)")
    p.add_argument("--cost", action="append", metavar="FILE",
                   help="measured cost to include: a run card, or saved 'ragtune index add/sync --json' output (repeatable)")
    p.add_argument("--engine", choices=("auto", "transformers", "llama.cpp", "openai"), default=None,
                   help="answering engine for every mode (default eval.engine: auto = llama.cpp on the CPU "
                        "when installed, from the f16 GGUF export; transformers otherwise); openai: an "
                        "OpenAI-compatible server answers base and rag (modes with adapters are refused)")
    p.add_argument("--url", default=None, metavar="URL",
                   help="with --engine openai: the server's /v1 base URL (default generation.url)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="with --engine openai: the model it serves (default generation.model)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="with --engine openai: its key (default generation.api_key, else env RAGTUNE_ENGINE_API_KEY)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (the full report is report.json)")
    p.set_defaults(func=_run_eval)
