"""Where edge indexes live and who has them: names, folders, the index lock, generations, reader copies.

    from ragtune.retrieval.index_dirs import IndexLock, check_index_name, generation, index_dir, live_readers, missing_index

    check_index_name("policies")                 # refuses names that are not safe as a folder name
    index_dir("policies")                        # $RAGTUNE_HOME/indexes/policies
    with IndexLock("policies", "index add"):     # exclusive: a second writer gets IndexBusy at once
        ...                                      # on exit the writer bumps policies/generation
    with IndexLock("policies", shared=True):     # readers share; a writer waits up to `wait` seconds for them
        ...
    generation("policies")                       # changes whenever a writer has had the index
    live_readers("policies")                     # pids of servers and chats reading a private copy
    raise missing_index("policies")              # the one message for an index that is not there

Used by both stores (`ragtune.retrieval.store`), ingest, search, bundles and train/rag.py.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ragtune.errors import RagtuneError, UsageError


class IndexBusy(RagtuneError):
    """The index is open in another process (a writer, or a reader of an Edge index)."""


def indexes_root() -> Path:
    """$RAGTUNE_HOME/indexes: one folder per edge index."""
    from ragtune.modeling import ragtune_home

    return ragtune_home() / "indexes"


def index_dir(name: str) -> Path:
    return indexes_root() / name


def check_index_name(name: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name or ""):
        raise UsageError(
            f"index name '{name}' is not valid; use letters, digits, '_', '.', '-' (up to 64, starting with a letter or digit)"
        )
    return name


class IndexLock:
    """fcntl lock on the index folder, released when the process dies: exclusive for a writer (which
    bumps the index's generation when it lets go), shared for readers. A writer that finds only
    readers there waits up to `wait` seconds for them; one that finds a writer fails at once."""

    def __init__(self, name: str, what: str = "", shared: bool = False, wait: float = 10.0) -> None:
        self.name = name
        self.path = index_dir(name) / ".lock"
        self.what = what or "ragtune"
        self.shared = shared
        self.wait = wait
        self.fd: int | None = None

    def __enter__(self) -> "IndexLock":
        import fcntl
        import time

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # RAGTUNE_HOME a file, or read-only
            from ragtune.modeling import ragtune_home

            raise RagtuneError(
                f"cannot use index '{self.name}' in {self.path.parent}: {exc.strerror or exc}; indexes live under "
                f"RAGTUNE_HOME ({ragtune_home()}): set RAGTUNE_HOME to a folder you can write to") from None
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = ""
                try:
                    holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
                except OSError:
                    pass
                if not self.shared and not holder and time.monotonic() < deadline:
                    time.sleep(0.1)  # only readers: they let go within moments
                    continue
                os.close(fd)
                if self.shared:
                    raise IndexBusy(
                        f"index '{self.name}' is being written by another process{f' ({holder})' if holder else ''}; "
                        "wait for it to finish and run the command again"
                    ) from None
                raise IndexBusy(
                    f"index '{self.name}' is in use by another process ({holder or 'a reader'}); "
                    "wait for it to finish and run the command again"
                ) from None
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {self.what}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        import fcntl

        if self.fd is not None:
            try:
                if not self.shared and self.path.parent.is_dir():  # gone when `index drop` took it
                    from ragtune.io import atomic_write_text

                    atomic_write_text(self.path.parent / "generation", uuid.uuid4().hex + "\n")
                    os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def generation(name: str) -> str:
    """Changes whenever a writer has had the index (readers of a copy compare it to theirs)."""
    try:
        return (index_dir(name) / "generation").read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def remove_stale_copies(name: str) -> None:
    """Read copies whose process is gone (killed servers) are deleted by the next reader."""
    root = index_dir(name) / ".readers"
    if not root.is_dir():
        return
    for d in root.iterdir():
        try:
            os.kill(int(d.name.split("-", 1)[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def live_readers(name: str) -> list[int]:
    """Process ids of the running processes (servers, chats) that read a private copy of the index."""
    root = index_dir(name) / ".readers"
    pids = set()
    if root.is_dir():
        for d in root.iterdir():
            try:
                pid = int(d.name.split("-", 1)[0])
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError):
                continue
            except PermissionError:  # alive, another user's
                pass
            pids.add(pid)
    return sorted(pids)


def lock_holder(name: str) -> str:
    try:
        return (index_dir(name) / ".lock").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def local_indexes() -> list[str]:
    """The names of the edge indexes under $RAGTUNE_HOME/indexes that hold a store."""
    root = indexes_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "shard" / "edge_config.json").is_file())


def other_indexes(name: str, most: int = 10) -> str:
    """The local indexes other than `name`, for an error about a missing one ("" when there are none)."""
    others = [n for n in local_indexes() if n != name]
    return ", ".join(others[:most]) + (" ..." if len(others) > most else "")


def missing_index(name: str, where: str = "", also: str = "", how: str = "", others: bool = True) -> UsageError:
    """The one message for an index that is not there: where it was looked for (`where`), what to do
    (`how`: create it, by default; `also`: another way out), and the local indexes that do exist."""
    how = how or f"create it with 'ragtune index add PATH --index {name}'"
    msg = f"index '{name}' does not exist" + (f" at {where}" if where else "") + f"; {how}" + (f", or {also}" if also else "")
    names = other_indexes(name) if others else ""
    return UsageError(msg + (f"; the indexes here are {names} (pick one with --index NAME)" if names else ""))
