"""A GGUF file's scalar and string metadata, read from its header alone.

    from ragtune.export.header import gguf_metadata
    gguf_metadata("smol-f16.gguf", ["general.architecture", "general.file_type"])

The `gguf` package's GGUFReader builds every array (a 49k-token vocabulary: seconds); this reads the
key/value section once and stops when every wanted key is found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ragtune.errors import RagtuneError

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


def gguf_metadata(path: str | Path, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file (arrays skipped); `keys` stops the read early."""
    import mmap
    import os
    import struct

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:  # magic, version, tensor and key counts
            raise RagtuneError(f"'{path}' is not a GGUF file (it is empty or shorter than a GGUF header)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            try:
                return _read(m, path, set(keys) if keys is not None else None)
            except (struct.error, KeyError, RecursionError) as exc:  # a length, type or nesting past the file's end
                raise RagtuneError(f"'{path}' is truncated or damaged: its GGUF header does not read ({exc}); "
                                   "copy or export the file again") from exc


def _read(m: Any, path: str | Path, want: set[str] | None) -> dict[str, Any]:
    import struct

    out: dict[str, Any] = {}
    if m[:4] != b"GGUF":
        raise RagtuneError(f"'{path}' is not a GGUF file (bad magic)")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
    if version < 2:
        raise RagtuneError(f"'{path}' is GGUF version {version}; export it again with a current converter")
    pos = 24

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", m, p)
        if p + 8 + n > len(m):
            raise struct.error(f"a string of {n} bytes at offset {p} runs past the end of the file ({len(m)} bytes)")
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
        if pos > len(m):
            raise struct.error(f"the metadata runs past the end of the file ({len(m)} bytes)")
        if want is not None and want <= out.keys():
            break
    return out
