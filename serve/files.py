"""OpenAI's Files API on `ragtune serve` (with `serve.fine_tuning: true`): training data uploaded once.

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    f = client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune")
    client.files.list(); client.files.retrieve(f.id); client.files.content(f.id); client.files.delete(f.id)

Each file lives in `$RAGTUNE_HOME/files/<id>/`: `content` (the bytes as uploaded) and `file.json`
(OpenAI's file object plus the content's sha256). The folder is written whole under a temporary
name and renamed into place, so a crash mid-upload leaves no half file; a folder without a readable
`file.json` is not a file. Uploads above `serve.max_file_bytes` are refused (413) before they are read
when the client declares its length, and as soon as they pass the limit otherwise.
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

PURPOSES = ("fine-tune",)  # what these files are for; OpenAI's other purposes have no use here


def files_dir() -> Path:
    from ragtune.modeling import ragtune_home

    return ragtune_home() / "files"


class FileStore:
    """Files by id under one folder; ids are `file-` + 24 random hex characters."""

    def __init__(self, root: Path | None = None):
        self.root = root or files_dir()

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
        """The file object; KeyError when there is no such (complete) file."""
        try:
            return json.loads((self._dir(file_id) / "file.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise KeyError(file_id) from None

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
                    except KeyError:
                        continue
        out = [f for f in out if not purpose or f.get("purpose") == purpose]
        return sorted(out, key=lambda f: (-int(f.get("created_ns", f.get("created_at", 0) * 10**9)), f["id"]))

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

    from ragtune.serve.server import APIError

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise APIError(413, f"upload is {declared} bytes; the limit is {limit} (serve.max_file_bytes)",
                       code="file_too_large")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "POST /v1/files takes multipart/form-data with fields 'file' and 'purpose'")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # python-multipart's parse errors
        raise APIError(400, f"the multipart body could not be read: {exc}") from None
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if not isinstance(purpose, str) or not purpose:
            raise APIError(400, "missing form field 'purpose' (use purpose=fine-tune)", param="purpose")
        if purpose not in PURPOSES:
            raise APIError(400, f"purpose '{purpose}' is not supported here; use {', '.join(PURPOSES)}",
                           param="purpose")
        if upload is None or isinstance(upload, str) or not hasattr(upload, "read"):
            raise APIError(400, "missing form field 'file' (the file's bytes, as a multipart file part)",
                           param="file")
        name = os.path.basename(upload.filename or "upload.jsonl") or "upload.jsonl"
        files.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=files.root, prefix=".upload-")
        tmp = Path(tmp_name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                while block := await upload.read(1 << 20):
                    size += len(block)
                    if size > limit:
                        raise APIError(413, f"upload is over {limit} bytes (serve.max_file_bytes)",
                                       code="file_too_large")
                    out.write(block)
            if size == 0:
                raise APIError(400, f"file '{name}' is empty", param="file")
            return public(files.add(name, purpose, tmp))
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        await form.close()


def _page(rows: list[dict[str, Any]], limit: int, after: str, order: str) -> dict[str, Any]:
    """OpenAI's list page over `rows` (newest first): order, the `after` cursor, `limit`."""
    from ragtune.serve.server import APIError

    if order not in ("asc", "desc"):
        raise APIError(400, f"order '{order}' is not asc or desc", param="order")
    if not 1 <= limit <= 10000:
        raise APIError(400, f"limit {limit} is not between 1 and 10000", param="limit")
    if order == "asc":
        rows = rows[::-1]
    if after:
        ids = [f["id"] for f in rows]
        if after not in ids:
            raise _missing(after)
        rows = rows[ids.index(after) + 1:]
    page = rows[:limit]
    return {"object": "list", "data": [public(f) for f in page], "has_more": len(rows) > len(page),
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


def _missing(file_id: str) -> Exception:
    from ragtune.serve.server import APIError

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
    async def list_files(purpose: str = "", limit: int = 10000, after: str = "", order: str = "desc") -> Any:
        return _page(files.list(purpose), limit, after, order)

    @app.get("/v1/files/{file_id}")
    async def retrieve(file_id: str) -> Any:
        try:
            return public(files.get(file_id))
        except KeyError:
            raise _missing(file_id) from None

    @app.get("/v1/files/{file_id}/content")
    async def content(file_id: str) -> Any:
        try:
            path = files.content_path(file_id)
        except KeyError:
            raise _missing(file_id) from None
        return FileResponse(path, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete(file_id: str) -> Any:
        try:
            files.delete(file_id)
        except KeyError:
            raise _missing(file_id) from None
        return {"id": file_id, "object": "file", "deleted": True}
