"""OpenAI's Files API on `ragtune serve` (with `serve.fine_tuning: true`): training data uploaded once.

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    f = client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune")
    client.files.list(); client.files.retrieve(f.id); client.files.content(f.id); client.files.delete(f.id)

Each file lives in `$RAGTUNE_HOME/files/<id>/`: `content` (the bytes as uploaded) and `file.json`
(OpenAI's file object plus the content's sha256). The folder is written whole under a temporary
name and renamed into place, so a crash mid-upload leaves no half file; a folder without a readable
`file.json` is not a file (one of the wrong shape is left out and logged once). Uploads above
`serve.max_file_bytes` are refused (413) before they are read when the client declares its length, and
as soon as the bytes received pass the limit otherwise (chunked uploads included). A fine-tune file must
look like chat JSONL (its first line a JSON object), so a CSV or plain text is refused at upload with the
command that converts it, not later by the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the routes' annotations here

from ragtune.serve.job_store import DamagedRecord, WarnOnce, read_record, shape_problem

PURPOSES = ("fine-tune",)  # what these files are for; OpenAI's other purposes have no use here
MAX_FILENAME = 255  # characters of a stored file name
ENVELOPE = 64 * 1024  # room for the multipart boundaries and part headers around the file's bytes
HEAD = 64 * 1024  # how much of an upload the JSONL check looks at
FILE_FIELDS: dict[str, tuple[type, ...]] = {"object": (str,), "bytes": (int,), "created_at": (int,),
                                            "filename": (str,), "purpose": (str,)}


def files_dir() -> Path:
    from ragtune.modeling import ragtune_home

    return ragtune_home() / "files"


class FileStore:
    """Files by id under one folder; ids are `file-` + 24 random hex characters."""

    def __init__(self, root: Path | None = None):
        self.root = root or files_dir()
        self._warn = WarnOnce()

    def _dir(self, file_id: str) -> Path:
        if not (file_id.startswith("file-") and file_id[5:].isalnum() and len(file_id) <= 64):
            raise KeyError(file_id)  # never a path: no '..', no '/'
        return self.root / file_id

    def add(self, filename: str, purpose: str, data_path: Path) -> dict[str, Any]:
        """Move the uploaded bytes at `data_path` into the store; the file object."""
        file_id = "file-" + secrets.token_hex(12)
        h = hashlib.sha256()
        with open(data_path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        obj = {"id": file_id, "object": "file", "bytes": data_path.stat().st_size, "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
               "sha256": h.hexdigest(), "created_ns": time.time_ns()}
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{file_id}.tmp"
        tmp.mkdir()
        try:
            shutil.move(str(data_path), tmp / "content")
            with open(tmp / "file.json", "w", encoding="utf-8") as fh:
                json.dump(obj, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.root / file_id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return obj

    def get(self, file_id: str) -> dict[str, Any]:
        """The file object; KeyError when there is no such (complete) file, DamagedRecord when its file.json
        is unusable."""
        def problem(obj: Any) -> str:
            why = shape_problem(obj, file_id, FILE_FIELDS)
            if not why and not isinstance(obj.get("created_ns", 0), int):
                why = "its 'created_ns' is not a number"
            return why

        return read_record(self._dir(file_id) / "file.json", problem, file_id)

    def content_path(self, file_id: str) -> Path:
        self.get(file_id)
        return self._dir(file_id) / "content"

    def list(self, purpose: str = "") -> list[dict[str, Any]]:
        """Every complete file, newest first."""
        out = []
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.name.startswith("file-"):
                    try:
                        out.append(self.get(d.name))
                    except DamagedRecord as exc:
                        self._warn(exc, f"move {d} out of {self.root} (or restore its file.json)")
                    except KeyError:
                        continue
        out = [f for f in out if not purpose or f["purpose"] == purpose]
        return sorted(out, key=lambda f: (-f.get("created_ns", f["created_at"] * 10**9), f["id"]))

    def delete(self, file_id: str) -> None:
        d = self._dir(file_id)
        self.get(file_id)
        gone = self.root / f".{file_id}.deleting"
        os.replace(d, gone)  # out of sight at once, then removed
        shutil.rmtree(gone, ignore_errors=True)


def public(obj: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's file object (the sha256 and the upload's nanosecond clock, for ordering, stay on disk)."""
    return {k: v for k, v in obj.items() if k not in ("sha256", "created_ns")}


async def _upload(request: Request, files: FileStore, limit: int) -> dict[str, Any]:
    """A multipart upload (fields 'file' and 'purpose') streamed to a temporary file, then stored."""
    import tempfile

    from starlette.formparsers import MultiPartParser

    from ragtune.serve.server import APIError, limited_stream

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + ENVELOPE:
        raise APIError(413, f"upload is {declared} bytes; the limit is {limit} (serve.max_file_bytes)",
                       code="file_too_large")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "POST /v1/files takes multipart/form-data with fields 'file' and 'purpose'")
    # two file parts at most, so that a purpose sent as a file gets its own message below
    stream = limited_stream(request, limit + ENVELOPE, _too_large(limit))
    parser = MultiPartParser(request.headers, stream, max_files=2, max_fields=8)
    form = await _parse(parser)
    try:
        purpose, upload = _fields(form)
        name = _filename(upload.filename)
        files.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=files.root, prefix=".upload-")
        tmp = Path(tmp_name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                while block := await upload.read(1 << 20):
                    size += len(block)
                    if size > limit:
                        raise _too_large(limit)
                    out.write(block)
            if size == 0:
                raise APIError(400, f"file '{name}' is empty", param="file")
            why = not_jsonl(tmp, name)
            if why:
                raise APIError(400, why, param="file", code="invalid_file_format")
            return public(files.add(name, purpose, tmp))
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        await form.close()


def _too_large(limit: int) -> Exception:
    from ragtune.serve.server import APIError

    return APIError(413, f"upload is over {limit} bytes (serve.max_file_bytes)", code="file_too_large")


async def _parse(parser: Any) -> Any:
    from starlette.formparsers import MultiPartException

    from ragtune.serve.server import APIError

    try:
        return await parser.parse()
    except MultiPartException as exc:
        cause = str(exc.__cause__ or "")
        if "header size" in cause:  # python-multipart's limit on one header line (~4 KB)
            raise APIError(400, f"a part's header is over 4 KB (a file name that long?); file names may have at "
                           f"most {MAX_FILENAME} characters", param="file", code="invalid_request") from None
        raise APIError(400, f"the multipart body could not be read: {exc.message}" + (f" ({cause})" if cause else ""),
                       code="invalid_request") from None


def _fields(form: Any) -> tuple[str, Any]:
    """The form's purpose (a text field) and file (a file part), or a 400 naming the one that is wrong."""
    from ragtune.serve.server import APIError

    purposes, uploads = form.getlist("purpose"), form.getlist("file")
    if purposes and not isinstance(purposes[0], str):
        raise APIError(400, "purpose must be a text field (purpose=fine-tune; with curl -F purpose=fine-tune), "
                       "not a file part", param="purpose")
    purpose = purposes[0] if purposes else ""
    if not purpose:
        raise APIError(400, "missing form field 'purpose' (use purpose=fine-tune)", param="purpose")
    if purpose not in PURPOSES:
        raise APIError(400, f"purpose '{purpose}' is not supported here; use {', '.join(PURPOSES)}",
                       param="purpose")
    if not uploads:
        others = sorted({k for k in form.keys() if k != "purpose"})
        raise APIError(400, "missing form field 'file' (the file's bytes, as a multipart file part)"
                       + (f"; the form has: {', '.join(others)}" if others else ""), param="file")
    if len(uploads) > 1:
        raise APIError(400, f"the form has {len(uploads)} 'file' fields; upload one file per request", param="file")
    if isinstance(uploads[0], str):
        raise APIError(400, "file must be a file part with the file's bytes (with curl -F file=@training.jsonl), "
                       "not a text field", param="file")
    return purpose, uploads[0]


def _filename(raw: str | None) -> str:
    """The name to store: the last path component, no control characters; 'upload.jsonl' when none is left."""
    from ragtune.serve.server import APIError

    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = "".join(c if c.isprintable() else "_" for c in name)
    if len(name) > MAX_FILENAME:
        raise APIError(400, f"the file name is {len(name)} characters long; file names may have at most "
                       f"{MAX_FILENAME} characters: rename the file", param="file", code="invalid_request")
    return "upload.jsonl" if name in ("", ".", "..") else name


def not_jsonl(path: Path, name: str) -> str:
    """Why an uploaded fine-tune file is plainly not chat JSONL ("" when its first line is a JSON object).
    Only the start is read: every line is checked, with the model's tokenizer, when a job uses the file."""
    from ragtune.text import UTF16_BOMS

    with open(path, "rb") as fh:
        head = fh.read(HEAD)
    whole = len(head) < HEAD
    if head.startswith(UTF16_BOMS):  # Windows "Unicode" text, which training reads too
        text = head.decode("utf-16", errors="ignore")
    else:
        text = head.decode("utf-8", errors="replace").removeprefix("\ufeff")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if first.startswith("{") or (not first and not whole):
        return ""
    if not first:
        return f"file '{name}' holds only blank lines; upload chat JSONL, one {{\"messages\": [...]}} record per line"
    shown = first[:40] + ("..." if len(first) > 40 else "")
    if first.startswith("["):
        return (f"file '{name}' is a JSON array, not JSON Lines: put one chat record {{\"messages\": [...]}} on "
                f"each line ('ragtune data check {name} --write-clean OUT.jsonl' writes them so) and upload that")
    if Path(name).suffix.lower() in (".csv", ".tsv", ".parquet") or "," in first or "\t" in first:
        return (f"file '{name}' looks like a table (first line: '{shown}'), not chat JSONL: convert it with "
                f"'ragtune data convert {name} --question-col COLUMN --answer-col COLUMN' first and upload the "
                ".jsonl file it writes")
    return (f"file '{name}' is not chat JSONL: its first line starts '{shown}', but each line must be a JSON object "
            f"{{\"messages\": [...]}}; 'ragtune data check {name}' shows what is wrong and 'ragtune data convert "
            f"{name}' converts other formats")


def query_limit(raw: str, top: int) -> int:
    """A list route's `limit` query parameter, 1..top, or a 400 that names it."""
    from ragtune.serve.server import APIError

    value = raw.strip()
    if not (value.isdigit() and 1 <= int(value) <= top):
        raise APIError(400, f"limit {value[:40]!r} is not a whole number between 1 and {top}", param="limit",
                       code="invalid_request")
    return int(value)


def _page(rows: list[dict[str, Any]], limit: int, after: str, order: str) -> dict[str, Any]:
    """OpenAI's list page over `rows` (newest first): order, the `after` cursor, `limit`."""
    from ragtune.serve.server import APIError

    if order not in ("asc", "desc"):
        raise APIError(400, f"order '{order}' is not asc or desc", param="order")
    if order == "asc":
        rows = rows[::-1]
    if after:
        ids = [f["id"] for f in rows]
        if after not in ids:
            raise APIError(404, f"after: no file '{after}' in this list (GET /v1/files lists them)", param="after",
                           code="file_not_found")
        rows = rows[ids.index(after) + 1:]
    page = rows[:limit]
    return {"object": "list", "data": [public(f) for f in page], "has_more": len(rows) > len(page),
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


def _missing(file_id: str, exc: KeyError | None = None) -> Exception:
    from ragtune.serve.server import APIError

    if isinstance(exc, DamagedRecord):
        return APIError(404, f"file '{file_id}' cannot be read: its record {exc}; upload the file again (the server's "
                        "operator can remove that folder)", param="file_id", code="file_damaged")
    return APIError(404, f"no file '{file_id}' (GET /v1/files lists them)", param="file_id", code="file_not_found")


def add_file_routes(app: Any, cfg: Any, store: FileStore | None = None) -> None:
    """/v1/files routes, behind the same API key as the rest of /v1."""
    from fastapi.responses import FileResponse

    files = store or FileStore()
    limit = cfg.serve.max_file_bytes

    @app.post("/v1/files")
    async def upload(request: Request) -> Any:
        return await _upload(request, files, limit)

    @app.get("/v1/files")
    async def list_files(purpose: str = "", limit: str = "10000", after: str = "", order: str = "desc") -> Any:
        return _page(files.list(purpose), query_limit(limit, 10000), after, order)

    @app.get("/v1/files/{file_id}")
    async def retrieve(file_id: str) -> Any:
        try:
            return public(files.get(file_id))
        except KeyError as exc:
            raise _missing(file_id, exc) from None

    @app.get("/v1/files/{file_id}/content")
    async def content(file_id: str) -> Any:
        try:
            path = files.content_path(file_id)
        except KeyError as exc:
            raise _missing(file_id, exc) from None
        return FileResponse(path, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete(file_id: str) -> Any:
        try:
            files.delete(file_id)
        except KeyError as exc:
            raise _missing(file_id, exc) from None
        return {"id": file_id, "object": "file", "deleted": True}
