"""Shared by the bench/ scripts (run as `python bench/NAME.py`, so this imports as `common`)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


class Stamps:
    """A transformers streamer that records when each new token arrives, and its id."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.ids: list[int] = []
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() streams the prompt first
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.ids.append(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def emit(out: dict[str, Any], path: str = "", ensure_ascii: bool = True) -> None:
    """Print a benchmark's results as JSON, and write the same text to `path` when one is given."""
    text = json.dumps(out, indent=1, ensure_ascii=ensure_ascii)
    print(text)
    if path:
        Path(path).write_text(text + "\n", encoding="utf-8")


def gguf(model: str = "", type: str = "f16") -> Path:
    """The GGUF export of `model` (a model folder; default the prepared SmolLM2-135M-Instruct) in `type`,
    made once and cached: what the llama.cpp benchmarks load."""
    from ragtune.modeling import default_chat_model_dir
    from ragtune.serve.llamacpp import ensure_gguf

    return ensure_gguf(Path(model) if model else default_chat_model_dir(), type=type)


def f16_gguf(model: str = "") -> Path:
    return gguf(model, "f16")
