"""The Ollama Modelfile beside each export: FROM/ADAPTER, a TEMPLATE equal to the chat template, stops.

    from ragtune.export.ollama import modelfile_text, parse_modelfile, render_ollama_template
    text, verified = modelfile_text("./smol-f16.gguf", render, special_tokens, eos)

Ollama is not installable here, so the TEMPLATE is checked, not assumed: `chat_shape` reads a chat
template as role prefix + content + role suffix from renders of probe conversations;
`ollama_template` writes that as a Go template over `.Messages`; `render_ollama_template`
interprets the subset of Go templates it writes, as Ollama would, and the TEMPLATE is written only
when it renders every probe conversation exactly like the Jinja template. Other templates get no
TEMPLATE (Ollama then reads `tokenizer.chat_template` from the GGUF).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

Render = Callable[[list[dict[str, str]], bool], str]  # (messages, add_generation_prompt) -> prompt text

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


def chat_shape(render: Render, special_tokens: Sequence[str], eos: Sequence[str]) -> ChatShape | None:
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


def modelfile_text(from_path: str, template_render: Render, special_tokens: Sequence[str], eos: Sequence[str],
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


def relative(path: Path, start: Path) -> str:
    """PATH as the Modelfile names it: relative to the Modelfile's folder when below it."""
    try:
        r = os.path.relpath(path, start)
    except ValueError:  # another drive (Windows)
        return str(path)
    return r if r.startswith("..") else f"./{r}"


def modelfile_path(out: Path, modelfile: Path | None, force: bool = False) -> Path:
    """Where the Modelfile for OUT goes: MODELFILE if given, else `Modelfile` beside OUT, else OUT's
    stem + `.Modelfile`. An existing Modelfile is replaced only with `force`, and `Modelfile` only when
    it names OUT (a hand-written one or another export's is kept: the stem's file is used instead).
    Raises before the export when the one file left to write exists and `force` is not given."""
    from ragtune.errors import UsageError

    if modelfile is not None:
        mf = Path(modelfile).expanduser()
        if mf.resolve().is_dir():
            raise UsageError(f"--modelfile '{mf}' is a folder; name a file, such as '{mf / 'Modelfile'}'")
        if mf.resolve().exists() and not force:
            raise UsageError(f"--modelfile '{mf}' already exists; pass --force to replace it, or name another "
                             "--modelfile")
        above = next(p for p in mf.resolve().parents if p.exists())
        if not above.is_dir():
            raise UsageError(f"--modelfile '{mf}': '{above}' is a file, so no folder can be made under it; name a "
                             "path in a folder")
        return mf
    default = out.parent / "Modelfile"
    if not default.exists() or (force and _names(default, out)):
        return default
    own = out.with_name(out.stem + ".Modelfile")
    if own.exists() and not force:
        raise UsageError(f"'{default}' and '{own}' already exist and are kept; pass --force to replace '{own}', or "
                         "name another file with --modelfile FILE")
    return own


def _names(modelfile: Path, out: Path) -> bool:
    """Whether MODELFILE (beside OUT) is the one an export of OUT writes: its ADAPTER, else FROM, is OUT."""
    try:
        prev = parse_modelfile(modelfile.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, or not a Modelfile we can read: not ours
        return False
    return prev.get("ADAPTER", prev.get("FROM")) == relative(out, out.parent)


def write_modelfile(out: Path, render: Render, special_tokens: Sequence[str], eos: Sequence[str],
                    modelfile: Path | None, from_file: Path, adapter_file: Path | None,
                    force: bool = False) -> tuple[Path, bool]:
    """Write the Modelfile for OUT atomically where `modelfile_path` says (asked again here: another
    export into the folder may have written a Modelfile meanwhile); (its path, whether its TEMPLATE
    was verified)."""
    from ragtune.io import atomic_write_text

    path = modelfile_path(out, modelfile, force)
    text, verified = modelfile_text(relative(from_file, path.parent), render, special_tokens, eos,
                                    relative(adapter_file, path.parent) if adapter_file else None, note=out.name)
    atomic_write_text(path, text)
    return path, verified
