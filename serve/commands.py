"""`ragtune ask`: one question in, one answer out, built for shell scripts.

    ragtune ask "How many days can I work remotely?" --adapter runs/adapter
    echo "How many days?" | ragtune ask - --json --no-rag
    ragtune ask --questions questions.jsonl            # model loaded once; one JSON line per question
    ragtune ask "How many days?" --server http://127.0.0.1:8000 --api-key KEY   # a running server answers
    ragtune ask "How many days?" --engine openai --url http://gpu-box:8000/v1 --model policies-merged

Plain output is the answer only (stdout), printed as it is decoded when stdout is a terminal
(--stream/--no-stream decide; the text is the same); --json gives answer, sources, mode, token counts and
timings. Errors go to stderr with exit code 2 (usage) or 1; a batch exits 3 when some lines failed.
With --server (or RAGTUNE_SERVER) nothing heavy is imported: the question goes to the server's
/v1/chat/completions and its answer is printed in the same shapes (streamed from its server-sent events
by the same rule). With --engine openai (or
generation.engine: openai) retrieval, the prompt and the sources stay here and any OpenAI-compatible
server (generation.url/model/api_key, or --url/--model/--api-key) generates.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Iterable, Iterator, TextIO

from ragtune.errors import EXIT_PARTIAL, RagtuneError, UsageError


def generation_overrides(cfg: Any, args: argparse.Namespace) -> Any:
    """cfg with --max-new-tokens, --temperature and --engine applied (checked even without a cfg)."""
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
    if not changes or cfg is None:
        return cfg
    from ragtune.config import replace

    return replace(cfg, generation=replace(cfg.generation, **changes))


def remote_overrides(cfg: Any, args: argparse.Namespace) -> Any:
    """cfg with --url, --model and --api-key as generation.url/model/api_key (engine openai only)."""
    flags = {"url": getattr(args, "url", None) or "", "model": getattr(args, "model", "") or "",
             "api_key": getattr(args, "api_key", None) or ""}
    if cfg.generation.engine != "openai":
        given = ["--" + k.replace("_", "-") for k, v in flags.items() if v]
        if given:
            raise UsageError(f"{', '.join(given)} name a remote server: add --engine openai (an OpenAI-compatible "
                             "server generates) or, for ask, --server URL (a running 'ragtune serve')")
        return cfg
    changes = {k: v for k, v in flags.items() if v}
    if not changes:
        return cfg
    from ragtune.config import replace

    return replace(cfg, generation=replace(cfg.generation, **changes))


def precheck(cfg: Any, adapter: str = "") -> None:
    """The cheap checks (engine, model dir) before anything slow loads. With an adapter and no
    model.path, the base comes from the adapter's run card when the model loads."""
    from ragtune.modeling import resolve_model_path
    from ragtune.serve.generator import check_engine

    if cfg.generation.engine == "openai":
        from ragtune.serve.remote import check_remote

        check_remote(cfg)
        if adapter or cfg.model.adapter:
            which = "--adapter" if adapter else "model.adapter"
            raise UsageError(f"engine openai answers with the remote server's model as it is; {which} "
                             f"'{adapter or cfg.model.adapter}' cannot be applied there (merge it with 'ragtune "
                             "merge' and serve the merged model remotely, or drop " + which + ")")
        return
    check_engine(cfg.generation.engine, cfg.model.device)
    if cfg.model.path or not (adapter or cfg.model.adapter):
        resolve_model_path(cfg.model.path, "model.path")


def load_for_cli(cfg: Any, adapter_dir: str) -> tuple[Any, str | None]:
    """A loaded Generator for ask/chat and the name of the adapter to answer with."""
    import warnings
    from pathlib import Path

    from ragtune.modeling import quiet_libraries
    from ragtune.serve.generator import Generator

    if cfg.generation.engine == "openai":
        from ragtune.serve.remote import remote_generator

        return remote_generator(cfg), None
    gen = Generator(cfg)
    if gen.engine == "llama.cpp":  # transformers is imported only where it is needed (its tokenizer)
        warnings.filterwarnings("ignore", category=FutureWarning)
    else:
        quiet_libraries()
    adapter_dir = adapter_dir or cfg.model.adapter
    adapters = {Path(adapter_dir).name: adapter_dir} if adapter_dir else {}
    gen.load(adapters=adapters)
    return gen, (next(iter(gen.adapters)) if adapters else None)


def read_question(text: str) -> str:
    q = sys.stdin.read() if text == "-" else text
    q = q.strip()
    if not q:
        raise UsageError("the question is empty; pass it as an argument or on stdin with '-'")
    why = not_unicode(q)
    if why:
        raise UsageError(f"the question is not valid text: {why}")
    return q


def not_unicode(text: str) -> str:
    """Why `text` cannot go to a tokenizer or a server ('' when it can): bytes that were not UTF-8 (Python
    keeps them from argv and stdin as surrogates \\udc80-\\udcff) or a lone surrogate from a JSON escape."""
    try:
        text.encode("utf-8")
        return ""
    except UnicodeEncodeError as exc:
        ch = text[exc.start]
        if "\udc80" <= ch <= "\udcff":
            return f"byte 0x{ord(ch) - 0xdc00:02x} at character {exc.start} is not UTF-8; give the text as UTF-8"
        return (f"character {exc.start} is a lone surrogate ({ch!r}, e.g. a JSON escape \\ud800 without its pair), "
                "which is not valid Unicode; send well-formed text")


def run_ask(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.client import read_batch, server_url

    if (args.question is None) == (args.questions is None):
        raise UsageError("give one QUESTION or --questions FILE (JSONL with a \"question\" field, or one question "
                         "a line; '-' reads stdin)")
    stream = wants_stream(args, args.questions is not None)
    url = server_url(getattr(args, "server", None))
    # checked before any model loads; in a .jsonl file every line must be a {"question": ...} object
    batch = read_batch(args.questions, "question", jsonl=True) if args.questions is not None else None
    question = read_question(args.question) if batch is None else ""
    if args.system and (why := not_unicode(args.system)):
        raise UsageError(f"--system is not valid text: {why}")
    cfg = generation_overrides(cfg, args)
    schema = getattr(args, "schema", None)
    args.response_format = schema_format(schema) if schema else None
    asker = _RemoteAsk(args, url) if url else _LocalAsk(args, cfg)
    try:
        if batch is not None:
            return _ask_batch(asker, batch, args)
        out = asker.ask_streamed(question, args.system, sys.stdout) if stream else asker.ask(question, args.system)
    finally:
        asker.close()
    if args.json:
        sys.stdout.write(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    else:
        if not stream:
            sys.stdout.write(str(out["answer"]).strip() + "\n")
        if out.get("finish_reason") == "length":  # plain output alone cannot tell a cut answer from a whole one
            sys.stderr.write(f"note: the answer was cut off at {out.get('completion_tokens')} tokens; "
                             "--max-new-tokens N allows a longer one\n")
    return 0


def wants_stream(args: argparse.Namespace, batch: bool) -> bool:
    """--stream/--no-stream; by default stream where someone watches (stdout a terminal, as Ollama does) and
    one plain answer is printed (--json and --questions print whole JSON objects)."""
    flag = getattr(args, "stream", None)
    if flag and (args.json or batch):
        other = "--json" if args.json else "--questions"
        raise UsageError(f"--stream prints one plain answer as it is decoded; {other} prints whole JSON objects: "
                         "drop --stream")
    if flag is not None:
        return bool(flag)
    return not args.json and not batch and sys.stdout.isatty()


def print_stream(deltas: Iterable[str], out: TextIO) -> None:
    """Write an answer's deltas as they come, exactly as the whole answer prints (stripped, then a newline):
    leading whitespace is skipped and trailing whitespace held until more text follows it. Ctrl-C keeps
    what was printed and ends its line."""
    started, held = False, ""
    try:
        for delta in deltas:
            if not started:
                delta = delta.lstrip()
                if not delta:
                    continue
                started = True
            text = held + delta
            body = text.rstrip()
            held = text[len(body):]
            if body:
                out.write(body)
                out.flush()
    except KeyboardInterrupt:
        if started:
            out.write("\n")
            out.flush()
        raise
    out.write("\n")
    out.flush()


def schema_format(path: str) -> dict[str, Any]:
    """`--schema FILE.json` as OpenAI's response_format, checked here so a bad file fails before any model loads."""
    import re
    from pathlib import Path

    from ragtune.serve.constrained import UnsupportedSchema, response_format_grammar

    p = Path(path).expanduser()
    try:
        schema = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--schema '{p}': cannot read it ({exc.strerror or exc}); give a JSON schema file") from exc
    except ValueError as exc:
        raise UsageError(f"--schema '{p}' is not valid JSON ({exc}); give a JSON schema file") from exc
    name = re.sub(r"[^A-Za-z0-9_-]", "_", p.stem)[:64] or "schema"
    rf = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    try:
        response_format_grammar(rf)
    except UnsupportedSchema as exc:
        raise UsageError(f"--schema '{p}': {exc}") from exc
    return rf


def _ask_batch(asker: Any, rows: list[Any], args: argparse.Namespace) -> int:
    """One JSON line per input line, in order; a bad line gets {"line", "error"} and the rest go on.

    A local engine that batches (llama.cpp, or transformers with serve.max_batch > 1) answers a wave
    of lines at a time through `Generator.answer_all` (in line order, the same answers as one by one
    where float rounding allows); each wave's lines are printed when it ends."""
    failed = 0
    wave = asker.wave() if hasattr(asker, "wave") else 1
    for start in range(0, len(rows), wave):
        chunk = rows[start:start + wave]
        todo: list[tuple[int, str, str]] = []  # (index in chunk, question, system)
        outs: list[dict[str, Any]] = []
        for i, (n, obj, why) in enumerate(chunk):
            outs.append({"line": n, "error": why} if obj is None else {"line": n})
            if obj is None:
                continue
            system = obj.get("system", args.system)
            if not isinstance(system, str):
                outs[i] = {"line": n, "error": f'line {n}: "system" must be a string'}
                continue
            bad = [f'line {n}: "{k}" is not valid text: {why}' for k, v in (("question", obj["question"]),
                                                                          ("system", system)) if (why := not_unicode(v))]
            if bad:
                outs[i] = {"line": n, "error": bad[0]}
                continue
            todo.append((i, obj["question"].strip(), system))
        if wave > 1:
            got = asker.ask_all([(q, system) for _, q, system in todo])
        else:
            got = []
            for _, q, system in todo:
                try:
                    got.append(asker.ask(q, system))
                except RagtuneError as exc:
                    got.append(exc)
        for (i, q, _), res in zip(todo, got):
            if isinstance(res, RagtuneError):
                outs[i] = {"line": outs[i]["line"], "error": str(res)}
            else:
                outs[i].update(question=q, **res)
        for out in outs:
            failed += "error" in out
            sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    return EXIT_PARTIAL if failed else 0


def _messages(question: str, system: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


class _LocalAsk:
    """The model (and index) loaded once in this process."""

    def __init__(self, args: argparse.Namespace, cfg: Any) -> None:
        from ragtune.serve.answer import retriever_for

        cfg = remote_overrides(cfg, args)
        precheck(cfg, args.adapter)
        self.extra: dict[str, Any] = {}
        rf = getattr(args, "response_format", None)
        if rf and cfg.generation.engine == "openai":
            self.extra = {"response_format": rf}  # the remote enforces it
        elif rf:
            from ragtune.serve.constrained import response_format_grammar

            self.extra = {"grammar": response_format_grammar(rf)}
        self.index = (args.index or cfg.index.name)
        self.retriever = retriever_for(cfg, args.index or None, args.no_rag)
        try:
            self.gen, self.adapter = load_for_cli(cfg, args.adapter)
        except BaseException:
            self.close()
            raise

    def ask(self, question: str, system: str) -> dict[str, Any]:
        ans = self.gen.answer(_messages(question, system), adapter=self.adapter, retriever=self.retriever,
                              **self.extra)
        return self._dict(ans)

    def ask_streamed(self, question: str, system: str, out: TextIO) -> dict[str, Any]:
        """`ask`, with the answer written to `out` as the engine decodes it (the generator's stream)."""
        stream = self.gen.stream(_messages(question, system), adapter=self.adapter, retriever=self.retriever,
                                 **self.extra)
        try:
            print_stream(stream, out)
        finally:
            stream.close()  # stops the worker at its next token when Ctrl-C (or a closed pipe) ended the loop
        return self._dict(stream.answer)

    def wave(self) -> int:
        """Lines answered together: 4 batches' worth where the engine batches, else 1 (one by one)."""
        sched = self.gen.batch_scheduler
        if sched is None or self.extra:  # a grammar (--schema) keeps one answer at a time
            return 1
        return 4 * sched.width if sched.width > 1 else 1

    def ask_all(self, items: list[tuple[str, str]]) -> list[dict[str, Any] | RagtuneError]:
        got = self.gen.answer_all([(_messages(q, system), self.retriever) for q, system in items],
                                  adapter=self.adapter)
        return [a if isinstance(a, RagtuneError) else self._dict(a) for a in got]

    def _dict(self, ans: Any) -> dict[str, Any]:
        out = ans.to_dict()
        remote = self.gen.engine == "openai"  # `model` is then the remote's model name
        out.update(model=self.gen.model if remote else str(self.gen.base_path), engine=self.gen.engine,
                   index=self.index if self.retriever is not None else None)
        return out

    def close(self) -> None:
        if getattr(self, "retriever", None) is not None and hasattr(self.retriever, "close"):
            self.retriever.close()


class _RemoteAsk:
    """POST /v1/chat/completions on a running `ragtune serve`; its answer in ask's --json shape
    (`model` is the deployment's name there)."""

    def __init__(self, args: argparse.Namespace, url: str) -> None:
        from ragtune.client import api_key, get_json

        chosen = [f for f, on in (("--adapter", args.adapter), ("--index", args.index), ("--no-rag", args.no_rag),
                                  ("--engine", args.engine), ("--url", getattr(args, "url", None))) if on]
        if chosen:
            raise UsageError(f"{', '.join(chosen)} cannot be used with --server: the server's deployments decide the "
                             "model, adapter, index and engine; pick one with --model NAME (see GET /v1/models)")
        self.url, self.key = url, api_key(args.api_key)
        self.model = args.model
        if not self.model:
            models = get_json(url, "/v1/models", self.key).get("data") or []
            if not models:
                raise RagtuneError(f"the server at {url} serves no deployment (GET /v1/models is empty)")
            self.model = str(models[0]["id"])
        self.max_new_tokens = args.max_new_tokens
        self.temperature = args.temperature
        self.response_format = getattr(args, "response_format", None)

    def ask(self, question: str, system: str) -> dict[str, Any]:
        from ragtune.client import post_json

        return _remote_dict(post_json(self.url, "/v1/chat/completions", self._body(question, system), self.key))

    def ask_streamed(self, question: str, system: str, out: TextIO) -> dict[str, Any]:
        """`ask`, with the answer written to `out` from the server's SSE chunks as they come. Ctrl-C (or a
        closed pipe) hangs up, which stops the server's decode; an error once text is printed ends its
        line first, then raises."""
        from ragtune.client import EventStream

        body = {**self._body(question, system), "stream": True, "stream_options": {"include_usage": True}}
        events = EventStream(self.url, "/v1/chat/completions", body, self.key)
        last: dict[str, Any] = {}  # the latest of each top-level field (sources, ragtune, usage, model)
        text: list[str] = []
        finish: list[Any] = [None]
        failed: list[RagtuneError] = []

        def deltas() -> Iterator[str]:
            printed = False
            try:
                for event in events:
                    last.update({k: v for k, v in event.items() if v is not None and k != "choices"})
                    for choice in event.get("choices") or []:
                        finish[0] = choice.get("finish_reason") or finish[0]
                        delta = (choice.get("delta") or {}).get("content") or ""
                        if delta:
                            text.append(delta)
                            printed = printed or bool(delta.strip())
                            yield delta
            except RagtuneError as exc:
                if not printed:  # nothing on stdout yet: the error alone, as unstreamed
                    raise
                failed.append(exc)  # print_stream ends the printed line; the error follows on stderr

        try:
            print_stream(deltas(), out)
        finally:
            events.close()
        if failed:
            raise failed[0]
        return _remote_dict({**last, "choices": [{"message": {"content": "".join(text)},
                                                  "finish_reason": finish[0]}]})

    def _body(self, question: str, system: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": _messages(question, system)}
        if self.max_new_tokens is not None:
            body["max_tokens"] = self.max_new_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.response_format:
            body["response_format"] = self.response_format
        return body

    def close(self) -> None:
        pass


def _remote_dict(r: dict[str, Any]) -> dict[str, Any]:
    """A chat completion from a ragtune server (whole, or put together from its chunks) in ask's --json shape."""
    meta = r.get("ragtune") or {}
    usage = r.get("usage") or {}
    choice = (r.get("choices") or [{}])[0]
    return {"answer": (choice.get("message") or {}).get("content") or "", "sources": r.get("sources") or [],
            "mode": meta.get("mode"), "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0), "abstained": bool(meta.get("abstained")),
            "finish_reason": choice.get("finish_reason"), "timings": meta.get("timings") or {},
            "adapter": meta.get("adapter"), "best_score": meta.get("best_score"), "model": r.get("model"),
            "engine": meta.get("engine"), "index": meta.get("index"), "tool_rendering": meta.get("tool_rendering")}
