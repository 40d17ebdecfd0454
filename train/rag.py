"""Training prompts built the way serving builds them (retrieval-augmented fine-tuning, RAFT-style).

    ragtune train --config configs/demo.yaml data.rag.index=demo-policies data.rag.distractors=1
    ragtune data check train.jsonl --rag demo-policies        # gold found, in top k, lengths with sources

    from ragtune.train.rag import build_rag
    built = build_rag(cfg, records, tokenizer, template)      # records: ragtune.train.data.Record
    built.records, built.missing, built.block()               # rebuilt records, gold not found, run card block

For every record: the query is the last user turns before its final answer (what `retrieve` sends
when the conversation is served); the index is searched with the serving settings (search mode,
reranker); the prompt is `ragtune.chat.rag_messages(history, sources, rag.system_prompt)`, the
function `ask --index` uses, so the rendered training text starts with the served prompt byte for
byte. The answer stays the record's own (with `cite`, followed by [n], the gold source's number).

The gold source is the passage the answer is grounded in:
1. the record's optional `"sources": ["remote_work.md", ...]` names its documents: the retrieved
   chunk of those that best matches the answer (searched within them when retrieval missed them);
2. else the retrieved chunk that best matches the answer: the share of the answer's words (and
   Hangul syllable pairs) found in the chunk, every number of the answer among them, at least
   MATCH_MIN; ties go to the higher-ranked chunk;
3. else none: the record is counted and listed, and keeps the sources served for its question.
The prompt holds the gold source plus `distractors` other retrieved chunks, in retrieval order
(with every top_k chunk when distractors=-1: exactly what serving shows), or with `order: shuffled`
in an order drawn per record with train.seed, so the gold's position is no cue (RAFT's placement).
For a `withheld` share of the records (drawn with train.seed) the gold source, and any chunk
holding the answer, is left out. Their target is the record's answer (`withheld_answer: keep`: the model also learns to answer
when retrieval misses, RAFT's P < 1) or `rag.not_found_message` (`withheld_answer: not_found`: it
learns to say so when its sources do not hold the answer, as serving instructs it to). Failure mode:
a record whose answer is not in the documents at all (gold missing) teaches reciting from memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from ragtune.errors import UsageError

log = logging.getLogger(__name__)

MATCH_MIN = 0.6  # share of the answer's units a chunk must hold to be its gold source
POOL_EXTRA = 10  # chunks retrieved beyond the prompt's, where the gold and distractors are looked for
CACHE_VERSION = 1
RAG_PROMPTS = "rag_prompts.jsonl"  # the built prompts, beside the checkpoints and in the adapter folder
STOPWORDS = frozenset(
    "a an the and or of to in on at for by with from is are be can may must you your i my we our it this that "
    "as up per do does not no yes if".split())


@dataclass
class RagBuild:
    """Records rebuilt with retrieved sources, and what was found for each."""

    records: list[Any]  # ragtune.train.data.Record, messages rebuilt, enc unset
    settings: dict[str, Any]  # index, top_k, distractors, withheld, cite, prompt_format, ...
    index: dict[str, Any]  # name, identity, generation
    gold: dict[int, dict[str, Any]] = field(default_factory=dict)  # line -> {how, rank, n, source, withheld}
    missing: list[int] = field(default_factory=list)  # lines whose gold source was not found
    from_cache: bool = False
    key: str = ""  # cache key: records, settings and index identity

    @property
    def gold_in_top_k(self) -> int:
        k = self.settings["top_k"]
        return sum(1 for g in self.gold.values() if g.get("rank") is not None and g["rank"] <= k)

    def prompts_sha256(self) -> str:
        return hashlib.sha256(self._lines().encode("utf-8")).hexdigest()

    def block(self) -> dict[str, Any]:
        """The run card's `rag` block: how the prompts were built, from which index."""
        found = [g for g in self.gold.values() if g.get("how")]
        return {
            **self.settings,
            "index": self.index["name"], "index_identity": self.index["identity"],
            "index_generation": self.index["generation"],
            "records": len(self.records),
            "gold_found": len(found),
            "gold_given": sum(1 for g in found if g["how"] == "sources"),
            "gold_in_top_k": self.gold_in_top_k,
            "gold_missing_lines": list(self.missing),
            "withheld_records": sum(1 for g in self.gold.values() if g.get("withheld")),
            "prompts_file": RAG_PROMPTS,
            "prompts_sha256": self.prompts_sha256(),
        }

    def note(self) -> str:
        n = len(self.records)
        found = sum(1 for g in self.gold.values() if g.get("how"))
        text = (f"retrieval-built prompts from index '{self.index['name']}': gold source found for {found} of {n} "
                f"records, in the top {self.settings['top_k']} for {self.gold_in_top_k}")
        if self.missing:
            shown = ", ".join(map(str, self.missing[:10])) + (", ..." if len(self.missing) > 10 else "")
            text += (f"; not found for {len(self.missing)} (lines {shown}): their answers match no retrieved chunk; "
                     "give the record a \"sources\": [\"DOC\"] field, or check that the documents hold the answer")
        return text

    def _lines(self) -> str:
        return "".join(json.dumps({"line": r.line, "messages": r.messages, "gold": self.gold.get(r.line, {})},
                                  ensure_ascii=False, sort_keys=True) + "\n" for r in self.records)

    def write(self, path: str | Path) -> Path:
        """The prompts, one record per line after a header carrying the cache key (atomic)."""
        from ragtune.io import atomic_write_text

        head = json.dumps({"cache_version": CACHE_VERSION, "key": self.key, "settings": self.settings,
                           "index": self.index, "missing": self.missing}, ensure_ascii=False, sort_keys=True)
        return atomic_write_text(Path(path), head + "\n" + self._lines())


# --- settings and index identity --------------------------------------------------------------


def resolve_settings(cfg: Any) -> dict[str, Any]:
    """data.rag as built (top_k 0 -> rag.top_k, distractors -1 -> top_k - 1), checked; raises naming the key."""
    from ragtune.chat import RAG_PROMPT_FORMAT

    rc = cfg.data.rag
    top_k = rc.top_k or cfg.rag.top_k
    problems = []
    if top_k < 1:
        problems.append(f"data.rag.top_k={rc.top_k}: must be at least 1 (0 = rag.top_k, which is {cfg.rag.top_k})")
    if rc.distractors < -1:
        problems.append(f"data.rag.distractors={rc.distractors}: give a count of 0 or more, or -1 for top_k - 1")
    if not 0.0 <= rc.withheld < 1.0:
        problems.append(f"data.rag.withheld={rc.withheld}: a share from 0 (never) to below 1 (every record's gold "
                        "source withheld would teach the model to ignore its sources)")
    not_found = rc.withheld_answer == "not_found"
    if not_found and not cfg.rag.not_found_message.strip():
        problems.append("data.rag.withheld_answer=not_found trains on rag.not_found_message, which is empty: set it "
                        "(e.g. rag.not_found_message=\"I could not find this in the documents.\")")
    if problems:
        raise UsageError("the retrieval training settings are invalid:\n  " + "\n  ".join(problems))
    extra = {"withheld_answer": "not_found", "not_found_message": cfg.rag.not_found_message} if not_found else {}
    if rc.order != "retrieval":  # absent at the default, so runs and caches built before the setting still match
        extra["order"] = rc.order
    if cfg.rag.question_first:  # absent at the default, as order
        extra["question_first"] = True
    if not cfg.search.dedupe:  # absent at the default (runs from before it differ only over repeated texts)
        extra["dedupe"] = False
    return {
        "top_k": top_k,
        "distractors": rc.distractors if rc.distractors >= 0 else top_k - 1,
        "withheld": rc.withheld, **extra, "cite": rc.cite, "prompt_format": RAG_PROMPT_FORMAT,
        "system_prompt": cfg.rag.system_prompt, "search_mode": cfg.search.mode,
        "rerank_model": cfg.search.rerank_model, "seed": cfg.train.seed,
    }


def index_identity(store: Any, meta: dict[str, Any]) -> str:
    """What the index holds, by content: its documents (ids hash bytes + path), chunkers, chunk counts
    and embedder. A no-op re-sync keeps it; any changed document changes it."""
    docs = sorted((d, s.get("chunker", ""), s.get("sparse", ""), int(s.get("count", 0)))
                  for d, s in store.doc_states().items())
    emb = (meta.get("embedder") or {}).get("hash", "")
    raw = json.dumps({"docs": docs, "embedder": emb, "schema": meta.get("schema_version")}, sort_keys=True)
    return "sha256:" + hashlib.sha256(raw.encode("utf-8")).hexdigest()


def describe_index(cfg: Any, name: str) -> dict[str, Any]:
    """{name, identity, generation} of an existing index, read without loading the embedder."""
    from ragtune.retrieval.store import generation, open_for_reading

    store = open_for_reading(cfg, name)
    try:
        ident = index_identity(store, store.read_meta())
    finally:
        store.close()
    return {"name": name, "identity": ident, "generation": generation(name)}


def cache_key(settings: dict[str, Any], index: dict[str, Any], records: Sequence[Any]) -> str:
    raw = json.dumps({"v": CACHE_VERSION, "settings": settings, "index": index["identity"],
                      "records": [[r.line, r.raw] for r in records]}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def read_cache(path: Path, key: str, records: Sequence[Any], settings: dict[str, Any],
               index: dict[str, Any]) -> RagBuild | None:
    """The prompts cached with the run, when they were built from these records, settings and index."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])
        if head.get("key") != key or head.get("cache_version") != CACHE_VERSION:
            return None
        rows = [json.loads(x) for x in lines[1:] if x.strip()]
    except (OSError, ValueError, IndexError):
        return None
    by_line = {r.line: r for r in records}
    if [row["line"] for row in rows] != [r.line for r in records]:
        return None
    out = [replace(by_line[row["line"]], messages=row["messages"], enc=None) for row in rows]
    return RagBuild(out, settings, {**index, "generation": head["index"].get("generation", index["generation"])},
                    gold={row["line"]: row["gold"] for row in rows}, missing=list(head.get("missing", [])),
                    from_cache=True, key=key)


# --- the gold-finding rule --------------------------------------------------------------------


def _units(text: str) -> list[str]:
    """Words (lower-cased, stopwords out) and Hangul syllable pairs: what a match is counted in."""
    out: list[str] = []
    for w in re.findall(r"\w+", str(text).casefold()):
        hangul = re.findall(r"[\uac00-\ud7a3]+", w)
        if hangul:
            for h in hangul:
                out.extend(h[i:i + 2] for i in range(max(1, len(h) - 1)))
            rest = re.sub(r"[\uac00-\ud7a3]+", " ", w).split()
            out.extend(x for x in rest if x not in STOPWORDS)
        elif w not in STOPWORDS:
            out.append(w)
    return out


def match_score(answer: str, text: str) -> float:
    """Share of the answer's units found in `text`; 0 when a number of the answer is missing from it."""
    want = set(_units(answer))
    if not want:
        return 0.0
    have = set(_units(text))
    numbers = {u for u in want if any(c.isdigit() for c in u)}
    if not numbers <= have:
        return 0.0
    return len(want & have) / len(want)


def _doc_matches(hit_source: str, given: str) -> bool:
    h, g = str(hit_source).replace("\\", "/"), str(given).replace("\\", "/").lstrip("./")
    return h == g or h.endswith("/" + g)


def find_gold(answer: str, hits: Sequence[dict[str, Any]], given: Sequence[str] = ()) -> tuple[int | None, str]:
    """Index in `hits` of the answer's gold chunk and how it was found ("sources", "match"), else (None, why).

    With `given` documents only their chunks qualify, the best-matching first (rank breaks ties);
    without, a chunk must hold at least MATCH_MIN of the answer's units and all its numbers."""
    if given:
        cands = [i for i, h in enumerate(hits) if any(_doc_matches(h.get("source", ""), g) for g in given)]
        if not cands:
            return None, "its sources were not retrieved"
        best = max(cands, key=lambda i: (match_score(answer, hits[i].get("text", "")), -i))
        return best, "sources"
    scores = [match_score(answer, h.get("text", "")) for h in hits]
    if not scores or max(scores) < MATCH_MIN:
        return None, "no retrieved chunk holds the answer"
    best = max(range(len(hits)), key=lambda i: (scores[i], -i))
    return best, "match"


def cite(answer: str, n: int) -> str:
    """`answer` ending with [n], before its closing punctuation: 'Up to 3 days [1].'"""
    m = re.match(r"^(.*?)([.!?。]*)\s*$", answer, flags=re.S)
    body, end = (m.group(1), m.group(2)) if m else (answer, "")
    return f"{body.rstrip()} [{n}]{end}"


def record_sources(record: Any) -> list[str]:
    """The record's optional `sources` field (a document path or a list of them); raises naming the line."""
    try:
        obj = json.loads(record.raw)
    except ValueError:
        return []
    given = obj.get("sources") if isinstance(obj, dict) else None
    if given is None:
        return []
    if isinstance(given, str):
        given = [given]
    if not isinstance(given, list) or not all(isinstance(g, str) and g.strip() for g in given):
        raise UsageError(f"line {record.line}: \"sources\" must be a document path or a list of them "
                         f"(as 'ragtune search' shows them), got {json.dumps(given, ensure_ascii=False)[:80]}")
    return [g.strip() for g in given]


# --- building ---------------------------------------------------------------------------------


def _split_last_answer(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    return [dict(m) for m in messages[:last]], dict(messages[last])


def choose_sources(hits: list[dict[str, Any]], gold: int | None, n_sources: int, withheld: bool,
                   answer: str) -> list[dict[str, Any]]:
    """The prompt's chunks in retrieval order: the gold + the best others, or (withheld) none holding the answer."""
    if gold is None:
        return hits[:n_sources]
    if withheld:
        return [h for i, h in enumerate(hits) if i != gold and match_score(answer, h.get("text", "")) < MATCH_MIN
                ][:n_sources]
    others = [i for i in range(len(hits)) if i != gold][:n_sources - 1]
    return [hits[i] for i in sorted(others + [gold])]


def build_rag(cfg: Any, records: Sequence[Any], retriever: Any = None, cache: str | Path | None = None) -> RagBuild:
    """Rebuild every record as the served prompt for its question (see the module docstring).

    `retriever` is an open `ragtune.retrieval.search.Retriever` (default: opened on data.rag.index);
    `cache` a rag_prompts.jsonl written by an earlier build, reused when records, settings and index match."""
    from ragtune.chat import rag_messages, last_user_turns
    from ragtune.retrieval.sources import to_source

    name = cfg.data.rag.index
    if not name:
        raise UsageError("data.rag.index is not set: name the index to retrieve training sources from")
    settings = resolve_settings(cfg)
    given = {r.line: record_sources(r) for r in records}  # every bad field reported before retrieval starts
    index = describe_index(cfg, name) if retriever is None else {
        "name": name, "identity": index_identity(retriever.store, retriever.meta), "generation": _generation(name)}
    key = cache_key(settings, index, records)
    if cache and Path(cache).is_file():
        hit = read_cache(Path(cache), key, records, settings, index)
        if hit is not None:
            log.info("retrieval-built prompts: reusing %s", cache)
            return hit
    own = retriever is None
    if own:
        from ragtune.retrieval.sources import open_retriever

        retriever = open_retriever(cfg, name, without="train on the bare records (leave data.rag.index unset)")
    top_k, n_src = settings["top_k"], settings["distractors"] + 1
    pool = max(top_k, n_src) + POOL_EXTRA
    try:
        built: list[tuple[Any, list[dict[str, Any]], dict[str, Any], list[dict[str, Any]], dict[str, Any]]] = []
        for r in records:
            history, answer_turn = _split_last_answer(r.messages)
            query = last_user_turns(history)
            hits = retriever.search(query, top_k=pool) if query.strip() else []
            gold, how = find_gold(answer_turn["content"], hits, given[r.line])
            if gold is None and given[r.line]:  # look inside the named documents
                extra = retriever.search(query, top_k=pool, filters={"source": given[r.line]})
                ids = {h.get("chunk_id") for h in hits}
                hits = hits + [h for h in extra if h.get("chunk_id") not in ids]
                gold, how = find_gold(answer_turn["content"], hits, given[r.line])
            info: dict[str, Any] = ({"how": how, "rank": gold + 1, "source": hits[gold].get("source", "")}
                                    if gold is not None else {"how": "", "why": how})
            built.append((r, history, answer_turn, hits, info))
    finally:
        if own:
            retriever.close()
    found = [i for i, b in enumerate(built) if b[4].get("how")]
    rng = random.Random(f"{settings['seed']}:withheld")
    shuffle = settings.get("order") == "shuffled"
    n_withheld = round(settings["withheld"] * len(found))
    withheld = set(rng.sample(found, n_withheld)) if n_withheld else set()
    out_records, gold_info, missing = [], {}, []
    for i, (r, history, answer_turn, hits, info) in enumerate(built):
        gold = info["rank"] - 1 if info.get("how") else None
        chosen = choose_sources(hits, gold, n_src, i in withheld, answer_turn["content"])
        if shuffle:  # one generator per record: a record's order does not depend on the records before it
            random.Random(f"{settings['seed']}:order:{r.line}").shuffle(chosen)
        sources = [to_source(h, n) for n, h in enumerate(chosen, 1)]
        answer = answer_turn["content"]
        if i in withheld and settings.get("withheld_answer") == "not_found":
            answer = settings["not_found_message"]
        if gold is not None and i not in withheld:
            info["n"] = next(n for n, h in enumerate(chosen, 1) if h is hits[gold])
            if settings["cite"]:
                answer = cite(answer, info["n"])
        info["withheld"] = i in withheld
        msgs = rag_messages(history, sources, settings["system_prompt"], settings.get("question_first", False)) + [
            {**answer_turn, "content": answer}]
        out_records.append(replace(r, messages=msgs, enc=None))
        gold_info[r.line] = info
        if not info.get("how"):
            missing.append(r.line)
    return RagBuild(out_records, settings, index, gold=gold_info, missing=missing, key=key)


def _generation(name: str) -> str:
    from ragtune.retrieval.store import generation

    return generation(name)


def check_with_rag(report: Any, built: RagBuild, tokenizer: Any, template: str | None, max_length: int) -> Any:
    """A data.check_file report over the rebuilt records: token lengths with the sources, truncation."""
    from ragtune.train.data_check import _token_checks
    from ragtune.train.data_report import CheckReport

    rep = CheckReport(path=f"{report.path} (with sources from index '{built.index['name']}')", lines=report.lines,
                      records=list(built.records))
    _token_checks(rep, tokenizer, template, max_length, None)
    rep.stats["rag"] = {k: v for k, v in built.block().items() if k not in ("prompts_file",)}
    return rep


def apply_rag(cfg: Any, tokenizer: Any, template: str, report: Any, train_records: list[Any],
              eval_records: list[Any], cache: str | Path | None = None) -> tuple[list[Any], list[Any], RagBuild]:
    """For `ragtune train`: train (and eval) records rebuilt with their sources and checked again at
    data.max_length; refuses records whose answer no longer fits unless data.skip_invalid."""
    from ragtune.errors import CheckFailed

    max_len = cfg.data.max_length
    built = build_rag(cfg, train_records, cache=cache)
    log.info("%s", built.note())
    rep = check_with_rag(report, built, tokenizer, template, max_len)
    if not rep.ok:
        fix = (f"raise data.max_length (now {max_len}), or shorten the prompts: data.rag.distractors, data.rag.top_k "
               "or smaller chunks (chunk.size when indexing)")
        if not cfg.data.skip_invalid:
            raise CheckFailed(f"with their retrieved sources some records do not fit; nothing was trained:\n"
                              f"{rep.format()}\n{fix}, or pass --skip-invalid to train on the others")
        log.warning("skipping %d records whose answers do not fit beside their sources (data.skip_invalid); %s",
                    len(rep.rejected), fix)
    cut = rep.stats.get("cut_lines") or []
    if cut:
        log.warning("with their sources, the answers of %d record(s) are cut at data.max_length=%d (lines %s)",
                    len(cut), max_len, ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else ""))
    log.info("with sources: %s tokens per epoch (median record %s tokens)", f"{rep.stats.get('tokens_per_epoch', 0):,}",
             (rep.stats.get("tokens") or {}).get("median"))
    rebuilt_eval = build_rag(cfg, eval_records).records if eval_records else []
    return list(rep.records), rebuilt_eval, built
