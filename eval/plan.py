"""The plan of a `ragtune eval` run: every input checked before anything slow (questions, adapters and
their run cards, modes, engine, the report folder).

    plan = make_plan(cfg, "q.jsonl", ["plain=runs/plain"], "policies", "base,ft,rag,ft+rag", "auto", check=True)
    out = check_out_dir(Path("runs/eval"))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ragtune.errors import UsageError
from ragtune.eval.modes import EvalAdapter, adapter_of, mode_items, parse_adapters, parse_modes, uses_retrieval
from ragtune.eval.questions import Question, load_questions

log = logging.getLogger(__name__)

AdapterSpecs = str | Sequence[str] | Mapping[str, str] | None
REPORT_FILES = ("report.json", "report.md", "report.png")  # what write_report puts in the folder


@dataclass
class Plan:
    """Everything decided before a model loads."""

    questions_path: str
    questions: list[Question]
    modes: list[str]
    adapters: dict[str, EvalAdapter]  # those the modes use, in the order given
    index: str
    engine: str  # as asked: auto | transformers | llama.cpp | openai
    max_new_tokens: int
    refused: list[str] = field(default_factory=list)  # modes engine openai cannot run (they need an adapter)

    @property
    def needs_rag(self) -> bool:
        return any(uses_retrieval(m) for m in self.modes)


def make_plan(cfg: Any, questions: str | Path | None, adapter: AdapterSpecs, index: str | None,
              modes: str | Sequence[str] | None, engine: str | None, check: bool) -> Plan:
    """Check every input before anything slow: questions, adapters and their run cards, modes, engine."""
    from ragtune.runcard import read_runcard

    ecfg = cfg.eval
    engine = engine or ecfg.engine
    if check and engine == "openai":
        from ragtune.serve.remote import check_remote

        check_remote(cfg)
    elif check:
        from ragtune.serve.generator import check_engine

        check_engine(engine, cfg.model.device)
    if int(ecfg.concurrency) < 1:
        raise UsageError(f"eval.concurrency must be at least 1 (questions answered at once), got {ecfg.concurrency}")
    qpath = questions or ecfg.questions
    if not qpath:
        raise UsageError("no questions file: pass --questions FILE.jsonl (or set eval.questions)")
    given = parse_adapters(adapter if adapter else (cfg.model.adapter or None))
    asked = modes if modes is not None else ecfg.modes
    refused: list[str] = []
    if engine == "openai":  # a remote serves its model as it is: only base and rag can run there
        asked, refused = _remote_modes(asked, list(given))
    mode_list = parse_modes(asked, list(given))
    used = {adapter_of(m) for m in mode_list}
    if check:  # its files, before its run card: a whole model given as an adapter is said as such
        from ragtune.modeling import check_adapter_dir

        for name, path in given.items():
            if name in used:
                check_adapter_dir(path, f"adapter '{name}' at")
    adapters = {name: EvalAdapter(name, path, read_runcard(path)) for name, path in given.items() if name in used}
    return Plan(str(qpath), load_questions(qpath), mode_list, adapters, index or cfg.index.name, engine,
                 int(ecfg.max_new_tokens), refused)


def check_out_dir(out: Path) -> Path:
    """The report folder, refused now rather than after every question has been answered: it must not be
    a file, nor lie under one (`--out notes.txt/eval`), and a file must be creatable where the report goes
    (the folder, or the nearest one above it that exists: read-only mounts, /proc, no permission), under
    names the file system takes (NAME_MAX)."""
    import os
    import tempfile

    def exists(p: Path) -> bool:  # False, not an error, for a name too long to look up
        try:
            return p.exists()
        except OSError:
            return False

    flag = "eval.out_dir / --out"
    if exists(out) and not out.is_dir():
        raise UsageError(f"{flag} '{out}' is a file; the report goes in a folder: name another")
    above = next((p for p in out.absolute().parents if exists(p)), None)
    if above is not None and not above.is_dir():
        raise UsageError(f"{flag} '{out}': '{above}' is a file, so no folder can be made under it; "
                         "name a folder elsewhere")
    in_the_way = [name for name in REPORT_FILES if (out / name).is_dir()] if exists(out) else []
    if in_the_way:
        raise UsageError(f"{flag} '{out}' holds a folder named {in_the_way[0]}, where the report writes that file; "
                         "move it away or name another folder")
    where = out if exists(out) else above
    if where is None:
        return out
    try:
        name_max = os.pathconf(where, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    long = [part for part in out.absolute().relative_to(where.absolute()).parts if len(os.fsencode(part)) > name_max]
    if long:
        raise UsageError(f"{flag} '{out}': the name '{long[0][:40]}...' is {len(os.fsencode(long[0]))} bytes, longer "
                         f"than the {name_max} this file system allows; name a shorter folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ragtune-eval-", suffix=".probe", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{flag} '{out}' cannot be written: creating a file in '{where}' failed "
                         f"({exc.strerror or exc}); name a folder you can write") from None
    return out


def _remote_modes(modes: str | Sequence[str], adapter_names: list[str]) -> tuple[list[str], list[str]]:
    """(modes to run, modes refused) for engine openai: those that need an adapter are refused."""
    items = mode_items(modes, adapter_names)
    refused = [m for m in items if adapter_of(m) is not None]
    run = [m for m in items if adapter_of(m) is None]
    if refused and not run:
        raise UsageError(f"engine openai cannot run mode(s) {', '.join(refused)}: the remote server serves its model "
                         "as it is and cannot apply an adapter; run --modes base,rag against it (merge an adapter "
                         "with 'ragtune merge' and serve the merged model to score it as base)")
    if refused:
        log.warning("engine openai: running %s; refused %s (they need an adapter, which a remote server cannot "
                    "apply)", ", ".join(run), ", ".join(refused))
    return run, refused
