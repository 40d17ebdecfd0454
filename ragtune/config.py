"""YAML -> frozen dataclasses, with `key.sub=value` overrides.

    from ragtune.config import load_config, replace
    cfg = load_config("configs/train/smollm2-lora.yaml", ["train.epochs=2"])
    cfg = replace(cfg, generation=replace(cfg.generation, temperature=0.0))

Every problem (unreadable file, unknown key, wrong type, value outside its choices or its range,
malformed override) is collected and raised once as a ConfigError whose lines name the file or the
override, the key and what is allowed. The sections themselves (Config, ModelConfig, ...; to_dict,
flat_settings) are in ragtune/config_schema.py, the ranges and the rules across settings (RANGES,
check_together) in ragtune/config_checks.py; every one of those names is importable from here too.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Literal

from ragtune.config_checks import PROBLEM_KEY, RANGES, Range, check_together, in_range
from ragtune.config_schema import (GGUF_TYPES, SECRET_KEYS, ChunkConfig, Config, DataConfig, DeploymentConfig,
                                   EmbedderConfig, EvalConfig, GenerationConfig, GgufType, IndexConfig, LoraConfig,
                                   ModelConfig, RagConfig, RagDataConfig, SearchConfig, ServeConfig, StoreConfig,
                                   TrainConfig, flat_settings, replace, setting_keys, to_dict)
from ragtune.errors import ConfigError

__all__ = [
    "load_config", "guess_setting", "PEER_KEYS",
    # ragtune.config_schema
    "Config", "ModelConfig", "DataConfig", "RagDataConfig", "TrainConfig", "LoraConfig", "EmbedderConfig",
    "ChunkConfig", "StoreConfig", "IndexConfig", "SearchConfig", "GenerationConfig", "RagConfig",
    "DeploymentConfig", "ServeConfig", "EvalConfig", "GgufType", "GGUF_TYPES", "SECRET_KEYS", "to_dict",
    "replace", "flat_settings", "setting_keys",
    # ragtune.config_checks
    "RANGES", "Range", "check_together",
]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (optional), apply `a.b=value` overrides, validate everything, return Config."""
    problems: list[str] = []
    where = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path:
        raw = _read_yaml(Path(path), problems)
    in_file = set(_paths(raw))
    for item in overrides:
        _apply_override(raw, item, problems)
    cfg = _build(Config, raw, "", where, problems)
    check_together(cfg, set(_paths(raw)), where, problems)
    if problems:
        raise ConfigError([_blame_override(p, where, overrides, in_file) for p in problems])
    return cfg


def _paths(raw: Any, prefix: str = "") -> list[str]:
    """Every dotted key a YAML mapping sets (sections included)."""
    if not isinstance(raw, dict):
        return []
    out = []
    for k, v in raw.items():
        out.append(f"{prefix}{k}")
        out.extend(_paths(v, f"{prefix}{k}."))
    return out


def _blame_override(problem: str, where: str, overrides: list[str] | tuple[str, ...],
                    in_file: Collection[str] = ()) -> str:
    """A problem caused by a command-line override names the override, not the file; an unknown
    section an override names (trian.epochs=2) is called a section, with the override it meant."""
    m = PROBLEM_KEY.match(problem, len(where) + 2) if problem.startswith(f"{where}: ") else None
    if not m:
        return problem
    kind, bad = m[1], m[2]
    for item in reversed(overrides):  # the last override of a key is the one that counts
        key = item.partition("=")[0].strip()
        if not (bad == key or bad.startswith(key + ".") or key.startswith(bad + ".")):
            continue
        rest = problem[len(where) + 2:]
        if kind == "unknown key" and key.startswith(bad + "."):
            if bad in in_file:
                return problem  # the file has the section too: the file is where to fix it
            rest = "unknown section" + rest[len("unknown key"):]
            guess = re.search(r"; did you mean '([^']+)'\?$", rest)
            if guess and guess[1] + key[len(bad):] in setting_keys():  # the whole override it meant
                rest = rest[:guess.start()] + f"; did you mean '{guess[1] + item.strip()[len(bad):]}'?"
        return f"override '{item}': {rest}"
    return problem


def _read_yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    import yaml

    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml")) + sorted(p.name for p in path.glob("*.yml"))
        there = f" (YAML files there: {', '.join(found[:8])}{', ...' if len(found) > 8 else ''})" if found else ""
        problems.append(f"{path}: is a directory, not a config file; pass a YAML file with --config{there}")
        return {}
    if not path.exists():  # a pipe (--config <(...)) or /dev/null is read like a file
        problems.append(f"{path}: config file not found")
        return {}
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"{path}: config file cannot be read: {exc.strerror or exc}")
        return {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(_not_utf8(path, data, exc))
        return {}
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problems.append(_yaml_problem(path, exc))
        return {}
    except RecursionError:  # PyYAML builds nested [ and { recursively
        problems.append(f"{path}: not valid YAML for a config: nested too deeply (a config has a few levels of "
                        "sections); the file is damaged, or not a ragtune config")
        return {}
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        problems.append(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        return {}
    problems.extend(_duplicate_keys(path, text))
    return loaded


def _duplicate_keys(path: Path, text: str) -> list[str]:
    """A key given twice in one mapping: YAML keeps the last value without a word, so an edit made to the
    first copy would silently do nothing."""
    import yaml

    out: list[str] = []
    seen_nodes: set[int] = set()

    def walk(node: Any, prefix: str) -> None:
        if id(node) in seen_nodes:  # an alias of a node already walked (or of itself)
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, Any] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    name = f"{prefix}{key.value}"
                    if key.value in first:
                        out.append(f"{path}: line {key.start_mark.line + 1}: key '{name}' is given twice (first "
                                   f"at line {first[key.value].start_mark.line + 1}); YAML would keep only the last "
                                   "value: remove one of them")
                    else:
                        first[key.value] = key
                    walk(value, name + ".")
                else:
                    walk(value, prefix)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{prefix[:-1]}[{i}]." if prefix else f"[{i}].")

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except (yaml.YAMLError, RecursionError):  # pragma: no cover - safe_load read the same text
        pass
    return out


def _not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError) -> str:
    line = data.count(b"\n", 0, exc.start) + 1
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    return (f"{path}: line {line}, column {column}: not UTF-8 text (byte 0x{data[exc.start]:02x} at byte offset "
            f"{exc.start}); save the file as UTF-8")


def _yaml_problem(path: Path, exc: Exception) -> str:
    """PyYAML's message with both of its places: where the construct began (a quote, a bracket) and where
    it broke (often the end of the file)."""

    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if not problem:
        return f"{path}: not valid YAML: {exc}"
    first = context_mark or mark
    head = f"{path}: line {first.line + 1}: " if first else f"{path}: "
    parts = []
    if context:
        parts.append(f"{context} at {at(context_mark)}" if context_mark else context)
    parts.append(f"{problem} at {at(mark)}" if mark else problem)
    return head + "not valid YAML: " + ", ".join(parts)


def _apply_override(raw: dict[str, Any], item: str, problems: list[str]) -> None:
    import yaml

    key, sep, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p.isidentifier() for p in parts):
        problems.append(
            f"override '{item}': expected key.sub=value (for example train.epochs=2)"
        )
        return
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except (yaml.YAMLError, RecursionError):  # taken as the text typed; too deep a value is refused as a string
        value = text
    if not isinstance(value, (str, dict, list)):
        value = _Typed(value, text.strip())  # a string key takes the text as typed: No, 007, 1e3
    node = raw
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


@dataclass(frozen=True)
class _Typed:
    """An override's scalar as YAML read it, and as it was typed."""

    value: Any
    text: str

    def __repr__(self) -> str:
        return repr(self.value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


# What TRL, transformers, axolotl and LLaMA-Factory call our keys: a user's first guess.
PEER_KEYS = {
    "lr": "train.learning_rate",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.lr_scheduler",
    "max_length": "data.max_length",
    "max_seq_length": "data.max_length",
    "sequence_len": "data.max_length",
    "cutoff_len": "data.max_length",
    "sample_packing": "train.packing",
    "load_in_4bit": "train.qlora",
    "lora_r": "train.lora.r",
    "lora_rank": "train.lora.r",
    "lora_alpha": "train.lora.alpha",
    "lora_dropout": "train.lora.dropout",
    "lora_target_modules": "train.lora.target_modules",
    "lora_target": "train.lora.target_modules",
    "target_modules": "train.lora.target_modules",
    "val_set_size": "data.eval_fraction",
    "model_name_or_path": "model.path",
    "base_model": "model.path",
    "dataset": "data.train_file",
    "train_file": "data.train_file",
    "eval_file": "data.eval_file",
}


def guess_setting(name: str) -> str:
    """The dotted setting a bare or misspelt name most likely means ("" when nothing is close)."""
    if name in PEER_KEYS:
        return PEER_KEYS[name]
    keys = setting_keys()
    leaves: dict[str, str] = {}
    # A leaf that repeats means its top-level section's key (search.top_k, not data.rag.top_k);
    # among equals the first section wins (model.device before embedder.device).
    for k in sorted(keys, key=lambda k: k.count(".")):
        leaves.setdefault(k.rsplit(".", 1)[-1], k)
    close = difflib.get_close_matches(name, list(leaves), n=1) or difflib.get_close_matches(name, keys, n=1)
    return leaves.get(close[0], close[0]) if close else ""


def _build(cls: type, raw: Any, prefix: str, where: str, problems: list[str]) -> Any:
    label = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        problems.append(f"{where}: key '{label}': expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            peer = PEER_KEYS.get(str(key), "")
            guess = [peer] if peer else [prefix + g for g in difflib.get_close_matches(str(key), names, n=1)]
            hint = f"; did you mean '{guess[0]}'?" if guess else ""
            problems.append(
                f"{where}: unknown key '{prefix}{key}' (allowed: {', '.join(names)}){hint}"
            )
    values = {}
    for name in names:
        if name in raw:
            value = _coerce(hints[name], raw[name], f"{prefix}{name}", where, problems)
            if value is not _MISSING:
                values[name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        problems.append(f"{where}: key '{label}': {exc}")
        return cls()


_MISSING = object()
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _ranged(value: int | float, key: str, where: str, problems: list[str]) -> Any:
    return value if in_range(value, key, where, problems) else _MISSING


def _coerce(tp: Any, value: Any, key: str, where: str, problems: list[str]) -> Any:
    if isinstance(value, _Typed):
        value = value.text if tp is str else value.value

    def bad() -> Any:
        hint = ""
        if isinstance(value, bool) and tp is str:
            hint = " (YAML reads a bare yes/no/on/off/true/false as a boolean: put the text in quotes)"
        problems.append(f"{where}: key '{key}': expected {_type_name(tp)}, got {value!r}{hint}")
        return _MISSING

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", where, problems)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off (and yes/no) as a boolean
        elif value is False and "no" in choices:
            value = "no"  # mixed_precision: no
        return value if value in choices else bad()
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        if isinstance(value, (str, int, float)) and not dataclasses.is_dataclass(inner):
            value = [value] if not isinstance(value, str) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            return bad()
        out = [_coerce(inner, v, f"{key}[{i}]", where, problems) for i, v in enumerate(value)]
        return tuple(v for v in out if v is not _MISSING)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        return value if isinstance(value, bool) else bad()
    if tp is int:
        return _ranged(value, key, where, problems) if isinstance(value, int) and not isinstance(value, bool) else bad()
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return _ranged(float(value), key, where, problems)  # YAML 1.1 reads 5e-3 (no dot) as a string
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return bad()
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float: refused as not finite
            number = math.inf if value > 0 else -math.inf
        return _ranged(number, key, where, problems)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value if isinstance(value, str) else bad()
    return value
