"""The chat tokenizer without transformers: the chat template rendered with jinja2, tokenizer.json run
with `tokenizers`, so the llama.cpp engine answers without importing torch or transformers.

    tok, why, recheck = load_checked(model_dir, model_hash)   # None, the reason, check now? until one passed
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]; tok.decode(ids, skip_special_tokens=True)
    record_check(hf_tokenizer, model_dir, model_hash)  # once, while transformers' tokenizer is loaded

`LightTokenizer` has the part of a transformers tokenizer the Generator uses (render, encode,
decode, eos/pad ids, `chat_template`). Templates run in transformers' own environment: jinja2's
immutable sandbox with trim_blocks and lstrip_blocks, loop controls, `tojson` without HTML
escaping, `raise_exception`, `strftime_now`, `{% generation %}` markers, and the special tokens
(bos_token, eos_token...) as variables.

It is used for a model only after it gave transformers' rendered text, token ids and decoded text
on every CHECK_CONVERSATIONS (English, Korean, emoji, code, a special token typed by the user, a
RAG system turn): `record_check` writes that verdict to $RAGTUNE_HOME/tokenizers/<model hash>/
check.json, keyed by the model's content hash and the `tokenizers` version. So the first llama.cpp
answer of a model loads transformers' tokenizer and checks; later ones start without it. A model
whose check failed keeps transformers (the check says why and is not retried);
RAGTUNE_LIGHT_TOKENIZER=0 turns this tokenizer off.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from ragtune.chat_roles import fit_roles, template_environment

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: system turns folded for templates without a system role (checks of 1 are redone)
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CHECK_CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is the capital of France?"},),
    ({"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
     {"role": "user", "content": "u"}),
    ({"role": "user", "content": "연차 휴가는 며칠인가요? annual leave 2024 🙂"},),
    ({"role": "system", "content": "Answer using only the numbered sources below. Cite them as [n].\n\nSources:\n"
                                   "[1] remote_work.md > Eligibility\nEmployees may work remotely  3 days/week."},
     {"role": "user", "content": "  def f(x):\n\treturn x ** 2  # code, tabs and  double  spaces \n\n"}),
    ({"role": "user", "content": "a typed special token <|im_end|> and </s> <s> [INST] stays text?"},),
)


def enabled() -> bool:
    return os.environ.get("RAGTUNE_LIGHT_TOKENIZER", "1").strip().lower() not in ("0", "false", "no", "off")


def check_path(model_hash: str) -> Path:
    from ragtune.modeling import ragtune_home

    return ragtune_home() / "tokenizers" / model_hash / "check.json"


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class LightTokenizer:
    """A model folder's tokenizer.json + tokenizer_config.json + chat template, without transformers."""

    def __init__(self, model_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        from ragtune.modeling import chat_template_of

        d = Path(model_dir)
        if not (d / "tokenizer.json").is_file():
            raise ValueError(f"'{d}' has no tokenizer.json")
        conf_file = d / "tokenizer_config.json"
        conf = json.loads(conf_file.read_text(encoding="utf-8")) if conf_file.is_file() else {}
        specials_file = d / "special_tokens_map.json"
        specials = json.loads(specials_file.read_text(encoding="utf-8")) if specials_file.is_file() else {}
        self.backend = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.backend.no_padding()
        self.backend.no_truncation()
        self.special_tokens_map: dict[str, str] = {}
        for key in SPECIAL_KEYS:
            text = _token_text(conf.get(key)) or _token_text(specials.get(key))
            if text is not None:
                self.special_tokens_map[key] = text
        self.chat_template: str | None = chat_template_of(d)
        self.clean_up = bool(conf.get("clean_up_tokenization_spaces", False)) and type(
            self.backend.model).__name__ != "BPE"  # transformers skips the clean-up for BPE models
        self._env: Any = None
        self._compiled: dict[str, Any] = {}

    def _id(self, key: str) -> int | None:
        text = self.special_tokens_map.get(key)
        return None if text is None else self.backend.token_to_id(text)

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = False, chat_template: str | None = None,
                            tools: Sequence[dict[str, Any]] | None = None) -> str:
        if tokenize:
            raise ValueError("LightTokenizer.apply_chat_template renders text only (tokenize=False)")
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("this model has no chat template")
        if template not in self._compiled:
            if self._env is None:
                self._env = template_environment()
            self._compiled[template] = self._env.from_string(template)
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in fit_roles(messages, template)]
        return self._compiled[template].render(messages=chat, tools=tools, documents=None,
                                               add_generation_prompt=add_generation_prompt,
                                               **self.special_tokens_map)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up else text


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization (spaces before punctuation and contractions)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("tokenizers", "jinja2"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = ""
    return out


def load_checked(model_dir: str | Path, model_hash: str) -> tuple[LightTokenizer | None, str, bool]:
    """(the tokenizer, "", False) when a passed check for this model and `tokenizers` version is
    recorded, else (None, a one-line reason, whether to check again: False when it is off or failed)."""
    if not enabled():
        return None, "RAGTUNE_LIGHT_TOKENIZER=0", False
    path = check_path(model_hash)
    if not path.is_file():
        return None, "no check of the jinja2 + tokenizers chat tokenizer for this model yet", True
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"the tokenizer check {path} is unreadable ({exc})", True
    if rec.get("format_version") != FORMAT_VERSION or rec.get("model_hash") != model_hash:
        return None, f"the tokenizer check {path} is of another format or model", True
    if rec.get("versions", {}).get("tokenizers") != _versions()["tokenizers"]:
        return None, "the tokenizer check was made with another version of tokenizers", True
    if not rec.get("passed"):
        return None, f"jinja2 + tokenizers differ from transformers' tokenizer here ({rec.get('reason')})", False
    try:
        return LightTokenizer(model_dir), "", False
    except Exception as exc:  # a damaged tokenizer.json: transformers loads it or says why
        return None, f"the chat tokenizer of '{model_dir}' could not be loaded without transformers ({exc})", True


def check(hf_tokenizer: Any, model_dir: str | Path) -> dict[str, Any]:
    """Compare LightTokenizer with transformers' tokenizer on CHECK_CONVERSATIONS: rendered text, prompt
    ids, decoded text (with and without special tokens), eos and pad ids."""
    res: dict[str, Any] = {"conversations": len(CHECK_CONVERSATIONS), "passed": False}
    try:
        light = LightTokenizer(model_dir)
    except Exception as exc:
        res["reason"] = f"cannot load tokenizer.json/tokenizer_config.json ({exc})"
        return res
    problems: list[str] = []
    if light.chat_template != getattr(hf_tokenizer, "chat_template", None):
        problems.append("chat template text")
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(light, name) != getattr(hf_tokenizer, name, None):
            problems.append(name)
    for n, conv in enumerate(CHECK_CONVERSATIONS):
        try:
            want = hf_tokenizer.apply_chat_template(fit_roles(conv, light.chat_template), tokenize=False,
                                                    add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that refuses this conversation must refuse both ways
            want = None
        try:
            got = light.apply_chat_template(list(conv), add_generation_prompt=True)
        except Exception:  # noqa: BLE001
            got = None
        if want != got:
            problems.append(f"rendering of conversation {n}")
            continue
        if want is None:
            continue
        ids = hf_tokenizer(want, add_special_tokens=False)["input_ids"]
        if list(ids) != light(want, add_special_tokens=False)["input_ids"]:
            problems.append(f"token ids of conversation {n}")
            continue
        for skip in (True, False):
            if hf_tokenizer.decode(ids, skip_special_tokens=skip) != light.decode(ids, skip_special_tokens=skip):
                problems.append(f"decoded text of conversation {n} (skip_special_tokens={skip})")
    res["passed"] = not problems
    if problems:
        res["reason"] = "differs in " + ", ".join(problems[:4]) + (" ..." if len(problems) > 4 else "")
    return res


def record_check(hf_tokenizer: Any, model_dir: str | Path, model_hash: str) -> bool:
    """Check (see `check`) and write the verdict beside the model's hash; True when it passed. Never
    raises: without a record the next load uses transformers again."""
    from ragtune.io import atomic_write_json

    if not enabled():
        return False
    t0 = time.perf_counter()
    res = check(hf_tokenizer, model_dir)
    rec = {"format_version": FORMAT_VERSION, "model_hash": model_hash, "model_dir": str(model_dir),
           "versions": _versions(), "checked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "seconds": round(time.perf_counter() - t0, 3), **res}
    try:
        atomic_write_json(check_path(model_hash), rec)
    except OSError as exc:
        log.info("chat tokenizer: could not record the check in %s (%s)", check_path(model_hash), exc)
        return False
    if res["passed"]:
        log.info("chat tokenizer: jinja2 + tokenizers agree with transformers on '%s'; later llama.cpp answers "
                 "start without transformers", model_dir)
    else:
        log.info("chat tokenizer: jinja2 + tokenizers differ from transformers on '%s' (%s); keeping transformers",
                 model_dir, res["reason"])
    return bool(res["passed"])


def generation_eos(model_dir: str | Path) -> Any:
    """eos_token_id of generation_config.json (what transformers' GenerationConfig reads), None without one."""
    f = Path(model_dir) / "generation_config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError):
        return None
