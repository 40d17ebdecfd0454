"""`ragtune search --explain`: each hit's dense and lexical rank/score and fused score, through the CLI
on a real index (the bundled MiniLM, so the dense ranking means something)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ragtune.cli import main
from ragtune.retrieval.fusion import fuse
from tests.retrieval.conftest import write_docs


@pytest.fixture(scope="module")
def indexed(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A RAGTUNE_HOME whose default index holds the `docs` folder, embedded by MiniLM once for the module
    (the tests only search it), and the settings that search it."""
    tmp = tmp_path_factory.mktemp("explain")
    a = [f"embedder.path={minilm_dir}", "embedder.device=cpu"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGTUNE_HOME", str(tmp / "home"))
        assert main(["-q", "index", "add", str(write_docs(tmp / "docs")), "--no-progress", *a]) == 0
    return tmp / "home", a


@pytest.fixture
def args(indexed: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv("RAGTUNE_HOME", str(indexed[0]))
    return indexed[1]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_explain_json_and_plain_agree_with_the_fusion(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    query = "how long must passwords be"
    rc, out, err = _run(capsys, "search", query, "--explain", "--json", "--top-k", "4", *args)
    assert rc == 0, err
    hits = json.loads(out)
    top = hits[0]
    assert top["heading"] == "Security > Passwords"
    ex = top["explain"]
    assert ex["mode"] == "hybrid" and ex["fusion"] == {"method": "dbsf", "weights": [3.0, 1.0]}
    assert ex["dense"] == {"rank": 1, "score": top["dense_score"]} and 0 < ex["dense"]["score"] <= 1
    assert ex["lexical"]["rank"] == 1 and ex["lexical"]["score"] == top["sparse_score"] > 0
    assert ex["fused"] == top["score"] == top["fused_score"]
    # the fused scores are what the fusion makes of the two channels' rankings shown, in that order
    assert [h["explain"]["fused"] for h in hits] == sorted((h["explain"]["fused"] for h in hits), reverse=True)
    for channel in ("dense", "lexical"):  # each channel's ranks follow its own scores
        ranked = sorted((h["explain"][channel] for h in hits if h["explain"][channel]["rank"]), key=lambda c: c["rank"])
        assert len({c["rank"] for c in ranked}) == len(ranked)
        assert [c["score"] for c in ranked] == sorted((c["score"] for c in ranked), reverse=True)
    # DBSF maps each channel's scores into [0, 1]: a hit one channel missed gets that channel's weight at most
    for h in hits:
        ex = h["explain"]
        assert ex["fused"] <= (3.0 if ex["dense"]["rank"] else 0) + (1.0 if ex["lexical"]["rank"] else 0)

    rc, out, err = _run(capsys, "search", query, "--explain", "--top-k", "4", *args)
    assert rc == 0, err
    why = [line.strip() for line in out.splitlines() if line.strip().startswith("why:")]
    assert len(why) == len(hits)
    m = re.fullmatch(r"why: dense #(\d+) \(cos ([\d.]+)\); lexical #(\d+) \(bm25 ([\d.]+)\) -> fused ([\d.]+) "
                     r"\(dbsf, dense:lexical weights 3:1\)", why[0])
    assert m, why[0]
    assert (int(m[1]), int(m[3])) == (1, 1)
    assert float(m[2]) == pytest.approx(top["dense_score"], abs=1e-4)
    assert float(m[4]) == pytest.approx(top["sparse_score"], abs=1e-4)
    assert float(m[5]) == pytest.approx(top["score"], abs=1e-4)
    for line, h in zip(why, hits):
        if h["explain"]["lexical"]["rank"] is None:
            assert "lexical: not in its top 50" in line


def test_explain_rrf_recomputes_from_the_ranks(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "search", "remote work days per week", "--explain", "--json", "--top-k", "3",
                        "search.fusion=rrf", *args)
    assert rc == 0, err
    for h in json.loads(out):
        ex = h["explain"]
        assert ex["fusion"] == {"method": "rrf", "weights": [3.0, 1.0], "k": 60}
        want = sum(w / (60 + c["rank"]) for w, c in ((3.0, ex["dense"]), (1.0, ex["lexical"])) if c["rank"])
        assert ex["fused"] == pytest.approx(want)
    assert fuse([("a", 0.9)], [("a", 2.0)], method="rrf", weights=(3, 1))[0][1]["fused"] == pytest.approx(4 / 61)


def test_explain_single_channel_modes_and_batch(args: list[str], docs: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "search", "passwords", "--mode", "dense", "--explain", "--json", "--top-k", "2", *args)
    hits = json.loads(out)
    assert [h["explain"]["dense"]["rank"] for h in hits] == [1, 2]
    assert all(h["explain"]["lexical"] is None and h["explain"]["fused"] is None for h in hits)
    rc, out, _ = _run(capsys, "search", "passwords", "--mode", "dense", "--explain", "--top-k", "1", *args)
    assert "lexical: not searched (mode dense)" in out
    rc, out, _ = _run(capsys, "search", "passwords", "--mode", "sparse", "--explain", "--json", *args)
    h = json.loads(out)[0]
    assert h["explain"]["lexical"]["rank"] == 1 and h["explain"]["dense"]["rank"] is None
    assert h["explain"]["dense"]["score"] == h["dense_score"] is not None  # the cosine abstention uses
    rc, out, _ = _run(capsys, "search", "the", "--explain", "--top-k", "1", *args)  # stop-words only: dense
    assert rc == 0 and "stop-words only" in out
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query": "passwords", "mode": "sparse"}\n{"query": "annual leave"}\n', encoding="utf-8")
    rc, out, _ = _run(capsys, "search", "--queries", str(queries), "--explain", *args)
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and rows[0]["hits"][0]["explain"]["mode"] == "sparse"
    assert rows[1]["hits"][0]["explain"]["mode"] == "hybrid"
    # without --explain nothing is added
    rc, out, _ = _run(capsys, "search", "passwords", "--json", *args)
    assert "explain" not in json.loads(out)[0]


def test_explain_through_a_server_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "search", "passwords", "--explain", "--server", "http://127.0.0.1:9")
    assert rc == 2 and out == ""
    assert "--explain needs the index in this process" in err and "drop --server" in err
