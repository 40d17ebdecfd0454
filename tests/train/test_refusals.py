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


def test_resume_of_a_run_with_no_steps_left_is_refused_and_leaves_the_adapter_as_it_was(
        trainable_llama: Path, qa_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _train(trainable_llama, qa_file, out, "train.max_steps=4") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    # the Trainer trained step 5 of 4 (same length) or rewrote the adapter from checkpoint-4 at 0 tokens/s (shorter)
    for length in ("train.max_steps=4", "train.max_steps=3"):
        assert _train(trainable_llama, qa_file, out, length, "--resume") == 2
        err = capsys.readouterr().err
        assert f"--resume: the last checkpoint is at step 4 and this run is {length[-1]} steps long ({length}): " \
               "nothing is left to train; raise train.max_steps or train.epochs" in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # stopped after its last step, before the adapter was written (Ctrl-C in the final evaluation): it goes on
    cut = tmp_path / "cut"
    cut.mkdir()
    (out / "checkpoints").rename(cut / "checkpoints")
    assert _train(trainable_llama, qa_file, cut, "train.max_steps=4", "--resume") == 0
    assert (cut / "adapter_model.safetensors").is_file()
    # a run by epochs (20 records, batch 4: 5 steps an epoch) that has finished them
    out = tmp_path / "epochs"
    assert _train(trainable_llama, qa_file, out, "train.epochs=1") == 0
    capsys.readouterr()
    assert _train(trainable_llama, qa_file, out, "train.epochs=1", "--resume") == 2
    assert "this run is 5 steps long (train.epochs=1): nothing is left to train" in capsys.readouterr().err
    assert _train(trainable_llama, qa_file, out, "train.epochs=2", "--resume") == 0


def test_resume_from_a_damaged_checkpoint_names_the_file_and_the_one_to_resume_from(
        trainable_llama: Path, qa_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    out = tmp_path / "run"
    assert _train(trainable_llama, qa_file, out, "train.max_steps=4", "train.save_total_limit=0") == 0
    last = out / "checkpoints" / "checkpoint-4"
    saved = tmp_path / "saved"
    shutil.copytree(last, saved)
    for name, cut in (("adapter_model.safetensors", "truncate"), ("optimizer.pt", "truncate"),
                      ("optimizer.pt", "flip")):
        f = last / name
        data = bytearray((saved / name).read_bytes())
        if cut == "truncate":
            data = data[:len(data) - 10]
        else:  # same length, damaged inside: only the archive's checksums tell
            data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
        f.write_bytes(bytes(data))
        capsys.readouterr()
        assert _train(trainable_llama, qa_file, out, "train.max_steps=6", "--resume") == 2
        err = capsys.readouterr().err
        assert f"--resume: checkpoint '{last}' is damaged ({name}: " in err, err
        assert f"delete '{last}' and run the same command again to resume from checkpoint-2" in err
        assert "Traceback" not in err
        f.write_bytes((saved / name).read_bytes())
    shutil.rmtree(last)
    assert _train(trainable_llama, qa_file, out, "train.max_steps=6", "--resume") == 0


def test_merge_of_an_adapter_whose_base_moved_asks_for_base_and_checks_it_by_hash(
        trainable_llama: Path, qa_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import shutil

    base = tmp_path / "base"
    shutil.copytree(trainable_llama, base)
    adapter = tmp_path / "adapter"
    assert _train(base, qa_file, adapter, "train.max_steps=1") == 0
    moved = base.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["merge", str(adapter), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"the adapter's base model '{base}' (named in {adapter / 'ragtune.json'}) is not there any more; pass " \
           "--base DIR with that model where it is now" in err, err
    assert "models prepare" not in err and not (tmp_path / "m").exists()
    other = tmp_path / "other"  # another model: refused by its hash
    shutil.copytree(moved, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
    assert main(["merge", str(adapter), "--out", str(tmp_path / "m"), "--base", str(other)]) == 2
    assert "hash" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main(["merge", str(adapter), "--out", str(tmp_path / "m"), "--base", str(moved)]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_a_second_run_into_the_same_output_dir_is_refused_while_the_first_trains(
        trainable_llama: Path, qa_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two runs into one folder both 'succeeded', with their checkpoints and metrics.jsonl interleaved."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "runs" / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "ragtune", "-q", "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}",
         f"train.output_dir={out}", "train.max_steps=100000", "train.save_steps=100000", *QUICK[:2]],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        settings = out / "checkpoints" / "ragtune-run.json"
        deadline = time.time() + 120
        while not settings.is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert settings.is_file(), first.stderr.read() if first.poll() is not None else "first run did not start"
        before = settings.read_bytes()
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert _train(trainable_llama, qa_file, out, "train.max_steps=2", *extra) == 2
            err = capsys.readouterr().err
            assert f"train.output_dir '{out}' is in use by another 'ragtune train' (pid {first.pid}); wait for it " \
                   "to finish, or set train.output_dir to another folder" in err, err
        assert settings.read_bytes() == before  # --overwrite did not delete the first run's checkpoints
    finally:
        # no clean-up at all: the kernel releases the lock. Not SIGINT: a pytest-xdist worker ignores SIGINT and its
        # children inherit that (Python then installs no KeyboardInterrupt handler), so the run trained on
        first.kill()
        first.communicate(timeout=120)
    assert first.returncode == -signal.SIGKILL
    # the lock dies with its holder; a refused run whose folder did not exist leaves no folder behind
    assert _train(trainable_llama, qa_file, out, "train.max_steps=2", "--overwrite") == 0
    assert _train(trainable_llama, qa_file, tmp_path / "new" / "deeper" / "run", "train.max_steps=1",
                  "train.lora.target_modules=nope") == 2
    assert not (tmp_path / "new").exists()
    assert json.loads((out / "ragtune.json").read_text())["metrics"]["steps"] == 2


def test_contradictory_or_nonsense_flags_are_usage_errors(qa_file: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--resume with --overwrite resumed (ignoring --overwrite); data check --max-length -5 reported
    'tokens per epoch -100' and exit 0."""
    out = tmp_path / "run"
    assert main(["train", f"data.train_file={qa_file}", f"train.output_dir={out}", "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite ask for opposite things" in capsys.readouterr().err and not out.exists()
    assert main(["data", "check", str(qa_file), "--max-length", "-5"]) == 2
    assert "--max-length must be a number of tokens (at least 1; 0 = data.max_length, 1024), got -5" in \
        capsys.readouterr().err


def test_resume_follows_the_base_model_by_content_not_by_path(
        trainable_llama: Path, qa_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The checkpoints recorded model.path by name: a base changed in place resumed silently (two models'
    training mixed), and the same base moved elsewhere was refused."""
    import json
    import shutil

    base = tmp_path / "base"
    shutil.copytree(trainable_llama, base)
    out = tmp_path / "run"
    assert _train(base, qa_file, out, "train.max_steps=2") == 0
    original = (base / "config.json").read_text()
    cfg = json.loads(original)
    (base / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))  # another model, same path
    capsys.readouterr()
    assert _train(base, qa_file, out, "train.max_steps=4", "--resume") == 2
    err = capsys.readouterr().err
    assert "belong to a run with other settings:\n  model.path: sha256:" in err, err
    (base / "config.json").write_text(original)
    moved = base.rename(tmp_path / "moved")  # the same model elsewhere
    assert _train(moved, qa_file, out, "train.max_steps=4", "--resume") == 0
    assert json.loads((out / "ragtune.json").read_text())["metrics"]["steps"] == 4


def test_resume_with_damaged_run_settings_is_a_usage_error(tmp_path: Path) -> None:
    from ragtune.errors import UsageError
    from ragtune.train.checkpoints import RUN_SETTINGS, check_resume_settings

    for text in ('{"model.pa', "[]", "\udcff"):
        (tmp_path / RUN_SETTINGS).write_text(text, encoding="utf-8", errors="surrogateescape")
        with pytest.raises(UsageError, match=f"--resume: '{tmp_path / RUN_SETTINGS}' .* is damaged"):
            check_resume_settings(tmp_path, {"model.path": "sha256:x"})


def test_resume_after_a_kill_that_cut_the_metrics_line_short(
        trainable_llama: Path, qa_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json

    out = tmp_path / "run"
    assert _train(trainable_llama, qa_file, out, "train.max_steps=4") == 0
    metrics = out / "checkpoints" / "metrics.jsonl"
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('{"step": 5, "lo')  # kill -9 while the next row was being appended
    assert _train(trainable_llama, qa_file, out, "train.max_steps=6", "--resume") == 0
    assert f"{metrics}: 1 damaged line left out" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s <= 4] and max(steps) == 6


def test_ctrl_c_in_the_final_evaluation_says_how_to_resume_and_resume_writes_the_adapter(
        trainable_llama: Path, qa_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from transformers import TrainerCallback

    from ragtune.train import recipe

    class CtrlC(TrainerCallback):
        def on_evaluate(self, args, state, control, **kw):  # noqa: ANN001
            raise KeyboardInterrupt  # the evaluation after the last step, mid-epoch: run_metrics evaluates

    real = recipe.make_callbacks
    monkeypatch.setattr(recipe, "make_callbacks", lambda *a: real(*a) + [CtrlC()])
    out = tmp_path / "run"
    args = ["train.max_steps=2", "data.eval_fraction=0.2", "train.eval_steps=0"]  # once per epoch: 4 steps
    assert _train(trainable_llama, qa_file, out, *args) == 130
    assert f"stopped at step 2; {out / 'checkpoints' / 'checkpoint-2'} is kept: run the same command with --resume" \
           in caplog.text
    monkeypatch.setattr(recipe, "make_callbacks", real)
    assert _train(trainable_llama, qa_file, out, *args, "--resume") == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_data_outputs_under_a_file_are_usage_errors_naming_the_file(qa_file: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """They were OSErrors ('File exists', exit 1) from the write, after the whole check or split."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    cases = [
        (["data", "split", str(qa_file), "--eval-fraction", "0.2", "--out-dir", str(a_file)],
         f"--out-dir '{a_file}' is a file, not a folder"),
        (["data", "split", str(qa_file), "--eval-fraction", "0.2", "--out-dir", str(a_file / "sub")],
         f"--out-dir '{a_file / 'sub'}' lies under '{a_file}', which is a file, not a folder"),
        (["data", "check", str(qa_file), "--write-clean", str(a_file / "clean.jsonl")],
         f"--write-clean's folder '{a_file}' is a file, not a folder"),
        (["data", "convert", str(qa_file), "--out", str(a_file / "chat.jsonl")],
         f"--out's folder '{a_file}' is a file, not a folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert a_file.read_text() == "x"


def test_train_says_model_adapter_is_not_trained_further(
        trainable_llama: Path, qa_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """model.adapter was ignored without a word: a user hoping to train an adapter further got a new one."""
    first = tmp_path / "first"
    assert _train(trainable_llama, qa_file, first, "train.max_steps=1") == 0
    assert "model.adapter" not in caplog.text
    assert _train(trainable_llama, qa_file, tmp_path / "second", "train.max_steps=1", f"model.adapter={first}") == 0
    assert f"model.adapter '{first}' is not trained further: train makes a new adapter on model.path" in caplog.text


def test_records_longer_than_the_models_context_are_refused(
        trainable_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """data.max_length above the model's max_position_embeddings trained 2000-token records on a 1024-token
    model without a word."""
    import json

    from tests.train.conftest import chat, write_jsonl

    context = json.loads((trainable_llama / "config.json").read_text())["max_position_embeddings"]
    data = write_jsonl(tmp_path / "long.jsonl", [chat("apple bread cheese " * (context // 6) + str(i), f"ok {i}")
                                                 for i in range(4)])
    out = tmp_path / "run"
    assert _train(trainable_llama, data, out, "train.max_steps=1", f"data.max_length={4 * context}") == 2
    err = capsys.readouterr().err
    assert f"4 records are longer than the model's context (up to " in err, err
    assert f"the model takes {context}: max_position_embeddings in {trainable_llama / 'config.json'}); set " \
           f"data.max_length={context}" in err and not out.exists()


def test_an_output_dir_holding_only_hidden_files_is_refused_not_emptied(
        trainable_llama: Path, qa_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Hidden entries were not counted as the folder's own files, so the finished run deleted a .git with it."""
    out = tmp_path / "repo"
    (out / ".git").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / ".gitkeep").touch()
    assert _train(trainable_llama, qa_file, out, "train.max_steps=1", "--overwrite") == 2
    err = capsys.readouterr().err
    assert f"train.output_dir '{out}' holds files that are not a ragtune run (.git, .gitkeep)" in err
    assert (out / ".git" / "HEAD").is_file() and not (out / "adapter_config.json").exists()
    (out / ".git" / "HEAD").unlink()
    (out / ".git").rmdir()
    (out / ".gitkeep").unlink()
    (out / ".DS_Store").touch()  # the Finder's, remade at will: no reason to refuse
    assert _train(trainable_llama, qa_file, out, "train.max_steps=1") == 0


def test_data_check_of_a_file_whose_every_record_is_skipped_fails(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """It said '0 valid records' and exited 0, so `data check F && train` went on to a train that fails."""
    import json

    from tests.train.conftest import write_jsonl

    tool = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                         {"role": "tool", "content": "r", "tool_call_id": "c1"},
                         {"role": "assistant", "content": "a"}]}
    data = write_jsonl(tmp_path / "tools.jsonl", [tool, tool])
    assert main(["data", "check", str(data)]) == 1
    out = capsys.readouterr().out
    assert "no record is left to train on: every one is skipped" in out and "use tools or function calling" in out
    assert main(["data", "check", str(data), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_a_split_that_can_hold_nothing_out_says_so(trainable_llama: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Records that all ask one question stay on one side: split wrote an empty eval file and exit 0, and
    train with data.eval_fraction trained without eval data without a word."""
    from tests.train.conftest import chat, write_jsonl

    data = write_jsonl(tmp_path / "same.jsonl", [chat("Which code?", f"Code {i}.") for i in range(5)])
    assert main(["data", "split", str(data), "--eval-fraction", "0.2"]) == 2
    assert "every record asks the same question" in capsys.readouterr().err
    assert not (tmp_path / "same.eval.jsonl").exists() and not (tmp_path / "same.train.jsonl").exists()
    assert _train(trainable_llama, data, tmp_path / "run", "train.max_steps=1", "data.eval_fraction=0.2") == 0
    assert "data.eval_fraction=0.2 held out nothing: every record asks the same question" in caplog.text


def test_a_file_system_without_locks_trains_unguarded_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Some network and FUSE mounts answer flock with ENOLCK/EOPNOTSUPP: the run must still go ahead there."""
    import errno
    import fcntl

    from ragtune.train.outputs import output_lock

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = False
    with output_lock(tmp_path / "run"):
        ran = True
    assert ran and "cannot lock" in caplog.text and "No locks available" in caplog.text


def test_a_chat_template_file_that_is_no_template_names_the_file(
        trainable_llama: Path, qa_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A non-UTF-8 file was a UnicodeDecodeError traceback, a folder 'does not exist', and a broken template
    was reported as every record of the data failing to render."""
    bad = tmp_path / "latin1.jinja"
    bad.write_bytes(b"\xff\xfe{{ x }}")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content ")
    cases = [(tmp_path, f"train.chat_template '{tmp_path}' is not a file"),
             (bad, f"train.chat_template '{bad}' is not UTF-8 text"),
             (broken, f"train.chat_template '{broken}' line 2 is not a valid Jinja template: unexpected end of "
                      "template")]
    out = tmp_path / "run"
    for template, message in cases:
        assert _train(trainable_llama, qa_file, out, "train.max_steps=1", f"train.chat_template={template}") == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "line 1:" not in err, err
        assert main(["data", "check", str(qa_file), "--model", str(trainable_llama),
                     f"train.chat_template={template}"]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()
