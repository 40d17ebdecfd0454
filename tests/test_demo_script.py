"""scripts/demo.sh ends with commands to try next; they must work on what the demo built."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from ragtune.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _script_vars(script: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in re.findall(r"^([A-Z_]+)=(\S+)", script, re.M)}


def test_the_try_next_commands_use_the_serve_config_and_what_the_demo_built() -> None:
    script = (ROOT / "scripts/demo.sh").read_text(encoding="utf-8")
    env = _script_vars(script)
    block = re.search(r"^try next.*?\n(.*?)^EOF$", script, re.M | re.S)
    assert block, "demo.sh no longer prints the commands to try next"
    lines = [ln.split("#")[0].strip() for ln in block.group(1).splitlines() if ln.strip()]
    commands = [shlex.split(re.sub(r"\$(\w+)", lambda m: env[m.group(1)], ln)) for ln in lines]
    serve_cfg = env["SERVE"]
    serve = load_config(str(ROOT / serve_cfg))
    demo = load_config(str(ROOT / "configs/demo.yaml"))
    built = {demo.train.output_dir} | {f"{env['OUT']}/{m}" for m in re.findall(r'train\.output_dir="\$OUT/([\w./-]+)"', script)}
    verbs = set()
    for cmd in commands:
        assert cmd[0] == "ragtune" and serve_cfg in cmd, cmd
        verb = next(w for w in cmd[1:] if w in ("ask", "chat", "serve"))
        verbs.add(verb)
        if "--adapter" in cmd:
            assert cmd[cmd.index("--adapter") + 1] in built, (cmd, built)
        if "--index" in cmd:
            assert cmd[cmd.index("--index") + 1] == serve.index.name == demo.index.name
    assert verbs == {"ask", "chat", "serve"}
    # the served model names printed are the serve config's deployments
    listed = re.search(r"models: (.*)$", block.group(1), re.M).group(1).split(", ")
    assert listed == [d.name for d in serve.serve.deployments]
