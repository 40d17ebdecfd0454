"""Grammar-constrained decoding: answers that are JSON, JSON of a schema, or tool calls, token by token.

    from ragtune.serve.constrained import Grammars, response_format_grammar

    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})
    grammars = Grammars(tokenizer, n_vocab, eos_ids)   # once per model: llguidance's tokenizer (~1 s)
    c = grammars.constraint(grammar)                   # one per request
    c.mask(logits)                                     # numpy row, in place: tokens the grammar refuses -> -inf
    c.accept(token_id)                                 # advance; c.done once the grammar has ended

Library: llguidance (the grammar engine llama.cpp and vLLM ship). It needs numpy and the model's
`tokenizers` JSON only, so the llama.cpp engine stays free of torch; xgrammar needs torch,
transformers and triton. At each step the matcher writes a bitmask of the allowed tokens, the
sequence's logits row is masked and the usual sampler picks from it (greedy = argmax of the masked
row), then the picked token advances the matcher. JSON is compact (no free whitespace), so a
random model cannot pad forever: after the closing brace the only allowed token is end-of-text.
A schema keyword llguidance does not implement (`not`, `if`, `uniqueItems`, ...) is refused up
front with its name (`UnsupportedSchema`), never silently ignored; so is a `$ref` cycle with no value in
between (`ref_cycle`), which llguidance would only give up on at the first token. An answer cut by max_tokens
(finish_reason "length") is a prefix of valid JSON, as with OpenAI.
"""

from __future__ import annotations

import copy
import json
import threading
from typing import Any, Sequence

from ragtune.errors import UsageError

COMPACT = {"whitespace_flexible": False}


class UnsupportedSchema(UsageError):
    """A response_format or tool schema that cannot be enforced; `param` names where it is."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise UsageError("structured output needs llguidance: pip install 'llguidance==1.9.1'") from exc
    return llguidance


def check_grammar(grammar: str, param: str) -> str:
    """The grammar, or UnsupportedSchema naming what llguidance refused in it."""
    llg = _llguidance()
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, None)
    if is_error:
        why = "; ".join(m.strip() for m in messages) or "invalid schema"
        raise UnsupportedSchema(f"{param}: this schema cannot be enforced: {why}; remove or rewrite that part "
                                "(supported: type, properties, required, additionalProperties, items, enum, const, "
                                "anyOf/oneOf, $ref/$defs, min/max lengths, items and values, pattern, format)", param)
    return grammar


def schema_grammar(schema: Any, param: str) -> str:
    """A compact-JSON grammar for a JSON schema (a dict); checked."""
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"{param} must be a JSON schema object, got {type(schema).__name__}", param)
    cycle = ref_cycle(schema)
    if cycle:
        raise UnsupportedSchema(f"{param}: $ref '{cycle[0]}' leads back to itself ({' -> '.join(cycle)}) before any "
                                "value is read, so no JSON can match it; give the recursion a base case (an optional "
                                "property, an array that may be empty, an anyOf with a branch of its own) or remove "
                                "the cycle", param)
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), COMPACT)
    except (ValueError, TypeError) as exc:
        raise UnsupportedSchema(f"{param}: not a usable JSON schema ({exc})", param) from exc
    return check_grammar(grammar, param)


NOT_SCHEMAS = {"$defs", "definitions", "enum", "const", "default", "examples", "properties", "patternProperties",
               "dependentSchemas"}  # hold data or maps of names, walked apart from the keys whose values are schemas


def ref_cycle(schema: dict[str, Any]) -> list[str]:
    """A chain of local `$ref`s in use that comes back to where it started without a value in between
    (`{"$ref": "#"}`, a -> b -> a, allOf: [{"$ref": "#"}]), as the refs taken; [] when there is none.
    llguidance accepts such a schema up front and gives up on its first token (NoExtensionBias)."""
    def resolve(ref: str) -> Any:
        if ref == "#":
            return schema
        if not ref.startswith("#/"):
            return None  # remote and anchor refs: llguidance names those itself
        node: Any = schema
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def same_place(node: dict[str, Any]) -> list[tuple[str, Any]]:
        """What `node` applies to the same value: its ref's target, allOf members, a lone anyOf/oneOf member."""
        out = []
        ref = node.get("$ref")
        if isinstance(ref, str) and isinstance(resolve(ref), dict):
            out.append((ref, resolve(ref)))
        for key in ("allOf", "anyOf", "oneOf"):
            members = node.get(key)
            if isinstance(members, list) and (key == "allOf" or len(members) == 1):
                out += [("", m) for m in members if isinstance(m, dict)]
        return out

    reached: dict[int, dict[str, Any]] = {}
    todo: list[Any] = [schema]
    while todo:  # the schemas in use: the root, what it holds, and what their refs point at
        node = todo.pop()
        if not isinstance(node, dict) or id(node) in reached:
            continue
        reached[id(node)] = node
        for key, value in node.items():
            if key in ("properties", "patternProperties", "dependentSchemas") and isinstance(value, dict):
                todo += list(value.values())
            elif key not in NOT_SCHEMAS:
                todo += value if isinstance(value, list) else [value]
        if isinstance(node.get("$ref"), str):
            todo.append(resolve(node["$ref"]))
    state: dict[int, int] = {}  # 1: on the current path, 2: explored
    for root in reached.values():  # depth-first along same-place edges; reaching a node on the path is a cycle
        if id(root) in state:
            continue
        state[id(root)] = 1
        path = [(root, "", iter(same_place(root)))]  # (node, the ref taken to it, its edges left)
        while path:
            node, _, edges = path[-1]
            step = next(edges, None)
            if step is None:
                state[id(node)] = 2
                path.pop()
                continue
            ref, target = step
            if state.get(id(target)) == 1:
                i = next(k for k, (n, _, _) in enumerate(path) if n is target)
                chain = [r for r in (path[i][1], *(r for _, r, _ in path[i + 1:]), ref) if r]
                return chain if len(chain) > 1 else chain * 2
            if id(target) not in state:
                state[id(target)] = 1
                path.append((target, ref, iter(same_place(target))))
    return []


def response_format_grammar(rf: Any) -> str | None:
    """The grammar for OpenAI's `response_format` (None for text); UnsupportedSchema when malformed."""
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise UnsupportedSchema("response_format must be an object with a `type`: \"text\", \"json_object\" or "
                                "\"json_schema\"", "response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return schema_grammar({"type": "object"}, "response_format")
    if kind != "json_schema":
        raise UnsupportedSchema(f"response_format.type '{kind}' is not one of text, json_object, json_schema",
                                "response_format.type")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise UnsupportedSchema("response_format.json_schema must be an object {\"name\", \"schema\", \"strict\"?}",
                                "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise UnsupportedSchema("response_format.json_schema.name must be a non-empty string of at most 64 "
                                "characters", "response_format.json_schema.name")
    if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
        raise UnsupportedSchema("response_format.json_schema.strict must be true or false",
                                "response_format.json_schema.strict")
    schema = spec.get("schema", {"type": "object"})
    return schema_grammar(schema, "response_format.json_schema.schema")


def tokenizer_json(tokenizer: Any) -> str:
    """The `tokenizers` JSON behind a transformers fast tokenizer or ragtune's LightTokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise UsageError("structured output needs a fast (tokenizer.json) tokenizer; this model's is "
                         f"{type(tokenizer).__name__}")
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str()


class Grammars:
    """llguidance's view of one model's vocabulary; makes a Constraint per request."""

    def __init__(self, tokenizer: Any, n_vocab: int, eos_ids: Sequence[int]):
        llg = _llguidance()
        self.n_vocab = int(n_vocab)
        self.tokenizer = llg.LLTokenizer(tokenizer_json(tokenizer), n_vocab=self.n_vocab,
                                         eos_token=[int(i) for i in eos_ids] or None)

    def constraint(self, grammar: str) -> "Constraint":
        return Constraint(self, grammar)


class Constraint:
    """One request's grammar state. Not thread-safe: the decoding thread alone uses it."""

    def __init__(self, grammars: Grammars, grammar: str):
        import numpy as np

        llg = _llguidance()
        self.n_vocab = grammars.n_vocab
        self.matcher = llg.LLMatcher(grammars.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise UnsupportedSchema(f"the grammar cannot be used: {self.matcher.get_error()}", "response_format")
        self._bits = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)

    def allowed(self) -> Any:
        """A bool array over the vocabulary: the tokens the grammar allows next."""
        import numpy as np

        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little", count=self.n_vocab).view(bool)

    def mask(self, logits: Any) -> Any:
        """Set the refused tokens of a numpy logits row to -inf, in place; returns it."""
        import numpy as np

        ok = self.allowed()
        n = min(len(ok), logits.shape[-1])
        logits[:n][~ok[:n]] = -np.inf
        logits[n:] = -np.inf
        return logits

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            self._check()

    @property
    def done(self) -> bool:
        """The grammar has ended (its end-of-text was taken, or nothing can follow)."""
        return self.matcher.is_stopped()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarFailed(self.matcher.get_error())


class GrammarFailed(UsageError):
    """llguidance gave up on a grammar while decoding (one it accepted up front, such as a pattern with
    nested repetition counts whose lexer grows past its limit): the request's fault, said in a line."""

    api_code = "grammar_too_complex"

    def __init__(self, detail: str):
        why = detail.split("<state>")[0].strip().splitlines()[0][:200] if detail.strip() else "unknown error"
        super().__init__(
            f"constrained decoding stopped: the answer's grammar (response_format's schema or the forced tool "
            f"call's parameters) grew past what the grammar engine can follow ({why}); simplify it: smaller "
            "repetition counts in `pattern`, smaller maxLength/maxItems, less nesting")


_LOCK = threading.Lock()


def grammars_for(owner: Any, tokenizer: Any, n_vocab: int, eos_ids: Sequence[int]) -> Grammars:
    """The Grammars cached on `owner` (a Generator), built on first use."""
    with _LOCK:
        g = getattr(owner, "_grammars", None)
        if g is None:
            g = Grammars(tokenizer, n_vocab, eos_ids)
            owner._grammars = g
        return g
