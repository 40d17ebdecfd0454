"""Shipped training and accelerate configs: the YAML ragtune reads loads; accelerate's parse."""

from __future__ import annotations

from pathlib import Path

import yaml

from ragtune.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_train_configs_load_and_point_at_shipped_data() -> None:
    paths = sorted((ROOT / "configs" / "train").glob("*.yaml"))
    assert paths
    for p in paths:
        cfg = load_config(p)
        assert (ROOT / cfg.data.train_file).is_file(), p
        assert cfg.train.learning_rate > 0


def test_accelerate_configs_parse() -> None:
    kinds = {}
    for p in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        data = yaml.safe_load(p.read_text())
        assert data["compute_environment"] == "LOCAL_MACHINE", p
        assert "accelerate launch --config_file" in p.read_text(), f"{p} should show the launch command"
        kinds[data["distributed_type"]] = data
    assert set(kinds) == {"NO", "MULTI_GPU", "FSDP"}
    assert kinds["FSDP"]["fsdp_config"]["fsdp_version"] == 2
    assert kinds["MULTI_GPU"]["num_processes"] >= 2
