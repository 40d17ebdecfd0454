"""Which adapters `ragtune eval` compares, and the modes it answers in.

    adapters = parse_adapters(["plain=runs/plain", "rag-trained=runs/raft"])   # {name: EvalAdapter}
    modes = parse_modes("base,ft,rag,ft+rag", adapters)
    # ['base', 'plain', 'rag-trained', 'rag', 'plain+rag', 'rag-trained+rag']

An adapter is given as NAME=DIR (repeatable) or as a bare DIR, which is named `ft`; a DIR that is a bare
name and no folder here is the adapter `ragtune bundle restore` put in $RAGTUNE_HOME/adapters/NAME. The modes are
`base` (the base model alone), `rag` (base + retrieved sources), and for each adapter `NAME`
(base + adapter) and `NAME+rag` (both). In a mode list, `ft` stands for every adapter's NAME mode
and `ft+rag` for every NAME+rag mode (a lone bare DIR is `ft` itself), so the default list
"base,ft,rag,ft+rag" compares them all; name a mode to pick one adapter ("base,plain+rag").
Each adapter's training recipe comes from its run card: plain (the records as written), or trained
with retrieval (the card's `rag` block: index, top_k, distractors, withheld share, citations).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ragtune.errors import UsageError

BARE_NAME = "ft"  # the name of an adapter given without NAME=
RAG_SUFFIX = "+rag"
FIXED_MODES = ("base", "rag")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class EvalAdapter:
    name: str
    path: str
    card: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def recipe(self) -> str:
        return training_recipe(self.card)


def parse_adapters(specs: str | Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """{name: dir} from NAME=DIR / DIR strings (or a mapping), checked: names unique and usable in a
    mode list, each dir an existing folder."""
    from ragtune.modeling import adapter_dir

    if not specs:
        return {}
    if isinstance(specs, Mapping):
        pairs = [(str(k), str(v)) for k, v in specs.items()]
    else:
        pairs = [_split(s) for s in ([specs] if isinstance(specs, str) else specs)]
    out: dict[str, str] = {}
    for name, path in pairs:
        if not _NAME.fullmatch(name) or name in FIXED_MODES:
            raise UsageError(f"--adapter {name}={path}: the name '{name}' must be letters, digits, '.', '_' or '-' "
                             f"(not {' or '.join(FIXED_MODES)}), e.g. --adapter plain={path}")
        if name in out:
            hint = ("name each one, e.g. --adapter plain=DIR1 --adapter rag-trained=DIR2" if name == BARE_NAME
                    else "give each adapter its own name")
            raise UsageError(f"--adapter: two adapters are named '{name}' ({out[name]} and {path}); {hint}")
        restored = adapter_dir(path)  # a bare NAME that is no folder here: one 'ragtune bundle restore' put in place
        if restored != Path(path).expanduser():
            path = str(restored)
        if not Path(path).expanduser().is_dir():
            raise UsageError(f"--adapter {name}={path}: '{path}' is not a folder; give an adapter folder written by "
                             "'ragtune train' (it holds adapter_config.json and ragtune.json), or the name of one "
                             "'ragtune bundle restore' put in $RAGTUNE_HOME/adapters")
        out[name] = path
    return out


def _split(spec: str) -> tuple[str, str]:
    """NAME=DIR, or a bare DIR (named ft). A spec with "=" that is not itself a folder is meant as
    NAME=DIR, so its name is checked as one ('=DIR' and 'a b=DIR' are bad names, not missing folders)."""
    name, sep, path = str(spec).partition("=")
    if sep and not Path(str(spec)).expanduser().is_dir():
        return name, path
    return BARE_NAME, str(spec)


def adapter_of(mode: str) -> str | None:
    """The adapter a mode answers with (None for base and rag)."""
    if mode in FIXED_MODES:
        return None
    return mode[: -len(RAG_SUFFIX)] if mode.endswith(RAG_SUFFIX) else mode


def uses_retrieval(mode: str) -> bool:
    return mode == "rag" or mode.endswith(RAG_SUFFIX)


def mode_items(modes: str | Sequence[str], adapter_names: Sequence[str] = ()) -> list[str]:
    """The modes as written ("base, rag" or a list), each checked to be a mode name: base, rag, ft, ft+rag,
    or an adapter's NAME / NAME+rag (a typo is an unknown mode, never taken for an adapter's)."""
    items = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    known = [*FIXED_MODES, BARE_NAME, BARE_NAME + RAG_SUFFIX]
    known += [x for n in adapter_names for x in (n, n + RAG_SUFFIX) if x not in known]
    bad = [m for m in items if m not in known]
    if bad or not items:
        raise UsageError(f"--modes: unknown mode(s) {', '.join(bad) or '(none given)'}; choose from {','.join(known)}")
    return items


def parse_modes(modes: str | Sequence[str], adapter_names: Sequence[str] = ()) -> list[str]:
    """The mode list, `ft`/`ft+rag` expanded to every adapter, duplicates dropped, order kept."""
    names = list(adapter_names)
    items = mode_items(modes, names)
    out: list[str] = []
    for m in items:
        if m in (BARE_NAME, BARE_NAME + RAG_SUFFIX) and names:
            suffix = m[len(BARE_NAME):]
            out += [n + suffix for n in names]
        else:
            out.append(m)
    out = list(dict.fromkeys(out))
    needing = [m for m in out if adapter_of(m) is not None and adapter_of(m) not in names]
    if needing:
        raise UsageError(
            f"mode(s) {', '.join(needing)} need an adapter: pass --adapter DIR (a 'ragtune train' output; "
            "NAME=DIR to compare several) or leave them out, e.g. --modes base,rag"
        )
    return out


def training_recipe(card: Mapping[str, Any]) -> str:
    """How an adapter was trained, in words, from its run card (a card without a `rag` block is plain)."""
    rag = card.get("rag") if isinstance(card, Mapping) else None
    if not isinstance(rag, Mapping) or not rag:
        return "plain: trained on the records as written (no retrieved sources in its prompts)"
    parts = []
    if rag.get("index"):
        gen = f", generation {rag['index_generation']}" if rag.get("index_generation") not in (None, "") else ""
        parts.append(f"index '{rag['index']}'{gen}")
    if rag.get("top_k") is not None:
        parts.append(f"top_k {rag['top_k']}")
    if rag.get("distractors") is not None:
        parts.append(f"{rag['distractors']} distractor(s)")
    if rag.get("withheld") is not None:
        parts.append(f"gold withheld from {100 * float(rag['withheld']):.0f}% of records"
                     + (" (target: the not-found message)" if rag.get("withheld_answer") == "not_found" else ""))
    if rag.get("cite") is not None:
        parts.append("target cites [n]" if rag["cite"] else "no [n] in the target")
    if rag.get("order") == "shuffled":
        parts.append("sources in shuffled order")
    if rag.get("question_first"):
        parts.append("question above the sources")
    if rag.get("prompt_format") is not None:
        parts.append(f"prompt format {rag['prompt_format']}")
    return "trained with retrieval (sources in its prompts" + (": " + ", ".join(parts) if parts else "") + ")"
