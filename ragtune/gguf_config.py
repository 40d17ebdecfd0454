"""The hyperparameters a GGUF file declares, carried into the transformers config made from it and checked there.

    from ragtune.export.header import gguf_metadata
    from ragtune.gguf_config import carry_declared, disagreements
    meta = gguf_metadata("gemma-2-27b.gguf")
    carry_declared(meta, config)      # {"query_pre_attn_scalar": (256, 144)}: set on `config`
    disagreements(meta, config)       # [] once the config computes what the file declares

transformers' GGUF reader maps some of a file's metadata into the config (its GGUF_CONFIG_MAPPING) and
leaves the rest at the architecture's defaults, so the model it reads computes something else than the
file wherever a default differs: rope scaling (Gemma 3 4B-27B scale their global layers' positions
linearly by 8), the sliding layers' rope base, Phi-3's sliding window, Gemma 2's logit soft-capping,
and Gemma 2/3's query scale, which no GGUF key holds. llama.cpp scales queries by 1/sqrt(n_embd/n_head) at the 27B layer
counts (Gemma 2: 46 layers, Gemma 3: 62) and by 1/sqrt(key_length) otherwise: each published model's
query_pre_attn_scalar (144 and 168 for the 27Bs, 256 for the others), where transformers assumes 256.

`carry_declared` sets those on the config as llama.cpp reads them; `disagreements` compares the config
with every hyperparameter below that the file declares (or llama.cpp derives from it). A rope scaling
other than linear is not carried and stays a disagreement. Keys not named here are not compared.
"""

from __future__ import annotations

import math
from typing import Any

# GGUF key (after "<arch>.") -> transformers config attribute, where transformers' reader maps it itself
PLAIN = {
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
}
# llama.cpp's value when a Gemma 2 file leaves the soft-capping keys out (llama-hparams.h)
GEMMA2_SOFTCAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def declared(meta: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """config attribute -> (where the value comes from, the value llama.cpp computes with)."""
    arch = str(meta.get("general.architecture", ""))
    out: dict[str, tuple[str, Any]] = {}
    for key, attr in PLAIN.items():
        if _number(meta.get(f"{arch}.{key}")):
            out[attr] = (f"{arch}.{key}", meta[f"{arch}.{key}"])
    window = meta.get(f"{arch}.attention.sliding_window")  # Phi-3's is not mapped by transformers
    if _number(window):
        out["sliding_window"] = (f"{arch}.attention.sliding_window", int(window) or None)  # 0: none (Phi-4)
    if arch == "gemma2":
        for attr, default in GEMMA2_SOFTCAPS.items():
            v = meta.get(f"{arch}.{attr}")
            absent = (f"{arch}.{attr} (absent: llama.cpp's default)", default)
            out[attr] = (f"{arch}.{attr}", v) if _number(v) else absent
    if arch == "gemma3":
        v = meta.get(f"{arch}.final_logit_softcapping")
        out["final_logit_softcapping"] = (f"{arch}.final_logit_softcapping", v if _number(v) and v else None)
    if arch in GEMMA_27B_LAYERS:
        out["query_pre_attn_scalar"] = _gemma_query_scalar(meta, arch)
    return out


def _gemma_query_scalar(meta: dict[str, Any], arch: str) -> tuple[str, Any]:
    n_embd, n_head = int(meta[f"{arch}.embedding_length"]), int(meta[f"{arch}.attention.head_count"])
    layers = int(meta[f"{arch}.block_count"])
    if layers == GEMMA_27B_LAYERS[arch]:
        source = f"{arch}.embedding_length / {arch}.attention.head_count (llama.cpp, {layers} layers: 27B)"
        return source, n_embd // n_head
    key_length = meta.get(f"{arch}.attention.key_length")
    if _number(key_length):
        return f"{arch}.attention.key_length (llama.cpp)", int(key_length)
    return f"{arch}.embedding_length / {arch}.attention.head_count (llama.cpp: no key_length)", n_embd // n_head


def declared_rope(meta: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Rope settings the file declares: "theta", "sliding_theta", "type", "factor"."""
    arch = str(meta.get("general.architecture", ""))
    names = {"theta": "rope.freq_base", "sliding_theta": "rope.freq_base_swa", "type": "rope.scaling.type",
             "factor": "rope.scaling.factor"}
    out = {k: (f"{arch}.{key}", meta[f"{arch}.{key}"]) for k, key in names.items() if f"{arch}.{key}" in meta}
    if out.get("type", ("", "none"))[1] == "none":
        out.pop("type", None)
        out.pop("factor", None)
    return out


def _rope_parts(config: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The full-attention layers' rope parameters and the sliding layers' (None: the same ones)."""
    rp = getattr(config, "rope_parameters", None) or {}
    if isinstance(rp.get("full_attention"), dict):
        return rp["full_attention"], rp.get("sliding_attention")
    return rp, None


def carry_declared(meta: dict[str, Any], config: Any) -> dict[str, tuple[Any, Any]]:
    """Set on `config` what the file declares and transformers' reader leaves at a default; returns what
    changed as {attribute: (before, after)}."""
    changed: dict[str, tuple[Any, Any]] = {}
    for attr, (_, value) in declared(meta).items():
        if attr in PLAIN.values() or not hasattr(config, attr):
            continue  # transformers maps these itself; a disagreement there is reported, not papered over
        before = getattr(config, attr)
        if not _same(before, value):
            setattr(config, attr, value)
            changed[attr] = (before, value)
    rope = declared_rope(meta)
    full, sliding = _rope_parts(config)
    if rope.get("type", ("", ""))[1] == "linear" and _number(rope.get("factor", ("", None))[1]):
        before = dict(full)
        full.update(rope_type="linear", factor=float(rope["factor"][1]))
        changed["rope_parameters"] = (before, dict(full))
    swa_theta = rope.get("sliding_theta", ("", None))[1]
    if sliding is not None and swa_theta is not None and not _same(sliding.get("rope_theta"), swa_theta):
        changed["rope_parameters.sliding_attention.rope_theta"] = (sliding.get("rope_theta"), swa_theta)
        sliding["rope_theta"] = float(swa_theta)
    return changed


def disagreements(meta: dict[str, Any], config: Any) -> list[str]:
    """Each hyperparameter the file declares (or llama.cpp derives) that `config` computes differently."""
    out = []
    for attr, (source, value) in declared(meta).items():
        have = getattr(config, attr, None)
        if attr == "head_dim" and have is None:
            have = config.hidden_size // config.num_attention_heads
        if not _same(have, value):
            out.append(f"{source} = {value}, but the config has {attr} = {have}")
    rope = declared_rope(meta)
    full, sliding = _rope_parts(config)
    expect = {"theta": ("rope_theta", full), "type": ("rope_type", full), "factor": ("factor", full),
              "sliding_theta": ("rope_theta", sliding if sliding is not None else full)}
    for name, (source, value) in rope.items():
        key, params = expect[name]
        have = params.get(key, "default" if key == "rope_type" else None)
        if not _same(have, value):
            out.append(f"{source} = {value}, but the config has rope_parameters {key} = {have}")
    if "type" not in rope and full.get("rope_type", "default") != "default":
        out.append(f"the file declares no rope scaling, but the config has rope_type = {full['rope_type']}")
    return out


def checked_keys(meta: dict[str, Any]) -> list[str]:
    """The sources `disagreements` compares, for the model card."""
    return sorted([s for s, _ in declared(meta).values()] + [s for s, _ in declared_rope(meta).values()])


def _same(a: Any, b: Any) -> bool:
    if _number(a) and _number(b):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)  # the file holds float32
    return a == b
