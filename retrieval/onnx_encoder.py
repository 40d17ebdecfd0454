"""The embedder exported to ONNX, so a query is encoded with onnxruntime + `tokenizers` (no torch).

    enc, why, retry = load_cached(embedder_hash)  # None, the reason, export again? when missing/corrupt/failed
    vecs = enc.encode(["text", ...])             # float32 (n, dim), L2-normalised, like Embedder.embed
    export(st_model, embedder_hash)              # once, from a loaded SentenceTransformer (needs torch)

The export is the transformer + the model's own pooling (mean, cls or max, from its Pooling
module) + L2 normalisation in one graph, with the tokenizer.json beside it, in
$RAGTUNE_HOME/embedders/<embedder hash>/ (written atomically). Before it is used it must agree
with sentence-transformers on PARITY_TEXTS (English, Korean, mixed, long, short): every cosine
>= MIN_COSINE and the same token ids; encoder.json records those figures (or why the export
failed, so it is not retried on every search). load_cached re-encodes a probe text and compares
it with the vector recorded at export time, so a corrupt model.onnx is refused, not trusted.
RAGTUNE_ONNX=0 in the environment turns the exported encoder off (today's path everywhere).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MIN_COSINE = 0.9999
POOLING_MODES = ("mean", "cls", "max")
PARITY_TEXTS = (
    "how many days per week can I work remotely?",
    "Passwords must be at least fourteen characters long and rotated yearly.",
    "서울은 한국의 수도입니다.",
    "직원은 주 3일까지 재택근무를 할 수 있습니다.",
    "연차 휴가는 며칠인가요? annual leave policy 2024",
    "x",
    "What is the expense policy for travel, meals, hotels and per diem allowances when visiting "
    "customers abroad, and who approves reports above the limit? " * 12,
)
PROBE = PARITY_TEXTS[0]


def enabled() -> bool:
    return os.environ.get("RAGTUNE_ONNX", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir(embedder_hash: str) -> Path:
    from ragtune.modeling import ragtune_home

    return ragtune_home() / "embedders" / embedder_hash


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _threads() -> int:
    """OMP_NUM_THREADS when set (tests, benchmarks sharing a machine), else onnxruntime's default."""
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


class OnnxEncoder:
    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder = folder
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self.max_tokens = int(manifest["max_tokens"])
        self.inputs = list(manifest["inputs"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = _threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(manifest["max_seq_length"]))

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def encode(self, texts: list[str], batch_size: int = 64) -> Any:
        import numpy as np

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # sorted by length so a batch pads little; results go back in input order
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            encs = self.tokenizer.encode_batch([texts[i] for i in idx])
            width = max(len(e.ids) for e in encs)
            ids = np.full((len(encs), width), int(self.manifest["pad_id"]), dtype=np.int64)
            mask = np.zeros((len(encs), width), dtype=np.int64)
            types = np.zeros((len(encs), width), dtype=np.int64)
            for row, e in enumerate(encs):
                n = len(e.ids)
                ids[row, :n] = e.ids
                mask[row, :n] = 1
                types[row, :n] = e.type_ids
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            (vecs,) = self.session.run(["embedding"], {k: feed[k] for k in self.inputs})
            out[idx] = vecs
        return out


def load_cached(embedder_hash: str) -> tuple[OnnxEncoder | None, str, bool]:
    """(the verified export for this embedder, "", False) or (None, a one-line reason, whether to
    export again: True when missing or corrupt, False when the export or its check failed)."""
    import json

    import numpy as np

    folder = cache_dir(embedder_hash)
    manifest_path = folder / "encoder.json"
    if not manifest_path.is_file():
        return None, f"no exported query encoder in {folder} yet", True
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION or manifest.get("embedder_hash") != embedder_hash:
            return None, f"the exported query encoder in {folder} is of another format or embedder", True
        if not manifest.get("passed"):
            return None, f"the exported query encoder in {folder} failed its check ({manifest.get('reason')})", False
        model = folder / "model.onnx"
        if not model.is_file() or model.stat().st_size != int(manifest["onnx_bytes"]):
            return None, f"the exported query encoder {model} is missing or truncated", True
        enc = OnnxEncoder(folder, manifest)
        probe = enc.encode([PROBE])[0]
        cos = float(np.dot(probe, np.asarray(manifest["probe"], dtype=np.float32)))
        if not cos >= MIN_COSINE:
            return None, f"the exported query encoder {model} gives other vectors than at export (cosine {cos:.6f})", True
        return enc, "", False
    except Exception as exc:  # corrupt file, unreadable JSON, onnxruntime refusing the graph
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return None, f"the exported query encoder in {folder} could not be loaded ({first})", True


def _pooling(st_model: Any) -> tuple[Any, str]:
    """The transformer module and the pooling mode, or ValueError for a pipeline we do not export."""
    mods = list(st_model)
    names = [type(m).__name__ for m in mods]
    if len(mods) < 2 or names[0] != "Transformer" or names[1] != "Pooling" or any(
            n != "Normalize" for n in names[2:]):
        raise ValueError(f"modules {names} are not Transformer + Pooling [+ Normalize]")
    mode = str(getattr(mods[1], "pooling_mode", ""))
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode '{mode}' is not one of {', '.join(POOLING_MODES)}")
    model = getattr(mods[0], "auto_model", None) or getattr(mods[0], "model", None)
    if model is None:
        raise ValueError("the Transformer module has no model to export")
    return model, mode


def _export_graph(model: Any, mode: str, inputs: list[str], path: Path) -> None:
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> Any:
            kw = dict(zip(inputs, args))
            tok = self.model(**kw).last_hidden_state
            mask = kw["attention_mask"].unsqueeze(-1).to(tok.dtype)
            if mode == "mean":
                pooled = (tok * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            elif mode == "cls":
                pooled = tok[:, 0]
            else:
                pooled = (tok + (mask - 1.0) * 1e9).max(1).values
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    dummy = tuple(torch.ones((2, 8), dtype=torch.long) for _ in inputs)
    axes = {n: {0: "batch", 1: "seq"} for n in inputs}
    axes["embedding"] = {0: "batch"}
    was_training = model.training
    model.eval()
    import warnings

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Encoder(), dummy, str(path), input_names=inputs, output_names=["embedding"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
    finally:
        model.train(was_training)


def export(st_model: Any, embedder_hash: str, max_tokens: int) -> tuple[OnnxEncoder | None, dict[str, Any]]:
    """Export, check against `st_model` on PARITY_TEXTS, write the cache folder; (encoder or None, manifest).

    A failed export or check is recorded too (passed: false, reason), so searches do not retry it."""
    import numpy as np

    from ragtune.io import atomic_dir, atomic_write_json

    folder = cache_dir(embedder_hash)
    t0 = time.monotonic()
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "embedder_hash": embedder_hash, "passed": False,
                                "min_cosine_required": MIN_COSINE, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                            time.gmtime())}
    try:
        model, mode = _pooling(st_model)
        hf_tok = st_model.tokenizer
        backend = getattr(hf_tok, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("the tokenizer has no `tokenizers` backend (tokenizer.json)")
        names = list(getattr(hf_tok, "model_input_names", ["input_ids", "attention_mask"]))
        inputs = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in names]
        if inputs[:2] != ["input_ids", "attention_mask"]:
            raise ValueError(f"tokenizer inputs {names} lack input_ids/attention_mask")
        import onnxruntime

        with atomic_dir(folder) as tmp:
            _export_graph(model, mode, inputs, tmp / "model.onnx")
            backend.save(str(tmp / "tokenizer.json"))
            pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else 0
            manifest.update({
                "dim": int(st_model.get_embedding_dimension() if hasattr(st_model, "get_embedding_dimension")
                           else st_model.get_sentence_embedding_dimension()),
                "max_seq_length": int(st_model.max_seq_length or 512), "max_tokens": int(max_tokens),
                "pooling": mode, "inputs": inputs, "pad_id": int(pad_id),
                "onnx_bytes": (tmp / "model.onnx").stat().st_size, "onnx_sha256": _sha256(tmp / "model.onnx"),
                "onnxruntime": onnxruntime.__version__,
            })
            enc = OnnxEncoder(tmp, manifest)
            texts = list(PARITY_TEXTS)
            ref = np.asarray(st_model.encode(texts, normalize_embeddings=True, convert_to_numpy=True,
                                             show_progress_bar=False), dtype=np.float32)
            got = enc.encode(texts)
            cos = [float(np.dot(a, b)) for a, b in zip(ref, got)]
            ref_ids = hf_tok(texts, truncation=True, max_length=manifest["max_seq_length"])["input_ids"]
            same_ids = [list(a) == list(b) for a, b in zip(ref_ids, enc.token_ids(texts))]
            manifest["parity"] = {"texts": len(texts), "korean_texts": 3, "min_cosine": min(cos),
                                  "mean_cosine": sum(cos) / len(cos), "same_token_ids": all(same_ids)}
            manifest["probe"] = [float(x) for x in got[0]]
            if not all(same_ids):
                manifest["reason"] = f"token ids differ from the model's tokenizer on {same_ids.count(False)} texts"
            elif not min(cos) >= MIN_COSINE:
                manifest["reason"] = f"min cosine {min(cos):.6f} < {MIN_COSINE}"
            else:
                manifest["passed"] = True
            manifest["export_seconds"] = round(time.monotonic() - t0, 2)
            atomic_write_json(tmp / "encoder.json", manifest)
    except Exception as exc:  # record why, so every later search does not pay a failing export again
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        manifest["reason"] = f"export failed: {first}"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "encoder.json", manifest)
        log.info("query encoder: could not export embedder %s to ONNX (%s); search keeps sentence-transformers",
                 embedder_hash[:12], manifest["reason"])
        return None, manifest
    if not manifest["passed"]:
        log.info("query encoder: the ONNX export of embedder %s failed its check (%s); search keeps "
                 "sentence-transformers", embedder_hash[:12], manifest["reason"])
        return None, manifest
    log.info("query encoder: exported embedder %s to %s (min cosine %.6f over %d texts)", embedder_hash[:12],
             folder, manifest["parity"]["min_cosine"], manifest["parity"]["texts"])
    return OnnxEncoder(folder, manifest), manifest
