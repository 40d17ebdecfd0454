"""Before the base model loads: resolve it and its tokenizer and chat template, check the training
data (every problem with its line number), split off eval records, and with data.rag.index rebuild
the records as served prompts with retrieved sources; then encode records for the Trainer.

    from ragtune.config import load_config
    from ragtune.train.prepare import encode, prepare

    prep = prepare(load_config("configs/train/smollm2-lora.yaml"))   # Prepared: tokenizer, template, records
    enc = encode(prep.train_records, prep.tokenizer, prep.template, max_length=1024)   # input_ids, labels
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtune.errors import CheckFailed, UsageError

log = logging.getLogger(__name__)

PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|padding|>")


@dataclass
class Prepared:
    """Everything resolved before the model is loaded (cheap; also used by the benchmark)."""

    base: Path
    tokenizer: Any
    template: str
    train_records: list[Any]
    eval_records: list[Any]
    train_report: Any
    eval_report: Any | None
    skipped: int
    rag: Any = None  # ragtune.train.rag.RagBuild: the records rebuilt with retrieved sources (data.rag.index)


def _read_template(cfg: Any, tokenizer: Any) -> str:
    from ragtune.train.template import template_of

    if cfg.train.chat_template:
        return read_template_file(cfg.train.chat_template)
    return template_of(tokenizer)


def read_template_file(path: str | Path) -> str:
    """train.chat_template's text, refused (naming the file and the fix) when it is no file, not UTF-8, or not
    a Jinja template: otherwise every record would be reported as a data problem, or a traceback shown."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"train.chat_template '{p}' " + ("is not a file" if p.exists() else "does not exist")
                         + "; give a .jinja file, or leave it empty to use the model's own template")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"train.chat_template '{p}' is not UTF-8 text; save the template as UTF-8") from None
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # pragma: no cover - another transformers: rendering the records reports it instead
        return text
    try:
        _compile_jinja_template(text)  # as apply_chat_template compiles it ({% generation %} included)
    except Exception as exc:  # noqa: BLE001 - jinja2's TemplateSyntaxError, and whatever the extensions raise
        line = getattr(exc, "lineno", None)
        raise UsageError(f"train.chat_template '{p}'{f' line {line}' if line else ''} is not a valid Jinja "
                         f"template: {str(exc).rstrip('.')}; fix the template, or leave train.chat_template "
                         "empty") from None
    return text


def prepare(cfg: Any, rag_cache: Path | None = None) -> Prepared:
    """Resolve the base model and tokenizer, check the data, split off eval records; with data.rag.index,
    rebuild them as served prompts with retrieved sources (reusing `rag_cache` when it matches)."""
    from ragtune.modeling import load_tokenizer, resolve_model_path
    from ragtune.train.data import check_file, record_prompt, split_items

    if not cfg.data.train_file:
        raise UsageError("no training data: set data.train_file=FILE.jsonl (chat JSONL, one {\"messages\": [...]} per line)")
    base = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(base, trust_remote_code=cfg.model.trust_remote_code)
    template = _read_template(cfg, tok)
    tok.chat_template = template
    max_len = cfg.data.max_length
    rep = check_file(cfg.data.train_file, tok, template, max_len, dedupe=cfg.data.dedupe)
    for note in (rep.tool_note(), rep.duplicate_note()):
        if note:
            log.warning("%s", note)
    skipped = len(rep.rejected)
    if not rep.records:
        raise CheckFailed(f"no valid training records in {cfg.data.train_file}; nothing was trained:\n{rep.format()}")
    if not rep.ok:
        if not cfg.data.skip_invalid:
            raise CheckFailed(
                f"the training data has problems; nothing was trained:\n{rep.format()}\n"
                f"fix the lines above (or 'ragtune data check {cfg.data.train_file} --write-clean OUT'), "
                f"or pass --skip-invalid to train on the {len(rep.records)} valid records"
            )
        log.warning("skipping %d invalid records of %s (data.skip_invalid)", skipped, cfg.data.train_file)
    if rep.conflicts:
        log.warning("%s", rep.conflict_note())
    cut = rep.stats.get("cut_lines") or []
    if cut:
        log.warning("the answers of %d record(s) of %s are cut at data.max_length=%d (lines %s): their ends and stop "
                    "tokens are not trained", len(cut), cfg.data.train_file, max_len,
                    ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else ""))
    train_records = rep.records
    eval_records: list[Any] = []
    eval_rep = None
    if cfg.data.eval_file:
        eval_rep = check_file(cfg.data.eval_file, tok, template, max_len, dedupe=cfg.data.dedupe)
        if eval_rep.tool_lines:
            log.warning("%s", eval_rep.tool_note())
        if not eval_rep.ok and not cfg.data.skip_invalid:
            raise CheckFailed(f"the eval data has problems; nothing was trained:\n{eval_rep.format()}")
        eval_records = eval_rep.records
        seen = {record_prompt(r) for r in train_records}
        shared = [r.line for r in eval_records if record_prompt(r) in seen]
        if shared:
            lines = ", ".join(map(str, shared[:5])) + (", ..." if len(shared) > 5 else "")
            log.warning("%d of %d eval records ask a question the training data also asks (%s line %s): their eval "
                        "loss measures memory, not generalisation; remove them from one of the files",
                        len(shared), len(eval_records), cfg.data.eval_file, lines)
    elif cfg.data.eval_fraction > 0:
        train_records, eval_records = split_items(train_records, cfg.data.eval_fraction, cfg.train.seed,
                                                  key=record_prompt)
        if not eval_records:
            log.warning("data.eval_fraction=%g held out nothing: %s; training without eval data (give "
                        "data.eval_file, or add records with other questions)", cfg.data.eval_fraction,
                        "a single record cannot be split" if len(train_records) < 2 else
                        "every record asks the same question, and a question's records stay on one side")
    rag = None
    if cfg.data.rag.index:
        from ragtune.train.rag import apply_rag

        train_records, eval_records, rag = apply_rag(cfg, tok, template, rep, train_records, eval_records, rag_cache)
    return Prepared(base, tok, template, train_records, eval_records, rep, eval_rep, skipped, rag)


def choose_pad_token(tokenizer: Any, template: str) -> str:
    """A pad token distinct from eos, taken from the existing vocabulary (no resize) when possible."""
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return tokenizer.pad_token
    vocab = tokenizer.get_vocab()
    for cand in PAD_CANDIDATES:
        if cand in vocab and cand != eos:
            return cand
    used = {eos, tokenizer.bos_token}
    sample = template_text_sample(tokenizer, template)
    if tokenizer.unk_token and tokenizer.unk_token not in used and tokenizer.unk_token not in sample:
        return tokenizer.unk_token
    for tok_text in tokenizer.get_added_vocab():
        if tok_text not in used and tok_text not in sample:
            return tok_text
    raise UsageError(
        "the tokenizer has no token that can serve as padding distinct from its end-of-sequence token; "
        "add a pad token to the base model's tokenizer (tokenizer.add_special_tokens({'pad_token': '<|pad|>'}) "
        "and resize the embeddings), then train again"
    )


def template_text_sample(tokenizer: Any, template: str) -> str:
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    try:
        from ragtune.chat_roles import fit_roles

        return tokenizer.apply_chat_template(fit_roles(msgs, template), tokenize=False, chat_template=template)
    except Exception:  # noqa: BLE001 - only a heuristic
        return ""


def encode(records: list[Any], tokenizer: Any, template: str, max_length: int) -> dict[str, list[list[int]]]:
    """input_ids and labels (-100 off the assistant answers), truncated to max_length."""
    from ragtune.train.template import tokenize_conversation

    ids_all, labels_all = [], []
    for r in records:
        enc = getattr(r, "enc", None) or tokenize_conversation(tokenizer, r.messages, template)
        ids = enc.input_ids[:max_length]
        labels = [t if m else -100 for t, m in zip(ids, enc.mask[:max_length])]
        ids_all.append(ids)
        labels_all.append(labels)
    return {"input_ids": ids_all, "labels": labels_all}
