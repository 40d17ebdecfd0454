"""OpenAI's Files API on `ragtune serve`, through the official `openai` client against a real uvicorn server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from ragtune.config import load_config
from ragtune.serve.server import create_app
from tests.conftest import start_server

RECORDS = b"".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                             {"role": "assistant", "content": f"a{i}"}]}).encode() + b"\n"
                   for i in range(3))


def _serve(tmp_path: Path, tiny_llama: Path, loaded_gen: Any, extra: str) -> Any:
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_llama}\nserve:\n  api_key: k-test\n{extra}  deployments:\n    - {{name: base}}\n")
    app = create_app(load_config(f), generator=loaded_gen)
    server, t, port = start_server(app)
    return server, t, f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def files_url(tmp_path: Path, tiny_llama: Path, loaded_gen: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("RAGTUNE_HOME", str(tmp_path / "home"))
    server, t, url = _serve(tmp_path, tiny_llama, loaded_gen, "  fine_tuning: true\n  max_file_bytes: 2000\n")
    yield url
    server.should_exit = True
    t.join(10)


def test_files_round_trip_through_the_openai_client(files_url: str, tmp_path: Path) -> None:
    import openai

    client = openai.OpenAI(base_url=files_url, api_key="k-test", max_retries=0)
    data = tmp_path / "training.jsonl"
    data.write_bytes(RECORDS)
    with open(data, "rb") as fh:
        f = client.files.create(file=fh, purpose="fine-tune")
    assert (f.object, f.purpose, f.filename, f.bytes) == ("file", "fine-tune", "training.jsonl", len(RECORDS))
    second = client.files.create(file=("more.jsonl", RECORDS[:100]), purpose="fine-tune")
    listed = client.files.list()
    assert [x.id for x in listed.data] == sorted([f.id, second.id], key=lambda i: i != second.id)  # newest first
    assert client.files.retrieve(f.id).filename == "training.jsonl"
    assert client.files.content(f.id).content == RECORDS

    stored = tmp_path / "home" / "files" / f.id  # on disk: the bytes and their sha256, nothing half-written
    meta = json.loads((stored / "file.json").read_text())
    assert meta["sha256"] == hashlib.sha256(RECORDS).hexdigest() and (stored / "content").read_bytes() == RECORDS
    assert not [p for p in stored.parent.iterdir() if p.name.startswith(".")]

    gone = client.files.delete(f.id)
    assert gone.deleted and gone.id == f.id
    assert [x.id for x in client.files.list().data] == [second.id]
    with pytest.raises(openai.NotFoundError) as e:
        client.files.retrieve(f.id)
    assert e.value.body["code"] == "file_not_found"


def test_bad_uploads_are_refused_with_openai_errors(files_url: str) -> None:
    import httpx
    import openai

    client = openai.OpenAI(base_url=files_url, api_key="k-test", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="purpose 'assistants' is not supported"):
        client.files.create(file=("a.jsonl", RECORDS), purpose="assistants")
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", b"x" * 5000), purpose="fine-tune")
    assert e.value.status_code == 413 and "serve.max_file_bytes" in e.value.message
    with pytest.raises(openai.BadRequestError, match="is empty"):
        client.files.create(file=("empty.jsonl", b""), purpose="fine-tune")
    h = {"Authorization": "Bearer k-test"}
    r = httpx.post(f"{files_url}/files", headers=h, json={"purpose": "fine-tune"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    r = httpx.post(f"{files_url}/files", headers=h, files={"file": ("a.jsonl", RECORDS)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    assert httpx.get(f"{files_url}/files/..%2F..%2Fetc", headers=h).status_code == 404
    assert httpx.get(f"{files_url}/files").status_code == 401  # the same API key as every /v1 route


def test_files_routes_are_off_unless_fine_tuning_is_on(tmp_path: Path, tiny_llama: Path, loaded_gen: Any) -> None:
    import httpx

    server, t, url = _serve(tmp_path, tiny_llama, loaded_gen, "")
    try:
        r = httpx.get(f"{url}/files", headers={"Authorization": "Bearer k-test"})
        assert r.status_code == 404
    finally:
        server.should_exit = True
        t.join(10)
