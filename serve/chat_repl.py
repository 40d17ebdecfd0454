"""`ragtune chat`: an interactive multi-turn session with streamed tokens.

    ragtune chat --adapter runs/adapter --index default

Commands: /sources (the last answer's sources), /rag on|off, /reset (forget the conversation),
/help, /exit (or /bye, or Ctrl-D); case does not matter, and "//" at the start asks a question that
begins with "/". A message of several lines (a pasted paragraph) goes between \"\"\" and \"\"\", as in
Ollama: line by line, each line would be a question of its own. Ctrl-C stops an answer, before or
after its first token; as the web page's Stop, the words so far stay in the conversation. With
retrieval on, each question searches with the recent user turns (so follow-ups keep their topic) and
the answer cites [n].
A conversation that outgrows the model's context (its prompt plus --max-new-tokens, counted by the
engine's own tokenizer through the chat template) loses its oldest questions and answers, with a note;
the system prompt and the question are always sent, and a question too long on its own is refused with
the sizes and what to change (`fit_to_context`). Over a remote server (engine openai) the server's own
limit holds.
Bytes that are not UTF-8 (a Latin-1 terminal) are replaced by U+FFFD, never passed on as surrogates.
On a terminal the up arrow recalls earlier questions, this session's and earlier ones' ($RAGTUNE_HOME/
chat_history, the last 1000 lines, readable by you only; RAGTUNE_CHAT_HISTORY=0 keeps none).
While the session runs, ragtune's INFO log lines are held back (warnings and errors still show); an
answer that abstained says so in a "(not found in the documents: ...)" note.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Any, Callable, Iterator, TextIO

from ragtune.errors import PromptTooLong, RagtuneError
from ragtune.serve.answer import source_label

HELP = 'commands: /sources  /rag on|off  /reset  /help  /exit;  """ starts and ends a message of several lines'


class ChatSession:
    def __init__(self, gen: Any, adapter: str | None = None, retriever: Any = None, system: str = "",
                 open_retriever: Callable[[], Any] | None = None, out: TextIO | None = None,
                 err: TextIO | None = None):
        self.gen = gen
        self.adapter = adapter
        self.retriever = retriever
        self.rag = retriever is not None
        self.system = system
        self._open_retriever = open_retriever
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.history: list[dict[str, str]] = []
        self.last_sources: list[dict[str, Any]] = []
        self.last_answer: Any = None

    def trained_system_prompt(self) -> str:
        """The system prompt the adapter's run card records, which the generator adds by default."""
        adapters = getattr(self.gen, "adapters", {}) or {}
        a = adapters.get(self.adapter) if self.adapter else None
        return getattr(a, "system_prompt", "") or ""

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def command(self, line: str) -> bool:
        """Handle a /command; False means exit."""
        cmd, _, arg = line.partition(" ")
        cmd, arg = cmd.lower(), arg.strip().lower()
        if cmd in ("/exit", "/quit", "/bye"):
            return False
        if cmd in ("/reset", "/sources", "/help") and arg:
            self.say(f"({cmd} takes nothing after it; {HELP})")
        elif cmd == "/rag" and arg not in ("on", "off"):
            self.say(f"(/rag takes on or off, got '{arg}')" if arg else "(/rag takes on or off: /rag on, /rag off)")
        elif cmd == "/reset":
            self.history, self.last_sources = [], []
            self.say("(conversation cleared)")
        elif cmd == "/sources":
            if not self.last_sources:
                self.say("(no sources for the last answer)")
            for s in self.last_sources:
                score = f"  relevance {s['score']:.2f}" if s.get("score") is not None else ""
                self.say(f"[{s['n']}] {source_label(s)} - {s.get('source')}{score}")
        elif cmd == "/rag" and arg in ("on", "off"):
            if arg == "on" and self.retriever is None:
                try:
                    self.retriever = self._open_retriever() if self._open_retriever else None
                except RagtuneError as exc:
                    self.err.write(f"error: {exc}\n")
                if self.retriever is None:
                    self.say("(retrieval stays off: no index could be opened)")
                    return True
            self.rag = arg == "on"
            self.say(f"(retrieval {'on' if self.rag else 'off'})")
        elif cmd == "/help":
            self.say(HELP)
        else:
            self.say(f"(unknown command '{line}'; {HELP})")
        return True

    def start(self) -> Any:
        """The answer's stream for the conversation so far, once it fits the model's context: the oldest
        exchanges that leave no room for the answer leave the history, with a note."""
        retriever = self.retriever if self.rag else None
        if not getattr(self.gen, "context_length", 0) or not hasattr(self.gen, "prepare"):  # a remote server
            return self.gen.stream(self.messages(), adapter=self.adapter, retriever=retriever)
        from ragtune.serve.streaming import AnswerStream

        system = [{"role": "system", "content": self.system}] if self.system else []
        job, start = fit_to_context(self.gen, system, self.history, self.adapter, retriever,
                                    after_drop=self.after_drop())
        if start:
            dropped = sum(m["role"] == "user" for m in self.history[:start])
            del self.history[:start]
            self.say(drop_note(dropped, self.gen.context_length, int(self.gen.cfg.generation.max_new_tokens)))
        return AnswerStream(self.gen, job)

    def after_drop(self) -> int | None:
        """The prompt size a conversation that must lose exchanges is brought down to: on llama.cpp, which keeps
        the prompt's KV cache from turn to turn and loses all of it when the conversation's start moves, half
        the room (as Ollama and llama.cpp's context shift do), so that the turns after reuse the cache instead
        of each prefilling the whole conversation; elsewhere None (the fewest drops that fit)."""
        if getattr(self.gen, "engine", "") != "llama.cpp":
            return None
        return (self.gen.context_length - int(self.gen.cfg.generation.max_new_tokens)) // 2

    def ask(self, question: str) -> None:
        self.history.append({"role": "user", "content": question})
        try:  # preparing (tokenizing, retrieving, reranking) can take a while: Ctrl-C stops it too
            stream = self.start()
        except KeyboardInterrupt:
            self.history.pop()
            self.say("\n(stopped)")
            return
        except RagtuneError as exc:
            self.history.pop()
            # a remote server's refusal of the conversation (a local one is fitted: see start)
            reset = isinstance(exc, PromptTooLong) and not isinstance(exc, QuestionTooLong) and self.history
            self.err.write(f"error: {exc}{'; /reset starts a new conversation' if reset else ''}\n")
            return
        printed: list[str] = []
        try:
            for delta in stream:
                printed.append(delta)
                self.out.write(delta)
                self.out.flush()
        except KeyboardInterrupt:
            stream.close()
            self.stopped("".join(printed), stream.sources)
            return
        except RagtuneError as exc:
            self.history.pop()
            self.err.write(f"\nerror: {exc}\n")
            return
        self.out.write("\n")
        ans = stream.answer
        self.last_answer = ans
        self.last_sources = ans.sources
        if ans.finish_reason == "length":
            self.say(f"(cut off at {ans.completion_tokens} tokens; --max-new-tokens N allows longer answers)")
        if ans.abstained:  # what retrieval's INFO log line says, as a note of the chat's own
            why = ("the search found nothing" if ans.best_score is None
                   else f"the best relevance, {ans.best_score:.2f}, is below rag.min_score")
            self.say(f"(not found in the documents: {why})")
        if ans.sources:
            self.say(sources_line(ans.sources))
        self.history.append({"role": "assistant", "content": ans.text})

    def stopped(self, partial: str, sources: list[dict[str, Any]]) -> None:
        """Ctrl-C during an answer, as the web page's Stop: the words so far stay the answer (the next
        question sees them); stopped before a word, the question is dropped as if never asked."""
        self.say("\n(stopped)")
        if not partial.strip():
            self.history.pop()
            return
        self.history.append({"role": "assistant", "content": partial})
        self.last_answer, self.last_sources = None, sources
        if sources:
            self.say(sources_line(sources))

    def loop(self, inp: TextIO | None = None) -> int:
        inp = inp or sys.stdin
        interactive = inp.isatty()
        history = kept_history() if interactive else contextlib.nullcontext()
        with history:
            return self._loop(inp, interactive)

    def _loop(self, inp: TextIO, interactive: bool) -> int:
        if interactive:
            mode = ("ft" if self.adapter else "base") + ("+rag" if self.rag else "")
            self.err.write(f"ragtune chat ({mode}); {HELP}\n")
            trained = self.trained_system_prompt()
            if trained and not self.system:
                self.err.write(f"system prompt (the adapter was trained with it; --system replaces it): {trained}\n")
        with quiet_info_logs():  # the conversation stays clean: routine INFO lines become notes
            while True:
                try:
                    line = read_line(inp, interactive, "you> ")
                    if line.lstrip().startswith(MULTILINE):
                        line = read_block(line.lstrip()[len(MULTILINE):], inp, interactive)
                except EOFError:  # Ctrl-D, or the end of piped input
                    if interactive:
                        self.out.write("\n")
                    return 0
                except KeyboardInterrupt:  # at the prompt (or inside a multi-line block, which it drops)
                    self.out.write("\n")
                    continue
                line = well_formed(line.strip())
                if not line:
                    continue
                if line.startswith("//"):  # a question that begins with "/"
                    line = line[1:]
                elif line.startswith("/"):
                    if not self.command(line):
                        return 0
                    continue
                self.ask(line)


class QuestionTooLong(PromptTooLong):
    """The question (with the system prompt and its sources) leaves no room for the answer on its own."""


def fit_to_context(gen: Any, system: list[dict[str, str]], history: list[dict[str, str]], adapter: str | None = None,
                   retriever: Any = None, after_drop: int | None = None) -> tuple[Any, int]:
    """The generator's prepared job for the longest recent part of `history` (from one of its user turns on;
    the last user turn is the question) whose prompt leaves generation.max_new_tokens of the model's
    context free, and the index in `history` where that part starts.

    Each try renders and tokenizes as the answer will (`Generator.prepare`: chat template, system prompt,
    sources), 11-35 ms for 8k tokens on 2 CPU cores; a conversation that fits takes the one try it always
    took. Then come one exchange dropped (a conversation growing turn by turn), the question alone, and a
    binary search between, so a long paste after many turns takes a few tries, not one per exchange. Retrieval runs
    once per query however many tries (`SearchOnce`); the query is the last three user turns, so only
    the last two tries can change the sources. Failure: QuestionTooLong, with the sizes and the fixes,
    when the question alone does not fit. With `after_drop`, a conversation that has to lose exchanges loses
    the fewest that bring its prompt down to that many tokens (where the question alone allows), not merely
    under the context: the llama.cpp engine keeps the prompt cached between turns, and each drop costs a
    prefill of the whole conversation."""
    ctx, room = gen.context_length, int(gen.cfg.generation.max_new_tokens)
    if retriever is not None:
        retriever = SearchOnce(retriever)
    starts = [i for i, m in enumerate(history) if m["role"] == "user"]
    tried: dict[int, tuple[Any, int]] = {}

    def fits(k: int, bound: int = ctx - room) -> bool:
        """Whether the conversation from its k-th user turn on makes a prompt of at most `bound` tokens (by
        default: one that leaves room for the answer)."""
        if k not in tried:
            try:
                job = gen.prepare(system + history[starts[k]:], adapter, retriever)
                tried[k] = (job, len(job.input_ids))
            except PromptTooLong as exc:
                if not exc.prompt_tokens:
                    raise
                tried[k] = (None, exc.prompt_tokens)
        job, n = tried[k]
        return job is not None and (job.abstained or n <= bound)

    last = len(starts) - 1
    if fits(0):  # all of it
        return tried[0][0], starts[0]
    bound = ctx - room if after_drop is None else min(after_drop, ctx - room)
    if last >= 1 and fits(1, bound):  # one exchange less: a conversation growing turn by turn
        return tried[1][0], starts[1]
    if not fits(last):
        n = tried[last][1]
        raise QuestionTooLong(too_long_message(n, room, ctx, retriever is not None, gen.cfg.rag.top_k), n, ctx)
    if not fits(last, bound):  # the question alone is past `after_drop`: the fewest drops that fit, then
        bound = ctx - room
        if fits(1):
            return tried[1][0], starts[1]
    lo, k = 1, last  # lo does not fit the bound, k does
    while k - lo > 1:
        mid = (lo + k) // 2
        lo, k = (lo, mid) if fits(mid, bound) else (mid, k)
    return tried[k][0], starts[k]


def drop_note(questions: int, ctx: int, room: int) -> str:
    which = ("its oldest question and answer are" if questions == 1
             else f"its {questions} oldest questions and their answers are")
    return (f"(the conversation outgrew the model's {ctx}-token context with {room} kept for the answer: "
            f"{which} no longer sent; /reset starts over)")


def too_long_message(n: int, room: int, ctx: int, rag: bool, top_k: int) -> str:
    fixes = ["ask a shorter question"]
    if rag:
        fixes.append(f"retrieve fewer sources (rag.top_k, now {top_k})")
    if n < ctx:
        fixes.append(f"allow a shorter answer (--max-new-tokens {ctx - n} or less)")
    fixes.append("use a model with a longer context")
    return (f"this question makes a prompt of {n} tokens{' with its sources' if rag else ''} and its answer may "
            f"take {room} more, but the model's context is {ctx} tokens; " + ", ".join(fixes[:-1])
            + f" or {fixes[-1]}")


class SearchOnce:
    """A retriever that searches each query once: fitting a question to the context may prepare it
    several times."""

    def __init__(self, retriever: Any):
        self.retriever = retriever
        self.found: dict[str, list[dict[str, Any]]] = {}

    def search(self, query: str, **kw: Any) -> list[dict[str, Any]]:
        key = repr((query, sorted(kw.items())))
        if key not in self.found:
            self.found[key] = self.retriever.search(query, **kw)
        return [dict(h) for h in self.found[key]]

    def __getattr__(self, name: str) -> Any:  # default_min_score and the like
        if name == "retriever":  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self.retriever, name)


MULTILINE = '"""'
HISTORY_LINES = 1000


@contextlib.contextmanager
def kept_history(path: Any = None) -> Iterator[None]:
    """Line editing, and the questions of earlier sessions under the up arrow (as Ollama keeps them):
    $RAGTUNE_HOME/chat_history, the last HISTORY_LINES lines, written back when the session ends.
    RAGTUNE_CHAT_HISTORY=0 keeps nothing on disk."""
    import os
    from pathlib import Path

    try:
        import readline
    except ImportError:  # pragma: no cover - no readline (Windows): input() without editing
        yield
        return
    if os.environ.get("RAGTUNE_CHAT_HISTORY", "1") == "0":
        yield
        return
    if path is None:
        from ragtune.modeling import ragtune_home

        path = ragtune_home() / "chat_history"
    path = Path(path)
    readline.clear_history()
    try:
        readline.read_history_file(path)
    except OSError:  # none yet, or unreadable: start empty
        pass
    try:
        yield
    finally:
        readline.set_history_length(HISTORY_LINES)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # questions can be private: yours only
            os.chmod(path, 0o600)
            readline.write_history_file(path)
        except OSError as exc:
            logging.getLogger(__name__).warning("chat history not kept: cannot write %s (%s)", path,
                                                exc.strerror or exc)


@contextlib.contextmanager
def quiet_info_logs() -> Iterator[None]:
    """ragtune's INFO log lines (e.g. retrieval abstaining) at WARNING while the REPL runs, so they do not land
    in the middle of the conversation; warnings and errors still show, and -v (DEBUG) keeps everything."""
    logger = logging.getLogger("ragtune")
    level = logger.level
    if logger.getEffectiveLevel() == logging.INFO:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def sources_line(sources: list[dict[str, Any]]) -> str:
    return "sources: " + "  ".join(f"[{s['n']}] {s.get('title') or s.get('source')}" for s in sources)


def read_line(inp: TextIO, interactive: bool, prompt: str) -> str:
    """One line without its newline; EOFError at Ctrl-D or the end of piped input."""
    if interactive:
        return input(prompt)
    line = inp.readline()
    if line == "":
        raise EOFError
    return line.rstrip("\r\n")


def read_block(first: str, inp: TextIO, interactive: bool) -> str:
    """The lines of a \"\"\" block up to the line that ends with \"\"\" (the end of input ends it too)."""
    lines, line = [], first
    while not line.rstrip().endswith(MULTILINE):
        lines.append(line)
        try:
            line = read_line(inp, interactive, "... ")
        except EOFError:
            return "\n".join(lines)
    lines.append(line.rstrip()[:-len(MULTILINE)])
    return "\n".join(lines)


def well_formed(text: str) -> str:
    """`text` with what is not valid Unicode replaced by U+FFFD: stdin's surrogateescape bytes (a Latin-1
    terminal) and lone surrogates would otherwise reach the tokenizer and end the session."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


def run_chat(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.serve.answer import open_retriever, retriever_for
    from ragtune.serve.commands import generation_overrides, load_for_cli, precheck, remote_overrides

    cfg = remote_overrides(generation_overrides(cfg, args), args)
    precheck(cfg, args.adapter)
    retriever = retriever_for(cfg, args.index or None, args.no_rag, read_copy=True)
    gen, adapter = load_for_cli(cfg, args.adapter)
    session = ChatSession(gen, adapter, retriever, system=args.system,
                          open_retriever=lambda: open_retriever(cfg, args.index or cfg.index.name, read_copy=True,
                                                                without="keep /rag off"))
    try:
        return session.loop()
    finally:
        if session.retriever is not None and hasattr(session.retriever, "close"):
            session.retriever.close()
