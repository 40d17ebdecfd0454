"""Checkpoints cut off while saving, and the run card of a resumed run, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.cli import main


def _weights(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def test_resume_skips_a_checkpoint_cut_off_while_saving_and_records_the_whole_run(
        trainable_llama: Path, qa_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from transformers import TrainerCallback

    from ragtune.train import recipe

    def args(out: Path) -> list[str]:
        return ["-q", "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}",
                f"train.output_dir={out}", "train.max_steps=6", "train.save_steps=2", "train.batch_size=4",
                "train.save_total_limit=0", "train.threads=1"]

    whole = tmp_path / "whole"
    assert main(args(whole)) == 0
    expected = json.loads((whole / "ragtune.json").read_text())["metrics"]

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == 5:  # checkpoint-4 was saved at the end of step 4
                raise KeyboardInterrupt

    real = recipe.make_callbacks
    monkeypatch.setattr(recipe, "make_callbacks", lambda *a: real(*a) + [Interrupt()])
    out = tmp_path / "cut"
    assert main(args(out)) == 130
    monkeypatch.setattr(recipe, "make_callbacks", real)
    ckpts = out / "checkpoints"
    # what kill -9 during a save leaves: an empty checkpoint-6/, and a checkpoint-8/ with weights and no state
    (ckpts / "checkpoint-6").mkdir()
    (ckpts / "checkpoint-8").mkdir()
    (ckpts / "checkpoint-8" / "adapter_model.safetensors").write_bytes((ckpts / "checkpoint-4" /
                                                                          "adapter_model.safetensors").read_bytes())
    (ckpts / "checkpoint-8" / "trainer_state.json").write_text('{"global_st')  # cut mid-write
    caplog.clear()
    assert main(args(out) + ["--resume"]) == 0
    for step in (6, 8):
        assert f"checkpoint {ckpts / f'checkpoint-{step}'} is incomplete (interrupted while it was being saved): " \
               "removed; resuming from the one before it" in caplog.text
    card = json.loads((out / "ragtune.json").read_text())
    m = card["metrics"]
    assert (m["resumed_from_step"], m["steps"]) == (4, 6)
    # the run card covers the whole run, as an uninterrupted one does (not only steps 5-6)
    assert m["train_tokens"] == expected["train_tokens"]
    assert m["train_loss_mean"] == pytest.approx(expected["train_loss_mean"], abs=1e-3)
    assert m["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-6)
    got, want = _weights(out), _weights(whole)
    assert got.keys() == want.keys()
    assert all((got[k] - want[k]).abs().max() < 1e-6 for k in want)


def test_no_complete_checkpoint_is_a_clear_refusal(trainable_llama: Path, qa_file: Path, tmp_path: Path,
                                                   capsys) -> None:
    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # killed while saving the first checkpoint
    rc = main(["-q", "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}",
               f"train.output_dir={out}", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "--resume: no checkpoint in" in err and "Traceback" not in err


def test_resume_without_checkpoints_says_which_way_to_start_over(tmp_path: Path) -> None:
    """Once an interrupted --overwrite has cleared the checkpoints, the advice must be one that works."""
    from ragtune.errors import UsageError
    from ragtune.train.recipe import _resume_point

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    with pytest.raises(UsageError, match="start a new run without --resume"):
        _resume_point(out, out / "checkpoints", resume=True, overwrite=False)
    (out / "adapter_config.json").write_text("{}")  # the last finished adapter is still there
    with pytest.raises(UsageError, match="start a new run with --overwrite instead of --resume"):
        _resume_point(out, out / "checkpoints", resume=True, overwrite=False)
    with pytest.raises(UsageError, match="pass --resume to continue it, --overwrite to start over"):
        _resume_point(out, out / "checkpoints", resume=False, overwrite=False)
    assert _resume_point(out, out / "checkpoints", resume=False, overwrite=True) is None


def test_an_output_dir_holding_other_files_is_refused(tmp_path: Path) -> None:
    """The finished run replaces output_dir whole: train.output_dir=. in a project folder would delete it."""
    from ragtune.errors import UsageError
    from ragtune.train.recipe import _resume_point

    project = tmp_path / "project"
    project.mkdir()
    (project / "train.jsonl").write_text("{}\n")
    for overwrite in (False, True):
        with pytest.raises(UsageError, match=r"holds files that are not a ragtune run \(train.jsonl\)"):
            _resume_point(project, project / "checkpoints", resume=False, overwrite=overwrite)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        _resume_point(tmp_path / "afile", tmp_path / "afile" / "checkpoints", resume=False, overwrite=True)
    assert _resume_point(tmp_path / "new", tmp_path / "new" / "checkpoints", resume=False, overwrite=False) is None


def test_checkpoints_from_before_the_rag_settings_were_recorded_still_resume(tmp_path: Path) -> None:
    from ragtune.errors import UsageError
    from ragtune.train.checkpoints import RUN_SETTINGS, check_resume_settings

    then = {"train.learning_rate": 0.001, "data.rag.index_identity": "sha256:abc"}
    (tmp_path / RUN_SETTINGS).write_text(json.dumps(then))
    now = {**then, "rag.question_first": False, "rag.system_prompt": "", "rag.top_k": 2, "search.mode": "hybrid",
           "search.dedupe": True}
    check_resume_settings(tmp_path, now)  # recorded since: not compared against checkpoints that lack them
    (tmp_path / RUN_SETTINGS).write_text(json.dumps({**then, "rag.question_first": True}))
    with pytest.raises(UsageError, match="rag.question_first: true in the checkpoints, false now"):
        check_resume_settings(tmp_path, now)
    # the search that chose the sources: compared once recorded (a changed mode or dedupe builds other prompts)
    (tmp_path / RUN_SETTINGS).write_text(json.dumps({**now, "search.dedupe": False}))
    with pytest.raises(UsageError, match="search.dedupe: false in the checkpoints, true now"):
        check_resume_settings(tmp_path, now)
