"""LlamaCppEngine: streaming, cancel, sampling seeds, prefix reuse and adapter switching."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from ragtune.errors import UsageError
from tests.export.conftest import NEEDS_LLAMA_CPP

pytestmark = NEEDS_LLAMA_CPP
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def engine(tiny_f16: dict[str, Any]) -> Any:
    from ragtune.serve.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(tiny_f16["path"], n_threads=1, n_ctx=256).load()
    yield eng
    eng.close()


def test_stream_deltas_concatenate_to_the_text(engine: Any) -> None:
    deltas: list[str] = []
    ids: list[int] = []
    out = engine.generate(PROMPT, max_new_tokens=20, on_token=deltas.append, on_token_id=ids.append, stop_ids=[-1])
    assert out["completion_tokens"] == 20 == len(out["ids"]) and out["finish_reason"] == "length"
    assert ids == out["ids"]
    assert "".join(deltas) == out["text"] == engine.detokenize(out["ids"])
    assert out["ttft_s"] > 0 and out["decode_s"] > 0 and out["decode_tokens_per_s"] > 0


def test_prefix_reuse_gives_the_same_ids(engine: Any) -> None:
    first = engine.generate(PROMPT, max_new_tokens=10, reuse_prefix=False)["ids"]
    again = engine.generate(PROMPT, max_new_tokens=10)["ids"]  # whole prompt cached but the last token
    longer = PROMPT.replace("France", "Spain")
    other = engine.generate(longer, max_new_tokens=10)["ids"]  # shares a prefix with the cached one
    fresh = engine.generate(longer, max_new_tokens=10, reuse_prefix=False)["ids"]
    assert first == again and other == fresh


def test_cancel_stops_generation(engine: Any) -> None:
    cancel = threading.Event()
    seen: list[int] = []

    def on_id(t: int) -> None:
        seen.append(t)
        if len(seen) == 3:
            cancel.set()

    out = engine.generate(PROMPT, max_new_tokens=50, on_token_id=on_id, cancel=cancel, stop_ids=[-1])
    assert out["finish_reason"] == "cancelled" and out["completion_tokens"] == 3


def test_sampling_is_reproducible_with_a_seed(engine: Any) -> None:
    a = engine.generate(PROMPT, max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7, stop_ids=[-1])["ids"]
    b = engine.generate(PROMPT, max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7, stop_ids=[-1])["ids"]
    c = engine.generate(PROMPT, max_new_tokens=12, temperature=1.5, top_p=0.95, seed=8, stop_ids=[-1])["ids"]
    greedy = engine.generate(PROMPT, max_new_tokens=12, stop_ids=[-1])["ids"]
    assert a == b
    assert a != c or a != greedy


def test_stops_at_the_stop_token(engine: Any) -> None:
    free = engine.generate(PROMPT, max_new_tokens=8, stop_ids=[-1])["ids"]
    out = engine.generate(PROMPT, max_new_tokens=8, stop_ids=[free[2]])
    assert out["ids"] == free[:3] and out["finish_reason"] == "stop"


def test_errors_name_the_fix(engine: Any, tmp_path: Path) -> None:
    from ragtune.serve.llamacpp import LlamaCppEngine

    with pytest.raises(UsageError, match="not loaded in the llama.cpp engine"):
        engine.generate(PROMPT, max_new_tokens=2, adapter="nope")
    with pytest.raises(UsageError, match="ragtune export gguf"):
        LlamaCppEngine(tmp_path / "missing.gguf").load()
    with pytest.raises(UsageError, match="context is 256"):
        engine.generate(prompt_ids=[1] * 300, max_new_tokens=2)


def test_ensure_gguf_exports_once_and_serves_adapters(tiny_smol: Path, tiny_adapter: Path, llama_home: Path) -> None:
    """The engine's cache: base and adapter GGUFs made once under $RAGTUNE_HOME/gguf/<hash>/, then reused."""
    from ragtune.modeling import model_hash
    from ragtune.serve.llamacpp import LlamaCppEngine, ensure_gguf

    lora = ensure_gguf(tiny_smol, adapter_dir=tiny_adapter)
    base = ensure_gguf(tiny_smol)
    assert base.parent == llama_home / "gguf" / model_hash(tiny_smol)[:32] and base.name == "model-f16.gguf"
    assert lora.name == "lora-f16.gguf" and lora.parent != base.parent
    stamps = (base.stat().st_mtime_ns, lora.stat().st_mtime_ns)
    assert (ensure_gguf(tiny_smol), ensure_gguf(tiny_smol, adapter_dir=tiny_adapter)) == (base, lora)
    assert (base.stat().st_mtime_ns, lora.stat().st_mtime_ns) == stamps  # not exported again
    import json

    assert json.loads((base.parent / "model-f16.gguf.json").read_text())["check"]["ok"] is True
    assert json.loads((tiny_adapter / "ragtune.json").read_text())["exports"] == []  # cache entries are not exports
    eng = LlamaCppEngine(base, lora={"ft": lora}, n_threads=1).load()
    with_ft = eng.generate(PROMPT, max_new_tokens=8, adapter="ft", stop_ids=[-1])["ids"]
    without = eng.generate(PROMPT, max_new_tokens=8, stop_ids=[-1])["ids"]
    assert with_ft != without
    assert eng.generate(PROMPT, max_new_tokens=8, adapter="ft", stop_ids=[-1])["ids"] == with_ft
    eng.close()
    with pytest.raises(UsageError, match="not one of"):
        ensure_gguf(tiny_smol, type="q2")
