"""PDF text extraction: pypdf (the loader before) against PDFium (ragtune's `pdf_pages`), on real PDFs.

    apt-get download debian-reference-en debian-faq bash-doc r-doc-pdf gnuplot-doc docbook-xsl-doc-pdf \
        python-reportlab-doc wamerican
    for d in *.deb; do dpkg -x "$d" x; done; gunzip -k $(find x -name '*.pdf.gz')
    python bench/bench_pdf.py $(find x -name '*.pdf' -size +100k) --dict x/usr/share/dict/american-english \
        --robustness --out pdf.json

Any PDFs will do; docs/benchmarks.md ("PDF text extraction") lists the 11 files measured.
Each (file, extractor) runs in a fresh process, so its peak RSS is its own; the raw page
texts (before retrieval/cleaning.py) are then scored the same way for both:
- glued: letter runs longer than 20 letters ("Therearetwomethodsofassociatingafile"), per 1,000 words
  (\\w+ runs);
- split: a letter token that is not a dictionary word, next to one that together with it makes one
  ("interacti ve", "v ariable", "e xecuted"), per 10,000 words;
- in dict: the share of letter tokens of 3+ letters that are dictionary words (after ligatures are
  spelled out), a whole-text check that neither count can game by dropping text;
- odd: ligature code points, soft hyphens and zero-width characters, private-use and control
  characters, U+FFFD, before cleaning;
- ms/page and peak RSS (VmHWM of the fresh process, imports included).
Without --dict (or /usr/share/dict/words) the dictionary is the document's own words seen 3 times or more.
`--robustness` also runs both on encrypted, image-only, truncated and damaged PDFs made on the spot.
pypdf must be installed (it is a test dependency).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import emit, machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXTRACTORS = ("pypdf", "pdfium")
_WORD = re.compile(r"\w+")
_LETTERS = re.compile(r"[^\W\d_]+")
_GLUED = re.compile(r"[^\W\d_]{21,}")
_ODD = re.compile("[\ufb00-\ufb06\u00ad\u200b\u2060\ufeff\ue000-\uf8ff\ufffd\x00-\x08\x0b-\x1f]")
_LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl"})


def extract(extractor: str, path: Path, max_pages: int) -> list[str]:
    data = path.read_bytes()
    if extractor == "pdfium":
        from ragtune.retrieval.loaders import pdf_pages

        return pdf_pages(data)[0]  # all pages: the caller keeps the first max_pages
    import logging

    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)
    reader = PdfReader(io.BytesIO(data))
    if reader.is_encrypted and not reader.decrypt(""):
        from ragtune.retrieval.loaders import Skip

        raise Skip("encrypted PDF that needs a password; save a copy without one")
    pages = reader.pages[:max_pages] if max_pages else reader.pages
    out = []
    for page in pages:  # as load_pdf read them before: a page that fails counts as empty
        try:
            out.append(page.extract_text() or "")
        except Exception:  # noqa: BLE001
            out.append("")
    return out


def child(extractor: str, path: Path, max_pages: int, out: Path) -> None:
    """One extraction in this (fresh) process: texts to `out`, timings and memory on stdout."""
    if extractor == "pdfium":
        import pypdfium2  # noqa: F401 - imports are not extraction time
        import ragtune.retrieval.loaders  # noqa: F401
    else:
        import pypdf  # noqa: F401
    base = _hwm_mb()
    t0 = time.perf_counter()
    texts = extract(extractor, path, max_pages)
    seconds = time.perf_counter() - t0
    pages_read = len(texts)
    texts = texts[:max_pages] if max_pages else texts
    peak = _hwm_mb()
    out.write_text(json.dumps(texts), encoding="utf-8")
    print(json.dumps({"seconds": seconds, "pages_read": pages_read, "peak_rss_mb": peak, "import_rss_mb": base}))


def _hwm_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_dict(path: str) -> set[str] | None:
    for p in [path] if path else ["/usr/share/dict/words"]:
        if p and Path(p).is_file():
            words = Path(p).read_text(encoding="utf-8", errors="ignore").split()
            return {w.lower() for w in words if not w.endswith("'s")}
    return None


def score(texts: list[str], vocab: set[str] | None) -> dict[str, Any]:
    raw = "\n".join(texts)
    text = raw.translate(_LIGATURES)
    words = _WORD.findall(text)
    letters = [w.lower() for w in _LETTERS.findall(text)]
    if vocab is None:
        vocab = {w for w, n in Counter(letters).items() if n >= 3}
    glued = _GLUED.findall(text)
    split = []
    for line in text.split("\n"):
        runs = list(_LETTERS.finditer(line))
        for x, y in zip(runs, runs[1:]):  # two letter runs with one space between them
            if line[x.end() : y.start()] != " ":
                continue
            a, b = x.group().lower(), y.group().lower()
            if len(a + b) >= 4 and a + b in vocab and (a not in vocab or b not in vocab):
                split.append(f"{x.group()} {y.group()}")
    long_letters = [w for w in letters if len(w) >= 3]
    odd = Counter(f"U+{ord(c):04X}" for c in _ODD.findall(raw))
    n = max(1, len(words))
    return {
        "pages": len(texts), "chars_per_page": round(len(raw) / max(1, len(texts))), "words": len(words),
        "glued_per_1k": round(1000 * len(glued) / n, 2), "split_per_10k": round(10000 * len(split) / n, 1),
        "in_dict": round(sum(w in vocab for w in long_letters) / max(1, len(long_letters)), 4),
        "odd_chars": sum(odd.values()), "odd_top": odd.most_common(4),
        "glued_examples": [g for g, _ in Counter(glued).most_common(3)],
        "split_examples": [s for s, _ in Counter(split).most_common(4)],
    }


def run_one(extractor: str, path: Path, max_pages: int) -> tuple[dict[str, Any], list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "texts.json"
        cmd = [sys.executable, __file__, "--child", extractor, str(path), "--pages", str(max_pages), "--texts", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
        return stats, json.loads(out.read_text(encoding="utf-8"))


def producer(path: Path) -> str:
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(str(path))
    try:
        return " / ".join(x for x in (pdf.get_metadata_value("Creator"), pdf.get_metadata_value("Producer")) if x)
    finally:
        pdf.close()


def robustness(tmp: Path) -> dict[str, dict[str, str]]:
    """What each extractor (as load_pdf uses it, or used it) makes of the files that are not plain PDFs."""
    from pypdf import PdfWriter
    from reportlab.pdfgen import canvas

    from ragtune.retrieval.loaders import Skip, load_pdf

    def make(name: str, pages: list[str]) -> Path:
        c = canvas.Canvas(str(tmp / name))
        for text in pages:
            c.drawString(72, 720, text)
            c.showPage()
        c.save()
        return tmp / name

    plain = make("plain.pdf", ["First page about pumps.", "Second page about seals.", "Third page about bearings."])
    cases: dict[str, bytes] = {}
    for algo in ("RC4-128", "AES-128", "AES-256"):
        for pw in ("", "pw"):
            w = PdfWriter(clone_from=str(plain))
            w.encrypt(user_password=pw, owner_password="owner", algorithm=algo)
            buf = io.BytesIO()
            w.write(buf)
            cases[f"{algo}, {'password' if pw else 'empty user password'}"] = buf.getvalue()
    c = canvas.Canvas(str(tmp / "scan.pdf"))
    c.rect(100, 100, 200, 200, fill=1)
    c.showPage()
    c.save()
    cases["image-only"] = (tmp / "scan.pdf").read_bytes()
    data = plain.read_bytes()
    cases["truncated at 60%"] = data[: int(len(data) * 0.6)]
    cases["xref offsets wrong"] = re.sub(rb"\d{10} 00000 n", b"0000000001 00000 n", data)
    # page 2's content stream made undecodable (its Flate bytes overwritten): a page-level failure
    idx = [m.start() for m in re.finditer(rb"stream\r?\n", data)]
    bad_page = bytearray(data)
    if len(idx) >= 2:
        s = idx[1] + 7
        bad_page[s : s + 20] = b"\x00" * 20
    cases["one page's stream damaged"] = bytes(bad_page)
    results: dict[str, dict[str, str]] = {}
    for name, blob in cases.items():
        row = {}
        for ex in EXTRACTORS:
            f = tmp / "case.pdf"
            f.write_bytes(blob)
            try:
                texts = extract(ex, f, 0)
                row[ex] = f"{sum(bool(t.strip()) for t in texts)} of {len(texts)} pages with text"
            except Skip as exc:
                row[ex] = f"Skip: {exc}"
            except Exception as exc:  # noqa: BLE001
                row[ex] = f"{type(exc).__name__}: {str(exc)[:70]}"
        try:
            doc = load_pdf(blob, "case.pdf", "case")
            row["load_pdf"] = f"{len({b.page for b in doc.blocks})} pages read"
        except Skip as exc:
            row["load_pdf"] = f"Skip: {exc}"
        results[name] = row
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pdfs", nargs="*", type=Path)
    ap.add_argument("--dict", default="", help="word list (default /usr/share/dict/words if present)")
    ap.add_argument("--pages", type=int, default=0, help="first N pages of each file (0: all)")
    ap.add_argument("--robustness", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--texts", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.pdfs[0], args.pages, args.texts)
        return 0
    vocab = load_dict(args.dict)
    out: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "load_before": os.getloadavg()[0], "dictionary": args.dict or "/usr/share/dict/words"
                           if vocab is not None else "each document's own words", "files": []}
    for path in args.pdfs:
        entry: dict[str, Any] = {"file": path.name, "producer": producer(path)}
        for ex in EXTRACTORS:
            stats, texts = run_one(ex, path, args.pages)
            entry[ex] = {**score(texts, vocab), "ms_per_page": round(1000 * stats["seconds"] / max(1, stats["pages_read"]), 1),
                         "peak_rss_mb": round(stats["peak_rss_mb"]), "import_rss_mb": round(stats["import_rss_mb"])}
            print(f"{path.name:32} {ex:7} glued/1k {entry[ex]['glued_per_1k']:6} split/10k {entry[ex]['split_per_10k']:6} "
                  f"in-dict {entry[ex]['in_dict']:.3f} odd {entry[ex]['odd_chars']:5} {entry[ex]['ms_per_page']:6} ms/page "
                  f"{entry[ex]['peak_rss_mb']} MB", file=sys.stderr)
        out["files"].append(entry)
    if args.robustness:
        with tempfile.TemporaryDirectory() as tmp:
            out["robustness"] = robustness(Path(tmp))
    out["load_after"] = os.getloadavg()[0]
    emit(out, args.out, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
