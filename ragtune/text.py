"""Bytes -> text: the one decoding rule for documents and training data.

    enc = detect_encoding(data)        # "utf-8-sig", "utf-16", "cp949", "cp1252", ... or None (unsure)
    text = data.decode(enc)

UTF-16 with a byte-order mark and UTF-8 (with or without one) are taken as they are. Anything else
is a legacy code page, told apart by charset-normalizer among the encodings such files are really
written in (Korean, Japanese, Chinese, Cyrillic, Western and Central European Windows code pages).
Trying one fixed fallback instead is how cp1252 text turns into Hangul mojibake: CP949 "decodes"
most byte strings. When the best candidate still reads as noise the answer is None, and the caller
refuses the file with its name rather than index or train on garbage.
"""

from __future__ import annotations

UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")

# the code pages legacy files are written in; charset-normalizer chooses among these only (left to
# itself it calls Western European text Baltic, cp775, or short accented words UTF-16)
LEGACY_ENCODINGS = ("cp949", "shift_jis", "euc_jp", "gb18030", "big5", "cp1252", "cp1250", "cp1251",
                    "cp1253", "cp1254", "cp1255", "cp1256", "cp1257", "cp874")
MULTI_BYTE = frozenset({"cp949", "shift_jis", "euc_jp", "gb18030", "big5"})
MAX_CHAOS = 0.2  # charset-normalizer's mess ratio above which a decoding is noise, not text
TIE = 0.05  # candidates this close to the least messy one are told apart by `plausibility`


def is_control(c: str) -> bool:
    """A C0 or C1 control character (newline, tab, escape, ...): what breaks a listing or drives a terminal."""
    return ord(c) < 32 or 127 <= ord(c) < 160


def escape_controls(text: str) -> str:
    """`text` with its control characters shown as \\xNN, on one line and inert on a terminal."""
    return "".join(f"\\x{ord(c):02x}" if is_control(c) else c for c in text)


def is_binary(data: bytes) -> bool:
    """NUL bytes near the start, outside UTF-16: not a text file."""
    return b"\x00" in data[:8192] and not data.startswith(UTF16_BOMS)


def detect_encoding(data: bytes) -> str | None:
    """The encoding to decode `data` with, or None when no candidate gives readable text."""
    if data.startswith(UTF16_BOMS):
        return "utf-16"
    try:
        data.decode("utf-8")
        return "utf-8-sig"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    results = [r for r in from_bytes(data, cp_isolation=list(LEGACY_ENCODINGS)) if r.chaos <= MAX_CHAOS]
    if not results:
        return None
    least = min(r.chaos for r in results)
    close = [r.encoding for r in results if r.chaos <= least + TIE]
    # several code pages decode the same bytes without a mess (cp949 "reads" Shift-JIS as rare Hangul
    # syllables; cp1250 reads cp1252's "ï" as "ď"): the one whose text looks like its own script wins,
    # then the order of LEGACY_ENCODINGS (the more common code page of a script first)
    return max(close, key=lambda e: (round(plausibility(data.decode(e, "replace"), e), 2),
                                     -LEGACY_ENCODINGS.index(e) if e in LEGACY_ENCODINGS else -99))


def plausibility(text: str, encoding: str) -> float:
    """Share of the non-ASCII characters that belong to the script `encoding` is used for.

    For the multi-byte code pages a character that reads as an accented Latin letter plus an ASCII
    letter, wedged between two ASCII letters, does not count: that is a Western word read two bytes
    at a time ("Fran\xe7ois" in Shift-JIS is "Fran輟is"), while "AとB" keeps its と (its second
    byte is not ASCII)."""
    chars = [c for c in text if ord(c) > 0x7F]
    if not chars:
        return 1.0
    if encoding in MULTI_BYTE:
        chars = [c for i, c in enumerate(text) if ord(c) > 0x7F and not (
            0 < i < len(text) - 1 and _ascii_letter(text[i - 1]) and _ascii_letter(text[i + 1])
            and _latin_pair(c, encoding))]
        if not chars:
            return 0.0
    if encoding == "cp949":  # real Korean keeps to the 2,350 common syllables (EUC-KR); mojibake does not
        good = sum(1 for c in chars if "\uac00" <= c <= "\ud7a3" and _ks_x_1001(c))
    elif encoding in ("shift_jis", "euc_jp"):
        good = sum(1 for c in chars if "\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" or "\u3000" <= c <= "\u303f")
    elif encoding in ("gb18030", "big5"):
        good = sum(1 for c in chars if "\u4e00" <= c <= "\u9fff" or "\u3000" <= c <= "\u303f" or "\uff00" <= c <= "\uff5e")
    else:  # single-byte code pages: letters, not symbols
        good = sum(1 for c in chars if c.isalpha())
    return good / len(chars)


def _ascii_letter(c: str) -> bool:
    return c.isascii() and c.isalpha()


def _latin_pair(c: str, encoding: str) -> bool:
    """Whether `c`'s two bytes in `encoding` read in cp1252 as an accented letter and an ASCII letter."""
    try:
        raw = c.encode(encoding)
    except UnicodeEncodeError:
        return False
    return (len(raw) == 2 and raw[1] < 0x80 and chr(raw[1]).isalpha()
            and raw[:1].decode("cp1252", "replace").isalpha())


def _ks_x_1001(c: str) -> bool:
    """One of the 2,350 common Hangul syllables (Python's euc_kr spells the others as 8-byte jamo sequences)."""
    try:
        return len(c.encode("euc_kr")) == 2
    except UnicodeEncodeError:
        return False


def decode(data: bytes) -> str | None:
    """`data` as text by `detect_encoding`, or None when its encoding cannot be told."""
    enc = detect_encoding(data)
    return None if enc is None else data.decode(enc)
