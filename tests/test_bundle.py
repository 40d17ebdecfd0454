"""Air-gap bundles: create, verify (a flipped byte anywhere is caught), install with no network, restore."""

from __future__ import annotations

import json
import re
import struct
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ragtune.bundle import create_bundle, install_bundle, restore_bundle, verify_bundle
from ragtune.cli import main
from ragtune.errors import CheckFailed, RagtuneError, UsageError
from ragtune.modeling import model_hash
from ragtune.runcard import write_runcard
from tests.conftest import REAL_HOME, require_setup

ROOT = Path(__file__).resolve().parents[1]


def fake_adapter(base: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/connected/side/base", "r": 4}))
    (out / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")  # a whole, empty safetensors file
    write_runcard(out, {"base_model": {"path": "/connected/side/base", "hash": model_hash(base)}})
    return out


@pytest.fixture(scope="module")
def built_bundle(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One bundle of tiny_llama, an adapter and the default config (building its ragtune wheel takes seconds)."""
    tmp = tmp_path_factory.mktemp("small-bundle")
    adapter = fake_adapter(tiny_llama, tmp / "policies")
    return create_bundle(
        tmp / "bundle", models=[str(tiny_llama)], adapters=[str(adapter)],
        configs=[str(ROOT / "configs" / "default.yaml")], deps="none", default_models=False,
    )


@pytest.fixture
def small_bundle(built_bundle: Path, tmp_path: Path) -> Path:
    """This test's own copy of built_bundle, to damage or install from."""
    return Path(shutil.copytree(built_bundle, tmp_path / "bundle", symlinks=True))


def test_create_and_verify(small_bundle: Path) -> None:
    manifest = json.loads((small_bundle / "bundle.json").read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert "models/tiny-llama/model.safetensors" in paths
    assert "adapters/policies/ragtune.json" in paths
    assert "configs/default.yaml" in paths and "install.sh" in paths and "verify.py" in paths
    assert any(p.startswith("wheels/ragtune-") and p.endswith(".whl") for p in paths)
    assert manifest["versions"]["torch"].startswith("2.")
    assert verify_bundle(small_bundle) == ([], len(manifest["files"]))
    assert main(["bundle", "verify", str(small_bundle)]) == 0


@pytest.mark.parametrize("victim", ["models/tiny-llama/model.safetensors", "adapters/policies/ragtune.json",
                                    "install.sh", "wheels"])
def test_flipped_byte_is_caught_by_verify_install_and_restore(small_bundle: Path, victim: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    target = small_bundle / victim
    if target.is_dir():
        target = next(target.glob("*.whl"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    rel = target.relative_to(small_bundle).as_posix()
    problems, _ = verify_bundle(small_bundle)
    assert problems == [f"corrupted (sha256 mismatch): {rel}"]
    assert main(["bundle", "verify", str(small_bundle)]) == 1
    assert f"corrupted (sha256 mismatch): {rel}" in capsys.readouterr().err
    with pytest.raises(CheckFailed, match="nothing was installed"):
        install_bundle(small_bundle)
    with pytest.raises(CheckFailed, match=rel):
        restore_bundle(small_bundle)
    # the stdlib checker that install.sh runs first says the same
    out = subprocess.run([sys.executable, str(small_bundle / "verify.py"), str(small_bundle)], capture_output=True, text=True)
    assert out.returncode == 1 and rel in out.stderr


def test_missing_file_is_named(small_bundle: Path) -> None:
    (small_bundle / "configs" / "default.yaml").unlink()
    assert verify_bundle(small_bundle)[0] == ["missing: configs/default.yaml"]


def _verify_py(bundle: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(bundle / "verify.py"), str(bundle)], capture_output=True, text=True)


def test_a_file_the_manifest_does_not_list_is_named(small_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a wheel dropped into wheels/ passed verify, and pip --find-links wheels/ would have taken it
    whl = next((small_bundle / "wheels").glob("*.whl"))
    shutil.copy(whl, small_bundle / "wheels" / "zzz-9.9-py3-none-any.whl")
    (small_bundle / "venv" / "bin").mkdir(parents=True)  # install.sh's default venv is made in the bundle: not a problem
    (small_bundle / "venv" / "bin" / "python").write_text("")
    said = "not in bundle.json: wheels/zzz-9.9-py3-none-any.whl (added after the bundle was made)"
    assert verify_bundle(small_bundle)[0] == [said]
    assert main(["bundle", "verify", str(small_bundle)]) == 1 and said in capsys.readouterr().err
    out = _verify_py(small_bundle)
    assert out.returncode == 1 and said in out.stderr
    (small_bundle / "wheels" / "zzz-9.9-py3-none-any.whl").unlink()
    assert verify_bundle(small_bundle)[0] == [] and _verify_py(small_bundle).returncode == 0


@pytest.mark.parametrize("damage,said", [
    (lambda m: {}, "bundle.json is damaged: it has no list of files"),
    (lambda m: [m], "bundle.json is damaged: it has no list of files"),
    (lambda m: {**m, "files": [{**m["files"][0], "size": "12"}] + m["files"][1:]},
     'bundle.json is damaged: files[0] is not {"path", "size", "sha256"}'),
])
def test_a_damaged_manifest_is_named_not_a_traceback(small_bundle: Path, damage, said: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # valid JSON of another shape was a KeyError / TypeError traceback, in ragtune and in verify.py
    mf = small_bundle / "bundle.json"
    mf.write_text(json.dumps(damage(json.loads(mf.read_text()))))
    problems, _ = verify_bundle(small_bundle)
    assert len(problems) == 1 and problems[0].startswith(said) and problems[0].endswith("; copy the bundle again")
    assert main(["bundle", "verify", str(small_bundle)]) == 1
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert main(["bundle", "verify", "--json", str(small_bundle)]) == 1  # a script still gets its report
    assert json.loads(capsys.readouterr().out)["problems"] == problems
    with pytest.raises(CheckFailed, match="nothing was installed"):
        install_bundle(small_bundle)
    out = _verify_py(small_bundle)
    assert out.returncode == 1 and said in out.stderr and "Traceback" not in out.stderr


def test_an_edited_manifest_cannot_reach_outside_the_bundle_or_home(small_bundle: Path, ragtune_home: Path,
                                                                   tmp_path: Path) -> None:
    # bundle.json is not covered by its own sha256s: a path '../x' was read from outside the bundle, and a
    # name '../../x' made restore replace a folder outside $RAGTUNE_HOME
    mf = small_bundle / "bundle.json"
    manifest = json.loads(mf.read_text())
    edited = json.loads(mf.read_text())
    edited["files"][0]["path"] = "../elsewhere/" + manifest["files"][0]["path"]
    mf.write_text(json.dumps(edited))
    problems = verify_bundle(small_bundle)[0]
    assert f"outside the bundle: ../elsewhere/{manifest['files'][0]['path']} (bundle.json is damaged or was edited)" \
        in problems
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    edited = json.loads(json.dumps(manifest))
    edited["contents"]["models"][0]["name"] = os.path.relpath(victim, ragtune_home / "models")
    mf.write_text(json.dumps(edited))
    assert verify_bundle(small_bundle)[0] == []
    with pytest.raises(CheckFailed, match=r"nothing was restored:\n  contents.models\[0\]: name '\.\./.*victim' is "
                                          "not a plain"):
        restore_bundle(small_bundle)
    assert (victim / "precious.txt").read_text() == "mine" and not (ragtune_home / "models").exists()
    edited = json.loads(json.dumps(manifest))  # an index's trimmed sizes were int()-ed: a ValueError traceback
    edited["contents"]["indexes"] = [{"name": "policies", "path": "configs", "trimmed": {"default.yaml": "lots"}}]
    mf.write_text(json.dumps(edited))
    with pytest.raises(CheckFailed, match=r"contents.indexes\[0\]: trimmed \{'default.yaml': 'lots'\} is not"):
        restore_bundle(small_bundle)


def test_install_refuses_a_venv_folder_that_holds_other_files(small_bundle: Path, tmp_path: Path) -> None:
    # --venv naming a project folder made a venv among its files (and pip installed into it)
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    assert install_bundle(small_bundle, venv=str(project)) == 2
    assert [p.name for p in project.iterdir()] == ["notes.txt"]
    run = lambda *args: subprocess.run(["bash", str(small_bundle / "install.sh"), *args],  # noqa: E731
                                       capture_output=True, text=True)
    out = run("--venv", str(project))
    assert out.returncode == 2 and f"--venv '{project}' holds files but is no virtual environment" in out.stderr
    out = run("--venv", str(project / "notes.txt"))
    assert out.returncode == 2 and "is a file; name a folder for the virtual environment" in out.stderr
    out = run("--venv")  # was bash's "$2: unbound variable" (exit 1)
    assert out.returncode == 2 and "--venv needs a folder" in out.stderr
    assert "verifying" not in out.stdout and not (small_bundle / "venv").exists()


def test_a_cut_short_or_edited_tar_is_named_and_nothing_is_unpacked(small_bundle: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # were tarfile.ReadError / OutsideDestinationError tracebacks, the second after unpacking the members before it
    import io
    import tarfile

    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tf:
        tf.add(small_bundle, arcname="shipped")
    cut = tmp_path / "cut" / "b.tar"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    edited = tmp_path / "edited" / "b.tar"
    edited.parent.mkdir()
    with tarfile.open(edited, "w") as tf:
        for name, data in [("shipped/bundle.json", b'{"files": []}'), ("shipped/../../escape.txt", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    for tar, said in [(cut, "unexpected end of data"), (edited, "which is outside the destination")]:
        problems, _ = verify_bundle(tar)
        assert len(problems) == 1 and re.search(f"is damaged or was edited .*{said}.*nothing was unpacked", problems[0])
        assert main(["bundle", "verify", str(tar)]) == 1
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err
        assert main(["bundle", "verify", "--json", str(tar)]) == 1
        assert json.loads(capsys.readouterr().out)["problems"] == problems
        with pytest.raises(CheckFailed, match=said):
            restore_bundle(tar)
        assert [p.name for p in tar.parent.iterdir()] == ["b.tar"]
    assert not (tmp_path / "escape.txt").exists()


def test_an_interrupted_tar_leaves_nothing_behind(small_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C while OUT.tar was written left the hidden .OUT.tar.tmp (as big as the bundle) behind
    import tarfile

    from ragtune.bundle import write_tar

    real_addfile = tarfile.TarFile.addfile
    written: list[str] = []

    def interrupted(self: tarfile.TarFile, tarinfo: tarfile.TarInfo, fileobj: Any = None) -> None:
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(tarinfo.name)
        real_addfile(self, tarinfo, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_tar(small_bundle)
    assert len(written) == 3 and sorted(p.name for p in small_bundle.parent.iterdir()) == ["bundle"]


def test_an_existing_tar_is_replaced_only_with_force(tiny_llama: Path, tmp_path: Path) -> None:
    # bundle create OUT --tar replaced an existing OUT.tar (another bundle's) without --force
    (tmp_path / "b.tar").write_bytes(b"another bundle")
    with pytest.raises(UsageError, match=r"'.*b.tar' already exists; pass --force to replace it"):
        create_bundle(tmp_path / "b", models=[str(tiny_llama)], deps="none", default_models=False, tar=True)
    assert (tmp_path / "b.tar").read_bytes() == b"another bundle" and not (tmp_path / "b").exists()


def test_restore_warns_of_an_adapter_whose_base_did_not_come(tiny_llama: Path, tmp_path: Path, ragtune_home: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # the adapter was restored in silence, still pointing at the connected side's base: it failed on first use
    adapter = fake_adapter(tiny_llama, tmp_path / "policies")
    out = create_bundle(tmp_path / "b", adapters=[str(adapter)], deps="none", default_models=False)
    with caplog.at_level("WARNING", logger="ragtune.bundle"):
        done = restore_bundle(out)
    assert done["adapters"] == [str(ragtune_home / "adapters" / "policies")]
    assert ("adapter 'policies': its base model (/connected/side/base, hash " + model_hash(tiny_llama)[:12]
            + ") is not in this bundle and not at that path here") in caplog.text


def test_a_wheel_pip_would_refuse_is_refused_when_the_bundle_is_made(small_bundle: Path, tmp_path: Path) -> None:
    # any file named *.whl was carried, and pip refused it on the air-gapped machine
    good = next((small_bundle / "wheels").glob("ragtune-*.whl"))
    renamed = tmp_path / "mytool.whl"
    shutil.copyfile(good, renamed)
    cut = tmp_path / "mytool-1.0-py3-none-any.whl"
    cut.write_bytes(good.read_bytes()[:2000])
    for w, said in [(renamed, "'mytool.whl' is not a wheel's file name"), (cut, "is not a whole wheel")]:
        with pytest.raises(UsageError, match=said):
            create_bundle(tmp_path / "b", extra_wheels=[str(w)], deps="none", default_models=False)
    assert not (tmp_path / "b").exists()


def test_restore_leaves_an_index_another_process_writes(small_bundle: Path, ragtune_home: Path) -> None:
    # restore swapped the index folder under a running 'index sync' (and a server's reader copy) without a word
    from ragtune.retrieval.store import IndexBusy, IndexLock, index_dir

    mf = small_bundle / "bundle.json"
    manifest = json.loads(mf.read_text())
    manifest["contents"]["indexes"] = [{"name": "policies", "path": "configs"}]
    mf.write_text(json.dumps(manifest))
    mine = index_dir("policies")
    mine.mkdir(parents=True)
    (mine / "points.dat").write_text("the user's index")
    with IndexLock("policies", "ragtune index sync docs"):
        with pytest.raises(IndexBusy, match=r"index 'policies' is in use by another process \(pid \d+: ragtune index "
                                            "sync docs\)"):
            restore_bundle(small_bundle)
    assert (mine / "points.dat").read_text() == "the user's index"
    assert not (ragtune_home / "models").exists()  # refused before anything was restored
    reader = mine / ".readers" / f"{os.getpid()}-copy"  # a running server's read copy (this process: alive)
    reader.mkdir(parents=True)
    with pytest.raises(IndexBusy, match=f"open in running process {os.getpid()}"):
        restore_bundle(small_bundle)
    shutil.rmtree(mine / ".readers")
    done = restore_bundle(small_bundle)
    assert done["indexes"] == [str(mine)] and (mine / "default.yaml").is_file() and not (mine / "points.dat").exists()


def test_create_checks_inputs_first(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="has no adapter_config.json"):
        create_bundle(tmp_path / "b", adapters=[str(tmp_path)], deps="none", default_models=False)
    pickled = tmp_path / "pickled"  # an adapter saved as adapter_model.bin: nothing on the far side can load it
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UsageError, match="--adapter '.*pickled' has no adapter_model.safetensors"):
        create_bundle(tmp_path / "b", adapters=[str(pickled)], deps="none", default_models=False)
    with pytest.raises(UsageError, match="index 'nope' does not exist"):
        create_bundle(tmp_path / "b", indexes=["nope"], deps="none", default_models=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n  learning_rat: 0.001\n")
    with pytest.raises(UsageError, match="--config '.*bad.yaml' would not load on the far side: .*learning_rat"):
        create_bundle(tmp_path / "b", configs=[str(bad)], deps="none", default_models=False)
    assert not (tmp_path / "b").exists()


def test_two_inputs_of_one_name_are_refused_and_one_given_twice_is_carried_once(tiny_llama: Path,
                                                                                 tmp_path: Path) -> None:
    # two adapters named 'adapter' (the usual training output) failed with "File exists: '.../.b.tmp/adapters/
    # adapter'" after copying; two configs named alike were both listed while the second replaced the first
    a1, a2 = fake_adapter(tiny_llama, tmp_path / "plain" / "adapter"), fake_adapter(tiny_llama, tmp_path / "raft" / "adapter")
    with pytest.raises(UsageError, match=r"--adapter '.*plain/adapter' and --adapter '.*raft/adapter' are both named "
                                         r"'adapter'; .* rename one"):
        create_bundle(tmp_path / "b", adapters=[str(a1), str(a2)], deps="none", default_models=False)
    (tmp_path / "c1").mkdir()
    (tmp_path / "c2").mkdir()
    c1, c2 = tmp_path / "c1" / "ragtune.yaml", tmp_path / "c2" / "ragtune.yaml"
    c1.write_text("train:\n  epochs: 2\n")
    c2.write_text("train:\n  epochs: 3\n")
    with pytest.raises(UsageError, match="--config '.*c1/ragtune.yaml' and --config '.*c2/ragtune.yaml' are both named"):
        create_bundle(tmp_path / "b", configs=[str(c1), str(c2)], deps="none", default_models=False)
    assert not (tmp_path / "b").exists()
    out = create_bundle(tmp_path / "b", adapters=[str(a1), str(tmp_path / "plain" / ".." / "plain" / "adapter")],
                        configs=[str(c1), str(c1)], deps="none", default_models=False)
    contents = json.loads((out / "bundle.json").read_text())["contents"]
    assert [a["name"] for a in contents["adapters"]] == ["adapter"] and [c["name"] for c in contents["configs"]] == [
        "ragtune.yaml"]
    assert verify_bundle(out)[0] == []


def test_restore_repoints_adapter_to_restored_base(small_bundle: Path, ragtune_home: Path) -> None:
    done = restore_bundle(small_bundle)
    base = ragtune_home / "models" / "tiny-llama"
    assert done["models"] == [str(base)]
    adapter = ragtune_home / "adapters" / "policies"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    card = json.loads((adapter / "ragtune.json").read_text())
    assert card["base_model"]["path"] == str(base)
    assert model_hash(base) == card["base_model"]["hash"]
    assert done["configs"] == [str(ragtune_home / "configs" / "default.yaml")]
    assert (ragtune_home / "configs" / "default.yaml").read_bytes() == (ROOT / "configs" / "default.yaml").read_bytes()
    # a restored adapter is found by its name
    from ragtune.modeling import adapter_dir

    assert adapter_dir("policies") == adapter
    assert adapter_dir("elsewhere/policies") == Path("elsewhere/policies")


def test_cli_create_carries_config_files(tiny_llama: Path, tmp_path: Path) -> None:
    # --config after `bundle create` names a file to carry (ragtune's own --config goes before the command)
    out = tmp_path / "b"
    rc = main(["bundle", "create", str(out), "--model", str(tiny_llama), "--deps", "none", "--no-default-models",
               "--config", str(ROOT / "configs" / "demo.yaml")])
    assert rc == 0
    manifest = json.loads((out / "bundle.json").read_text())
    assert [c["name"] for c in manifest["contents"]["configs"]] == ["demo.yaml"]


def _deps_without_ragtune(tmp_path: Path) -> Path:
    """A folder of links to this venv's packages minus ragtune itself, so the fresh venv needs no index."""
    src = Path(site.getsitepackages()[0])
    dst = tmp_path / "deps"
    dst.mkdir()
    for entry in src.iterdir():
        n = entry.name.lower()
        if n.startswith(("ragtune", "__editable__")) or n.endswith(".pth"):
            continue
        (dst / entry.name).symlink_to(entry)
    return dst


def _no_network_prefix() -> list[str]:
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"]
    return []


@pytest.mark.slow
def test_install_sh_into_fresh_venv_without_network(small_bundle: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pyver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    venv_site = venv / "lib" / pyver / "site-packages"
    for old in venv_site.glob("setuptools*"):  # the venv's own old setuptools would shadow the linked one
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    (venv_site / "deps.pth").write_text(str(_deps_without_ragtune(tmp_path)) + "\n")
    home = tmp_path / "far-side-home"
    env = {**os.environ, "RAGTUNE_HOME": str(home), "PIP_NO_INDEX": "1"}
    prefix = _no_network_prefix()
    out = subprocess.run(prefix + ["bash", str(small_bundle / "install.sh"), "--venv", str(venv)],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bundle ok:" in out.stdout
    assert (venv / "bin" / "ragtune").exists()
    # ragtune now comes from the wheel inside the venv, not from this checkout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import ragtune; print(ragtune.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert str(venv) in where.stdout, where.stdout + where.stderr
    assert (home / "models" / "tiny-llama" / "model.safetensors").is_file()
    assert (home / "adapters" / "policies" / "ragtune.json").is_file()
    listed = subprocess.run(prefix + [str(venv / "bin" / "ragtune"), "models", "list", "--json"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert listed.returncode == 0
    assert "tiny-llama" in {r["name"] for r in json.loads(listed.stdout)}
    # and the first answer comes with the network gone, from the restored model
    asked = subprocess.run(prefix + [str(venv / "bin" / "ragtune"), "ask", "What is the capital of France?", "--no-rag",
                                     "--json", "--max-new-tokens", "4", f"model.path={home / 'models' / 'tiny-llama'}"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["completion_tokens"] >= 1


@pytest.mark.slow
def test_restored_index_answers_identically(tmp_path: Path, ragtune_home: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "remote.md").write_text("# Remote work\n\nYou may work remotely up to 3 days per week.\n")
    (docs / "leave.md").write_text("# Leave\n\nAnnual leave is 25 days per year.\n\n## Carry-over\n\nUp to 5 days carry over.\n")
    (docs / "seoul.md").write_text("# 재택근무\n\n서울 사무소 직원은 주 2일까지 재택근무를 할 수 있습니다.\n", encoding="utf-8")
    assert main(["index", "add", str(docs), "--index", "pol"]) == 0
    queries = ["how many remote days per week?", "carry over leave", "서울 재택근무"]

    def run_queries() -> list[list[tuple[str, str]]]:
        results = []
        for q in queries:
            capsys.readouterr()
            assert main(["search", q, "--index", "pol", "--json", "--top-k", "3"]) == 0
            hits = json.loads(capsys.readouterr().out)
            results.append([(h["source"], h["chunk_id"]) for h in hits])
        return results

    before = run_queries()
    bundle = create_bundle(tmp_path / "bundle", indexes=["pol"], deps="none", default_models=False, tar=True)
    src = ragtune_home / "indexes" / "pol"
    sizes = {f.relative_to(src).as_posix(): f.stat().st_size for f in src.rglob("*") if f.is_file()
             and ".lock" not in f.name and ".readers" not in f.parts}
    carried = sum(f.stat().st_size for f in (bundle / "indexes" / "pol").rglob("*") if f.is_file())
    # Qdrant Edge's preallocated pages are carried cut at their last written byte (a .tar stores holes as zeros)
    assert carried < sum(sizes.values()) / 10, (carried, sum(sizes.values()))
    assert bundle.with_suffix(".tar").stat().st_size < sum(sizes.values()) / 5
    far_home = tmp_path / "far-home"
    monkeypatch.setenv("RAGTUNE_HOME", str(far_home))
    restore_bundle(bundle.with_suffix(".tar"))
    back = far_home / "indexes" / "pol"
    assert {f.relative_to(back).as_posix(): f.stat().st_size for f in back.rglob("*") if f.is_file()
            and ".lock" not in f.name} == sizes  # every file back at its length
    assert run_queries() == before
    assert before[0][0][0] == "remote.md"


def test_bundle_carries_the_llama_cpp_converter(tmp_path: Path, ragtune_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ragtune.export.pin import SDIST_NAME, SDIST_SHA256

    real = REAL_HOME / "llama.cpp" / SDIST_NAME
    require_setup(real.is_file(), f"the pinned converter sdist is not at {real}")
    (ragtune_home / "llama.cpp").mkdir(parents=True)
    (ragtune_home / "llama.cpp" / SDIST_NAME).symlink_to(real)
    bundle = create_bundle(tmp_path / "bundle", deps="none", default_models=False)
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["contents"]["llama_cpp"] == [{"name": SDIST_NAME, "path": f"llama.cpp/{SDIST_NAME}", "sha256": SDIST_SHA256}]
    far = tmp_path / "far"
    monkeypatch.setenv("RAGTUNE_HOME", str(far))
    restore_bundle(bundle)
    from ragtune.modeling import file_sha256

    assert file_sha256(far / "llama.cpp" / SDIST_NAME) == SDIST_SHA256


def test_restore_and_verify_take_the_tar(tiny_llama: Path, tmp_path: Path, ragtune_home: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # 'bundle restore X.tar' died with NotADirectoryError: the tar is unpacked beside itself first
    made = tmp_path / "made"
    made.mkdir()
    create_bundle(made / "bundle", models=[str(tiny_llama)], deps="none", default_models=False, tar=True)
    carried = tmp_path / "usb"
    carried.mkdir()
    tar = carried / "renamed.tar"  # a user may rename the file: the folder inside is what counts
    shutil.copy2(made / "bundle.tar", tar)
    assert main(["bundle", "restore", str(tar)]) == 0
    assert "restored model:" in capsys.readouterr().out
    assert (ragtune_home / "models" / "tiny-llama" / "model.safetensors").is_file()
    assert (carried / "bundle" / "bundle.json").is_file()
    not_tar = carried / "notes.txt"
    not_tar.write_text("hello")
    assert main(["bundle", "restore", str(not_tar)]) == 2
    err = capsys.readouterr().err
    assert "is a file but not a bundle .tar" in err and "Traceback" not in err


def test_unreachable_torch_index_fails_fast_naming_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/whl/cpu"  # nothing listens there
    monkeypatch.setenv("RAGTUNE_TORCH_INDEX", url)
    rc = main(["bundle", "create", str(tmp_path / "b"), "--no-default-models"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "RAGTUNE_TORCH_INDEX" in err and url in err and "cannot be reached" in err
    assert not (tmp_path / "b").exists()  # nothing half-written


def test_torch_index_that_never_answers_is_given_up_on(tmp_path: Path) -> None:
    # a proxy that accepts and then says nothing: pip waited for it for more than 11 minutes
    import socket

    from ragtune.bundle import check_index_reachable

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/whl/cpu"
        with pytest.raises(UsageError, match=r"no answer.*RAGTUNE_TORCH_INDEX"):
            check_index_reachable(url, timeout=0.5)


def test_index_that_answers_passes_the_probe() -> None:
    import http.server
    import threading

    from ragtune.bundle import check_index_reachable

    class Index(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/whl/cpu/torch/" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        check_index_reachable(f"http://127.0.0.1:{srv.server_port}/whl/cpu")
        with pytest.raises(UsageError, match="it has no torch"):
            check_index_reachable(f"http://127.0.0.1:{srv.server_port}/other")
    finally:
        srv.shutdown()
        srv.server_close()


def test_downloads_show_progress(small_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # pip download with its output streamed: each package it collects and saves is logged as it happens
    import logging

    from ragtune.bundle_wheels import _run_showing_progress

    wheels = small_bundle / "wheels"
    dest = tmp_path / "dest"
    caplog.set_level(logging.INFO, logger="ragtune.bundle_wheels")
    _run_showing_progress([sys.executable, "-m", "pip", "download", "--no-index", "--no-deps", "--find-links",
                           str(wheels), "--dest", str(dest), "--progress-bar", "off", "ragtune"], "downloading")
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.strip().startswith(("Collecting ragtune", "Processing ")) for line in lines), lines
    assert any(line.strip().startswith("Saved ") for line in lines), lines
    assert list(dest.glob("ragtune-*.whl"))
    with pytest.raises(RagtuneError, match="No matching distribution"):
        _run_showing_progress([sys.executable, "-m", "pip", "download", "--no-index", "--dest", str(dest),
                               "no-such-package-anywhere"], "downloading")


def test_create_never_replaces_a_folder_holding_what_it_carries(tmp_path: Path, tiny_llama: Path) -> None:
    """--force replaces the bundle folder: one that holds a model, adapter or config being carried is refused."""
    work = tmp_path / "work"
    adapter = fake_adapter(tiny_llama, work / "adapter")
    with pytest.raises(UsageError, match="bundle dir '.*work' holds the adapter 'adapter'"):
        create_bundle(work, adapters=[str(adapter)], deps="none", default_models=False, force=True)
    assert (adapter / "adapter_config.json").is_file()
