"""The check that a GGUF file answers like transformers: prompt ids and greedy ids on fixed prompts.

    from ragtune.export.parity import check_against_transformers, describe_check
    report = check_against_transformers(model_dir, "smol-f16.gguf")     # report["ok"], report["prompts"]
    print(describe_check(report))

Greedy decoding is an argmax on both sides, so an f16 file gives transformers' ids wherever the
top-2 logit margin is clear. Each prompt's verdict: "equal"; "near-tie" (the first divergence is at a
step where transformers' logit for llama.cpp's token is within `margin` of its top token: f16
rounding may flip it; reported, not failed); "diverged" (a clear margin, or prompt ids that differ).
A quantized or bf16 file is not compared token by token (a further, expected loss; bf16 rounds
activations more coarsely than f16): it must load, generate and tokenize as transformers does (`check_loads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ragtune.errors import CheckFailed

DEFAULT_MARGIN = 0.5  # logits: a top-2 gap below this is a near-tie that f16 rounding may flip
CHECK_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colors.",
    "How many days are in a week?",
)
CHECK_TOKENS = 24
SHORT_KEYS = ("ok", "margin", "max_new_tokens", "prompt_ids_equal", "equal", "near_ties", "diverged", "checked_file")


@dataclass
class ChatRenderer:
    """A tokenizer with the chat template an export uses (the adapter's, else the model's)."""

    tokenizer: Any
    template: str | None
    special_tokens: list[str]
    eos: list[str]

    def __call__(self, messages: list[dict[str, str]], gen: bool) -> str:
        from ragtune.chat_roles import fit_roles

        template = self.template or getattr(self.tokenizer, "chat_template", None)
        return self.tokenizer.apply_chat_template(fit_roles(messages, template), tokenize=False,
                                                  add_generation_prompt=gen, chat_template=self.template)

    def ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def chat_renderer(tok_dir: Path, template: str | None = None) -> ChatRenderer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    specials = list(dict.fromkeys([*tok.all_special_tokens, *[t.content for t in tok.added_tokens_decoder.values()
                                                               if getattr(t, "special", False)]]))
    return ChatRenderer(tok, template or tok.chat_template, specials, [tok.eos_token] if tok.eos_token else [])


def check_against_transformers(model_dir: str | Path, gguf_file: str | Path, *, adapter_dir: str | Path | None = None,
                               lora_gguf: str | Path | None = None, template: str | None = None,
                               prompts: Sequence[str] = CHECK_PROMPTS, max_new_tokens: int = CHECK_TOKENS,
                               margin: float = DEFAULT_MARGIN, threads: int = 0) -> dict[str, Any]:
    """Greedy ids and prompt ids of llama.cpp vs transformers (fp32) on fixed chat prompts.

    With `adapter_dir` (+ `lora_gguf`) transformers runs base + peft adapter and llama.cpp base GGUF +
    the LoRA GGUF.
    """
    from ragtune.modeling import eos_token_ids
    from ragtune.serve.llamacpp import LlamaCppEngine

    model_dir = Path(model_dir)
    chat = chat_renderer(Path(adapter_dir) if adapter_dir else model_dir, template)
    eos = eos_token_ids(chat.tokenizer, model_dir=model_dir)
    model = _transformers_model(model_dir, adapter_dir)
    eng = LlamaCppEngine(gguf_file, lora={"check": str(lora_gguf)} if lora_gguf else None,
                         n_threads=threads).load()
    try:
        rows = [_compare(model, eng, chat, text, eos, max_new_tokens, margin, "check" if lora_gguf else None)
                for text in prompts]
    finally:
        eng.close()
    verdicts = [r["verdict"] for r in rows]
    return {"ok": "diverged" not in verdicts, "margin": margin, "max_new_tokens": max_new_tokens,
            "prompt_ids_equal": all(r["prompt_ids_equal"] for r in rows),
            "equal": verdicts.count("equal"), "near_ties": verdicts.count("near-tie"),
            "diverged": verdicts.count("diverged"), "prompts": rows}


def _transformers_model(model_dir: Path, adapter_dir: str | Path | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True,
                                                 use_safetensors=True)
    if adapter_dir:
        from peft import PeftModel

        from ragtune.modeling import adapter_mismatch

        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        except RuntimeError as exc:
            raise adapter_mismatch(exc, adapter_dir, model_dir) or exc
    return model.eval()


def _compare(model: Any, eng: Any, chat: ChatRenderer, text: str, eos: list[int], max_new_tokens: int,
             margin: float, adapter: str | None) -> dict[str, Any]:
    """One prompt: both greedy continuations and the verdict."""
    import torch
    from transformers import GenerationConfig

    tok = chat.tokenizer
    gcfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
                            output_logits=True, return_dict_in_generate=True)
    prompt = chat([{"role": "user", "content": text}], True)
    hf_prompt = chat.ids(prompt)
    ll_prompt = eng.tokenize(prompt)
    ids = torch.tensor([hf_prompt])
    with torch.inference_mode():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gcfg)
    hf_ids = gen.sequences[0, len(hf_prompt):].tolist()
    logits = [x[0].float() for x in gen.logits]
    ll_ids = eng.generate(prompt_ids=hf_prompt, max_new_tokens=max_new_tokens, temperature=0.0, adapter=adapter,
                          stop_ids=eos, reuse_prefix=False)["ids"]
    margins = [float(torch.topk(lg, 2).values[0] - torch.topk(lg, 2).values[1]) for lg in logits]
    row: dict[str, Any] = {"prompt": text, "prompt_ids_equal": hf_prompt == ll_prompt,
                           "prompt_tokens": len(hf_prompt), "transformers_ids": hf_ids,
                           "llama_cpp_ids": ll_ids, "min_margin": round(min(margins), 4) if margins else None}
    first = next((i for i, (a, b) in enumerate(zip(hf_ids, ll_ids)) if a != b), None)
    if first is None and len(hf_ids) != len(ll_ids):
        first = min(len(hf_ids), len(ll_ids))
    if first is None:
        row["verdict"] = "equal"
    else:
        row["first_divergence"] = first
        row["verdict"] = "diverged"
        if first < len(logits) and first < len(ll_ids):
            lg = logits[first]
            gap = float(lg.max() - lg[ll_ids[first]])
            row["gap_at_divergence"] = round(gap, 4)
            row["verdict"] = "near-tie" if gap < margin else "diverged"
    if not row["prompt_ids_equal"]:
        row["verdict"] = "diverged"
        row["prompt_ids"] = {"transformers": hf_prompt, "llama_cpp": ll_prompt}
    return row


def describe_check(check: dict[str, Any]) -> str:
    head = (f"check vs transformers: {check['equal']} equal, {check['near_ties']} near-tie, {check['diverged']} "
            f"diverged of {len(check['prompts'])} prompts; prompt ids "
            f"{'equal' if check['prompt_ids_equal'] else 'DIFFER'}")
    lines = [head]
    for r in check["prompts"]:
        if r["verdict"] != "equal":
            extra = f", gap {r['gap_at_divergence']}" if "gap_at_divergence" in r else ""
            lines.append(f"  {r['verdict']}: {r['prompt']!r} first divergence at token {r.get('first_divergence')}"
                         f"{extra} (transformers {r['transformers_ids'][:12]} vs llama.cpp {r['llama_cpp_ids'][:12]})")
    return "\n".join(lines)


def short_check(check: dict[str, Any] | None) -> dict[str, Any] | None:
    """The check's summary without its per-prompt rows (for run cards; the export card keeps all)."""
    if check is None:
        return None
    return {k: check[k] for k in SHORT_KEYS if k in check}


def check_template(gguf_file: Path, model_dir: Path) -> None:
    """The GGUF must carry the model dir's chat template, byte for byte."""
    from ragtune.export.header import gguf_metadata
    from ragtune.modeling import chat_template_of

    want = chat_template_of(model_dir)
    if not want:
        return
    got = gguf_metadata(gguf_file, ["tokenizer.chat_template"]).get("tokenizer.chat_template")
    if got != want:
        raise CheckFailed(
            f"the GGUF written from '{model_dir}' carries a different chat template than the model dir "
            "(tokenizer_config.json and chat_template.jinja disagree?); keep one template in the model dir"
        )


def check_loads(path: Path, tok_dir: Path, template: str | None, lora_gguf: Path | None = None,
                threads: int = 0) -> None:
    """A quantized file (or an adapter over one) must load in llama.cpp, generate, and tokenize
    prompts as transformers does."""
    from ragtune.serve.llamacpp import LlamaCppEngine

    chat = chat_renderer(tok_dir, template)
    eng = LlamaCppEngine(path, lora={"check": lora_gguf} if lora_gguf else None, n_threads=threads, n_ctx=512).load()
    try:
        for text in CHECK_PROMPTS:
            prompt = chat([{"role": "user", "content": text}], True)
            if eng.tokenize(prompt) != chat.ids(prompt):
                raise CheckFailed(f"llama.cpp tokenizes {text!r} differently from transformers in '{path}'")
        eng.generate(prompt, max_new_tokens=2, adapter="check" if lora_gguf else None)
    finally:
        eng.close()
