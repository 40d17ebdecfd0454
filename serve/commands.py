"""`ragtune ask`: one question in, one answer out, built for shell scripts.

    ragtune ask "How many days can I work remotely?" --adapter runs/adapter
    echo "How many days?" | ragtune ask - --json --no-rag

Plain output is the answer only (stdout); --json gives answer, sources, mode, token counts and
timings. Errors go to stderr with exit code 2 (usage) or 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ragtune.errors import UsageError

log = logging.getLogger(__name__)


def generation_overrides(cfg: Any, args: argparse.Namespace) -> Any:
    from ragtune.config import replace

    changes: dict[str, Any] = {}
    if getattr(args, "max_new_tokens", None) is not None:
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        changes["max_new_tokens"] = args.max_new_tokens
    if getattr(args, "temperature", None) is not None:
        if args.temperature < 0:
            raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
        changes["temperature"] = args.temperature
    if getattr(args, "engine", None):
        changes["engine"] = args.engine
    return replace(cfg, generation=replace(cfg.generation, **changes)) if changes else cfg


def precheck(cfg: Any, adapter: str = "") -> None:
    """The cheap checks (engine, model dir) before anything slow loads. With an adapter and no
    model.path, the base comes from the adapter's run card when the model loads."""
    from ragtune.modeling import resolve_model_path
    from ragtune.serve.generator import check_engine

    check_engine(cfg.generation.engine, cfg.model.device)
    if cfg.model.path or not (adapter or cfg.model.adapter):
        resolve_model_path(cfg.model.path, "model.path")


def load_for_cli(cfg: Any, adapter_dir: str) -> tuple[Any, str | None]:
    """A loaded Generator for ask/chat and the name of the adapter to answer with."""
    from ragtune.modeling import quiet_libraries
    from ragtune.serve.generator import Generator

    quiet_libraries()
    gen = Generator(cfg)
    adapter_dir = adapter_dir or cfg.model.adapter
    adapters = {Path(adapter_dir).name: adapter_dir} if adapter_dir else {}
    gen.load(adapters=adapters)
    return gen, (next(iter(gen.adapters)) if adapters else None)


def read_question(text: str) -> str:
    q = sys.stdin.read() if text == "-" else text
    q = q.strip()
    if not q:
        raise UsageError("the question is empty; pass it as an argument or on stdin with '-'")
    return q


def run_ask(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.serve.answer import retriever_for

    question = read_question(args.question)
    cfg = generation_overrides(cfg, args)
    precheck(cfg, args.adapter)
    retriever = retriever_for(cfg, args.index or None, args.no_rag)
    gen, adapter = load_for_cli(cfg, args.adapter)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": question}
    ]
    try:
        ans = gen.answer(messages, adapter=adapter, retriever=retriever)
    finally:
        if retriever is not None and hasattr(retriever, "close"):
            retriever.close()
    if args.json:
        out = ans.to_dict()
        out.update(model=str(gen.base_path), index=(args.index or cfg.index.name) if retriever is not None else None)
        sys.stdout.write(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(ans.text.strip() + "\n")
    return 0
