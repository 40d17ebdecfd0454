"""Optional cross-encoder reranking from a local model directory (none ships by default).

    rr = Reranker("/models/bge-reranker-base").load()
    scores = rr.score("query", ["passage 1", "passage 2"])

Set `search.rerank_model` to the directory; the top `search.rerank_candidates` hits are rescored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ragtune.errors import ModelPathError


class Reranker:
    def __init__(self, path: str, device: str = "auto") -> None:
        self.path = Path(path).expanduser()
        self.device = device
        self.model: Any = None

    def load(self) -> "Reranker":
        from ragtune.modeling import pick_device

        p = self.path
        if not (p / "config.json").is_file():
            raise ModelPathError(
                f"search.rerank_model '{p}' is not a model directory (no config.json); point it at a local "
                "cross-encoder (sentence-transformers CrossEncoder) or leave it empty for no reranking"
            )
        if not any(p.glob("*.safetensors")):
            raise ModelPathError(f"search.rerank_model '{p}' has no safetensors weights; convert them to safetensors")
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(str(p), device=pick_device(self.device), local_files_only=True,
                                  trust_remote_code=False, model_kwargs={"use_safetensors": True})
        return self

    def score(self, query: str, passages: list[str]) -> list[float]:
        if not passages:
            return []
        out = self.model.predict([(query, t) for t in passages], show_progress_bar=False)
        return [float(x) for x in out]
