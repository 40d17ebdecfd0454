"""The run card: what training writes beside the adapter and serving reads back.

`ragtune.json` records the base model (path and content hash), the chat template actually
trained with (and its hash), the resolved config, data hashes, metrics and exports. Serving
refuses an adapter whose base model or template does not match, and says which.

An adapter trained on retrieval-built prompts (`data.rag`, ragtune/train/rag.py) has a `rag` block:
index name, identity and generation, top_k, distractors, withheld share, cite flag, prompt format
version, and what was found (gold sources, records whose gold was missing); `describe_recipe`
names it in one line for eval reports.

`system_prompt` is the system message every training record shared (null when they did not all
share one): wherever the adapter answers, a conversation without its own system message gets it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

from ragtune.errors import RagtuneError, UsageError
from ragtune.io import atomic_write_json

log = logging.getLogger(__name__)

RUNCARD_NAME = "ragtune.json"
SCHEMA_VERSION = 1


class RunCardMismatch(UsageError):
    pass


def write_runcard(adapter_dir: str | Path, card: dict[str, Any]) -> Path:
    data = {"schema_version": SCHEMA_VERSION, **card}
    return atomic_write_json(Path(adapter_dir) / RUNCARD_NAME, data)


def read_runcard(adapter_dir: str | Path) -> dict[str, Any]:
    p = Path(adapter_dir) / RUNCARD_NAME
    if not p.is_file():
        raise UsageError(
            f"adapter '{adapter_dir}' has no {RUNCARD_NAME}; it was not written by 'ragtune train' "
            "(train it with ragtune, or load it without a run card check in your own code)"
        )
    try:
        card = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:  # UnicodeDecodeError included
        raise UsageError(f"{p}: not valid JSON ({exc}); the run card is damaged: copy the adapter folder again "
                         "or train again") from None
    version = card.get("schema_version", 0) if isinstance(card, dict) else 0
    version = version if isinstance(version, int) else 0
    if version > SCHEMA_VERSION:
        raise UsageError(
            f"{p}: schema_version {version} is newer than this ragtune understands ({SCHEMA_VERSION}); upgrade ragtune"
        )
    base = card.get("base_model") if isinstance(card, dict) else None
    if not isinstance(base, dict) or not isinstance(base.get("path"), str) or not isinstance(base.get("hash"), str):
        got = type(card).__name__ if not isinstance(card, dict) else f"base_model {json.dumps(base)[:80]}"
        raise UsageError(f"{p}: the run card is damaged: it needs an object with base_model {{\"path\": ..., "
                         f"\"hash\": ...}}, got {got}; copy the adapter folder again or train again")
    return card


def trained_system_prompt(card: dict[str, Any]) -> str:
    """The system prompt every training record carried ("" when none was shared, or an older card)."""
    value = card.get("system_prompt")
    return value if isinstance(value, str) else ""


def describe_recipe(card: dict[str, Any]) -> str:
    """How an adapter was trained, in one line: 'question -> answer' or the retrieval settings."""
    rag = card.get("rag") if isinstance(card, dict) else None
    if not rag:
        return "trained on question -> answer (no sources in the prompt)"
    withheld = f", gold withheld for {rag.get('withheld', 0):.0%}" if rag.get("withheld") else ""
    if withheld and rag.get("withheld_answer") == "not_found":
        withheld += " (answered with the not-found message)"
    return (f"trained on retrieved sources: index '{rag.get('index')}', {rag.get('distractors', 0)} distractor(s) beside "
            f"the gold source (top_k {rag.get('top_k')}){withheld}{', cites [n]' if rag.get('cite') else ''}"
            f"{', sources shuffled' if rag.get('order') == 'shuffled' else ''}"
            f"{', question above the sources' if rag.get('question_first') else ''}, "
            f"prompt format {rag.get('prompt_format')}")


def update_runcard(adapter_dir: str | Path, **fields: Any) -> Path:
    card = read_runcard(adapter_dir)
    card.update(fields)
    return atomic_write_json(Path(adapter_dir) / RUNCARD_NAME, card)


def repoint_adapter(adapter_dir: str | Path, base: str | Path) -> None:
    """Point an adapter at its base model's folder on this machine: peft's adapter_config.json
    (`base_model_name_or_path`) and, when there is one, the run card's `base_model.path`. The content
    hash is not touched: it is what still proves the base is the one the adapter was trained on."""
    adapter = Path(adapter_dir)
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = str(base)
    atomic_write_json(cfg_path, cfg)
    card_path = adapter / RUNCARD_NAME
    if card_path.is_file():
        card = json.loads(card_path.read_text(encoding="utf-8"))
        card.setdefault("base_model", {})["path"] = str(base)
        atomic_write_json(card_path, card)


def check_compatible(card: dict[str, Any], base_hash: str, base_path: str, template_hash: str | None = None) -> None:
    """Raise RunCardMismatch naming what differs between the card and the base about to be used."""
    base = card.get("base_model", {})
    if base.get("hash") and base["hash"] != base_hash:
        raise RunCardMismatch(
            f"adapter was trained on base model '{base.get('path')}' (hash {base['hash'][:12]}) but the base "
            f"model given is '{base_path}' (hash {base_hash[:12]}); use the same base model the adapter was trained on"
        )
    tpl = card.get("chat_template", {})
    if template_hash and tpl.get("hash") and tpl["hash"] != template_hash:
        raise RunCardMismatch(
            f"adapter was trained with chat template {tpl['hash'][:12]} but the one given is {template_hash[:12]}; "
            "serve with the template stored in the run card"
        )


def adapter_base(adapter_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """An adapter's run card and its base model dir, checked to be the one it was trained on (by
    content hash); raises ModelPathError or RunCardMismatch naming what is wrong."""
    from ragtune.modeling import check_model_dir, model_hash

    card = read_runcard(adapter_dir)
    base = check_model_dir(card["base_model"]["path"], what="the adapter's base model")
    check_compatible(card, model_hash(base), str(base))
    return card, base


def trained_base(adapter_dirs: Iterable[str | Path]) -> str:
    """For a command given adapters and no base: the base they were trained on, if it is on this
    machine and their run cards agree; else "" (the default model, which the hash check then judges).
    Unlike adapter_base() it never raises: loading the adapter reports what is wrong with it."""
    from ragtune.modeling import adapter_dir

    bases = set()
    for adir in adapter_dirs:
        try:
            bases.add(str(read_runcard(adapter_dir(adir))["base_model"]["path"]))
        except (RagtuneError, KeyError, TypeError):
            return ""
    if len(bases) != 1 or not Path(next(iter(bases))).is_dir():
        return ""
    log.info("model.path not set: using the adapter's base model %s", next(iter(bases)))
    return next(iter(bases))
