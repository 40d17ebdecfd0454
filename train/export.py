"""Export to GGUF for llama.cpp and Ollama, offline, checked against transformers.

    ragtune export gguf runs/adapter --out runs/gguf/policies-f16.gguf            # adapter merged on the fly
    ragtune export gguf ~/.cache/ragtune/models/SmolLM2-135M-Instruct --out smol-q4.gguf --type q4_k_m
    ragtune export gguf runs/adapter --lora --out runs/gguf/policies-lora.gguf    # llama.cpp LoRA adapter
    ragtune export setup                                                          # fetch + verify the converter

The converter is llama.cpp's own `convert_hf_to_gguf.py` (and `convert_lora_to_gguf.py`) with its
`gguf-py` and `conversion/` modules, taken from the pinned `llama-cpp-python` source distribution
kept (sha256-checked) in $RAGTUNE_HOME/llama.cpp/: the installed wheel does not ship them.
Quantized types go through llama.cpp's quantize API from an f16 intermediate. The chat template
travels inside the GGUF (`tokenizer.chat_template`); beside each export go a Modelfile for
`ollama create` and an export card (`FILE.gguf.json`), and adapters get the entry in their run card.

Checked, not assumed: prompt ids from llama.cpp's tokenizer equal transformers' on fixed chat
prompts, and greedy ids from llama.cpp equal transformers' greedy ids for the f16 file (the f16
intermediate of a quantized export), except where transformers' top-2 logit margin is below
`margin` (a near-tie: reported, not failed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ragtune.errors import CheckFailed, RagtuneError, UsageError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE")
CONVERTER_DIRS = ("gguf-py/", "conversion/")
TYPES = ("f16", "q8_0", "q4_k_m")
LLAMA_FTYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
DEFAULT_MARGIN = 0.5  # logits: a top-2 gap below this is a near-tie that f16 rounding may flip
CHECK_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colors.",
    "How many days are in a week?",
)
CHECK_TOKENS = 24


# --- the pinned converter -----------------------------------------------------------------------


def llama_cpp_dir() -> Path:
    from ragtune.modeling import ragtune_home

    return ragtune_home() / "llama.cpp"


def sdist_path() -> Path:
    return llama_cpp_dir() / SDIST_NAME


def fetch_command(dest: Path | None = None) -> str:
    return (f"pip download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} "
            f"-d {dest or llama_cpp_dir()}")


def _missing_sdist_hint() -> str:
    return (f"run 'ragtune export setup' (or ./scripts/setup.sh) on a machine with PyPI access, or copy "
            f"{SDIST_NAME} (sha256 {SDIST_SHA256[:16]}...) into {llama_cpp_dir()}/; it is fetched with: "
            f"{fetch_command()}")


def verify_sdist(path: Path | None = None) -> Path:
    """The pinned sdist, or an error naming what is wrong and how to get the right one."""
    from ragtune.modeling import cached_file_sha256

    p = path or sdist_path()
    if not p.is_file():
        raise UsageError(f"llama.cpp's GGUF converter is not set up: {p} is missing; {_missing_sdist_hint()}")
    digest = cached_file_sha256(p)
    if digest != SDIST_SHA256:
        raise UsageError(
            f"{p} has sha256 {digest[:16]}... but ragtune pins {SDIST_SHA256[:16]}... (llama-cpp-python "
            f"{LLAMA_CPP_PYTHON_VERSION}); delete it and {_missing_sdist_hint()}"
        )
    return p


def fetch_sdist() -> Path:
    """Download the pinned sdist with pip (needs PyPI) and verify it; a no-op when present and valid."""
    p = sdist_path()
    if p.is_file():
        try:
            return verify_sdist(p)
        except UsageError:
            p.unlink()
    p.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=p.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST_NAME
        if res.returncode != 0 or not got.is_file():
            raise RagtuneError(
                f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist ({res.stderr.strip()[-400:]}); "
                f"on an offline machine copy {SDIST_NAME} into {p.parent}/"
            )
        os.replace(got, p)
    return verify_sdist(p)


def converter_dir() -> Path:
    """llama.cpp's converter scripts, unpacked once from the verified sdist."""
    from ragtune.io import atomic_dir

    sdist = verify_sdist()
    out = llama_cpp_dir() / f"converter-{LLAMA_CPP_PYTHON_VERSION}"
    stamp = out / ".sdist-sha256"
    if stamp.is_file() and stamp.read_text().strip() == SDIST_SHA256:
        return out
    log.info("unpacking llama.cpp's converter from %s", sdist)
    with atomic_dir(out) as tmp, tarfile.open(sdist, "r:gz") as tar:
        for m in tar.getmembers():
            if not m.name.startswith(VENDOR) or not (m.isfile() or m.isdir()):
                continue
            rel = m.name[len(VENDOR):]
            if rel in CONVERTER_FILES or any(rel.startswith(d) for d in CONVERTER_DIRS):
                if ".." in Path(rel).parts:
                    continue
                dest = tmp / rel
                if m.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(dest, "wb") as f:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, f)
        if not (tmp / "convert_hf_to_gguf.py").is_file():
            raise RagtuneError(f"{sdist} has no {VENDOR}convert_hf_to_gguf.py; the file is not the pinned sdist")
        (tmp / ".sdist-sha256").write_text(SDIST_SHA256 + "\n")
    return out


def converter_version() -> str:
    return f"llama.cpp convert_hf_to_gguf.py from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"


def require_llama_cpp() -> Any:
    from ragtune.serve.llamacpp import import_llama_cpp

    lc = import_llama_cpp()
    version = getattr(lc, "__version__", "?")
    if version != LLAMA_CPP_PYTHON_VERSION:
        log.warning("llama-cpp-python %s is installed; ragtune pins %s (the converter's version)", version,
                    LLAMA_CPP_PYTHON_VERSION)
    return lc


def _run_converter(args: list[str], what: str) -> None:
    env = dict(os.environ)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env[var] = "1"
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py it ships with
    cmd = [sys.executable, *args]
    log.info("converting %s: %s", what, " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-12:])
        raise RagtuneError(
            f"llama.cpp's converter failed on {what}:\n{tail}\nThe architecture and tokenizer must be ones "
            f"llama.cpp supports ({converter_version()})"
        )


def convert_model(model_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    conv = converter_dir()
    _run_converter([str(conv / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out_file),
                    "--outtype", outtype], f"model '{model_dir}'")
    return out_file


def convert_lora(adapter_dir: Path, base_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    conv = converter_dir()
    _run_converter([str(conv / "convert_lora_to_gguf.py"), str(adapter_dir), "--base", str(base_dir),
                    "--outfile", str(out_file), "--outtype", outtype], f"adapter '{adapter_dir}'")
    return out_file


def quantize(src: Path, out: Path, type: str, threads: int = 0) -> Path:
    """llama.cpp's quantize API (llama_model_quantize) from an f16 GGUF."""
    lc = require_llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, LLAMA_FTYPES[type])
    params.nthread = threads
    from llama_cpp._utils import suppress_stdout_stderr

    # llama.cpp prints a line per tensor (fallback types for odd widths): only at -vv
    with suppress_stdout_stderr(disable=log.isEnabledFor(logging.DEBUG)):
        rc = lc.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0 or not out.is_file():
        raise RagtuneError(f"llama.cpp could not quantize '{src}' to {type} (code {rc})")
    return out


# --- metadata ----------------------------------------------------------------------------------


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


def gguf_metadata(path: str | Path, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file (arrays skipped), from its header alone.

    The `gguf` package's GGUFReader builds every array (a 49k-token vocabulary: seconds); this
    reads the key/value section once and stops when every wanted key is found.
    """
    import mmap
    import struct

    want = set(keys) if keys is not None else None
    out: dict[str, Any] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise RagtuneError(f"'{path}' is not a GGUF file (bad magic)")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version < 2:
            raise RagtuneError(f"'{path}' is GGUF version {version}; export it again with a current converter")
        pos = 24

        def string(p: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", m, p)
            return m[p + 8: p + 8 + n].decode("utf-8", errors="replace"), p + 8 + n

        def skip(t: int, p: int) -> int:
            if t == 8:
                (n,) = struct.unpack_from("<Q", m, p)
                return p + 8 + n
            if t == 9:
                it, count = struct.unpack_from("<IQ", m, p)
                p += 12
                if it in _GGUF_SCALARS:
                    return p + count * struct.calcsize(_GGUF_SCALARS[it])
                for _ in range(count):
                    p = skip(it, p)
                return p
            return p + struct.calcsize(_GGUF_SCALARS[t])

        for _ in range(n_kv):
            key, pos = string(pos)
            (t,) = struct.unpack_from("<I", m, pos)
            pos += 4
            if (want is None or key in want) and t != 9:
                if t == 8:
                    out[key], pos = string(pos)
                else:
                    (out[key],) = struct.unpack_from(_GGUF_SCALARS[t], m, pos)
                    pos += struct.calcsize(_GGUF_SCALARS[t])
            else:
                pos = skip(t, pos)
            if want is not None and want <= out.keys():
                break
    return out


# --- Ollama Modelfile ---------------------------------------------------------------------------

_S, _U, _A, _U2 = "SYSQZX7", "USRQZX7", "ASTQZX7", "US2QZX7"


@dataclass
class ChatShape:
    """A chat template seen as role prefix + content + role suffix, plus the generation prompt."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    gen: str
    default_system: str | None = None
    stops: list[str] = field(default_factory=list)


def _between(text: str, a: str, b: str) -> str:
    i = text.index(a) + len(a)
    return text[i:text.index(b, i)]


def chat_shape(render: Any, special_tokens: Sequence[str], eos: Sequence[str]) -> ChatShape | None:
    """Derive per-role prefix/suffix from renders of probe conversations; None if not of that form."""
    try:
        su_full = render([{"role": "user", "content": _U}], False)
        r2 = render([{"role": "system", "content": _S}, {"role": "user", "content": _U}], False)
        r2g = render([{"role": "system", "content": _S}, {"role": "user", "content": _U}], True)
        r3 = render([{"role": "system", "content": _S}, {"role": "user", "content": _U},
                     {"role": "assistant", "content": _A}], False)
        r4 = render([{"role": "system", "content": _S}, {"role": "user", "content": _U},
                     {"role": "assistant", "content": _A}, {"role": "user", "content": _U2}], False)
        su = su_full[su_full.index(_U) + len(_U):]
        sa = r3[r3.index(_A) + len(_A):]
        ps = r2[:r2.index(_S)]
        pa = _between(r3, _U, _A)
        pu = _between(r4, _A, _U2)
        if not (pa.startswith(su) and pu.startswith(sa)):
            return None
        pa, pu = pa[len(su):], pu[len(sa):]
        s_to_u = _between(r2, _S, _U)
        if not s_to_u.endswith(pu):
            return None
        ss = s_to_u[: len(s_to_u) - len(pu)]
        if not r2g.startswith(r2):
            return None
        gen = r2g[len(r2):]
        head = su_full[: su_full.index(_U)]
        if not head.endswith(pu):
            return None
        d = head[: len(head) - len(pu)]
        default_system = None
        if d:
            if not (d.startswith(ps) and d.endswith(ss)) or len(d) < len(ps) + len(ss):
                return None
            default_system = d[len(ps): len(d) - len(ss)]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    except Exception:  # noqa: BLE001 - a template that refuses the probes (e.g. needs alternation)
        return None
    pieces = [pu, su, pa, sa]
    stops = [t for t in eos if t]
    stops += [t for t in special_tokens if t and t not in stops and any(t in p for p in pieces)]
    return ChatShape({"system": ps, "user": pu, "assistant": pa}, {"system": ss, "user": su, "assistant": sa},
                     gen, default_system, stops)


def _go_literal(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(shape: ChatShape) -> str:
    """A Go template over Ollama's `.Messages` that renders like the chat template."""
    parts = ["{{ range .Messages }}"]
    for i, role in enumerate(("system", "user", "assistant")):
        kw = "if" if i == 0 else "else if"
        parts.append(f'{{{{ {kw} eq .Role "{role}" }}}}{_go_literal(shape.prefix[role])}{{{{ .Content }}}}'
                     f"{_go_literal(shape.suffix[role])}")
    parts.append("{{ end }}{{ end }}")
    parts.append(_go_literal(shape.gen))
    return "".join(parts)


_GO_TAG = re.compile(r"\{\{(.*?)\}\}", re.S)


def render_ollama_template(template: str, messages: Sequence[dict[str, str]], system: str | None = None) -> str:
    """Render the subset of Go templates that `ollama_template` writes, as Ollama would.

    Like Ollama, a Modelfile SYSTEM is put first when the messages carry no system turn.
    """
    msgs = list(messages)
    if system is not None and not any(m["role"] == "system" for m in msgs):
        msgs = [{"role": "system", "content": system}, *msgs]
    tokens: list[tuple[str, str]] = []
    pos = 0
    for m in _GO_TAG.finditer(template):
        if m.start() > pos:
            tokens.append(("text", template[pos:m.start()]))
        tokens.append(("tag", m.group(1).strip()))
        pos = m.end()
    if pos < len(template):
        tokens.append(("text", template[pos:]))

    def run(toks: list[tuple[str, str]], msg: dict[str, str] | None) -> str:
        out: list[str] = []
        i = 0
        while i < len(toks):
            kind, val = toks[i]
            if kind == "text":
                out.append(val)
            elif val == '"{{"':
                out.append("{{")
            elif val == ".Content":
                out.append(msg["content"] if msg else "")
            elif val == "range .Messages":
                body, i = _block(toks, i + 1)
                for mm in msgs:
                    out.append(run(body, mm))
                continue
            elif val.startswith("if "):
                branches, i = _if_chain(toks, i)
                for cond, body in branches:
                    if cond is None or (msg is not None and msg["role"] == cond):
                        out.append(run(body, msg))
                        break
                continue
            else:
                raise ValueError(f"unsupported template action {{{{ {val} }}}}")
            i += 1
        return "".join(out)

    return run(tokens, None)


def _block(toks: list[tuple[str, str]], i: int) -> tuple[list[tuple[str, str]], int]:
    depth, start = 0, i
    while i < len(toks):
        kind, val = toks[i]
        if kind == "tag" and (val.startswith("if ") or val.startswith("range ")):
            depth += 1
        elif kind == "tag" and val == "end":
            if depth == 0:
                return toks[start:i], i + 1
            depth -= 1
        i += 1
    raise ValueError("unterminated block in template")


_ROLE_COND = re.compile(r'^(?:else )?if eq \.Role "(\w+)"$')


def _if_chain(toks: list[tuple[str, str]], i: int) -> tuple[list[tuple[str | None, list[tuple[str, str]]]], int]:
    branches: list[tuple[str | None, list[tuple[str, str]]]] = []
    m = _ROLE_COND.match(toks[i][1])
    if not m:
        raise ValueError(f"unsupported condition {{{{ {toks[i][1]} }}}}")
    cond: str | None = m.group(1)
    i += 1
    depth, start = 0, i
    while i < len(toks):
        kind, val = toks[i]
        if kind == "tag" and (val.startswith("if ") or val.startswith("range ")):
            depth += 1
        elif kind == "tag" and depth == 0 and (val.startswith("else")):
            branches.append((cond, toks[start:i]))
            mm = _ROLE_COND.match(val)
            cond = mm.group(1) if mm else None
            start = i + 1
        elif kind == "tag" and val == "end":
            if depth == 0:
                branches.append((cond, toks[start:i]))
                return branches, i + 1
            depth -= 1
        i += 1
    raise ValueError("unterminated if in template")


PROBE_CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "Hi there"},),
    ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}),
    ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "One"},
     {"role": "assistant", "content": "Two\nlines"}, {"role": "user", "content": "Three"}),
    ({"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "3"}),
)


def modelfile_text(from_path: str, template_render: Any, special_tokens: Sequence[str], eos: Sequence[str],
                   adapter_path: str | None = None, note: str = "") -> tuple[str, bool]:
    """(Modelfile text, whether TEMPLATE was written and verified against the chat template)."""
    from ragtune import __version__

    lines = [f"# Written by ragtune {__version__}{(' for ' + note) if note else ''}.",
             "# Use: ollama create NAME -f THIS_FILE   (paths are relative to this file)",
             f"FROM {from_path}"]
    if adapter_path:
        lines.append(f"ADAPTER {adapter_path}")
    shape = chat_shape(template_render, special_tokens, eos)
    verified = False
    if shape is not None:
        tpl = ollama_template(shape)
        verified = '"""' not in tpl and all(
            render_ollama_template(tpl, conv, shape.default_system) == template_render(list(conv), True)
            for conv in PROBE_CONVERSATIONS
        )
        if verified:
            lines.append(f'TEMPLATE """{tpl}"""')
            if shape.default_system is not None and '"""' not in shape.default_system:
                lines.append(f'SYSTEM """{shape.default_system}"""')
    if not verified:
        lines.append("# No TEMPLATE: this chat template is not a plain role-prefix/suffix template, so it was not "
                     "translated; Ollama reads tokenizer.chat_template from the GGUF.")
    stops = shape.stops if shape is not None else [t for t in eos if t]
    for s in stops:
        lines.append(f'PARAMETER stop "{s}"')
    return "\n".join(lines) + "\n", verified


def parse_modelfile(text: str) -> dict[str, Any]:
    """The instructions of a Modelfile: {FROM, ADAPTER, TEMPLATE, SYSTEM, PARAMETER: [(name, value)]}."""
    out: dict[str, Any] = {"PARAMETER": []}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word not in ("FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "PARAMETER", "LICENSE", "MESSAGE"):
            raise ValueError(f"unknown Modelfile instruction {word!r}")
        rest = rest.strip()
        if rest.startswith('"""'):
            body = rest[3:]
            while '"""' not in body:
                if i >= len(lines):
                    raise ValueError(f"unterminated \"\"\" in {word}")
                body += "\n" + lines[i]
                i += 1
            rest = body[: body.index('"""')]
        if word == "PARAMETER":
            name, _, value = rest.partition(" ")
            out["PARAMETER"].append((name, json.loads(value) if value.startswith('"') else value))
        else:
            out[word] = rest
    return out


# --- equality check against transformers --------------------------------------------------------


def check_against_transformers(model_dir: str | Path, gguf_file: str | Path, *, adapter_dir: str | Path | None = None,
                               lora_gguf: str | Path | None = None, template: str | None = None,
                               prompts: Sequence[str] = CHECK_PROMPTS, max_new_tokens: int = CHECK_TOKENS,
                               margin: float = DEFAULT_MARGIN, threads: int = 0) -> dict[str, Any]:
    """Greedy ids and prompt ids of llama.cpp vs transformers (fp32) on fixed chat prompts.

    With `adapter_dir` (+ `lora_gguf`) transformers runs base + peft adapter and llama.cpp base GGUF +
    the LoRA GGUF. Each prompt's verdict: "equal"; "near-tie" (first divergence where transformers'
    logit for llama.cpp's token is within `margin` of its top token); "diverged" (a clear margin).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ragtune.modeling import eos_token_ids
    from ragtune.serve.llamacpp import LlamaCppEngine

    model_dir = Path(model_dir)
    tok_dir = Path(adapter_dir) if adapter_dir else model_dir
    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    tpl = template or tok.chat_template
    eos = eos_token_ids(tok, model_dir=model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True,
                                                 use_safetensors=True)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    eng = LlamaCppEngine(gguf_file, lora={"check": str(lora_gguf)} if lora_gguf else None,
                         n_threads=threads).load()
    gcfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
                            output_logits=True, return_dict_in_generate=True)
    rows = []
    try:
        for text in prompts:
            prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True, chat_template=tpl)
            hf_prompt = tok(prompt, add_special_tokens=False)["input_ids"]
            ll_prompt = eng.tokenize(prompt)
            ids = torch.tensor([hf_prompt])
            with torch.inference_mode():
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gcfg)
            hf_ids = gen.sequences[0, len(hf_prompt):].tolist()
            logits = [x[0].float() for x in gen.logits]
            ll = eng.generate(prompt_ids=hf_prompt, max_new_tokens=max_new_tokens, temperature=0.0,
                              adapter="check" if lora_gguf else None, stop_ids=eos, reuse_prefix=False)
            ll_ids = ll["ids"]
            margins = [float(torch.topk(lg, 2).values[0] - torch.topk(lg, 2).values[1]) for lg in logits]
            first = next((i for i, (a, b) in enumerate(zip(hf_ids, ll_ids)) if a != b), None)
            if first is None and len(hf_ids) != len(ll_ids):
                first = min(len(hf_ids), len(ll_ids))
            row: dict[str, Any] = {"prompt": text, "prompt_ids_equal": hf_prompt == ll_prompt,
                                   "prompt_tokens": len(hf_prompt), "transformers_ids": hf_ids,
                                   "llama_cpp_ids": ll_ids, "min_margin": round(min(margins), 4) if margins else None}
            if first is None:
                row["verdict"] = "equal"
            else:
                row["first_divergence"] = first
                if first < len(logits) and first < len(ll_ids):
                    lg = logits[first]
                    gap = float(lg.max() - lg[ll_ids[first]])
                    row["gap_at_divergence"] = round(gap, 4)
                    row["verdict"] = "near-tie" if gap < margin else "diverged"
                else:
                    row["verdict"] = "diverged"
            if not row["prompt_ids_equal"]:
                row["verdict"] = "diverged"
                row["prompt_ids"] = {"transformers": hf_prompt, "llama_cpp": ll_prompt}
            rows.append(row)
    finally:
        eng.close()
    verdicts = [r["verdict"] for r in rows]
    return {"ok": "diverged" not in verdicts, "margin": margin, "max_new_tokens": max_new_tokens,
            "prompt_ids_equal": all(r["prompt_ids_equal"] for r in rows),
            "equal": verdicts.count("equal"), "near_ties": verdicts.count("near-tie"),
            "diverged": verdicts.count("diverged"), "prompts": rows}


def describe_check(check: dict[str, Any]) -> str:
    head = (f"check vs transformers: {check['equal']} equal, {check['near_ties']} near-tie, {check['diverged']} "
            f"diverged of {len(check['prompts'])} prompts; prompt ids "
            f"{'equal' if check['prompt_ids_equal'] else 'DIFFER'}")
    lines = [head]
    for r in check["prompts"]:
        if r["verdict"] != "equal":
            extra = f", gap {r['gap_at_divergence']}" if "gap_at_divergence" in r else ""
            lines.append(f"  {r['verdict']}: {r['prompt']!r} first divergence at token {r.get('first_divergence')}"
                         f"{extra} (transformers {r['transformers_ids'][:12]} vs llama.cpp {r['llama_cpp_ids'][:12]})")
    return "\n".join(lines)


# --- sources ------------------------------------------------------------------------------------


def adapter_hash(adapter_dir: Path, card: dict[str, Any]) -> str:
    from ragtune.modeling import cached_file_sha256

    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        h.update(name.encode())
        h.update(cached_file_sha256(adapter_dir / name).encode())
    h.update(str(card.get("base_model", {}).get("hash", "")).encode())
    h.update(str(card.get("chat_template", {}).get("hash", "")).encode())
    return h.hexdigest()


@dataclass
class Source:
    kind: str  # "model" | "adapter"
    path: Path
    hash: str
    model_dir: Path | None = None  # the model dir to convert (a merged temp dir for adapters)
    base_dir: Path | None = None  # an adapter's base model
    card: dict[str, Any] = field(default_factory=dict)


def classify_source(source: str | Path) -> Source:
    from ragtune.errors import ModelPathError
    from ragtune.modeling import check_model_dir, model_hash
    from ragtune.runcard import adapter_base

    p = Path(source).expanduser()
    if not p.exists():
        raise UsageError(f"export source '{p}' does not exist; give an adapter folder (from 'ragtune train'), a "
                         "merged model or a transformers model directory")
    if p.is_file() and p.suffix == ".gguf":
        raise UsageError(f"export source '{p}' is already a GGUF file; give the transformers model directory or "
                         "adapter folder it came from")
    if p.is_dir() and (p / "adapter_config.json").is_file():
        p = p.resolve()
        if not (p / "adapter_model.safetensors").is_file():
            raise UsageError(f"adapter '{p}' has no adapter_model.safetensors (ragtune never loads pickle weights)")
        card, base = adapter_base(p)
        return Source("adapter", p, adapter_hash(p, card), base_dir=base, card=card)
    try:
        d = check_model_dir(p, what="export source")
    except ModelPathError as exc:
        raise UsageError(f"{exc}. An export source is an adapter folder (with adapter_config.json), a merged "
                         "model or a transformers model directory") from exc
    return Source("model", d, model_hash(d), model_dir=d)


# --- export -------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    path: Path
    type: str
    sha256: str
    size_bytes: int
    modelfile: Path | None
    card_path: Path
    entry: dict[str, Any]
    check: dict[str, Any] | None
    seconds: float


def _tokenizer_for_render(tok_dir: Path, template: str | None) -> tuple[Any, Any, list[str], list[str]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    tpl = template or tok.chat_template

    def render(messages: list[dict[str, str]], gen: bool) -> str:
        return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=gen, chat_template=tpl)

    specials = list(dict.fromkeys([*tok.all_special_tokens, *[t.content for t in tok.added_tokens_decoder.values()
                                                               if getattr(t, "special", False)]]))
    eos = [tok.eos_token] if tok.eos_token else []
    return tok, render, specials, eos


def _rel(path: Path, start: Path) -> str:
    try:
        r = os.path.relpath(path, start)
    except ValueError:  # another drive (Windows)
        return str(path)
    return r if r.startswith("..") else f"./{r}"


def _write_modelfile(out: Path, tok_dir: Path, template: str | None, modelfile: Path | None,
                     from_file: Path, adapter_file: Path | None) -> tuple[Path, bool]:
    from ragtune.io import atomic_write_text

    _, render, specials, eos = _tokenizer_for_render(tok_dir, template)
    if modelfile is None:
        modelfile = out.parent / "Modelfile"
        if modelfile.is_file():
            try:
                prev = parse_modelfile(modelfile.read_text(encoding="utf-8"))
            except ValueError:
                prev = {}
            mine = {_rel(from_file, out.parent), _rel(adapter_file, out.parent) if adapter_file else None}
            if prev.get("ADAPTER", prev.get("FROM")) not in mine:
                modelfile = out.with_name(out.stem + ".Modelfile")  # another export's Modelfile: keep it
    text, verified = modelfile_text(_rel(from_file, modelfile.parent), render, specials, eos,
                                    _rel(adapter_file, modelfile.parent) if adapter_file else None, note=out.name)
    atomic_write_text(modelfile, text)
    return modelfile, verified


def _record(src: Source, entry: dict[str, Any]) -> None:
    """Add the export to the adapter's run card (for a merged model: its adapter's, when still there)."""
    from ragtune.runcard import RUNCARD_NAME, read_runcard, update_runcard

    adapter = src.path if src.kind == "adapter" else None
    if adapter is None:
        info = src.path / "ragtune-model.json"
        if info.is_file():
            try:
                a = json.loads(info.read_text()).get("merged_from", {}).get("adapter")
            except ValueError:
                a = None
            if a and (Path(a) / RUNCARD_NAME).is_file():
                adapter = Path(a)
    if adapter is None:
        return
    card = read_runcard(adapter)
    exports = card.get("exports") or []
    exports = list(exports.values()) if isinstance(exports, dict) else list(exports)
    exports.append(entry)
    update_runcard(adapter, exports=exports)


def export_gguf(source: str | Path, out: str | Path, type: str = "f16", *, lora: bool = False,
                base_gguf: str | Path | None = None, check: bool = True, margin: float = DEFAULT_MARGIN,
                force: bool = False, modelfile: str | Path | None = None, threads: int = 0,
                record: bool = True, f16_gguf: str | Path | None = None) -> ExportResult:
    """Export SOURCE (adapter folder, merged model or model dir) to one GGUF file, checked.

    With `lora=True` the adapter becomes a llama.cpp LoRA GGUF; its Modelfile names a base GGUF
    (`base_gguf`, else an f16 export of the base cached in $RAGTUNE_HOME/gguf and linked beside OUT).
    """
    from ragtune.io import atomic_write_json
    from ragtune.modeling import file_sha256, text_sha256

    t0 = time.perf_counter()
    if type not in TYPES:
        raise UsageError(f"--type '{type}' is not one of {', '.join(TYPES)}")
    out = Path(out).expanduser().resolve()
    if out.suffix != ".gguf":
        raise UsageError(f"--out '{out}' must end in .gguf")
    if out.exists() and not force:
        raise UsageError(f"'{out}' already exists; pass --force to replace it")
    src = classify_source(source)
    if lora and src.kind != "adapter":
        raise UsageError(f"--lora needs an adapter folder (with adapter_config.json); '{src.path}' is a model directory")
    if lora and type != "f16":
        raise UsageError("--lora writes the adapter in f16 (its base GGUF may be quantized); drop --type")
    require_llama_cpp()
    converter_dir()  # fails early, with the fix, when the pinned sdist is missing
    out.parent.mkdir(parents=True, exist_ok=True)
    template = src.card.get("chat_template", {}).get("template") if src.kind == "adapter" else None
    check_report = None
    base_file: Path | None = None

    with tempfile.TemporaryDirectory(prefix=".ragtune-export-", dir=out.parent) as tmp_s:
        tmp = Path(tmp_s)
        if lora:
            assert src.base_dir is not None
            produced = convert_lora(src.path, src.base_dir, tmp / "lora.gguf", "f16")
            base_file = Path(base_gguf).expanduser().resolve() if base_gguf else None
            if base_file is None:
                cached = cached_gguf(src.base_dir, type="f16")
                base_file = out.with_name(f"{src.base_dir.name}-f16.gguf")
                if not base_file.exists():
                    _link_or_copy(cached, base_file)
            elif not base_file.is_file():
                raise UsageError(f"--base-gguf '{base_file}' does not exist")
            base_type = gguf_metadata(base_file, ["general.file_type"]).get("general.file_type")
            if check and base_type not in (0, 1):  # ALL_F32, MOSTLY_F16
                log.warning("not comparing with transformers: base GGUF '%s' is quantized (file type %s); "
                            "the adapter is checked to load only", base_file, base_type)
                _check_loads(base_file, src.path, template, lora_gguf=produced, threads=threads)
            elif check:
                check_report = check_against_transformers(src.base_dir, base_file, adapter_dir=src.path,
                                                          lora_gguf=produced, template=template, margin=margin,
                                                          threads=threads)
            model_for_tok = src.path
        else:
            if src.kind == "adapter":
                from ragtune.train.merge import merge_adapter

                merged = merge_adapter(src.path, tmp / "merged", force=True)
                _drop_temp_export(src.path, merged)
                src.model_dir = merged
            assert src.model_dir is not None
            if f16_gguf is not None:  # an f16 export of this very source, already checked: quantize it
                f16 = Path(f16_gguf)
                prior = json.loads(f16.with_name(f16.name + ".json").read_text())
                if prior.get("source", {}).get("hash") != src.hash:
                    raise UsageError(f"'{f16}' was not exported from '{src.path}'")
                check_report = prior.get("check") if check else None
            else:
                f16 = convert_model(src.model_dir, tmp / "f16.gguf", "f16")
                _check_template(f16, src.model_dir)
                if check:
                    check_report = check_against_transformers(src.model_dir, f16, margin=margin, threads=threads)
            produced = f16 if type == "f16" else quantize(f16, tmp / f"{type}.gguf", type, threads)
            model_for_tok = src.model_dir
        if check_report is not None and not check_report["ok"]:
            raise CheckFailed(
                f"the llama.cpp export of '{src.path}' does not answer like transformers; nothing was written to "
                f"'{out}'.\n{describe_check(check_report)}\nPass --no-check to write it anyway."
            )
        if check_report is not None and type != "f16":
            check_report["checked_file"] = "the f16 intermediate (quantization is the only further loss)"
        if type != "f16" and not lora:
            _check_loads(produced, model_for_tok, template, threads=threads)
        mf, verified = _write_modelfile(out, model_for_tok, template, Path(modelfile) if modelfile else None,
                                        base_file if lora else out, out if lora else None)
        os.replace(produced, out)

    digest = file_sha256(out)
    meta = gguf_metadata(out, ["general.architecture", "tokenizer.chat_template"])
    tpl_in = meta.get("tokenizer.chat_template")
    entry: dict[str, Any] = {
        "kind": "gguf-lora" if lora else "gguf",
        "path": str(out),
        "type": type,
        "sha256": digest,
        "size_bytes": out.stat().st_size,
        "source": {"kind": src.kind, "path": str(src.path), "hash": src.hash},
        "converter": {"name": converter_version(), "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
                      "sdist_sha256": SDIST_SHA256},
        "chat_template_hash": text_sha256(tpl_in) if isinstance(tpl_in, str) else None,
        "modelfile": str(mf),
        "modelfile_template_verified": verified,
        "check": _short_check(check_report),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if lora and base_file is not None:
        entry["base_gguf"] = str(base_file)
    card_path = atomic_write_json(out.with_name(out.name + ".json"), {**entry, "check": check_report})
    if record:
        _record(src, entry)
    secs = time.perf_counter() - t0
    log.info("exported %s -> %s (%s, %.1f MB) in %.1fs", src.path, out, type, entry["size_bytes"] / 1e6, secs)
    return ExportResult(out, type, digest, entry["size_bytes"], mf, card_path, entry, check_report, secs)


def _short_check(check: dict[str, Any] | None) -> dict[str, Any] | None:
    if check is None:
        return None
    keep = ("ok", "margin", "max_new_tokens", "prompt_ids_equal", "equal", "near_ties", "diverged", "checked_file")
    return {k: check[k] for k in keep if k in check}


def _drop_temp_export(adapter: Path, merged: Path) -> None:
    """merge_adapter records its output in the run card; a temp merge is gone after export: unrecord it."""
    from ragtune.runcard import read_runcard, update_runcard

    card = read_runcard(adapter)
    exports = [e for e in (card.get("exports") or []) if not (isinstance(e, dict) and e.get("path") == str(merged))]
    update_runcard(adapter, exports=exports)


def _check_template(gguf_file: Path, model_dir: Path) -> None:
    from ragtune.modeling import chat_template_of

    want = chat_template_of(model_dir)
    if not want:
        return
    got = gguf_metadata(gguf_file, ["tokenizer.chat_template"]).get("tokenizer.chat_template")
    if got != want:
        raise CheckFailed(
            f"the GGUF written from '{model_dir}' carries a different chat template than the model dir "
            "(tokenizer_config.json and chat_template.jinja disagree?); keep one template in the model dir"
        )


def _check_loads(path: Path, tok_dir: Path, template: str | None, lora_gguf: Path | None = None,
                 threads: int = 0) -> None:
    """A quantized file (or an adapter over one) must load in llama.cpp, generate, and tokenize
    prompts as transformers does."""
    from ragtune.serve.llamacpp import LlamaCppEngine

    tok, render, _, _ = _tokenizer_for_render(tok_dir, template)
    eng = LlamaCppEngine(path, lora={"check": lora_gguf} if lora_gguf else None, n_threads=threads, n_ctx=512).load()
    try:
        for text in CHECK_PROMPTS:
            prompt = render([{"role": "user", "content": text}], True)
            if eng.tokenize(prompt) != tok(prompt, add_special_tokens=False)["input_ids"]:
                raise CheckFailed(f"llama.cpp tokenizes {text!r} differently from transformers in '{path}'")
        eng.generate(prompt, max_new_tokens=2, adapter="check" if lora_gguf else None)
    finally:
        eng.close()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


# --- cache used by the engine --------------------------------------------------------------------


def cached_gguf(model_dir: str | Path, adapter_dir: str | Path | None = None, type: str = "f16",
                merged: bool = False) -> Path:
    """Export once and reuse: $RAGTUNE_HOME/gguf/<source-hash>/<kind>.gguf (+ .json card).

    The key is the content hash of the source (model dir, or adapter + its base); the card records
    the converter version, and a different converter exports again.
    """
    from ragtune.modeling import check_model_dir, model_hash, ragtune_home

    if type not in TYPES:
        raise UsageError(f"GGUF type '{type}' is not one of {', '.join(TYPES)}")
    base = check_model_dir(model_dir, what="model dir")
    if adapter_dir is None:
        key, name, source, lora = model_hash(base), f"model-{type}.gguf", base, False
    else:
        src = classify_source(adapter_dir)
        if src.kind != "adapter":
            raise UsageError(f"'{adapter_dir}' is not an adapter folder (no adapter_config.json)")
        if src.base_dir != base:
            raise UsageError(f"adapter '{src.path}' was trained on '{src.base_dir}', not on '{base}'")
        key = src.hash
        name = f"merged-{type}.gguf" if merged else "lora-f16.gguf"
        source, lora = src.path, not merged
        if lora:
            type = "f16"
    folder = ragtune_home() / "gguf" / key[:32]
    path = folder / name
    card = path.with_name(path.name + ".json")
    if path.is_file() and card.is_file():
        try:
            info = json.loads(card.read_text())
        except ValueError:
            info = {}
        if info.get("converter", {}).get("sdist_sha256") == SDIST_SHA256:
            return path
    log.info("exporting %s to GGUF once (cached in %s)", source, folder)
    f16 = cached_gguf(base, type="f16") if (lora or (adapter_dir is None and type != "f16")) else None
    export_gguf(source, path, type, lora=lora, force=True, record=False, base_gguf=f16 if lora else None,
                f16_gguf=f16 if not lora else None, modelfile=path.with_suffix(".Modelfile"))
    return path
