"""Config loading: YAML + overrides into frozen dataclasses; every problem reported at once."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ragtune.cli import main
from ragtune.config import Config, load_config
from ragtune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_are_frozen() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.index.name == "default"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 1  # type: ignore[misc]


def test_yaml_and_overrides(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  epochs: 2\n  lora:\n    r: 8\nsearch:\n  mode: dense\n")
    cfg = load_config(p, ["train.lora.r=4", "train.lora.target_modules=q_proj,v_proj", "rag.enabled=false"])
    assert cfg.train.epochs == 2.0
    assert cfg.train.lora.r == 4
    assert cfg.train.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.search.mode == "dense"
    assert cfg.rag.enabled is False


def test_deployments_list(tmp_path: Path) -> None:
    p = write(tmp_path, "serve:\n  deployments:\n    - {name: base}\n    - {name: policies+rag, adapter: runs/a, index: default}\n")
    cfg = load_config(p)
    assert [d.name for d in cfg.serve.deployments] == ["base", "policies+rag"]
    assert cfg.serve.deployments[1].index == "default"


def test_unknown_key_names_file_key_and_allowed(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  epoch: 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}: unknown key 'train.epoch' (allowed: output_dir, epochs,")
    assert msg.endswith("did you mean 'train.epochs'?")


def test_peer_names_point_at_ours_across_sections() -> None:
    """`train.lr` or `train.max_seq_length` (TRL's and axolotl's names) suggest ours, even in
    another section, instead of the nearest spelling (`lora`, `max_steps`)."""
    from ragtune.config import PEER_KEYS

    for peer, ours in PEER_KEYS.items():
        load_config(None, [f"{ours}={_sample(ours)}"])  # every target is a real key
        with pytest.raises(ConfigError) as exc:
            load_config(None, [f"train.{peer}=1"])
        assert str(exc.value).endswith(f"did you mean '{ours}'?"), peer


def _sample(key: str) -> str:
    import ragtune.config as c

    value: object = c.Config()
    for part in key.split("."):
        value = getattr(value, part)
    return {bool: "true", int: "1", float: "0.1", str: "x", tuple: "[q_proj]"}[type(value)]


def test_unknown_section(tmp_path: Path) -> None:
    p = write(tmp_path, "trainer:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert f"{p}: unknown key 'trainer'" in str(exc.value)
    assert "did you mean 'train'?" in str(exc.value)


def test_bad_value_names_key_and_expected_type(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  batch_size: eight\nsearch:\n  mode: fuzzy\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert exc.value.problems == [
        f"{p}: key 'train.batch_size': expected an integer, got 'eight'",
        f"{p}: key 'search.mode': expected one of 'dense', 'sparse', 'hybrid', got 'fuzzy'",
    ]


def test_counts_below_their_minimum_name_the_key(tmp_path: Path) -> None:
    """A count of 0 or less (top_k, max_new_tokens, batch sizes...) is refused where it was written, every one
    at once; a setting whose 0 or -1 means something (data.rag.top_k, data.rag.distractors) keeps it."""
    p = write(tmp_path, "rag:\n  top_k: 0\nchunk:\n  overlap: -1\ngeneration:\n  temperature: -0.5\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, ["serve.max_batch=0", "data.rag.top_k=0", "data.rag.distractors=-1"])
    assert exc.value.problems == [
        f"{p}: key 'chunk.overlap': must be at least 0, got -1",
        f"{p}: key 'generation.temperature': must be at least 0, got -0.5",
        f"{p}: key 'rag.top_k': must be at least 1, got 0",
        "override 'serve.max_batch=0': key 'serve.max_batch': must be at least 1, got 0",
    ]
    assert load_config(None, ["data.rag.top_k=0", "data.rag.distractors=-1", "chunk.overlap=0"]).data.rag.top_k == 0


def test_bad_override_is_reported_with_the_fix() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.epochs"])
    assert exc.value.problems == ["override 'train.epochs': expected key.sub=value (for example train.epochs=2)"]


def test_override_bad_value() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.epochs=many"])
    assert exc.value.problems == ["override 'train.epochs=many': key 'train.epochs': expected a number, got 'many'"]


def test_unknown_override_key_blames_the_override(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, ["train.epoch=3"])
    (msg,) = exc.value.problems
    assert msg.startswith("override 'train.epoch=3': unknown key 'train.epoch' (allowed: output_dir, epochs,")
    assert str(p) not in msg


def test_all_problems_at_once(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  epoch: 2\n  batch_size: x\nmodel:\n  dtype: int3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert len(exc.value.problems) == 3


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(exc.value).startswith(f"{p}: line ")
    assert "not valid YAML" in str(exc.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.yaml")
    assert str(exc.value) == f"{tmp_path / 'nope.yaml'}: config file not found"


def test_cli_config_error_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "model:\n  pathh: /x\n")
    rc = main(["doctor", "--config", str(p)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"error: {p}: unknown key 'model.pathh'" in err
    assert "did you mean 'model.path'?" in err


def test_cli_bad_override_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["doctor", "train.batch_size=big"])
    assert rc == 2
    assert "key 'train.batch_size': expected an integer, got 'big'" in capsys.readouterr().err


def test_cli_setting_without_its_section_names_the_full_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "lr=1e-4", "epochs=2", "--resume", "top_k=3", "zzzqq=1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: 'lr=1e-4' is not a setting: settings are section.key=value; did you mean 'train.learning_rate=1e-4'?",
        "'epochs=2' is not a setting: settings are section.key=value; did you mean 'train.epochs=2'?",
        "'top_k=3' is not a setting: settings are section.key=value; did you mean 'search.top_k=3'?",
        "'zzzqq=1' is not a setting: settings are section.key=value (see configs/ for the keys)",
    ]
    # a question that happens to look like one is still the question
    from ragtune.cli import build_parser, _split_globals

    rest, _, overrides = _split_globals(["ask", "E=mc2"])
    assert overrides == [] and build_parser().parse_known_args(rest)[0].question == "E=mc2"


def shipped_configs() -> list[Path]:
    return sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_there_are_shipped_configs() -> None:
    assert shipped_configs(), "configs/ must hold at least one YAML"


def test_scientific_notation_floats(tmp_path: Path) -> None:
    """YAML 1.1 reads 5e-3 as a string; a float field takes it as the number it means."""
    p = write(tmp_path, "train:\n  learning_rate: 5e-4\n")
    assert load_config(p, []).train.learning_rate == 5e-4
    assert load_config(None, ["train.learning_rate=2e-4"]).train.learning_rate == 2e-4
    with pytest.raises(ConfigError):
        load_config(None, ["train.learning_rate=fast"])


def test_bare_on_off_is_the_choice_not_a_boolean(tmp_path: Path) -> None:
    """YAML reads `on`/`off` as true/false; a key whose choices are on/off takes them as written."""
    p = write(tmp_path, "train:\n  gradient_checkpointing: on\n")
    assert load_config(p).train.gradient_checkpointing == "on"
    assert load_config(None, ["train.gradient_checkpointing=off"]).train.gradient_checkpointing == "off"
    assert load_config(None, ["train.gradient_checkpointing=auto"]).train.gradient_checkpointing == "auto"
    with pytest.raises(ConfigError, match="expected one of 'auto', 'on', 'off'"):
        load_config(None, ["train.gradient_checkpointing=maybe"])
    # and a bare `no` where "no" is a choice
    assert load_config(write(tmp_path, "train:\n  mixed_precision: no\n")).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="expected one of 'auto', 'bf16', 'no'"):
        load_config(None, ["train.mixed_precision=yes"])


def test_a_string_key_takes_an_override_as_typed(tmp_path: Path) -> None:
    cfg = load_config(None, ["rag.not_found_message=No", "index.name=007", "serve.api_key=1e3", "train.epochs=2"])
    assert (cfg.rag.not_found_message, cfg.index.name, cfg.serve.api_key) == ("No", "007", "1e3")
    assert cfg.train.epochs == 2.0
    p = write(tmp_path, "rag:\n  not_found_message: No\n")  # in a file, YAML has already read a boolean
    with pytest.raises(ConfigError, match="got False .YAML reads a bare yes/no/on/off/true/false as a boolean"):
        load_config(p)


def test_the_demo_serve_config_names_what_the_demo_builds() -> None:
    """configs/serve/demo.yaml works right after ./scripts/demo.sh: its index and adapters are the demo's."""
    demo = load_config(str(ROOT / "configs/demo.yaml"))
    serve = load_config(str(ROOT / "configs/serve/demo.yaml"))
    script = (ROOT / "scripts/demo.sh").read_text(encoding="utf-8")
    out = re.search(r'^OUT=(\S+)$', script, re.M).group(1)
    built = {demo.train.output_dir} | {f"{out}/{m}" for m in re.findall(r'train\.output_dir="\$OUT/([\w./-]+)"', script)}
    assert serve.index.name == demo.index.name
    assert (serve.chunk.size, serve.chunk.overlap) == (demo.chunk.size, demo.chunk.overlap)
    for d in serve.serve.deployments:
        assert d.index in ("", demo.index.name), d
        assert d.adapter in {"", *built}, (d, built)
    assert {d.adapter for d in serve.serve.deployments} >= built


def test_one_gguf_type_list_with_f16_by_default() -> None:
    """The config, the export CLI/cache and the quantizer read one list; the default stays f16, the fastest
    file for a RAG answer in docs/benchmarks.md's measurement (prefill of a ~350-token prompt dominates)."""
    import typing

    from ragtune.config import GenerationConfig
    from ragtune.export.quantize import LLAMA_FTYPES, TYPES

    assert typing.get_args(typing.get_type_hints(GenerationConfig)["gguf_type"]) == TYPES
    assert tuple(LLAMA_FTYPES) == TYPES
    assert load_config(None).generation.gguf_type == "f16"
