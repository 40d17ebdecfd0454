"""The CLI: every command's --help works without heavy imports; stubs exit 2; globals anywhere."""

from __future__ import annotations

import json
from typing import Any
from pathlib import Path
import subprocess
import sys

import pytest

from ragtune import __version__
from ragtune.cli import _split_globals, build_parser, main
from ragtune.errors import UsageError

COMMANDS = ["models", "data", "train", "merge", "index", "search", "ask", "chat", "serve", "eval", "doctor",
            "export", "bundle", "jobs"]
HEAVY = ("torch", "transformers", "trl", "peft", "sentence_transformers", "qdrant_client", "fastapi", "datasets")


def test_parser_has_every_command() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_light(command: str) -> None:
    """`ragtune CMD --help` exits 0 and imports none of the heavy libraries (so it is instant)."""
    code = (
        "import sys\n"
        "from ragtune.cli import main\n"
        f"rc = main([{command!r}, '--help'])\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('RC', rc, 'HEAVY', ','.join(heavy) or '-')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last == "RC 0 HEAVY -", f"{command} --help imported heavy modules: {last}"
    assert "usage: ragtune" in out.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ragtune {__version__}"


def test_python_dash_m() -> None:
    out = subprocess.run([sys.executable, "-m", "ragtune", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.strip() == f"ragtune {__version__}"


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: ragtune" in capsys.readouterr().out


def test_unknown_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_globals_before_or_after_command() -> None:
    rest, cfg, ov = _split_globals(["ask", "--config", "a.yaml", "hello", "train.epochs=2", "-v"])
    assert (rest, cfg, ov) == (["-v", "ask", "hello"], "a.yaml", ["train.epochs=2"])  # -v/-q go before the command
    rest, cfg, ov = _split_globals(["--config=b.yaml", "doctor"])
    assert (rest, cfg, ov) == (["doctor"], "b.yaml", [])
    # a question with '=' that is not a dotted key stays an argument
    rest, _, ov = _split_globals(["ask", "is x=1 true?"])
    assert rest == ["ask", "is x=1 true?"] and ov == []
    with pytest.raises(UsageError, match="'--set train.epochs=2': overrides take no flag; write 'train.epochs=2'"):
        _split_globals(["train", "--set", "train.epochs=2"])


def test_quiet_after_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["index", "list", "--all", "-q"]) == 0 and main(["index", "list", "--all", "--quiet", "-vv"]) == 0


def test_bundle_create_keeps_its_own_config_option() -> None:
    # `bundle create --config FILE` carries FILE into the bundle; a --config before the command is ragtune's
    argv = ["--config", "g.yaml", "bundle", "create", "out", "--config", "a.yaml", "--config=b.yaml"]
    rest, cfg, _ = _split_globals(argv)
    assert cfg == "g.yaml"
    args = build_parser().parse_args(rest)
    assert args.bundle_config == ["a.yaml", "b.yaml"]


def test_offline_env_is_set_by_main(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    main(["--version"])
    import os

    assert all(os.environ[v] == "1" for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def test_doctor_json_reports_unprepared_model(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    chat = next(c for c in report["checks"] if c["name"] == "chat model")
    assert chat["status"] == "fail" and chat["fix"] == "ragtune models prepare"
    assert rc == 1 and report["ok"] is False


def test_doctor_ok_when_prepared(ragtune_home, capsys: pytest.CaptureFixture[str]) -> None:
    d = ragtune_home / "models" / "SmolLM2-135M-Instruct"
    d.mkdir(parents=True)
    (d / "ragtune-model.json").write_text("{}")
    rc = main(["doctor"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "all required checks passed" in out


def test_os_errors_become_messages_with_the_path_and_the_fix(tmp_path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # an output folder that cannot be made (a file stands where it would go) was a raw traceback
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(4)))
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    args = ["data", "split", str(data), "--eval-fraction", "0.5", "--out-dir", str(blocker / "out")]
    assert main(args) == 2  # data split now sees it before writing
    assert "lies under" in capsys.readouterr().err
    from ragtune.train import data as data_mod

    def split(*a: Any, **k: Any) -> None:  # an OSError no check foresaw, raised while writing
        raise NotADirectoryError(20, "Not a directory", str(blocker / "out"))

    monkeypatch.setattr(data_mod, "split", split)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.startswith("error: Not a directory:") and str(blocker / "out") in err
    assert "a file is where a folder is expected" in err and "Traceback" not in err


def test_full_disk_and_permission_messages_name_the_fix() -> None:
    import errno

    from ragtune.cli import os_error_message

    full = os_error_message(OSError(errno.ENOSPC, "No space left on device", "/data/runs/adapter/x.safetensors"))
    assert full == ("No space left on device: '/data/runs/adapter/x.safetensors'; the disk is full: free space "
                    "there, or write somewhere else (RAGTUNE_HOME, --out, train.output_dir)")
    denied = os_error_message(PermissionError(errno.EACCES, "Permission denied", "/srv/out"))
    assert denied.startswith("Permission denied: '/srv/out'; no permission: choose a folder you can write")
    moved = os_error_message(OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"))
    assert moved == "Invalid cross-device link: '/a' -> '/b'; check the path and try again"


# llama_print_system_info() of llama-cpp-python 0.3.36 built here with GGML_NATIVE=OFF and with GGML_NATIVE=ON
PORTABLE_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
                 "OPENMP = 1 | REPACK = 1 | ")
NATIVE_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
               "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")


def test_doctor_names_the_cpu_features_a_portable_llama_cpp_build_leaves_unused() -> None:
    from ragtune.doctor import llama_build_check

    avx512 = {"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16"}
    portable = llama_build_check(PORTABLE_INFO, avx512)
    assert portable.status == "warn"
    assert "AVX512, AVX512_VNNI, AVX512_BF16" in portable.detail and "GGML_NATIVE=ON" in portable.fix
    native = llama_build_check(NATIVE_INFO, avx512)
    assert native.status == "ok" and native.detail.endswith("generation.gguf_type auto serves bf16")
    avx2 = llama_build_check(PORTABLE_INFO, {"avx2", "fma", "f16c"})  # an AVX2 CPU: nothing unused
    assert avx2.status == "ok" and avx2.detail.endswith("generation.gguf_type auto serves f16")
    # the installed build on this machine: set-up compiles it for this CPU, so nothing is left unused
    installed = llama_build_check()
    assert installed.status == "ok", installed


def test_doctor_reports_a_llama_cpp_install_that_does_not_load(tmp_path: Path) -> None:
    """A damaged install (its libllama.so gone, as when a copied venv misses files): doctor names it, no traceback."""
    import os
    import shutil

    import llama_cpp

    broken = tmp_path / "site"
    shutil.copytree(Path(llama_cpp.__file__).parent, broken / "llama_cpp")
    for lib in (broken / "llama_cpp" / "lib").glob("libllama.so*"):
        lib.unlink()
    env = {**os.environ, "PYTHONPATH": str(broken)}
    proc = subprocess.run([sys.executable, "-m", "ragtune.cli", "doctor", "--json"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    check = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "llama.cpp build")
    assert check["status"] == "warn" and "does not load" in check["detail"] and "setup.sh" in check["fix"]


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`ragtune ... | head -1`: no 'Broken pipe: (no path given)' message once the reader has gone."""
    import os
    import subprocess
    import sys

    script = tmp_path / "many_lines.py"  # `ragtune doctor` made to print more than a pipe holds
    script.write_text(
        "import sys\n"
        "from ragtune import cli\n"
        "def lines(args, cfg):\n"
        "    for i in range(100_000):\n"
        "        print('line', i)\n"
        "build = cli.build_parser\n"
        "def parser():\n"
        "    p = build()\n"
        "    p._subparsers._group_actions[0].choices['doctor'].set_defaults(func=lines)\n"
        "    return p\n"
        "cli.build_parser = parser\n"
        "sys.exit(cli.main(['doctor']))\n")
    p = subprocess.run(f"'{sys.executable}' '{script}' | head -1", shell=True, capture_output=True, text=True,
                       env=dict(os.environ), timeout=120)
    assert p.stdout == "line 0\n" and "Broken pipe" not in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_an_error_under_json_is_json_on_stdout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # a script reading `--json` output got an empty stdout (the message went to stderr only)
    monkeypatch.setenv("RAGTUNE_HOME", str(tmp_path))
    rc = main(["search", "--index", "nope", "--json", "hello"])
    out, err = capsys.readouterr()
    assert rc == 2 and "index 'nope' does not exist" in err
    assert json.loads(out) == {"error": err.strip().removeprefix("error: "), "exit_code": 2}
    rc = main(["search", "--index", "nope", "hello"])  # without --json: stdout stays empty
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "does not exist" in err


def test_sigterm_runs_the_clean_up_ctrl_c_runs_and_exits_143(tmp_path: Path) -> None:
    """`timeout`/`kill` sent SIGTERM, which ended the process at once: an export's temporary folder (as big as
    the model) and a bundle's .tar.tmp stayed behind. It now unwinds like Ctrl-C, through every `finally`."""
    import os
    import signal
    import subprocess
    import sys

    marker = tmp_path / "cleaned"
    script = tmp_path / "terminated.py"  # `ragtune doctor` made to be killed half-way through its work
    script.write_text(
        "import os, signal, sys, time\n"
        "from ragtune import cli\n"
        "def work(args, cfg):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "    finally:\n"
        f"        open({str(marker)!r}, 'w').close()\n"
        "build = cli.build_parser\n"
        "def parser():\n"
        "    p = build()\n"
        "    p._subparsers._group_actions[0].choices['doctor'].set_defaults(func=work)\n"
        "    return p\n"
        "cli.build_parser = parser\n"
        "rc = cli.main(['doctor'])\n"
        "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, 'the handler outlived the command'\n"
        "sys.exit(rc)\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=dict(os.environ),
                       timeout=60)
    assert p.returncode == 143 and p.stderr.strip().endswith("terminated"), p.stderr
    assert marker.exists() and "Traceback" not in p.stderr


def test_a_setting_without_a_value_says_to_write_key_equals_value(capsys: pytest.CaptureFixture[str]) -> None:
    # `ragtune train train.epochs` got argparse's bare "unrecognized arguments: train.epochs"
    assert main(["data", "check", "examples/policies/train_v1.jsonl", "train.epochs"]) == 2
    err = capsys.readouterr().err
    assert "'train.epochs': a setting needs a value; write it as key=value, e.g. train.epochs=VALUE" in err
    assert main(["data", "check", "examples/policies/train_v1.jsonl", "other.jsonl"]) == 2  # a file name: argparse's
    assert "unrecognized arguments: other.jsonl" in capsys.readouterr().err


def test_a_device_this_machine_lacks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # model.device=mps on a machine without MPS was taken as is: the run card said mps, the work ran elsewhere
    import torch

    from ragtune.errors import ModelPathError
    from ragtune.modeling import pick_device

    if not torch.backends.mps.is_available():
        with pytest.raises(ModelPathError, match="'mps' was asked for but torch sees no Apple GPU"):
            pick_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == "cuda:0"
    with pytest.raises(ModelPathError, match="'cuda:1' was asked for but torch sees 1 CUDA GPU"):
        pick_device("cuda:1")
    assert pick_device("cpu") == "cpu"


def test_an_adapter_folder_given_as_a_model_is_named_as_one(tmp_path: Path) -> None:
    from ragtune.errors import ModelPathError
    from ragtune.modeling import check_model_dir

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    with pytest.raises(ModelPathError, match=r"is a LoRA adapter, not a model \(its base model: /models/base\); "
                                             r"give the base model here and the adapter as model.adapter"):
        check_model_dir(tmp_path)


def test_models_import_of_a_folder_asks_for_the_gguf_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "import", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "is a folder; give the .gguf file itself" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--json", "--frob"], "ragtune: unrecognized arguments: --frob"),
    (["eval", "--engine", "nope", "--json"], "ragtune eval: argument --engine: invalid choice: 'nope'"),
    (["eval", "--json", "--questions"], "ragtune eval: argument --questions: expected one argument"),
    (["index", "add", "--json"], "ragtune index add: the following arguments are required: PATH"),
    (["models", "import", "x.gguf", "--dtype", "int3", "--json"], "ragtune models import: argument --dtype: "
                                                                  "invalid choice: 'int3'"),
    (["search", "--json", "--top-k"], "ragtune search: argument --top-k: expected one argument"),
    (["ask", "--server", "http://127.0.0.1:9", "--json", "--frob", "hi"], "ragtune: unrecognized arguments: --frob"),
    (["eval", "--json", "train.epochs"], "'train.epochs': a setting needs a value"),
])
def test_usage_errors_under_json_are_json_on_stdout(argv: list[str], message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # argparse's own errors (and the settings checks before it) printed text to stderr only, so a script
    # reading --json output got an empty stdout; now they are _fail's JSON object too, usage kept on stderr
    assert main(argv) == 2
    out, err = capsys.readouterr()
    got = json.loads(out)
    assert set(got) == {"error", "exit_code"} and got["exit_code"] == 2 and got["error"].startswith(message), got
    assert message.split(": ", 1)[-1].split(":")[0] in err
    assert main([a for a in argv if a != "--json"]) == 2
    assert capsys.readouterr().out == ""  # without --json, stdout stays empty


def test_help_and_version_under_json_print_no_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--json", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: ragtune eval")
    assert main(["--version", "eval", "--json"]) == 0
    assert capsys.readouterr().out.strip() == f"ragtune {__version__}"


def test_table_cells_show_control_characters_escaped_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # a stored title or file name with a newline or a terminal escape (clear screen) once reached the terminal
    from ragtune.cli import print_table

    print_table([{"source": "a\nb.md", "title": "Policy\x1b[2J", "chunks": 3}], ["source", "chunks", "title"])
    out = capsys.readouterr().out
    assert out.splitlines()[1] == "a\\x0ab.md  3       Policy\\x1b[2J" and "\x1b" not in out
