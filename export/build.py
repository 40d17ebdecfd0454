"""`export_gguf`: one checked GGUF file (+ Modelfile + export card) from an adapter or a model dir.

    from ragtune.export.build import export_gguf
    res = export_gguf("runs/adapter", "runs/gguf/policies-f16.gguf")                 # merged on the fly
    res = export_gguf("runs/adapter", "runs/gguf/policies-q4.gguf", "q4_k_m")
    res = export_gguf("runs/adapter", "runs/gguf/policies-lora.gguf", lora=True)     # llama.cpp LoRA GGUF

The steps, in order: check the request; convert with llama.cpp's converter into a temporary folder
beside OUT (an adapter is merged first, or converted as a LoRA); check the f16 file against
transformers; quantize; check that a quantized file loads and tokenizes alike; write the Modelfile;
move the file into place; write the export card (`OUT.json`) and record the export in the adapter's
run card. A failed check writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtune.errors import CheckFailed, UsageError
from ragtune.export.parity import DEFAULT_MARGIN
from ragtune.export.source import Source

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    path: Path
    type: str
    sha256: str
    size_bytes: int
    modelfile: Path | None
    card_path: Path
    entry: dict[str, Any]
    check: dict[str, Any] | None
    seconds: float


@dataclass
class _Converted:
    """What the conversion step leaves in the temporary folder."""

    produced: Path  # the file that becomes OUT
    tok_dir: Path  # where the tokenizer and chat template come from
    check: dict[str, Any] | None
    base_file: Path | None = None  # with lora: the base GGUF the Modelfile names


def export_gguf(source: str | Path, out: str | Path, type: str = "f16", *, lora: bool = False,
                base_gguf: str | Path | None = None, check: bool = True, margin: float = DEFAULT_MARGIN,
                force: bool = False, modelfile: str | Path | None = None, threads: int = 0,
                record: bool = True, f16_gguf: str | Path | None = None) -> ExportResult:
    """Export SOURCE (adapter folder, merged model or model dir) to one GGUF file, checked.

    With `lora=True` the adapter becomes a llama.cpp LoRA GGUF; its Modelfile names a base GGUF
    (`base_gguf`, else an f16 export of the base cached in $RAGTUNE_HOME/gguf and linked beside OUT).
    `f16_gguf` is an f16 export of this very source, already checked: it is quantized instead of
    converting again (the cache uses it).
    """
    from ragtune.export.convert import require_convertible
    from ragtune.export.pin import converter_dir
    from ragtune.export.quantize import require_llama_cpp

    t0 = time.perf_counter()
    out, src = _check_request(source, out, type, lora, force, modelfile, base_gguf)
    require_llama_cpp()
    converter_dir()  # fails early, with the fix, when the pinned sdist is missing
    if src.kind == "adapter":  # before the merge
        require_convertible(src.base_dir, f"adapter '{src.path}': its base ")
    else:
        require_convertible(src.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    template = src.card.get("chat_template", {}).get("template") if src.kind == "adapter" else None

    with tempfile.TemporaryDirectory(prefix=".ragtune-export-", dir=out.parent) as tmp_s:
        tmp = Path(tmp_s)
        if lora:
            conv = _convert_lora(src, out, tmp, base_gguf, template, check, margin, threads)
        else:
            conv = _convert_model(src, tmp, type, f16_gguf, template, check, margin, threads)
        _require_passed(conv.check, src, out, type)
        mf, verified = _write_modelfile(out, conv, template, Path(modelfile) if modelfile else None, lora, force)
        os.replace(conv.produced, out)

    entry = _entry(out, src, type, lora, conv, mf, verified)
    from ragtune.io import atomic_write_json

    card_path = atomic_write_json(out.with_name(out.name + ".json"), {**entry, "check": conv.check})
    if record:
        _record(src, entry)
    secs = time.perf_counter() - t0
    log.info("exported %s -> %s (%s, %.1f MB) in %.1fs", src.path, out, type, entry["size_bytes"] / 1e6, secs)
    return ExportResult(out, type, entry["sha256"], entry["size_bytes"], mf, card_path, entry, conv.check, secs)


def _check_request(source: str | Path, out: str | Path, type: str, lora: bool, force: bool,
                   modelfile: str | Path | None = None, base_gguf: str | Path | None = None) -> tuple[Path, Source]:
    from ragtune.export.ollama import modelfile_path
    from ragtune.export.quantize import check_type
    from ragtune.export.source import classify_source

    check_type(type)
    out = Path(out).expanduser().resolve()
    if out.suffix != ".gguf":
        raise UsageError(f"--out '{out}' must end in .gguf")
    if out.is_dir():
        raise UsageError(f"--out '{out}' is a folder; name the file to write, e.g. --out {out / 'model-f16.gguf'}")
    above = next(p for p in out.parents if p.exists())
    if not above.is_dir():
        raise UsageError(f"--out '{out}': '{above}' is a file, so no folder can be made under it; name a path "
                         "in a folder")
    if out.exists() and not force:
        raise UsageError(f"'{out}' already exists; pass --force to replace it")
    modelfile_path(out, Path(modelfile) if modelfile else None, force)  # refused now, not after the export
    src = classify_source(source)
    if lora and src.kind != "adapter":
        raise UsageError(f"--lora needs an adapter folder (with adapter_config.json); '{src.path}' is a model directory")
    if lora and type != "f16":
        raise UsageError("--lora writes the adapter in f16 (its base GGUF may be quantized); drop --type")
    _require_template(src)
    if lora:  # the LoRA file must not take the place of the base GGUF its Modelfile names
        assert src.base_dir is not None
        base_file = Path(base_gguf).expanduser().resolve() if base_gguf else _base_beside(out, src.base_dir)
        if base_file == out:
            raise UsageError(f"--out '{out}' is the base GGUF the LoRA file is used over ("
                             + ("--base-gguf" if base_gguf else "its base's f16 export is linked there")
                             + "); name the LoRA file otherwise, e.g. --out "
                             + str(out.with_name(out.stem + "-lora.gguf")))
    if base_gguf:
        _check_base_gguf(Path(base_gguf).expanduser().resolve())
    return out, src


def _base_beside(out: Path, base_dir: Path) -> Path:
    """Where a LoRA export links its base's f16 file when no --base-gguf is given."""
    return out.with_name(f"{base_dir.name}-f16.gguf")


def _check_base_gguf(path: Path) -> None:
    """--base-gguf is read before the conversion, not after it: it must be a whole GGUF file."""
    from ragtune.errors import RagtuneError
    from ragtune.export.header import gguf_metadata

    fix = ("give the base model's GGUF, e.g. one 'ragtune export gguf BASE_MODEL_DIR --out base-f16.gguf' wrote, or "
           "leave --base-gguf out to use an f16 export of the adapter's base")
    if not path.is_file():
        raise UsageError(f"--base-gguf '{path}' {'is a folder' if path.is_dir() else 'does not exist'}; {fix}")
    try:
        gguf_metadata(path)  # the whole header, so a file cut short in it is refused too
    except RagtuneError as exc:
        raise UsageError(f"--base-gguf {exc}; {fix}") from exc


def _require_template(src: Source) -> None:
    """The export is checked on chat prompts and its Modelfile formats chats: both need a chat template."""
    from ragtune.modeling import chat_template_of

    card_template = (src.card.get("chat_template") or {}).get("template") if src.kind == "adapter" else None
    model_dir = src.base_dir if src.kind == "adapter" else src.path
    if not (card_template or (model_dir is not None and chat_template_of(model_dir))):
        raise UsageError(
            f"'{src.path}' has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json); "
            "llama.cpp and Ollama format conversations with it and the export is checked on chat prompts: "
            "copy the chat_template.jinja of the chat model it comes from into the folder, or export a chat "
            "(Instruct) model")


def _convert_lora(src: Source, out: Path, tmp: Path, base_gguf: str | Path | None, template: str | None,
                  check: bool, margin: float, threads: int) -> _Converted:
    """The adapter as a llama.cpp LoRA GGUF, checked over its base GGUF (compared when that is f16)."""
    from ragtune.export.convert import convert_lora
    from ragtune.export.header import gguf_metadata
    from ragtune.export.parity import check_against_transformers, check_loads
    from ragtune.export.quantize import UNQUANTIZED_FILE_TYPES

    assert src.base_dir is not None
    base_file = _base_gguf(src.base_dir, out, base_gguf)
    produced = convert_lora(src.path, src.base_dir, tmp / "lora.gguf", "f16")
    report = None
    base_type = gguf_metadata(base_file, ["general.file_type"]).get("general.file_type")
    if check and base_type not in UNQUANTIZED_FILE_TYPES:
        log.warning("not comparing with transformers: base GGUF '%s' is quantized (file type %s); "
                    "the adapter is checked to load only", base_file, base_type)
        check_loads(base_file, src.path, template, lora_gguf=produced, threads=threads)
    elif check:
        report = check_against_transformers(src.base_dir, base_file, adapter_dir=src.path, lora_gguf=produced,
                                            template=template, margin=margin, threads=threads)
    return _Converted(produced, src.path, report, base_file)


def _base_gguf(base_dir: Path, out: Path, base_gguf: str | Path | None) -> Path:
    """The base GGUF a LoRA export names: the given one, else the cached f16 export linked beside OUT."""
    from ragtune.export.cache import cached_gguf

    if base_gguf:
        return Path(base_gguf).expanduser().resolve()  # checked by _check_request
    base_file = _base_beside(out, base_dir)
    cached = cached_gguf(base_dir, type="f16")
    if not base_file.exists():
        _link_or_copy(cached, base_file)
    elif not _same_content(base_file, cached):  # another model's of that folder name: never name it as the base
        raise UsageError(f"'{base_file}' is already there but is not the f16 export of '{base_dir}', the adapter's "
                         "base (another model in a folder of that name?); move it away, export into another folder, "
                         f"or pass --base-gguf {cached}")
    return base_file


def _same_content(a: Path, b: Path) -> bool:
    from ragtune.modeling import cached_file_sha256

    if os.path.samefile(a, b):  # the usual case: the link made by an earlier export
        return True
    return a.stat().st_size == b.stat().st_size and cached_file_sha256(a) == cached_file_sha256(b)


def _convert_model(src: Source, tmp: Path, type: str, f16_gguf: str | Path | None, template: str | None,
                   check: bool, margin: float, threads: int) -> _Converted:
    """One model GGUF: f16 from the converter (an adapter merged first), checked, then quantized."""
    from ragtune.export.convert import convert_model
    from ragtune.export.parity import check_against_transformers, check_loads, check_template
    from ragtune.export.quantize import quantize

    model_dir = _merged_model_dir(src, tmp)
    if f16_gguf is not None:
        f16 = Path(f16_gguf)
        prior = json.loads(f16.with_name(f16.name + ".json").read_text())
        if prior.get("source", {}).get("hash") != src.hash:
            raise UsageError(f"'{f16}' was not exported from '{src.path}'")
        report = prior.get("check") if check else None
    else:
        f16 = convert_model(model_dir, tmp / "f16.gguf", "f16")
        check_template(f16, model_dir)
        report = check_against_transformers(model_dir, f16, margin=margin, threads=threads) if check else None
    if type == "f16":
        return _Converted(f16, model_dir, report)
    produced = quantize(f16, tmp / f"{type}.gguf", type, threads)
    if report is not None:
        report["checked_file"] = "the f16 intermediate (quantization is the only further loss)"
    check_loads(produced, model_dir, template, threads=threads)
    return _Converted(produced, model_dir, report)


def _merged_model_dir(src: Source, tmp: Path) -> Path:
    """The model dir to convert: an adapter is merged into its base in the temporary folder."""
    if src.kind != "adapter":
        assert src.model_dir is not None
        return src.model_dir
    from ragtune.train.merge import merge_adapter

    merged = merge_adapter(src.path, tmp / "merged", force=True)
    _drop_temp_export(src.path, merged)
    return merged


def _require_passed(report: dict[str, Any] | None, src: Source, out: Path, type: str) -> None:
    from ragtune.export.parity import describe_check

    if report is not None and not report["ok"]:
        raise CheckFailed(
            f"the llama.cpp export of '{src.path}' does not answer like transformers; nothing was written to "
            f"'{out}'.\n{describe_check(report)}\nPass --no-check to write it anyway."
        )


def _write_modelfile(out: Path, conv: _Converted, template: str | None, modelfile: Path | None,
                     lora: bool, force: bool) -> tuple[Path, bool]:
    from ragtune.export.ollama import write_modelfile
    from ragtune.export.parity import chat_renderer

    chat = chat_renderer(conv.tok_dir, template)
    from_file = conv.base_file if lora and conv.base_file is not None else out
    return write_modelfile(out, chat, chat.special_tokens, chat.eos, modelfile, from_file, out if lora else None,
                           force)


def _entry(out: Path, src: Source, type: str, lora: bool, conv: _Converted, mf: Path,
           verified: bool) -> dict[str, Any]:
    """The export's record: in the export card (with the full check) and the adapter's run card."""
    from ragtune.export.header import gguf_metadata
    from ragtune.export.parity import short_check
    from ragtune.export.pin import converter_record
    from ragtune.modeling import file_sha256, text_sha256

    tpl_in = gguf_metadata(out, ["tokenizer.chat_template"]).get("tokenizer.chat_template")
    entry: dict[str, Any] = {
        "kind": "gguf-lora" if lora else "gguf",
        "path": str(out),
        "type": type,
        "sha256": file_sha256(out),
        "size_bytes": out.stat().st_size,
        "source": {"kind": src.kind, "path": str(src.path), "hash": src.hash},
        "converter": converter_record(),
        "chat_template_hash": text_sha256(tpl_in) if isinstance(tpl_in, str) else None,
        "modelfile": str(mf),
        "modelfile_template_verified": verified,
        "check": short_check(conv.check),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if lora and conv.base_file is not None:
        entry["base_gguf"] = str(conv.base_file)
    return entry


def _record(src: Source, entry: dict[str, Any]) -> None:
    """Add the export to the adapter's run card (for a merged model: its adapter's, when still there)."""
    from ragtune.runcard import RUNCARD_NAME, read_runcard, update_runcard

    adapter = src.path if src.kind == "adapter" else None
    if adapter is None:
        info = src.path / "ragtune-model.json"
        if info.is_file():
            try:
                merged_from = json.loads(info.read_text()).get("merged_from", {})
                a = merged_from.get("adapter") if isinstance(merged_from, dict) else None
            except (ValueError, AttributeError):  # not JSON, or not an object: the export just goes unrecorded
                a = None
            if isinstance(a, str) and a and (Path(a) / RUNCARD_NAME).is_file():
                adapter = Path(a)
    if adapter is None:
        return
    card = read_runcard(adapter)
    exports = card.get("exports") or []
    exports = list(exports.values()) if isinstance(exports, dict) else list(exports)
    exports.append(entry)
    update_runcard(adapter, exports=exports)


def _drop_temp_export(adapter: Path, merged: Path) -> None:
    """merge_adapter records its output in the run card; a temp merge is gone after export: unrecord it."""
    from ragtune.runcard import read_runcard, update_runcard

    card = read_runcard(adapter)
    exports = [e for e in (card.get("exports") or []) if not (isinstance(e, dict) and e.get("path") == str(merged))]
    update_runcard(adapter, exports=exports)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
