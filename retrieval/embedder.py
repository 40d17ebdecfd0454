"""Dense embeddings from a local sentence-transformers model directory (safetensors only).

    emb = Embedder(cfg.embedder); emb.load()
    vecs = emb.embed(["text", ...])      # float32 (n, dim), L2-normalised: dot = cosine

The embedder's identity is a content hash (weights, tokenizer, config, pooling), recorded by the
index that it builds; a query through a different embedder is refused.

On the CPU, `load()` takes the embedder's verified ONNX export when one is cached
(retrieval/onnx_encoder.py: onnxruntime + `tokenizers`, no torch), and sentence-transformers only
when something needs it: the HF `tokenizer` (chunking, token counts) or no usable export (one log
line says why). `emb.ensure_export()` writes the export from the loaded sentence-transformers model.
While sentence-transformers is loaded, `embed()` uses it; `embed_documents()` (indexing) runs it under
bf16 autocast on CPUs with native bf16 when the vectors keep cosine >= 0.9999 with fp32
(`embedder.mixed_precision`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from ragtune.config import EmbedderConfig
from ragtune.errors import ModelPathError

log = logging.getLogger(__name__)

ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def embedder_hash(path: Path) -> str:
    """model_hash of the transformer plus the sentence-transformers module configs (pooling...)."""
    from ragtune.modeling import model_hash

    h = hashlib.sha256(model_hash(path).encode())
    for f in sorted([*(path / n for n in ST_FILES), *path.glob("*_*/config.json")]):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


class Embedder:
    def __init__(self, cfg: EmbedderConfig | None = None) -> None:
        self.cfg = cfg or EmbedderConfig()
        self.model: Any = None
        self.onnx: Any = None  # OnnxEncoder when the verified export is in use
        self.onnx_why = ""  # why it is not (when it is not)
        self._export_again = False
        self.path: Path | None = None
        self.hash = ""
        self.dim = 0
        self.max_tokens = 0  # content tokens per text (model limit minus special tokens)
        self._doc_precision = ""  # "bf16" | "fp32" for documents, once decided (doc_precision)
        self.bf16_min_cosine: float | None = None

    def resolve(self) -> Path:
        from ragtune.models import resolve_embedder_path

        p = resolve_embedder_path(self.cfg.path)
        if not any(p.rglob("*.safetensors")):
            pickles = [x.name for x in p.rglob("*.bin")] + [x.name for x in p.rglob("*.pt")]
            found = f" (found only pickle files {', '.join(pickles[:3])}, which ragtune never loads)" if pickles else ""
            raise ModelPathError(f"embedder.path '{p}' has no safetensors weights{found}; convert them to safetensors")
        return p

    def identity(self) -> dict[str, Any]:
        """Path and hash without loading the model (cheap: hashes are cached by mtime)."""
        p = self.path or self.resolve()
        return {"path": str(p), "hash": self.hash or embedder_hash(p)}

    def load(self) -> "Embedder":
        if self.model is not None or self.onnx is not None:
            return self
        self.path = self.resolve()
        self.hash = embedder_hash(self.path)
        if self._load_onnx():
            return self
        return self._load_st()

    def _load_onnx(self) -> bool:
        from ragtune.retrieval import onnx_encoder

        if not onnx_encoder.enabled() or self.cfg.device in ("cuda", "mps"):
            return False
        enc, why, self._export_again = onnx_encoder.load_cached(self.hash)
        if enc is None:
            self.onnx_why = why
            log.info("query encoder: %s; using sentence-transformers", why)
            return False
        self.onnx = enc
        self.dim, self.max_tokens = enc.dim, enc.max_tokens
        log.debug("embedder %s: ONNX export %s, dim %d", self.path, enc.folder, self.dim)
        return True

    def ensure_export(self) -> bool:
        """Export to ONNX (and check it) when no usable export is cached and sentence-transformers is
        loaded; True when an export was written. A failed export is recorded and not retried."""
        from ragtune.retrieval import onnx_encoder

        if self.model is None or self.onnx is not None or not onnx_encoder.enabled():
            return False
        if not self._export_again:
            enc, _why, self._export_again = onnx_encoder.load_cached(self.hash)
            if enc is not None or not self._export_again:
                return False
        self._export_again = False
        enc, manifest = onnx_encoder.export(self.model, self.hash, self.max_tokens)
        return enc is not None

    def _load_st(self) -> "Embedder":
        from ragtune.modeling import pick_device

        if self.path is None:
            self.path = self.resolve()
            self.hash = embedder_hash(self.path)
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars on every load

        device = pick_device(self.cfg.device)
        try:
            self.model = SentenceTransformer(
                str(self.path), device=device, local_files_only=True, trust_remote_code=False,
                model_kwargs={"use_safetensors": True},
            )
        except (OSError, ValueError) as exc:
            raise ModelPathError(
                f"embedder.path '{self.path}' could not be loaded as a sentence-transformers model: {exc}"
            ) from exc
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        limit = int(self.model.max_seq_length or 512)
        specials = len(self.tokenizer("", add_special_tokens=True)["input_ids"])
        self.max_tokens = max(8, limit - specials)
        log.debug("embedder %s: dim %d, %d content tokens, device %s", self.path, self.dim, self.max_tokens, device)
        return self

    @property
    def tokenizer(self) -> Any:
        if self.model is None:
            self._load_st()
        return self.model.tokenizer

    def embed(self, texts: list[str], batch_size: int | None = None) -> Any:
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.model is None and self.onnx is not None:
            return self.onnx.encode(texts, batch_size=batch_size or self.cfg.batch_size)
        if self.model is None:
            self.load()
        vecs = self.model.encode(
            texts, batch_size=batch_size or self.cfg.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.asarray(vecs, dtype=np.float32)

    def embed_query(self, text: str) -> Any:
        return self.embed([text])[0]

    def embed_documents(self, texts: list[str], batch_size: int | None = None) -> Any:
        """`embed` for indexing: under bf16 autocast where `embedder.mixed_precision` allows it (see
        `doc_precision`), 1.6x the chunks/s of fp32 on an avx512_bf16 CPU; queries stay fp32."""
        if not texts or self.model is None or self.doc_precision() != "bf16":
            return self.embed(texts, batch_size)
        import torch

        with torch.autocast(self.model.device.type, dtype=torch.bfloat16):
            return self.embed(texts, batch_size)

    def doc_precision(self) -> str:
        """"bf16" or "fp32" for documents, decided once: mixed_precision "no" is fp32, "bf16" is bf16;
        "auto" is bf16 on a CPU with native bf16 when every PARITY_TEXTS vector keeps cosine >= MIN_COSINE
        with fp32, else fp32 (one log line says why)."""
        if self._doc_precision:
            return self._doc_precision
        mode = getattr(self.cfg, "mixed_precision", "auto")
        if self.model is None or mode == "no":
            self._doc_precision = "fp32"
        elif mode == "bf16":
            self._doc_precision = "bf16"
        elif self.model.device.type != "cpu" or not _cpu_has_native_bf16():
            self._doc_precision = "fp32"
        else:
            import numpy as np
            import torch

            from ragtune.retrieval.onnx_encoder import MIN_COSINE, PARITY_TEXTS

            ref = self.embed(list(PARITY_TEXTS))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = self.embed(list(PARITY_TEXTS))
            worst = float(np.min(np.sum(ref * got, axis=1)))
            self._doc_precision = "bf16" if worst >= MIN_COSINE else "fp32"
            self.bf16_min_cosine = worst
            if self._doc_precision == "fp32":
                log.info("embedder: bf16 vectors differ from fp32 (min cosine %.6f < %s); documents are embedded "
                         "in fp32", worst, MIN_COSINE)
        return self._doc_precision


def _cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX (torch's own probes); emulated bf16 is slower than fp32."""
    import torch

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except Exception:  # a private torch probe: its absence or failure means "no"
            continue
    return False
