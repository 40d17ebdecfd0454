"""ragtune.korean: one Hangul rule and one Kiwi analyzer for the lexical index and the eval metrics."""

from __future__ import annotations

import threading
import time

import pytest

from ragtune import korean


@pytest.mark.parametrize("ch", ["\u1100", "\u11ff", "\u3131", "\u318e", "\ua960", "\ua97c", "\uac00", "\ud7a3",
                                "\ud7b0", "\ud7fb"])
def test_every_hangul_block_counts(ch: str) -> None:
    assert korean.has_hangul(f"x{ch}y")


@pytest.mark.parametrize("text", ["plain English", "中文", "ひらがな", "ｶﾀｶﾅ", "", "\ud7a4"])
def test_other_scripts_do_not(text: str) -> None:
    assert not korean.has_hangul(text)


def test_search_and_scoring_share_one_analyzer_loaded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lexical index and the metrics each built their own Kiwi (two loads, twice the memory), and
    the metrics' lru_cache built one per thread that asked first at the same time."""
    import kiwipiepy

    from ragtune.eval import metrics
    from ragtune.retrieval.sparse import Tokenizer

    built: list[int] = []
    real = kiwipiepy.Kiwi

    class CountingKiwi(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a: object, **kw: object) -> None:
            built.append(1)
            time.sleep(0.3)  # a real load takes seconds: let the other threads arrive meanwhile
            super().__init__(*a, **kw)

    monkeypatch.setattr(kiwipiepy, "Kiwi", CountingKiwi)
    monkeypatch.setattr(korean, "_kiwi", None)
    metrics._tokens_cached.cache_clear()
    lexical = Tokenizer()
    got: dict[str, list[str]] = {}

    def search_side(i: int) -> None:
        got[f"s{i}"] = lexical(f"서울은 수도이다 {i}")

    def scoring_side(i: int) -> None:
        got[f"m{i}"] = metrics.normalize_tokens(f"서울이 수도 {i}")

    threads = [threading.Thread(target=f, args=(i,)) for i in range(3) for f in (search_side, scoring_side)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1
    assert all("서울" in toks for toks in got.values()) and len(got) == 6
    metrics._tokens_cached.cache_clear()
