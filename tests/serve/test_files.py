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


def _post(url: str, **kw: Any) -> Any:
    import httpx

    return httpx.post(f"{url}/files", headers={"Authorization": "Bearer k-test"}, **kw)


def test_multipart_mistakes_name_the_field_and_names_are_sanitised(files_url: str) -> None:
    r = _post(files_url, files={"purpose": ("p.txt", b"fine-tune"), "file": ("a.jsonl", RECORDS)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    assert "purpose must be a text field" in r.json()["error"]["message"]
    r = _post(files_url, files={"purpose": (None, "fine-tune"), "file": (None, "sometext")})  # multipart text fields
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert "file must be a file part" in r.json()["error"]["message"]
    for n in (300, 5000):  # past python-multipart's header limit, and under it
        r = _post(files_url, data={"purpose": "fine-tune"}, files={"file": ("a" * n + ".jsonl", RECORDS[:50])})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "file" and "255 characters" in err["message"], err
    for sent, stored in (("..", "upload.jsonl"), ("../../etc/x.jsonl", "x.jsonl"), ("C:\\data\\w.jsonl", "w.jsonl")):
        r = _post(files_url, data={"purpose": "fine-tune"}, files={"file": (sent, RECORDS[:200])})
        assert r.status_code == 200 and r.json()["filename"] == stored, (sent, r.text)


def test_a_fine_tune_file_that_is_not_jsonl_is_refused_at_upload(files_url: str) -> None:
    def refused(name: str, data: bytes) -> str:
        r = _post(files_url, data={"purpose": "fine-tune"}, files={"file": (name, data)})
        assert r.status_code == 400 and r.json()["error"]["param"] == "file", r.text
        return r.json()["error"]["message"]

    msg = refused("faq.csv", b"question,answer\nhi,there\n")
    assert "looks like a table" in msg and "ragtune data convert faq.csv" in msg
    assert "ragtune data convert" in refused("notes.jsonl", b"\n\nhello, this is not json\n")
    assert "JSON array" in refused("all.json", b'[{"messages": []}]\n')
    assert "blank lines" in refused("blank.jsonl", b"\n  \n")
    # what training reads is accepted: a UTF-8 BOM, UTF-16 with its BOM, blank lines first
    for data in (b"\xef\xbb\xbf" + RECORDS, b"\xff\xfe" + RECORDS.decode().encode("utf-16-le"), b"\n\n" + RECORDS):
        r = _post(files_url, data={"purpose": "fine-tune"}, files={"file": ("ok.jsonl", data[:1900])})
        assert r.status_code == 200, r.text


def _length(response: bytes) -> int:
    """The Content-Length of a raw HTTP response (0 until its head is complete)."""
    import re

    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", response.split(b"\r\n\r\n", 1)[0])
    return int(m[1]) if m and b"\r\n\r\n" in response else 0


def test_a_chunked_upload_is_refused_once_it_passes_the_limit(files_url: str) -> None:
    """No Content-Length: the 413 comes while the client is still sending, not after the whole body is spooled."""
    import socket
    from urllib.parse import urlsplit

    port = urlsplit(files_url).port
    b = "XyZ"
    head = (f"--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jsonl\"\r\n\r\n").encode()
    total, sent, block = 64 << 20, 0, b"{" + b"x" * (64 << 10)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall((f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k-test\r\n"
                   f"Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary={b}\r\n\r\n").encode())
        s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        try:
            while sent < total:
                s.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
                s.setblocking(False)
                try:
                    if s.recv(1, socket.MSG_PEEK):
                        break  # the server has answered
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
                    s.settimeout(20)
        except (ConnectionError, socket.timeout):
            pass  # the server answered and closed while this client was still sending
        answer = b""  # the head and the body may come in two reads
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            try:
                got = s.recv(4096)
            except ConnectionError:  # closed after answering: what came is the answer
                break
            if not got:
                break
            answer += got
    assert answer.startswith(b"HTTP/1.1 413") and b"serve.max_file_bytes" in answer, answer[:300]
    assert sent < 16 << 20, f"the server read {sent} bytes before refusing a 2000-byte limit"


def test_damaged_file_records_are_left_out_and_named(files_url: str, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import httpx

    h = {"Authorization": "Bearer k-test"}
    good = _post(files_url, data={"purpose": "fine-tune"}, files={"file": ("a.jsonl", RECORDS)}).json()
    root = tmp_path / "home" / "files"
    for fid, text in (("file-0000000000000000000000aa", "[]"), ("file-0000000000000000000000bb", '{"id": 3}'),
                      ("file-0000000000000000000000cc", "{not json")):
        (root / fid).mkdir()
        (root / fid / "file.json").write_text(text)
    with caplog.at_level("WARNING", logger="ragtune.serve.job_store"):
        for _ in range(3):
            r = httpx.get(f"{files_url}/files", headers=h)
            assert r.status_code == 200 and [f["id"] for f in r.json()["data"]] == [good["id"]]
    warned = [rec.getMessage() for rec in caplog.records if "is damaged" in rec.getMessage()]
    assert len(warned) == 3 and any("file-0000000000000000000000aa" in w for w in warned)  # once per file
    r = httpx.get(f"{files_url}/files/file-0000000000000000000000aa", headers=h)
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] == "file_damaged" and err["param"] == "file_id"
    assert str(root / "file-0000000000000000000000aa" / "file.json") in err["message"] and "an array" in err["message"]
    assert httpx.get(f"{files_url}/files/file-0000000000000000000000bb/content", headers=h).status_code == 404


def test_list_parameters_are_named_in_errors(files_url: str) -> None:
    import httpx

    h = {"Authorization": "Bearer k-test"}
    for query, param, status in (("after=file-nope", "after", 404), ("limit=abc", "limit", 400),
                                 ("limit=0", "limit", 400), ("order=up", "order", 400)):
        r = httpx.get(f"{files_url}/files?{query}", headers=h)
        assert r.status_code == status and r.json()["error"]["param"] == param, (query, r.text)
