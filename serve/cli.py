"""Argument parsers for `ragtune ask`, `ragtune chat`, `ragtune serve` (imports stay light).

    ragtune ask "How many remote days?" --adapter runs/adapter --json
    ragtune ask "How many remote days?" --stream | tee answer.txt   streamed on a pipe too (default: on a terminal)
    ragtune ask --questions questions.jsonl          one JSON line per question, in order (exit 3: some failed)
    ragtune ask "How many remote days?" --server http://127.0.0.1:8000 [--api-key KEY]
    ragtune ask "How many remote days?" --engine openai --url http://gpu-box:8000/v1 --model policies-merged
    echo "question" | ragtune ask - --no-rag
    ragtune chat --adapter runs/adapter
    ragtune serve --port 8000 --config configs/serve/local.yaml
"""

from __future__ import annotations

import argparse
from typing import Any


def _answer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="DIR", default="", help="LoRA adapter dir written by 'ragtune train', or the name of one restored from a bundle (default: model.adapter)")
    p.add_argument("--index", metavar="NAME", default="", help="answer from this index (default: index.name, when it exists)")
    p.add_argument("--no-rag", action="store_true", help="answer without retrieval")
    p.add_argument("--max-new-tokens", type=int, metavar="N", default=None, help="default: generation.max_new_tokens")
    p.add_argument("--temperature", type=float, metavar="T", default=None, help="0 = greedy (default: generation.temperature)")
    p.add_argument("--system", metavar="TEXT", default="", help="a system message before the question")
    p.add_argument("--engine", choices=("auto", "transformers", "llama.cpp", "openai"), default=None,
                   help="answering engine (default: generation.engine); llama.cpp runs a cached GGUF on the CPU; "
                        "openai sends generation to an OpenAI-compatible server (--url, --model)")
    p.add_argument("--url", metavar="URL", default=None,
                   help="with --engine openai: the remote server's /v1 base URL (default: generation.url)")


def register(sub: Any, ask_only: bool = False) -> None:
    """ask, chat, serve and jobs; `ask_only` for the `ask --server` fast path (remote_ask_args)."""
    p = sub.add_parser(
        "ask", help="answer one question, with or without retrieval",
        description="Answer one question and exit. Plain output is the answer only; --json adds sources, "
                    "mode, token counts and timings. Errors go to stderr with a non-zero exit code.",
    )
    p.add_argument("question", nargs="?", default=None, help="the question; '-' reads it from stdin")
    _answer_flags(p)
    p.add_argument("--json", action="store_true", help="answer, sources, mode, token counts and timings as JSON")
    p.add_argument("--questions", metavar="FILE", default=None,
                   help="many questions in one process: JSONL with a \"question\" field (optional system) or one "
                        "question a line, '-' for stdin; one JSON line per input, in order; exit 3 when some failed")
    p.add_argument("--server", metavar="URL", default=None,
                   help="ask a running 'ragtune serve' instead of loading the model (default: env RAGTUNE_SERVER)")
    p.add_argument("--model", metavar="NAME", default="",
                   help="with --server: the deployment to ask (default: the server's first in /v1/models); "
                        "with --engine openai: the model the remote server serves (default: generation.model)")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help="the server's API key (default: env RAGTUNE_API_KEY); with --engine openai the remote "
                        "server's (default: generation.api_key, else env RAGTUNE_ENGINE_API_KEY)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print the answer as it is decoded (default: when stdout is a terminal and neither --json "
                        "nor --questions is given); the text is the same either way")
    p.add_argument("--schema", metavar="FILE.json", default=None,
                   help="answer with JSON that validates against this JSON schema (grammar-constrained decoding); "
                        "prints the JSON")
    p.set_defaults(func=_run_ask)
    if ask_only:
        return

    p = sub.add_parser(
        "chat", help="interactive multi-turn chat",
        description="Interactive chat with streamed tokens. Commands: /sources, /rag on|off, /reset, /help, "
                    "/exit (or /bye, Ctrl-D); a message of several lines goes between \"\"\" lines. Ctrl-C "
                    "stops an answer.",
    )
    _answer_flags(p)
    p.add_argument("--model", metavar="NAME", default="",
                   help="with --engine openai: the model the remote server serves (default: generation.model)")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help="with --engine openai: the remote server's key (default: generation.api_key, else env "
                        "RAGTUNE_ENGINE_API_KEY)")
    p.set_defaults(func=_run_chat)

    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server",
        description="OpenAI-compatible HTTP server (GET /v1/models, POST /v1/chat/completions, GET /health) "
                    "with a chat page at /. Deployments come from serve.deployments in the config.",
    )
    p.add_argument("--host", default=None, help="bind address (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: serve.port, 8000)")
    p.set_defaults(func=_run_serve)

    from ragtune.serve.jobs_cli import register as register_jobs

    register_jobs(sub)


def remote_ask_args(argv: list[str]) -> argparse.Namespace | None:
    """`ask ... --server URL` (or with RAGTUNE_SERVER set) parsed by ask's own parser, so a script that
    asks a running server skips building every other parser and loading the config; None for anything
    else (the full CLI handles it)."""
    import os

    from ragtune.client import SERVER_ENV, server_url

    if argv[:1] != ["ask"] or not (any(a == "--server" or a.startswith("--server=") for a in argv)
                                   or os.environ.get(SERVER_ENV, "").strip()):
        return None
    parser = argparse.ArgumentParser(prog="ragtune")
    register(parser.add_subparsers(dest="command"), ask_only=True)
    args = parser.parse_args(argv)
    return args if server_url(args.server) else None


def _run_ask(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.serve.commands import run_ask

    return run_ask(args, cfg)


def _run_chat(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.serve.chat_repl import run_chat

    return run_chat(args, cfg)


def _run_serve(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.serve.server import run_serve

    return run_serve(args, cfg)
