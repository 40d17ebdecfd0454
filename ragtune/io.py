"""Atomic file writes: temp file in the same folder, fsync, rename. Nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def _umask() -> int:
    """The process umask, read without changing it (os.umask() sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _write_temp(p: Path, data: bytes) -> Path:
    """`data` in full in a new temp file beside `p`, fsynced, with the mode `p` has (or a plain open()'s)."""
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would, or keep the old one's
        mode = p.stat().st_mode & 0o7777 if p.exists() else 0o666 & ~_umask()
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    p = Path(path)
    tmp = _write_temp(p, data)
    try:
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def atomic_write_set(files: dict[Path, bytes]) -> list[Path]:
    """Replace several files as a set: every one is written in full to a temp name first, and only then
    are they renamed in, one right after another. A failure while writing (a full disk) or a Ctrl-C leaves
    the old set as it was, never a new file beside an old one; a Ctrl-C during the renames finishes them
    before it is raised. (A crash between two renames can still mix the sets: rename is atomic per file.)"""
    staged: list[tuple[Path, Path]] = []
    try:
        for dst, data in files.items():
            staged.append((_write_temp(Path(dst), data), Path(dst)))
        for _, dst in staged:  # a rename onto a folder would fail midway through the set
            if dst.is_dir():
                raise IsADirectoryError(errno.EISDIR, "a folder is where a file of the set goes", str(dst))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    try:
        for tmp, dst in staged:
            os.replace(tmp, dst)
    except KeyboardInterrupt:  # the temps are complete: finish the set, then stop
        for tmp, dst in staged:
            if tmp.exists():
                os.replace(tmp, dst)
        raise
    except BaseException:  # a rename refused: no temp files left behind
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for folder in {dst.parent for _, dst in staged}:  # make the renames durable (best effort)
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
    return [dst for _, dst in staged]


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: list[Any]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return atomic_write_text(path, text)


def _unprivate(root: Path) -> None:
    """Give files and folders that temp-file writers left private (0600/0700: mkstemp, mkdtemp and
    safetensors' save_file) the mode a plain open() or mkdir() would, so another user (a service
    account serving the adapter) can read them. Other modes are left as they are."""
    umask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        for names, private, ordinary in ((dirnames, 0o700, 0o777), (filenames, 0o600, 0o666)):
            for name in names:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p) and os.stat(p).st_mode & 0o7777 == private:
                    os.chmod(p, ordinary & ~umask)


def check_output_dir(out: str | Path, flag: str, force: bool, inputs: dict[str, Path] = {}) -> Path:  # noqa: B006
    """The resolved folder a command will replace (atomic_dir), refused up front: not empty without
    `force`; never one that is or holds an input (`inputs`: what each is called -> its path), the
    working folder or a folder above it, or the home folder, even with `force` (atomic_dir removes
    what was there); and its parent must take a new folder (said now, not after the work is done)."""
    from ragtune.errors import UsageError

    p = Path(out).expanduser().resolve()
    for what, src in inputs.items():
        src = Path(src).resolve()
        if p == src or src.is_relative_to(p):
            where = "is" if p == src else "holds"
            raise UsageError(f"{flag} '{p}' {where} the {what} ('{src}'); replacing it would delete it: "
                             f"name a new folder for {flag}")
    try:
        cwd = [(Path.cwd().resolve(), "the current folder")]
    except OSError:  # the working folder was deleted under this process
        cwd = []
    for special, name in cwd + [(Path.home().resolve(), "your home folder")]:
        if p == special or special.is_relative_to(p):
            raise UsageError(f"{flag} '{p}' is or holds {name}, which it would replace: name a new folder for {flag}")
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} '{p}' is a file; name a folder")
    if p.exists() and any(p.iterdir()) and not force:
        raise UsageError(f"{flag} '{p}' exists and is not empty; pass --force to replace it, or name a new folder")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    try:  # the same temp folder atomic_dir will make: an unwritable place fails before the work
        Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)).rmdir()
    except OSError as exc:
        raise UsageError(f"{flag} '{p}': cannot create a folder in '{parent}' ({exc.strerror or exc}); "
                         "name a writable place") from None
    return p


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside `path`; on success it replaces `path` (old content removed)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _unprivate(tmp)
    old = None
    if p.exists():
        old = p.with_name(f".{p.name}.old-{os.getpid()}")
        os.replace(p, old)
    os.replace(tmp, p)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
