"""`ragtune <command>`: one CLI over train, retrieval, serve and eval.

    ragtune --config configs/train/smollm2-lora.yaml train train.epochs=2

Global options (`--config FILE`, `-v`, `-q`) go before or after the command; `key.sub=value`
arguments anywhere are config overrides. Heavy libraries are imported inside command functions,
so `--help` is instant. Exit codes: 0 ok, 1 failed checks, 2 usage/config error, 3 partial success.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from ragtune import __version__
from ragtune.errors import EXIT_FAILED, EXIT_USAGE, RagtuneError, UsageError

OVERRIDE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")
BARE_OVERRIDE_RE = re.compile(r"^[A-Za-z_]\w*=")  # lr=1e-4: a setting without its section

EPILOG = """exit codes: 0 ok, 1 failed checks, 2 usage or config error, 3 partial success.
config: --config FILE.yaml plus key.sub=value overrides, e.g. train.epochs=2 model.path=/models/x.
ragtune never sends telemetry and never downloads models: everything loads from local paths."""


# options whose value is written key.sub=value like a config override (search's metadata filters)
VALUE_LOOKS_LIKE_OVERRIDE = ("--filter",)


def _split_globals(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """Pull --config FILE and key.sub=value items out of argv, wherever they are; -q/-v after the
    command are moved before it, where argparse takes them."""
    rest: list[str] = []
    front: list[str] = []
    overrides: list[str] = []
    config = None
    i = 0
    after_dashdash = False
    words: list[str] = []  # the command words seen so far
    while i < len(argv):
        a = argv[i]
        if after_dashdash:
            rest.append(a)
        elif a == "--":
            after_dashdash = True
            rest.append(a)
        elif words[:2] == ["bundle", "create"] and (a == "--config" or a.startswith("--config=")):
            rest.append(a)  # `bundle create --config FILE` names a config file to carry, not ragtune's own
        elif a == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
            i += 1
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif a == "--config":  # the last word, with no file after it
            raise UsageError("--config needs a file: --config FILE.yaml (before or after the command)")
        elif a in VALUE_LOOKS_LIKE_OVERRIDE and i + 1 < len(argv):  # `--filter meta.dept=finance`: the option's
            rest += [a, argv[i + 1]]                                   # value, not a config override
            i += 1
        elif OVERRIDE_RE.match(a):
            overrides.append(a)
        elif a in ("--set", "-s") and i + 1 < len(argv) and OVERRIDE_RE.match(argv[i + 1]):
            raise UsageError(f"'{a} {argv[i + 1]}': overrides take no flag; write '{argv[i + 1]}' on its own "
                             "(before or after the command)")
        elif words and (a in ("-q", "--quiet", "--verbose") or re.fullmatch(r"-v+", a)):
            front.append(a)
        else:
            if not a.startswith("-"):
                words.append(a)
            rest.append(a)
        i += 1
    return front + rest, config, overrides


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    from ragtune.text import escape_controls  # a newline or terminal escape in a stored name never reaches the tty

    cells = [[escape_controls("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def human_size(n: int | None) -> str:
    if not n:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return str(n)


# --- core commands: models, bundle, doctor ------------------------------------------------------


def _run_models(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune import models

    if args.models_cmd == "prepare":
        res = models.prepare_default(force=args.force)
        if res is None:
            print(f"already prepared: {models.default_chat_model_dir()}")
        else:
            print(f"prepared {res.out_dir} ({res.parameters:,} parameters, max |logit diff| vs GGUF {res.max_abs_logit_diff:.2g})")
        print(f"embedder: {models.default_embedder_dir()}")
        return 0
    if args.models_cmd == "import":
        from pathlib import Path

        from ragtune.modeling import ragtune_home

        out = args.out or str(ragtune_home() / "models" / Path(args.gguf).stem)
        res = models.import_gguf(args.gguf, out, dtype=args.dtype, force=args.force)
        if args.json:
            print_json({"out": str(res.out_dir), "parameters": res.parameters,
                        "max_abs_logit_diff": res.max_abs_logit_diff, "seconds": res.seconds})
        else:
            print(f"imported {res.source} -> {res.out_dir} ({res.parameters:,} parameters, verified)")
        return 0
    rows = models.list_models()
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        r["size"] = human_size(r.get("size_bytes"))
        r["params"] = f"{r['parameters'] / 1e6:.0f}M" if r.get("parameters") else "-"
        r["template"] = {True: "yes", False: "no", None: "-"}[r.get("chat_template")]
    print_table(rows, ["name", "kind", "status", "size", "params", "template", "path"])
    return 0


def _run_doctor(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.doctor import run_doctor

    return run_doctor(cfg, as_json=args.json)


def _add_models(sub: Any) -> None:
    p = sub.add_parser("models", help="prepare, import and list local models",
                       description="Prepare the bundled default models, import GGUF files, list models.")
    msub = p.add_subparsers(dest="models_cmd", metavar="{prepare,import,list}")
    pp = msub.add_parser("prepare", help="convert the bundled SmolLM2 GGUF into a safetensors model (once)")
    pp.add_argument("--force", action="store_true", help="convert again even if prepared")
    pi = msub.add_parser("import", help="convert any GGUF file into a safetensors transformers model dir")
    pi.add_argument("gguf", help="path to a .gguf file")
    pi.add_argument("--out", default="", help="output dir (default: $RAGTUNE_HOME/models/<name>)")
    pi.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    pi.add_argument("--force", action="store_true", help="replace a non-empty output dir")
    pi.add_argument("--json", action="store_true")
    pl = msub.add_parser("list", help="show default, prepared and imported models")
    pl.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_models, models_cmd="list", json=False)


def _run_bundle(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune import bundle

    if args.bundle_cmd == "create":
        out = bundle.create_bundle(
            args.out, models=args.model, adapters=args.adapter, indexes=args.index, configs=args.bundle_config,
            platform=args.platform, deps=args.deps, default_models=not args.no_default_models,
            extra_wheels=args.wheel, tar=args.tar, force=args.force,
        )
        print(f"bundle written: {out}" + (f" (and {out.with_suffix('.tar')})" if args.tar else ""))
        print(f"on the air-gapped machine: {out.name}/install.sh   (or: ragtune bundle install {out.name})")
        return 0
    if args.bundle_cmd == "verify":
        problems, n = bundle.verify_bundle(args.bundle)
        if args.json:
            print_json({"ok": not problems, "files": n, "problems": problems})
        else:
            for p in problems:
                print(f"bundle check failed: {p}", file=sys.stderr)
            print(f"bundle ok: {n} files verified" if not problems
                  else f"bundle check failed: {len(problems)} problem(s) over the {n} files listed")
        return 1 if problems else 0
    if args.bundle_cmd == "restore":
        done = bundle.restore_bundle(args.bundle)
        label = {"models": "model", "adapters": "adapter", "indexes": "index", "configs": "config",
                 "llama.cpp": "llama.cpp converter"}
        for kind, paths in done.items():
            for p in paths:
                print(f"restored {label.get(kind, kind)}: {p}")
        if done.get("adapters"):
            print("use a restored adapter by name: ragtune ask --adapter NAME \"QUESTION\"")
        return 0
    return bundle.install_bundle(args.bundle, venv=args.venv)  # "install": argparse allows no other


def _add_bundle(sub: Any) -> None:
    p = sub.add_parser("bundle", help="carry ragtune, models, adapters and indexes to an air-gapped machine",
                       description="Create, verify, install and restore offline bundles (sha256-verified).")
    bsub = p.add_subparsers(dest="bundle_cmd", metavar="{create,verify,install,restore}", required=True)
    c = bsub.add_parser("create", help="write a bundle folder (on a connected machine)")
    c.add_argument("out", help="bundle folder to write")
    c.add_argument("--model", action="append", default=[], metavar="DIR", help="extra model dir (repeatable)")
    c.add_argument("--adapter", action="append", default=[], metavar="DIR", help="adapter dir (repeatable)")
    c.add_argument("--index", action="append", default=[], metavar="NAME", help="index name (repeatable)")
    c.add_argument("--config", dest="bundle_config", action="append", default=[], metavar="FILE",
                   help="config file to carry (repeatable)")
    c.add_argument("--platform", choices=["cpu", "cuda"], default="cpu", help="torch build for the target (cpu)")
    c.add_argument("--deps", choices=["all", "none"], default="all",
                   help="'none' carries only the ragtune wheel (target already has the dependencies)")
    c.add_argument("--wheel", action="append", default=[], metavar="FILE", help="extra wheel to carry")
    c.add_argument("--no-default-models", action="store_true", help="leave out the prepared SmolLM2")
    c.add_argument("--tar", action="store_true", help="also write OUT.tar")
    c.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    v = bsub.add_parser("verify", help="check every file's sha256 without installing")
    v.add_argument("bundle")
    v.add_argument("--json", action="store_true")
    i = bsub.add_parser("install", help="verify, install into a venv with no network, restore, run doctor")
    i.add_argument("bundle")
    i.add_argument("--venv", default=None, help="virtual environment to create or reuse (default BUNDLE/venv)")
    r = bsub.add_parser("restore", help="verify and copy models, adapters and indexes into $RAGTUNE_HOME")
    r.add_argument("bundle")
    p.set_defaults(func=_run_bundle)


def _add_doctor(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check this machine has what an offline run needs",
                       description="Check Python, torch and device, packages, default models, offline settings, disk.")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_doctor)


def build_parser() -> argparse.ArgumentParser:
    from ragtune.eval import cli as eval_cli
    from ragtune.retrieval import cli as retrieval_cli
    from ragtune.serve import cli as serve_cli
    from ragtune.train import cli as train_cli
    from ragtune.export import cli as export_cli

    parser = argparse.ArgumentParser(
        prog="ragtune",
        description="Fine-tune or RAG? Train, index, answer and compare small local language models, offline.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ragtune {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug for libraries too)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    _add_models(sub)
    train_cli.register(sub)
    retrieval_cli.register(sub)
    serve_cli.register(sub)
    eval_cli.register(sub)
    export_cli.register(sub)
    _add_bundle(sub)
    _add_doctor(sub)
    return parser


def setup_logging(verbose: int, quiet: bool) -> None:
    import logging  # here, not at the top: a script's `ask --server` call never logs and skips its import

    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("ragtune").setLevel(level)
    if verbose < 2:
        for name in ("transformers", "sentence_transformers", "datasets", "httpx", "urllib3"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _bare_override_message(items: list[str]) -> str:
    from ragtune.config import guess_setting

    lines = []
    for item in items:
        name, value = item.split("=", 1)
        guess = guess_setting(name)
        lines.append(f"'{item}' is not a setting: settings are section.key=value"
                     + (f"; did you mean '{guess}={value}'?" if guess else " (see configs/ for the keys)"))
    return "\n".join(lines)


def os_error_message(exc: OSError) -> str:
    """What the operating system refused, on which path, and what to do about it."""
    import errno

    paths = " -> ".join(f"'{p}'" for p in (exc.filename, exc.filename2) if p is not None)
    where = f" {paths}" if paths else ""
    what = exc.strerror or str(exc)
    fixes = {
        errno.ENOSPC: "the disk is full: free space there, or write somewhere else (RAGTUNE_HOME, --out, "
                      "train.output_dir)",
        errno.EDQUOT: "the disk quota is exhausted: free space, or write somewhere else",
        errno.EACCES: "no permission: choose a folder you can write (RAGTUNE_HOME, --out, train.output_dir) or "
                      "fix the permissions",
        errno.EPERM: "not permitted: choose a folder you own or fix the permissions",
        errno.EROFS: "the file system is read-only: write somewhere else",
        errno.ENOENT: "it does not exist: check the path",
        errno.ENOTDIR: "a file is where a folder is expected: check the path (a .tar or file given for a folder?)",
        errno.EISDIR: "a folder is where a file is expected: check the path",
        errno.EEXIST: "it already exists: remove it or choose another name",
        errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
        errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    }
    fix = fixes.get(exc.errno or -1, "check the path and try again")
    return f"{what}:{where or ' (no path given)'}; {fix}"


def _remote(args_list: list[str]) -> int | None:
    """`ragtune [-q] ask|search ... --server URL` (or RAGTUNE_SERVER) through that command's own parser,
    with no config, no logging set-up (nothing on this path logs) and none of the other commands'
    modules: a script that calls a running server pays for Python, argparse, json and a socket only
    (see serve.cli.remote_ask_args, retrieval.cli.remote_search_args). None: the full CLI handles it."""
    words = args_list[1:] if args_list[:1] in (["-q"], ["--quiet"]) else args_list
    if words[:1] == ["ask"]:
        from ragtune.serve.cli import remote_ask_args as remote_args
    elif words[:1] == ["search"]:
        from ragtune.retrieval.cli import remote_search_args as remote_args
    else:
        return None
    args = None
    try:
        with _usage_errors_as_json(_wants_json(words)):
            args = remote_args(words)
        if args is None:
            return None
        return int(args.func(args, None) or 0)
    except SystemExit as exc:  # argparse: --help (0) or usage error (2)
        return int(exc.code or 0)
    except RagtuneError as exc:
        return _fail(args, str(exc), exc.exit_code)
    except BrokenPipeError:  # `... | head`: stdout's reader has gone (the client turns socket errors into messages)
        return _quiet_broken_pipe()
    except OSError as exc:
        return _fail(args, os_error_message(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _quiet_broken_pipe() -> int:
    """End quietly, as a SIGPIPE'd tool does, with no second error when Python flushes stdout at exit."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def _settings_without_value(words: list[str]) -> list[str]:
    """The words that name a setting (train.epochs) but give it no value (`ragtune train train.epochs`)."""
    dotted = [w for w in words if "." in w and "=" not in w and not w.startswith("-")]
    if not dotted:
        return []
    from ragtune.config import load_config
    from ragtune.config_schema import flat_settings

    try:
        known = set(flat_settings(load_config(None, [])))
    except Exception:  # only a hint: argparse's own message follows when the defaults cannot be read
        return []
    return [w for w in dotted if w in known]


def _fail(args: argparse.Namespace | None, message: str, code: int) -> int:
    """Print the error; with --json, also as a JSON object on stdout, so a script reading it gets JSON."""
    print(f"error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        _print_error_json(message, code)
    return code


def _print_error_json(message: str, code: int) -> None:
    print(json.dumps({"error": message, "exit_code": code}, ensure_ascii=False))


def _wants_json(argv: Sequence[str]) -> bool:
    """--json among the options (not after `--`): errors before the arguments are parsed are JSON too."""
    words = list(argv)
    return "--json" in (words[:words.index("--")] if "--" in words else words)


class _StderrTee:
    """Writes through to stderr and keeps the last write: argparse's `PROG: error: MESSAGE` line."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.last = ""

    def write(self, text: str) -> int:
        self.last = text
        return self.inner.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextmanager
def _usage_errors_as_json(enabled: bool) -> Iterator[None]:
    """argparse prints a usage error (unknown option, missing argument, bad choice) to stderr and exits 2;
    with `enabled` (--json given) the error also goes to stdout as the JSON object `_fail` prints. The
    usage text stays on stderr and the exit code stays 2."""
    if not enabled:
        yield
        return
    tee = _StderrTee(sys.stderr)
    sys.stderr = tee
    try:
        yield
    except SystemExit as exc:
        if exc.code == EXIT_USAGE:
            m = re.match(r"(.*?): error: (.*)", tee.last.strip(), re.DOTALL)
            _print_error_json(f"{m[1]}: {m[2]}" if m else (tee.last.strip() or "usage error"), EXIT_USAGE)
        raise
    finally:
        sys.stderr = tee.inner


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = argparse.Namespace(json=_wants_json(argv))  # for errors found before parsing ends
    try:
        args_list, config_path, overrides = _split_globals(argv)
    except UsageError as exc:
        return _fail(as_json, str(exc), exc.exit_code)
    if config_path is None and not overrides:  # a script asking a running server (ask/search --server)
        rc = _remote(args_list)
        if rc is not None:
            return rc
    from ragtune.modeling import set_offline_env

    set_offline_env()  # before any Hugging Face import, in this process and its children
    parser = build_parser()
    try:
        with _usage_errors_as_json(as_json.json):
            args, unknown = parser.parse_known_args(args_list)
            bare = [a for a in unknown if BARE_OVERRIDE_RE.match(a)]
            if bare:
                return _fail(as_json, _bare_override_message(bare), EXIT_USAGE)
            keys = _settings_without_value(unknown)
            if keys:
                return _fail(as_json, f"{', '.join(repr(k) for k in keys)}: a setting needs a value; write it as "
                             f"key=value, e.g. {keys[0]}=VALUE", EXIT_USAGE)
            if unknown:
                args = parser.parse_args(args_list)  # argparse's own message for the rest
    except SystemExit as exc:  # argparse: --help (0) or usage error (2)
        return int(exc.code or 0)
    setup_logging(args.verbose, args.quiet)
    given = [b for a, b in zip(args_list, args_list[1:] + [None]) if a == "--index"]
    given += [a[len("--index="):] for a in args_list if a.startswith("--index=")]
    if any(v is not None and not v.strip() for v in given):
        return _fail(as_json, "--index is empty (an unset shell variable?); name the index, or leave --index out "
                     "for index.name", EXIT_USAGE)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    previous = _sigterm_as_interrupt(args.command)
    try:
        from ragtune.config import load_config

        cfg = load_config(config_path, overrides)
        return int(args.func(args, cfg) or 0)
    except RagtuneError as exc:
        return _fail(args, str(exc), exc.exit_code)
    except BrokenPipeError:  # `ragtune ... | head`: the reader has gone
        return _quiet_broken_pipe()
    except OSError as exc:  # unwritable folder, full disk, a file where a folder belongs...
        return _fail(args, os_error_message(exc), EXIT_FAILED)
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, a scheduler stopping the job), raised where Ctrl-C would be: the same
    clean-up runs (temp files removed, how to resume printed), then exit 143."""


def _sigterm_as_interrupt(command: str) -> Any:
    """Make SIGTERM raise `Terminated` in the main thread while a command runs; the handler it replaced,
    or None where it left SIGTERM alone (`serve`: uvicorn shuts down gracefully on its own; a handler
    someone else set; not the main thread)."""
    import signal
    import threading

    if command == "serve" or threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        return None

    def _raise(signum: int, frame: Any) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, _raise)
    return previous


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
