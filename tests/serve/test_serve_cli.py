"""`ragtune serve` refuses bad settings before opening a port, with exit 2 and the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ragtune.cli import main


def test_serve_rejects_a_bad_port_and_a_missing_model(capsys) -> None:
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert main(["serve", "model.path=/nonexistent/model"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_names_the_deployment_whose_adapter_does_not_match(tiny_llama: Path, tiny_adapter: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_adapter, bad)
    card = json.loads((bad / "ragtune.json").read_text())
    card["base_model"]["hash"] = "f" * 64
    (bad / "ragtune.json").write_text(json.dumps(card))
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"model:\n  path: {tiny_llama}\nserve:\n  deployments:\n    - {{name: good, adapter: {tiny_adapter}}}\n"
                   f"    - {{name: wrong, adapter: {bad}}}\n    - {{name: good}}\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "name 'good' is used twice" in err
    cfg.write_text(cfg.read_text().replace("    - {name: good}\n", ""))
    assert main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "deployment 'wrong'" in err and "base model" in err and "Traceback" not in err


@pytest.mark.parametrize("yaml_file", sorted((Path(__file__).resolve().parents[2] / "configs" / "serve").glob("*.yaml")))
def test_shipped_serve_configs_load(yaml_file: Path) -> None:
    from ragtune.config import load_config

    cfg = load_config(yaml_file)
    assert cfg.serve.host == "127.0.0.1" and all(d.name for d in cfg.serve.deployments)


def test_a_server_that_fails_to_start_leaves_no_copy_of_its_index(tiny_llama: Path, tiny_embedder: Path,
                                                                    ragtune_home: Path, tmp_path: Path, capsys) -> None:
    from ragtune.retrieval.ingest import ingest
    from tests.retrieval.conftest import make_cfg, write_docs

    ingest(make_cfg(tiny_embedder), [str(write_docs(tmp_path / "docs"))], index="docs", progress=False)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"model:\n  path: {tiny_llama}\nembedder:\n  path: {tiny_embedder}\n  device: cpu\n"
                   "serve:\n  deployments:\n    - {name: a, index: docs}\n"
                   f"    - {{name: b, adapter: {tmp_path / 'no-such-adapter'}}}\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    assert "deployment 'b'" in capsys.readouterr().err
    readers = ragtune_home / "indexes" / "docs" / ".readers"
    assert not readers.exists() or not any(readers.iterdir())


def test_serve_on_a_taken_port_or_a_foreign_host_exits_2_before_loading(capsys, monkeypatch) -> None:
    """uvicorn's own bind failed after the models had loaded (minutes for a first GGUF export), after the
    'ragtune serve: http://...' line claimed the address, with one log line and exit 3 (partial success)."""
    import socket

    from ragtune.serve import server

    monkeypatch.setattr(server, "create_app", lambda *a, **k: pytest.fail("models were loaded"))
    remote = ["generation.engine=openai", "generation.url=http://127.0.0.1:1/v1", "generation.model=x"]
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        assert main(["serve", "--port", str(port), *remote]) == 2
        out, err = capsys.readouterr()
        assert f"--port {port}: 127.0.0.1:{port} is already in use" in err and "--port N" in err and out == ""
    finally:
        taken.close()
    assert main(["serve", "--host", "no-such-host.invalid", "--port", str(port), *remote]) == 2
    assert "--host no-such-host.invalid: not an address" in capsys.readouterr().err
    assert main(["serve", "--host", "192.0.2.1", "--port", str(port), *remote]) == 2  # TEST-NET: not this machine
    assert "--host 192.0.2.1: cannot listen on 192.0.2.1" in capsys.readouterr().err
