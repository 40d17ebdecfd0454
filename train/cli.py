"""Argument parsers for `ragtune data`, `ragtune train`, `ragtune merge` (imports stay light)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ragtune.errors import EXIT_FAILED, EXIT_OK


def _tokenizer_for_check(model: str, cfg: Any) -> tuple[Any, str | None, str]:
    """(tokenizer, template, note): the --model's, else model.path's, else the prepared default's."""
    from ragtune.errors import ModelPathError
    from ragtune.modeling import default_chat_model_dir, load_tokenizer, resolve_model_path
    from ragtune.train.template import template_of

    path = model or cfg.model.path
    if not path and not default_chat_model_dir().exists():
        return None, None, "no model"
    try:
        base = resolve_model_path(path)
    except ModelPathError:
        if model:
            raise
        return None, None, "no model"
    tok = load_tokenizer(base, trust_remote_code=cfg.model.trust_remote_code)
    return tok, _chat_template(cfg, tok, template_of), str(base)


def _chat_template(cfg: Any, tok: Any, template_of: Any) -> str:
    """train.chat_template's text (checked to be a readable Jinja file), else the tokenizer's own template."""
    from ragtune.train.prepare import read_template_file

    if not cfg.train.chat_template:
        return template_of(tok)
    return read_template_file(cfg.train.chat_template)


def _rag_check(index: str, rep: Any, tok: Any, tpl: str | None, max_len: int, cfg: Any) -> tuple[str, dict[str, Any]]:
    """`data check --rag INDEX`: the records as retrieval would build them (train/rag.py), before training."""
    from ragtune.config import replace
    from ragtune.train.rag import build_rag, check_with_rag

    rcfg = replace(cfg, data=replace(cfg.data, rag=replace(cfg.data.rag, index=index)))
    built = build_rag(rcfg, rep.records)
    rrep = check_with_rag(rep, built, tok, tpl, max_len)
    st = rrep.stats
    out = {**built.block(), "ok": rrep.ok, "tokens": st.get("tokens"), "tokens_per_epoch": st.get("tokens_per_epoch"),
           "over_max_length": st.get("over_max_length"), "cut_lines": st.get("cut_lines", []),
           "answer_truncated_lines": sorted(rrep.rejected), "max_length": max_len}
    lines = [built.note()]
    if st.get("tokens"):
        t = st["tokens"]
        lines.append(f"with sources: tokens per record min {t['min']}, median {t['median']}, p95 {t['p95']}, "
                     f"max {t['max']}; {st['tokens_per_epoch']:,} tokens per epoch; {st['over_max_length']} over "
                     f"max_length {max_len}")
    elif st.get("tokens_note"):
        lines.append(st["tokens_note"])
    if st.get("cut_lines"):
        lines.append(f"answers cut at max_length {max_len} (end and stop token not trained): lines "
                     + ", ".join(map(str, st["cut_lines"])))
    if rrep.rejected:
        lines.append(f"answers truncated away by their sources (not trainable): lines "
                     + ", ".join(map(str, sorted(rrep.rejected)))
                     + "; raise data.max_length or lower data.rag.distractors / data.rag.top_k")
    return "\n".join(lines), out


def _run_data(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.cli import print_json
    from ragtune.errors import UsageError
    from ragtune.train import data

    if args.data_cmd == "check":
        if args.write_clean:  # refused before the check, which may load a tokenizer
            data.clean_targets(args.file, args.write_clean, args.force)
        if args.max_length < 0:
            raise UsageError(f"--max-length must be a number of tokens (at least 1; 0 = data.max_length, "
                             f"{cfg.data.max_length}), got {args.max_length}")
        tok, tpl, model = _tokenizer_for_check(args.model, cfg)
        max_len = args.max_length or cfg.data.max_length
        rep = data.check_file(args.file, tok, tpl, max_len, dedupe=cfg.data.dedupe)
        rag = _rag_check(args.rag, rep, tok, tpl, max_len, cfg) if args.rag else None
        written = None
        if args.write_clean:
            written = data.write_clean(rep, args.write_clean, force=args.force)
        if args.json:
            d = rep.as_dict()
            d["model"] = model
            if written:
                d["written"] = {"clean": str(written[0]), "rejected": str(written[1])}
            if rag:
                d["rag"] = rag[1]
            print_json(d)
        else:
            print(rep.format())
            if written:
                print(f"wrote {len(rep.records)} valid records to {written[0]} and "
                      f"{len(rep.rejected)} rejected lines with reasons to {written[1]}")
            if rag:
                print(rag[0])
        return EXIT_OK if rep.ok and (rag is None or rag[1]["ok"]) else EXIT_FAILED
    if args.data_cmd == "convert":
        out, n, skipped = data.convert(args.file, args.question_col, args.answer_col, args.system, args.out,
                                       encoding=args.encoding, force=args.force)
        for s in skipped:
            print(f"skipped {s}")
        if not n:  # an empty training file is no result
            print(f"no records to write (no rows, or every row was skipped); {out} not written")
            return EXIT_FAILED
        print(f"wrote {n} record{'' if n == 1 else 's'} to {out}")
        return EXIT_OK
    if args.data_cmd == "split":
        tr, ev, ntr, nev, left_out = data.split(args.file, args.eval_fraction, args.seed, args.out_dir,
                                                force=args.force, skip_invalid=args.skip_invalid)
        print(f"wrote {ntr} records to {tr} and {nev} to {ev}"
              + (f" ({left_out} invalid record{'' if left_out == 1 else 's'} left out, --skip-invalid)" if left_out else ""))
        return EXIT_OK
    return EXIT_OK


def _run_train(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.cli import print_json
    from ragtune.config import replace
    from ragtune.runcard import read_runcard
    from ragtune.train.recipe import first_process, run_train

    if not first_process():  # one log for a multi-process run, from its first process
        import logging

        logging.getLogger("ragtune").setLevel(logging.WARNING)
    if args.skip_invalid:
        cfg = replace(cfg, data=replace(cfg.data, skip_invalid=True))
    if args.output_dir:
        cfg = replace(cfg, train=replace(cfg.train, output_dir=args.output_dir))
    if args.dry_run:
        plan = run_train(cfg, resume=args.resume, overwrite=args.overwrite, dry_run=True)
        if first_process():
            _print_plan(plan, cfg, args.json)
        return EXIT_OK
    try:
        out = run_train(cfg, resume=args.resume, overwrite=args.overwrite)
    finally:
        _leave_process_group()
    if not first_process():
        return EXIT_OK  # under accelerate launch / torchrun, the first process reports for all
    card = read_runcard(out)
    if args.json:
        print_json({"output_dir": str(out), "metrics": card["metrics"], "data": card["data"]})
    else:
        m = card["metrics"]
        ev = f", eval loss {m['eval_loss']:.4f}" if m.get("eval_loss") is not None else ""
        print(f"adapter: {out} ({m['steps']} steps, train loss {m['train_loss']:.4f}{ev}, "
              f"{m['tokens_per_second']:.0f} tokens/s, {m['wall_seconds']:.0f}s)")
    return EXIT_OK


def _leave_process_group() -> None:
    """Under accelerate launch / torchrun, end the process group before the interpreter does: left to exit,
    a rank's gloo threads were sometimes torn down while joinable ('terminate called without an active
    exception', exit -6), failing a run whose adapter was already written."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _print_plan(plan: dict[str, Any], cfg: Any, as_json: bool) -> None:
    from ragtune.cli import print_json

    if as_json:
        print_json({"dry_run": True, "output_dir": cfg.train.output_dir, **plan})
        return
    t = plan["training"]
    est = plan["estimated_train_seconds"]
    when = (f"about {est / 60:.0f} min" if est >= 90 else f"about {est:.0f} s") if est is not None else "not timed"
    print(f"dry run: nothing trained, nothing written to {cfg.train.output_dir}\n"
          f"  data: {plan['train_records']} training records ({plan['tokens_per_epoch']:,} tokens per epoch, "
          f"{plan['trained_tokens_per_epoch']:,} trained), {plan['eval_records']} eval records\n"
          f"  steps: {plan['steps']} ({plan['epochs']:g} epochs, {plan['records_per_step']} records per step)"
          + (f", resuming at step {plan['resume_from_step']}" if plan["resume_from_step"] else "") + "\n"
          f"  LoRA: {plan['trainable_parameters'] / 1e6:.2f}M trainable parameters of "
          f"{plan['total_parameters'] / 1e6:.0f}M\n"
          f"  on {t['device']}, {t['dtype']}, {t['threads']} threads, gradient checkpointing {t['gradient_checkpointing']}\n"
          f"  estimated training time: {when} (from two timed batches; evaluation and saving come on top)")


def _run_merge(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.modeling import quiet_libraries
    from ragtune.train.merge import merge_adapter

    quiet_libraries()

    out = merge_adapter(args.adapter, args.out, force=args.force, dtype=args.dtype, base_dir=args.base)
    print(f"merged model: {out}")
    return EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser("data", help="check, convert and split chat JSONL",
                       description="Check chat JSONL before training (every problem with its line number), "
                                   "convert question/answer tables to chat JSONL, split train/eval.")
    dsub = p.add_subparsers(dest="data_cmd", metavar="{check,convert,split}", required=True)
    pc = dsub.add_parser("check", help="report every problem with its line number; exit 1 if any")
    pc.add_argument("file", help="chat JSONL file")
    pc.add_argument("--model", default="", help="model dir whose tokenizer and chat template to check with "
                                                 "(default: model.path, else the prepared SmolLM2)")
    pc.add_argument("--max-length", type=int, default=0, help="tokens per record (default: data.max_length)")
    pc.add_argument("--json", action="store_true", help="machine-readable report")
    pc.add_argument("--rag", metavar="INDEX", default="",
                    help="also build the records as retrieval-built training prompts from INDEX (data.rag.*): how "
                         "many have their gold source in the top k, token lengths with the sources, truncation")
    pc.add_argument("--write-clean", metavar="OUT", default="",
                    help="write the valid records to OUT and rejected lines with reasons to OUT.rejected.jsonl "
                         "(OUT's stem + .rejected.jsonl); never the checked FILE itself")
    pc.add_argument("--force", action="store_true", help="with --write-clean: replace existing OUT / OUT.rejected.jsonl")
    pv = dsub.add_parser("convert", help="question/answer table, ShareGPT, Alpaca or prompt/completion -> chat JSONL",
                         description="Write chat JSONL from a question/answer table (.csv, .tsv, .jsonl, .json; "
                                     "name the columns) or, without column names, from ShareGPT, Alpaca or "
                                     "prompt/completion records (.jsonl, or a .json array), recognised by their keys.")
    pv.add_argument("file", help=".csv, .tsv, .jsonl or .json (an array) file")
    pv.add_argument("--question-col", default="", help="the question column (tables)")
    pv.add_argument("--answer-col", default="", help="the answer column (tables)")
    pv.add_argument("--system", default="", help="system message to put first in every record")
    pv.add_argument("--out", default="", help="output file (default: FILE.chat.jsonl beside the input)")
    pv.add_argument("--encoding", default="auto",
                    help="the table's text encoding, e.g. cp949 (Korean Excel) or cp1252 (Western Excel); "
                         "auto = UTF-8, or UTF-16 when the file starts with its byte-order mark")
    pv.add_argument("--force", action="store_true", help="replace an existing output file")
    ps = dsub.add_parser("split", help="deterministic train/eval split")
    ps.add_argument("file", help="chat JSONL file")
    ps.add_argument("--eval-fraction", type=float, required=True)
    ps.add_argument("--seed", type=int, default=42)
    ps.add_argument("--out-dir", default="", help="where FILE.train.jsonl / FILE.eval.jsonl go (default: beside FILE)")
    ps.add_argument("--force", action="store_true", help="replace existing FILE.train.jsonl / FILE.eval.jsonl")
    ps.add_argument("--skip-invalid", action="store_true",
                    help="split the valid records, leaving out invalid ones (default: stop with the report, as train does)")
    p.set_defaults(func=_run_data)

    t = sub.add_parser("train", help="LoRA fine-tuning with TRL",
                       description="LoRA SFT of a local base model on chat JSONL (loss on assistant tokens only).\n"
                                   "Settings: --config configs/train/NAME.yaml plus key=value overrides, e.g. "
                                   "data.train_file=train.jsonl train.epochs=2.\nMulti-GPU: "
                                   "accelerate launch --config_file configs/accelerate/multi-gpu-ddp.yaml $(which ragtune) train ... "
                                   "(docs/training.md)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir/checkpoints")
    t.add_argument("--overwrite", action="store_true", help="start over when output_dir already holds a run")
    t.add_argument("--skip-invalid", action="store_true", help="train on the valid records instead of stopping")
    t.add_argument("--output-dir", default="", help="same as train.output_dir=DIR")
    t.add_argument("--json", action="store_true", help="print output dir and metrics as JSON")
    t.add_argument("--dry-run", action="store_true",
                   help="check the data and settings, load the model, time two batches and print the plan "
                        "(steps, tokens, trainable parameters, estimated time); train and write nothing")
    t.set_defaults(func=_run_train)

    m = sub.add_parser("merge", help="merge an adapter into its base model",
                       description="Write base+adapter as one safetensors model dir with tokenizer and chat "
                                   "template, loadable by plain transformers and vLLM.")
    m.add_argument("adapter", help="adapter folder written by 'ragtune train'")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    m.add_argument("--base", default="", metavar="DIR",
                   help="the base model's folder, when it is no longer where the adapter was trained "
                        "(checked by content hash; default: the folder the adapter's ragtune.json names)")
    m.set_defaults(func=_run_merge)
