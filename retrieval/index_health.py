"""What an interrupted `index add`/`sync` left in an index, said to whoever reads it.

    said = incomplete_warning(store, "default")   # "" when every document is complete

The store is the manifest (retrieval/ingest_write.py): a document is complete when the store holds as
many chunks of it as it was cut into (its first chunk's n_chunks); an interrupted write leaves fewer,
or chunks without their document's first one. The next add or sync of the folder finishes them. Kept
apart from index_manage so that opening an index for search imports nothing more.
"""

from __future__ import annotations

import shlex
from typing import Any


def incomplete_warning(store: Any, name: str) -> str:
    """What to tell a reader of an index that an interrupted add or sync left documents of cut short
    (fewer chunks stored than were cut, `index list`'s "incomplete"): which ones, and the sync that
    finishes them; "" when every document is complete."""
    states = store.doc_states()
    cut = sorted((st for st in states.values() if st["count"] != st.get("n_chunks") and st.get("file") is not None),
                 key=lambda st: (st.get("root", ""), str(st.get("source", ""))))
    leftovers = sum(1 for st in states.values() if st.get("file") is None)
    if not cut and not leftovers:
        return ""
    roots = sorted({st["root"] for st in cut if st.get("root")}) or list(store.read_meta().get("roots") or [])
    shown = [str(st.get("source", st["doc_id"])) for st in cut[:10]]
    what = []
    if cut:
        more = f" and {len(cut) - 10} more" if len(cut) > 10 else ""
        what.append(f"{len(cut)} incomplete document{'s' if len(cut) != 1 else ''} ({', '.join(shown)}{more})")
    if leftovers:
        what.append(f"leftover chunks of {leftovers} interrupted write{'s' if leftovers != 1 else ''}")
    fix = " ".join(["ragtune", "index", "sync", *(shlex.quote(r) for r in roots or ["ROOT"]), "--index",
                    shlex.quote(name)])
    return (f"index '{name}' holds {' and '.join(what)}, left by an interrupted 'ragtune index add' or 'sync': "
            f"search may miss parts of them; run '{fix}' (or the interrupted command again) to finish them")
