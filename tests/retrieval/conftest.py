"""Fixtures for retrieval tests: a config on the tiny embedder and a small folder of documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune.config import Config, load_config

HR_MD = """# HR Handbook

## Remote work

Employees may work remotely up to three days per week with manager approval.

## Leave

Annual leave is twenty days per year; unused days expire at the end of March.
"""

SECURITY_HTML = """<html><head><title>Security policy</title></head><body>
<div class="sphinxsidebar">Navigation junk that must not be indexed</div>
<h1>Security</h1><p>Security badges must be worn visibly at all times inside the building.</p>
<h2>Passwords</h2><p>Passwords must be at least fourteen characters long and rotated yearly.</p>
</body></html>"""

KOREAN_TXT = "서울은 한국의 수도입니다.\n\n직원은 주 3일까지 재택근무를 할 수 있습니다."

FAQ_JSONL = (
    '{"id": "expenses", "text": "Expense reports must be submitted within thirty days of purchase.", "dept": "finance"}\n'
    '{"text": "The office opens at eight in the morning.", "title": "Opening hours"}\n'
)


def make_cfg(embedder: Path, *overrides: str) -> Config:
    return load_config(None, [f"embedder.path={embedder}", "embedder.device=cpu", *overrides])


@pytest.fixture
def cfg(tiny_embedder: Path) -> Config:
    return make_cfg(tiny_embedder)


def write_docs(d: Path) -> Path:
    """The `docs` fixture's folder: hr.md, security.html, ko/seoul.txt and faq.jsonl under `d`."""
    (d / "ko").mkdir(parents=True)
    (d / "hr.md").write_text(HR_MD, encoding="utf-8")
    (d / "security.html").write_text(SECURITY_HTML, encoding="utf-8")
    (d / "ko" / "seoul.txt").write_text(KOREAN_TXT, encoding="utf-8")
    (d / "faq.jsonl").write_text(FAQ_JSONL, encoding="utf-8")
    return d


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    return write_docs(tmp_path / "docs")


def make_pdf(path: Path, pages: list[str]) -> Path:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path), pagesize=A4)
    for text in pages:
        y = 800
        for line in text.split("\n"):
            c.drawString(72, y, line)
            y -= 16
        c.showPage()
    c.save()
    return path
