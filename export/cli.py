"""`ragtune export gguf|cache|setup`: the argument parser and the command (heavy imports inside the command).

    ragtune export gguf runs/adapter --out runs/gguf/policies-f16.gguf
    ragtune export cache runs/adapter            # the GGUFs the llama.cpp engine loads, made ahead of time
    ragtune export setup
"""

from __future__ import annotations

import argparse
from typing import Any

from ragtune.errors import EXIT_OK
from ragtune.export.parity import DEFAULT_MARGIN
from ragtune.export.quantize import TYPES


def _run_export(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.cli import print_json

    if args.export_cmd == "setup":
        return _run_setup(args)
    if args.export_cmd == "cache":
        return _run_cache(args)
    from ragtune.export.build import export_gguf
    from ragtune.export.parity import describe_check
    from ragtune.modeling import quiet_libraries

    _check_args(args)
    quiet_libraries()
    res = export_gguf(
        args.source, args.out, args.type, lora=args.lora, base_gguf=args.base_gguf or None,
        check=not args.no_check, margin=args.margin, force=args.force, modelfile=args.modelfile or None,
        threads=args.threads,
    )
    if args.json:
        print_json({**res.entry, "seconds": round(res.seconds, 2), "card": str(res.card_path), "check": res.check})
        return EXIT_OK
    print(f"wrote {res.path} ({res.type}, {res.size_bytes / 1e6:.1f} MB, sha256 {res.sha256[:16]}...) "
          f"in {res.seconds:.0f}s")
    if res.check is not None:
        print(describe_check(res.check))
    else:
        print("not checked against transformers (--no-check)")
    if res.modelfile is not None:
        tpl = "" if res.entry.get("modelfile_template_verified") else " (no TEMPLATE: Ollama uses the GGUF's)"
        print(f"Ollama: ollama create NAME -f {res.modelfile}{tpl}")
        kept = res.path.parent / "Modelfile"
        if not args.modelfile and res.modelfile != kept:
            print(f"  (kept the existing {kept}: a Modelfile is replaced only with --force, and only when it "
                  "names this GGUF)")
    print(f"Python: LlamaCppEngine('{res.path}').load() (ragtune.serve.llamacpp)")
    return EXIT_OK


def _run_cache(args: argparse.Namespace) -> int:
    """Each SOURCE's GGUF in the cache the llama.cpp engine loads from (`ensure_gguf`): an adapter as a
    LoRA GGUF over its base's f16 file, a model dir as a `--type` file. What `ragtune eval`, `ask` and
    `serve` would otherwise convert on first use (a script can run it while something else computes)."""
    from ragtune.cli import print_json
    from ragtune.export.source import classify_source
    from ragtune.modeling import quiet_libraries
    from ragtune.serve.llamacpp import ensure_gguf

    quiet_libraries()
    done = []
    for source in args.sources:
        src = classify_source(source)
        if src.kind == "adapter":
            path = ensure_gguf(src.base_dir, adapter_dir=src.path)
        else:
            path = ensure_gguf(src.path, type=args.type)
        done.append({"source": str(source), "gguf": str(path)})
        if not args.json:
            print(f"{source}: {path}")
    if args.json:
        print_json(done)
    return EXIT_OK


def _check_args(args: argparse.Namespace) -> None:
    """What argparse's types let through, refused before the export starts."""
    import math

    from ragtune.errors import UsageError

    if not math.isfinite(args.margin) or args.margin < 0:
        raise UsageError(f"--margin {args.margin}: give a number of 0 or more (the logit margin below which a "
                         f"differing greedy token is forgiven; default {DEFAULT_MARGIN})")
    if args.threads < 0:
        raise UsageError(f"--threads {args.threads}: give 0 (all usable cores) or more")
    if args.base_gguf and not args.lora:
        raise UsageError("--base-gguf names the base a LoRA GGUF is checked and served over: it goes with --lora; "
                         "leave it out to export the merged model")
    if args.no_check and args.margin != DEFAULT_MARGIN:
        raise UsageError("--margin sets the check that --no-check skips: give one of them")


def _run_setup(args: argparse.Namespace) -> int:
    from ragtune.cli import print_json
    from ragtune.export.pin import SDIST_SHA256, converter_dir, fetch_sdist

    path = fetch_sdist()
    conv = converter_dir()
    if args.json:
        print_json({"sdist": str(path), "sha256": SDIST_SHA256, "converter": str(conv)})
    else:
        print(f"llama.cpp converter ready: {conv} (from {path.name}, sha256 verified)")
    return EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="export a model or adapter to GGUF for llama.cpp/Ollama",
                       description="Export to GGUF with llama.cpp's own converter (offline, pinned), checked "
                                   "against transformers; writes a Modelfile for 'ollama create' beside it.")
    esub = p.add_subparsers(dest="export_cmd", metavar="{gguf,cache,setup}", required=True)
    g = esub.add_parser(
        "gguf", help="adapter folder, merged model or model dir -> one .gguf (+ Modelfile)",
        description="SOURCE is an adapter folder (merged on the fly, or with --lora converted to llama.cpp's "
                    "adapter format), a merged model or any local transformers model directory. The f16 file "
                    "(the f16 intermediate for q8_0/q4_k_m) is checked: greedy ids and prompt ids from "
                    "llama.cpp must equal transformers' on fixed prompts (near-ties are reported).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("source", help="adapter folder, merged model dir or transformers model dir")
    g.add_argument("--out", required=True, help="output file, FILE.gguf")
    g.add_argument("--type", default="f16", choices=TYPES, help="GGUF type (default f16)")
    g.add_argument("--lora", action="store_true", help="write the adapter as a llama.cpp LoRA GGUF")
    g.add_argument("--base-gguf", default="", metavar="FILE",
                   help="with --lora: the base GGUF its Modelfile names (default: an f16 export of the base, "
                        "written beside --out)")
    g.add_argument("--modelfile", default="", metavar="FILE",
                   help="where to write the Modelfile (default: Modelfile beside --out; when a Modelfile is there "
                        "already, NAME.Modelfile for --out NAME.gguf: an existing one is replaced only with --force)")
    g.add_argument("--no-check", action="store_true", help="skip the comparison with transformers")
    g.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"logit gap under which a divergence counts as a near-tie (default {DEFAULT_MARGIN})")
    g.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0 = all usable cores; 1 for files under 64 MB)")
    g.add_argument("--force", action="store_true",
                   help="replace an existing --out and its Modelfile (a Modelfile that names another file is kept)")
    g.add_argument("--json", action="store_true", help="print the export entry as JSON")
    c = esub.add_parser(
        "cache", help="convert adapters or models into the GGUF cache the llama.cpp engine loads from, ahead of use",
        description="Each SOURCE converted once into $RAGTUNE_HOME/gguf (keyed by content hash), where "
                    "'ragtune eval', 'ask' and 'serve' on the llama.cpp engine look first: an adapter folder "
                    "becomes a LoRA GGUF (with its base model's f16 file), a model dir a --type file.")
    c.add_argument("sources", nargs="+", metavar="SOURCE", help="adapter folder or transformers model dir")
    c.add_argument("--type", default="f16", choices=TYPES, help="GGUF type of a model dir (default f16)")
    c.add_argument("--json", action="store_true", help="print each source's cached file as JSON")
    s = esub.add_parser("setup", help="fetch and verify the pinned llama.cpp converter (needs PyPI once)")
    s.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_export)
