"""Stop strings and incremental detokenizing: the text of an answer as its token ids arrive.

    from ragtune.serve.stops import _Decoder, _StreamText, cut_at_stop, held_back

    dec = _Decoder(tokenizer)
    for tid in ids: print(dec.add(tid), end="")          # deltas; their concatenation is decode(ids)
    dec.finish()                                         # what is still missing, decoded once
    cut_at_stop("Yes.\nQ:", ["\nQ:"])                    # ("Yes.", True)
    held_back("Yes.\n", ["\nQ:"])                        # 1: "\n" may start a stop string
    st = _StreamText(tokenizer, stop)                    # a stream's deltas, cut at the first stop
    delta = st.add(tid); tail, text = st.finish()        # st.hit: whether a stop string ended it

Used by the generator (`ragtune.serve.generator`): `_run_scheduled` ends a sequence when a stop string
completes, `AnswerStream` (`ragtune.serve.streaming`) streams through `_StreamText`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence


class _Decoder:
    """Incremental detokenizer: deltas whose concatenation equals decoding all ids at once.

    Each token decodes a short window, not the whole answer: the ids from `_prefix` (the tokens of the
    last delta, the left context that byte merges, leading-space rules and clean-up need) to the end,
    and emits what it adds past the decoded context. A window ending in an unfinished multi-byte
    character, or one whose text rewrites its context, waits for the next token (the window grows).
    `finish` decodes everything once and emits what is still missing."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        self._prefix = 0  # window start: context whose text is already emitted
        self._read = 0  # ids before this are in `emitted`

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        context = self.tok.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        text = self.tok.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(text) <= len(context) or text.endswith("\ufffd") or not text.startswith(context):
            return ""  # nothing new yet, an unfinished multi-byte character, or a merge that rewrites the tail: wait
        delta = text[len(context):]
        self.emitted += delta
        self._prefix, self._read = self._read, len(self.ids)
        return delta

    def finish(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted += delta
        return delta


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one occurred."""
    found = [i for i in (text.find(x) for x in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


@functools.lru_cache(maxsize=64)
def _failure(stop: str) -> tuple[int, ...]:
    """KMP failure function: f[i] = length of the longest proper prefix of stop[:i+1] that is also its suffix."""
    f = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = f[k - 1]
        if stop[i] == stop[k]:
            k += 1
        f[i] = k
    return tuple(f)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop string: the longest proper prefix of
    a stop that the text ends with. Linear in the stops' lengths (a KMP pass over the text's last
    len(stop) characters), so a long stop string cannot make each streamed token quadratic."""
    best = 0
    for x in stops:
        if len(x) < 2:
            continue
        f = _failure(x)
        k = 0
        for ch in text[-(len(x) - 1):]:
            while k and (k == len(x) or ch != x[k]):
                k = f[k - 1]
            if ch == x[k]:
                k += 1
        if k == len(x):  # the text ends with the whole stop: its longest proper prefix that is a suffix
            k = f[-1]
        best = max(best, k)
    return best


class _StreamText:
    """A stream's token ids as text deltas: detokenized incrementally, cut at the first stop string,
    and holding back what may be the start of one."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self.dec = _Decoder(tokenizer)
        self.stop = stop
        self.sent = 0
        self.hit = False

    def add(self, token_id: int) -> str:
        if not self.dec.add(token_id) or self.hit:
            return ""
        text, self.hit = cut_at_stop(self.dec.emitted, self.stop)
        if not self.hit:
            text = text[: len(text) - held_back(text, self.stop)]
        if len(text) <= self.sent:
            return ""
        delta, self.sent = text[self.sent:], len(text)
        return delta

    def finish(self) -> tuple[str, str]:
        """(the last delta, the whole answer's text); `hit` says whether a stop string ended it."""
        self.dec.finish()
        text, self.hit = cut_at_stop(self.dec.emitted, self.stop)
        return text[self.sent:] if len(text) > self.sent else "", text
