"""Config loading: YAML + overrides into frozen dataclasses; every problem reported at once."""

from __future__ import annotations

import dataclasses
import logging
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
    # a string setting takes its default (a choice accepts no other), else "x"
    return {bool: "true", int: "1", float: "0.1", str: str(value or "x"), tuple: "[q_proj]"}[type(value)]


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
    p = write(tmp_path, "rag:\n  top_k: 0\nchunk:\n  overlap: -2\ngeneration:\n  temperature: -0.5\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, ["serve.max_batch=0", "data.rag.top_k=0", "data.rag.distractors=-1"])
    assert exc.value.problems == [
        f"{p}: key 'chunk.overlap': must be at least -1 (-1 = the index's own, 128 for a new index), got -2",
        f"{p}: key 'generation.temperature': must be at least 0 (0 = greedy), got -0.5",
        f"{p}: key 'rag.top_k': must be at least 1, got 0",
        "override 'serve.max_batch=0': key 'serve.max_batch': must be at least 1, got 0",
    ]
    assert load_config(None, ["data.rag.top_k=0", "data.rag.distractors=-1", "chunk.overlap=0"]).data.rag.top_k == 0
    assert load_config(None, ["chunk.overlap=-1", "chunk.size=0"]).chunk == Config().chunk  # unset, spelt out


@pytest.mark.parametrize("override, message", [
    ("train.lora.dropout=1.5", "key 'train.lora.dropout': must be at least 0 and below 1, got 1.5"),
    ("train.learning_rate=-0.1", "key 'train.learning_rate': must be more than 0, got -0.1"),
    ("train.learning_rate=0", "key 'train.learning_rate': must be more than 0, got 0.0"),
    ("train.logging_steps=0", "key 'train.logging_steps': must be at least 1, got 0"),
    ("train.warmup_ratio=2", "key 'train.warmup_ratio': must be at least 0 and below 1, got 2.0"),
    ("train.weight_decay=-3", "key 'train.weight_decay': must be at least 0, got -3.0"),
    ("train.lora.alpha=0", "key 'train.lora.alpha': must be more than 0, got 0"),
    ("train.lora.r=0", "key 'train.lora.r': must be at least 1, got 0"),
    ("train.threads=-4", "key 'train.threads': must be at least 0 (0 = choose), got -4"),
    ("train.seed=-1", "key 'train.seed': must be at least 0 and at most 4294967295, got -1"),
    ("train.max_steps=-2", "key 'train.max_steps': must be at least -1 (-1 or 0 = train for train.epochs), got -2"),
    ("train.save_total_limit=-1", "key 'train.save_total_limit': must be at least 0 (0 = keep every checkpoint)"),
    ("data.eval_fraction=1.0", "key 'data.eval_fraction': must be at least 0 and below 1 (0 = no split), got 1.0"),
    ("data.eval_fraction=1.5", "key 'data.eval_fraction': must be at least 0 and below 1 (0 = no split), got 1.5"),
    ("data.eval_fraction=-0.5", "key 'data.eval_fraction': must be at least 0 and below 1 (0 = no split), got -0.5"),
    ("data.rag.withheld=1.2", "key 'data.rag.withheld': must be at least 0 and at most 1, got 1.2"),
    ("data.rag.distractors=-2", "key 'data.rag.distractors': must be at least -1 (-1 = all of the top_k others)"),
    ("generation.repetition_penalty=0", "key 'generation.repetition_penalty': must be more than 0 (1 = none), got 0.0"),
    ("generation.repetition_penalty=-1", "key 'generation.repetition_penalty': must be more than 0 (1 = none)"),
    ("generation.top_p=5", "key 'generation.top_p': must be more than 0 and at most 1, got 5.0"),
    ("generation.top_p=0", "key 'generation.top_p': must be more than 0 and at most 1, got 0.0"),
    ("generation.threads=-1", "key 'generation.threads': must be at least 0 (0 = the engine's default), got -1"),
    ("search.hnsw_ef=-5", "key 'search.hnsw_ef': must be at least 0 (0 = the store's default), got -5"),
    ("search.rrf_k=-60", "key 'search.rrf_k': must be more than 0, got -60"),
    ("search.rrf_k=0", "key 'search.rrf_k': must be more than 0, got 0"),
    ("search.dense_weight=-1", "key 'search.dense_weight': must be at least 0, got -1.0"),
    ("search.candidates=0", "key 'search.candidates': must be at least 1, got 0"),
    ("chunk.size=4", "key 'chunk.size': must be 0 or at least 8 (0 = the index's own, 256 for a new index), got 4"),
    ("chunk.size=-8", "key 'chunk.size': must be 0 or at least 8 (0 = the index's own, 256 for a new index), got -8"),
    ("serve.port=70000", "key 'serve.port': must be at least 1 and at most 65535, got 70000"),
    ("eval.bootstrap=0", "key 'eval.bootstrap': must be at least 1, got 0"),
    ("train.epochs=-1", "key 'train.epochs': must be more than 0 (0 only when train.max_steps > 0 sets the length), "
                        "got -1.0"),
    ("train.learning_rate=.nan", "key 'train.learning_rate': must be a finite number, got nan"),
    ("train.learning_rate=1e999", "key 'train.learning_rate': must be a finite number, got inf"),
    ("search.hnsw_ef=" + "9" * 25, "key 'search.hnsw_ef': must be at least 0 and at most 9223372036854775807"),
])
def test_out_of_range_values_name_the_key_and_the_range(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    (problem,) = exc.value.problems
    assert problem.startswith(f"override '{override}': {message}")


def test_every_range_problem_at_once_where_it_was_written(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  warmup_ratio: 2\n  lora:\n    dropout: 1.5\nsearch:\n  rrf_k: -60\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, ["generation.top_p=5"])
    assert exc.value.problems == [
        f"{p}: key 'train.warmup_ratio': must be at least 0 and below 1, got 2.0",
        f"{p}: key 'train.lora.dropout': must be at least 0 and below 1, got 1.5",
        f"{p}: key 'search.rrf_k': must be more than 0, got -60",
        "override 'generation.top_p=5': key 'generation.top_p': must be more than 0 and at most 1, got 5.0",
    ]


def test_epochs_zero_needs_max_steps() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.epochs=0", "train.max_steps=0"])
    assert exc.value.problems == ["override 'train.epochs=0': key 'train.epochs': must be more than 0 (0 only when "
                                  "train.max_steps > 0 sets the length), got 0.0"]
    assert load_config(None, ["train.epochs=0", "train.max_steps=5"]).train.max_steps == 5


def test_overlap_is_at_most_half_the_chunk_and_judged_once() -> None:
    assert load_config(None, ["chunk.size=96", "chunk.overlap=48"]).chunk.overlap == 48
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["chunk.size=96", "chunk.overlap=49"])
    assert exc.value.problems == ["override 'chunk.overlap=49': key 'chunk.overlap': must be at most half of "
                                  "chunk.size 96 (48), got 49"]
    # an unset overlap (the index's own, or 128) is "at most half a chunk": a smaller chunk.size alone is no error
    assert load_config(None, ["chunk.size=96"]).chunk.overlap == -1
    # an overlap alone is judged at ingest, against the size the index keeps (tests/retrieval/test_index_chunking.py)
    assert load_config(None, ["chunk.overlap=300"]).chunk.overlap == 300
    with pytest.raises(ConfigError) as exc:  # a size refused on its own is not judged against the overlap
        load_config(None, ["chunk.size=4", "chunk.overlap=100"])
    assert len(exc.value.problems) == 1 and "chunk.size" in exc.value.problems[0]


def test_hybrid_needs_a_weighted_channel() -> None:
    with pytest.raises(ConfigError, match="key 'search.dense_weight': must be more than 0 when search.sparse_weight"):
        load_config(None, ["search.dense_weight=0", "search.sparse_weight=0"])
    assert load_config(None, ["search.dense_weight=0", "search.sparse_weight=0", "search.mode=dense"])


def test_range_rules_name_real_settings_and_the_defaults_pass() -> None:
    from ragtune.config import RANGES, flat_settings

    settings = flat_settings()
    assert set(RANGES) <= set(settings)
    assert all(rule.allows(settings[key]) for key, rule in RANGES.items())


def test_a_cut_chunk_size_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    from ragtune.retrieval.ingest import _fit_chunk_size

    cfg = load_config(None, ["chunk.size=1000", "chunk.overlap=300"])
    with caplog.at_level(logging.DEBUG, logger="ragtune.retrieval.ingest"):
        assert _fit_chunk_size(cfg, 254) == 254
        assert _fit_chunk_size(cfg, 254) == 254
    said = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1
    assert said[0].getMessage() == (
        "chunk.size 1000 is more than the embedder reads: chunks are cut to 254 tokens, its maximum, and "
        "chunk.overlap 300 to 127; set 'chunk.size=254 chunk.overlap=127' (or less) to choose the size yourself")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ragtune.retrieval.ingest"):  # the default's cut is expected
        assert _fit_chunk_size(load_config(), 254) == 254
        assert _fit_chunk_size(load_config(None, ["chunk.size=200", "chunk.overlap=100"]), 254) == 200
    assert not caplog.records


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


def test_unknown_section_in_an_override_blames_the_override(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["trian.epochs=2", "train.lorra.r=4", "trian2.whatever=1"])
    sections = "model, data, train, embedder, chunk, store, index, search, generation, rag, serve, eval"
    assert exc.value.problems[0] == (f"override 'trian.epochs=2': unknown section 'trian' (allowed: {sections}); "
                                     "did you mean 'train.epochs=2'?")
    assert exc.value.problems[1].startswith("override 'trian2.whatever=1': unknown section 'trian2' (allowed: ")
    assert exc.value.problems[1].endswith("did you mean 'train'?")  # train.whatever is no setting either
    assert exc.value.problems[2].startswith("override 'train.lorra.r=4': unknown section 'train.lorra' (allowed: ")
    assert exc.value.problems[2].endswith("did you mean 'train.lora.r=4'?")
    p = write(tmp_path, "trian:\n  seed: 1\n")  # the file has the section too: the file is where to fix it
    with pytest.raises(ConfigError) as exc:
        load_config(p, ["trian.epochs=2"])
    assert exc.value.problems[0].startswith(f"{p}: unknown key 'trian' (allowed: ")
    assert main(["train", "--dry-run", "trian.epochs=2"]) == 2
    assert "error: override 'trian.epochs=2': unknown section 'trian'" in capsys.readouterr().err


def test_the_last_override_of_a_key_is_blamed() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.seed=-1", "train.seed=-2"])
    assert exc.value.problems == ["override 'train.seed=-2': key 'train.seed': must be at least 0 and at most "
                                  "4294967295, got -2"]


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


def test_invalid_yaml_names_where_the_construct_began(tmp_path: Path) -> None:
    """An unclosed quote breaks at the end of the file; the line to fix is where the quote opened."""
    p = write(tmp_path, 'model:\n  path: "abc\ntrain:\n  epochs: 2\n')
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert exc.value.problems == [f"{p}: line 2: not valid YAML: while scanning a quoted scalar at line 2, column 9, "
                                  "found unexpected end of stream at line 5, column 1"]


def test_a_config_that_is_not_utf8_says_where_and_how_to_fix(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"model:\n  path: \xff\xfe\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert exc.value.problems == [f"{p}: line 2, column 9: not UTF-8 text (byte 0xff at byte offset 15); "
                                  "save the file as UTF-8"]
    assert main(["doctor", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "save the file as UTF-8" in err and "Traceback" not in err


def test_a_directory_as_config_is_called_a_directory(tmp_path: Path) -> None:
    write(tmp_path, "train:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path)
    assert exc.value.problems == [f"{tmp_path}: is a directory, not a config file; pass a YAML file with --config "
                                  "(YAML files there: cfg.yaml)"]


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


def test_one_gguf_type_list_with_auto_by_default() -> None:
    """The config, the export CLI/cache and the quantizer read one list; the default is auto (bf16 where
    llama.cpp multiplies bf16 in hardware, else f16: the fastest files for a RAG answer in docs/benchmarks.md,
    where prefill of a ~350-token prompt dominates)."""
    import typing

    from ragtune.config import GenerationConfig
    from ragtune.export.quantize import LLAMA_FTYPES, TYPES

    assert typing.get_args(typing.get_type_hints(GenerationConfig)["gguf_type"]) == ("auto", *TYPES)
    assert tuple(LLAMA_FTYPES) == TYPES
    assert load_config(None).generation.gguf_type == "auto"


def test_an_unknown_lr_scheduler_is_a_config_error_not_a_traceback_after_the_model_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="key 'train.lr_scheduler': expected one of 'cosine', 'linear'"):
        load_config(None, ["train.lr_scheduler=bogus"])
    with pytest.raises(ConfigError, match="key 'train.lr_scheduler'"):  # needs min_lr, which ragtune has no key for
        load_config(None, ["train.lr_scheduler=cosine_with_min_lr"])
    assert load_config(None, ["train.lr_scheduler=constant_with_warmup"]).train.lr_scheduler == "constant_with_warmup"
    out = tmp_path / "run"
    assert main(["train", "train.lr_scheduler=bogus", f"train.output_dir={out}"]) == 2
    assert "train.lr_scheduler" in capsys.readouterr().err and not out.exists()


def test_a_key_given_twice_in_the_yaml_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys without a word: an edit to the first would do nothing."""
    p = write(tmp_path, "train:\n  epochs: 1\n  lora:\n    r: 4\n    r: 8\n  epochs: 2\n"
                        "serve:\n  deployments:\n    - name: a\n      name: b\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert exc.value.problems == [
        f"{p}: line 5: key 'train.lora.r' is given twice (first at line 4); YAML would keep only the last value: "
        "remove one of them",
        f"{p}: line 6: key 'train.epochs' is given twice (first at line 2); YAML would keep only the last value: "
        "remove one of them",
        f"{p}: line 10: key 'serve.deployments[0].name' is given twice (first at line 9); YAML would keep only the "
        "last value: remove one of them",
    ]
    # the same key in two sections, a merge key and a self-referring alias are not repeats
    p = write(tmp_path, "model:\n  device: cpu\nembedder:\n  device: cpu\ntrain:\n  <<: {epochs: 1}\n  epochs: 2\n")
    assert load_config(p).train.epochs == 2


def test_an_empty_output_dir_is_refused_not_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`train.output_dir=$OUT` with OUT unset resolved to the current folder, which the finished run replaced."""
    with pytest.raises(ConfigError, match=r"key 'train.output_dir': is empty \(an unset shell variable\?\)"):
        load_config(None, ["train.output_dir="])
    with pytest.raises(ConfigError, match="key 'train.output_dir': is empty"):
        load_config(write(tmp_path, "train:\n  output_dir: ' '\n"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "train.output_dir=", "data.train_file=x.jsonl"]) == 2
    assert "train.output_dir" in capsys.readouterr().err


def test_yaml_nested_too_deeply_is_a_config_error_not_a_recursion_traceback(tmp_path: Path) -> None:
    for text in ("train: " + "[" * 5000 + "]" * 5000, "train:\n  lora: " + "{a: " * 3000 + "1" + "}" * 3000):
        p = write(tmp_path, text)
        with pytest.raises(ConfigError, match=f"{re.escape(str(p))}: not valid YAML for a config: nested too deeply"):
            load_config(p)
    deep = "[" * 5000 + "]" * 5000  # an override's value too deep for YAML is the text typed
    with pytest.raises(ConfigError, match="key 'train.epochs': expected a number"):
        load_config(None, [f"train.epochs={deep}"])


def test_a_config_from_a_pipe_is_read(tmp_path: Path) -> None:
    """`--config <(...)` (a pipe under /dev/fd) and /dev/null were 'config file not found'."""
    import os

    r, w = os.pipe()
    os.write(w, b"train:\n  epochs: 7\n")
    os.close(w)
    try:
        assert load_config(f"/dev/fd/{r}").train.epochs == 7
    finally:
        os.close(r)
    assert load_config("/dev/null") == Config()
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_warmup_ratio_of_one_is_refused_not_read_as_one_step() -> None:
    """transformers takes warmup_steps=1.0 as one step (a float below 1 is a share of the run)."""
    with pytest.raises(ConfigError, match="key 'train.warmup_ratio': must be at least 0 and below 1, got 1.0"):
        load_config(None, ["train.warmup_ratio=1"])
    assert load_config(None, ["train.warmup_ratio=0.99"]).train.warmup_ratio == 0.99
