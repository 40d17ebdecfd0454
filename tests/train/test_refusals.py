"""`ragtune train` / `ragtune merge` refusing what would fail later, with the fix and nothing written: LoRA
targets the model lacks, a resume with no steps left, a damaged checkpoint, an adapter whose base moved."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune.cli import main

QUICK = ["train.batch_size=4", "train.threads=1", "train.save_steps=2"]


def _train(base: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["-q", "train", f"model.path={base}", f"data.train_file={data}", f"train.output_dir={out}",
                 *QUICK, *extra])


def test_lora_targets_the_model_lacks_are_refused_before_anything_is_written(
        trainable_llama: Path, qa_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    for targets, bad in (("q_proj,foo", "'foo'"), ("mlp", "'mlp'")):  # a misspelling; a block, not a layer
        assert _train(trainable_llama, qa_file, out, "train.max_steps=1", f"train.lora.target_modules={targets}") == 2
        err = capsys.readouterr().err
        assert f"train.lora.target_modules: {bad} matches no layer LoRA can adapt in this model; its linear layers " \
               "are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in err, err
        assert "Traceback" not in err and not out.exists()
    assert _train(trainable_llama, qa_file, out, "train.max_steps=1", "train.lora.target_modules=") == 2
    assert "must name the modules LoRA adapts" in capsys.readouterr().err and not out.exists()
    assert _train(trainable_llama, qa_file, out, "train.max_steps=1", "train.lora.target_modules=[q_proj,v_proj]") == 0
