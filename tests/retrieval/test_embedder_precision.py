"""Documents under bf16 autocast (embedder.mixed_precision): parity with fp32, the off switch, and the
check that keeps fp32 when bf16 moves the vectors too far. Uses the real bundled MiniLM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ragtune.config import EmbedderConfig
from ragtune.modeling import cpu_has_native_bf16
from ragtune.retrieval.embedder import Embedder
from ragtune.retrieval.onnx_encoder import MIN_COSINE

TEXTS = [
    "Employees may work remotely up to three days per week after probation.",
    "직원은 주 3일까지 재택근무를 할 수 있습니다.",
    "def f(x):\n    return x ** 2  # squares its argument",
    "Expense reports are due within 14 days of the purchase; receipts over 25 EUR are required. " * 6,
]


def _loaded(path: Path, mode: str) -> Embedder:
    e = Embedder(EmbedderConfig(path=str(path), device="cpu", mixed_precision=mode))  # type: ignore[arg-type]
    e.load()
    e.tokenizer  # noqa: B018 - sentence-transformers, as indexing loads it (chunking needs the HF tokenizer)
    return e


def test_off_embeds_documents_exactly_as_queries(minilm_dir: Path) -> None:
    e = _loaded(minilm_dir, "no")
    assert e.doc_precision() == "fp32"
    np.testing.assert_array_equal(e.embed_documents(TEXTS), e.embed(TEXTS))


def test_bf16_documents_keep_cosine_parity_with_fp32(minilm_dir: Path) -> None:
    e = _loaded(minilm_dir, "bf16")
    assert e.doc_precision() == "bf16"
    ref, got = e.embed(TEXTS), e.embed_documents(TEXTS)
    assert not np.array_equal(ref, got)  # it did run in bf16
    cos = np.sum(ref * got, axis=1)
    assert cos.min() >= MIN_COSINE, cos
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_auto_uses_bf16_only_on_native_bf16_cpus_after_its_check(minilm_dir: Path) -> None:
    e = _loaded(minilm_dir, "auto")
    if cpu_has_native_bf16():
        assert e.doc_precision() == "bf16" and e.bf16_min_cosine is not None and e.bf16_min_cosine >= MIN_COSINE
    else:
        assert e.doc_precision() == "fp32" and e.bf16_min_cosine is None


def test_auto_keeps_fp32_when_bf16_fails_the_check(minilm_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    import ragtune.retrieval.embedder as embedder_mod
    import ragtune.retrieval.onnx_encoder as onnx_mod

    monkeypatch.setattr(embedder_mod, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(onnx_mod, "MIN_COSINE", 1.0000001)  # no bf16 vector can meet it
    e = _loaded(minilm_dir, "auto")
    with caplog.at_level("INFO", logger="ragtune.retrieval.embedder"):
        assert e.doc_precision() == "fp32"
    assert "documents are embedded in fp32" in caplog.text
    np.testing.assert_array_equal(e.embed_documents(TEXTS), e.embed(TEXTS))


@pytest.mark.parametrize("mode", ["bf16", "no"])
def test_index_add_stores_vectors_at_fp32_parity_and_says_which(minilm_dir: Path, tmp_path: Path, mode: str) -> None:
    from ragtune.config import load_config
    from ragtune.retrieval.ingest import ingest
    from ragtune.retrieval.store import open_for_reading
    from tests.retrieval.conftest import HR_MD, KOREAN_TXT

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "hr.md").write_text(HR_MD, encoding="utf-8")
    (docs / "seoul.txt").write_text(KOREAN_TXT, encoding="utf-8")
    cfg = load_config(None, [f"embedder.path={minilm_dir}", "embedder.device=cpu",
                             f"embedder.mixed_precision={mode}"])
    res = ingest(cfg, [str(docs)], index="p", progress=False)
    assert res.chunks_written and res.to_dict()["embed_precision"] == ("bf16" if mode == "bf16" else "fp32")
    with open_for_reading(cfg, "p") as st:
        rows = [(p["text"], np.asarray(v["dense"], dtype=np.float32))
                for _, p, v in st.scroll({"kind": "chunk"}, ["text"], with_vectors=True)]
    ref = _loaded(minilm_dir, "no").embed([t for t, _ in rows])
    cos = np.sum(ref * np.stack([v for _, v in rows]), axis=1)
    assert cos.min() >= (MIN_COSINE if mode == "bf16" else 0.999999), cos
