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
front with its name (`UnsupportedSchema`), never silently ignored. An answer cut by max_tokens
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
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), COMPACT)
    except (ValueError, TypeError) as exc:
        raise UnsupportedSchema(f"{param}: not a usable JSON schema ({exc})", param) from exc
    return check_grammar(grammar, param)


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
