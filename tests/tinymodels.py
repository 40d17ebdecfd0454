"""Tiny random models built offline in about a second, for tests.

    build_tiny_llama(dir)     LlamaConfig model + BPE tokenizer trained here + a chat template
                              with {% generation %} markers (for assistant-only loss)
    build_tiny_smol(dir, tok) a random Llama with SmolLM2's tokenizer (llama.cpp's converter takes it)
    build_tiny_sentencepiece(arch, dir, template)
                              a random model whose vocabulary is a SentencePiece tokenizer.model trained
                              here (beside its tokenizer.json), as Gemma, Gemma 2 and Phi-3 ship it
    build_tiny_embedder(dir)  sentence-transformers model: tiny BERT + WordPiece + mean pooling
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma 2's own template: <bos>, no system role, the assistant is "model", turns end with <end_of_turn>
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Employees may work remotely up to three days per week with manager approval.",
    "Expense reports must be submitted within thirty days of purchase.",
    "The office opens at eight in the morning and closes at six in the evening.",
    "Annual leave is twenty days per year; unused days expire at the end of March.",
    "Security badges must be worn visibly at all times inside the building.",
    "Passwords must be at least fourteen characters long and rotated yearly.",
    "Question answer policy document section heading page source citation.",
    "서울은 한국의 수도입니다. 직원은 주 3일까지 재택근무를 할 수 있습니다.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 30 40 50 100",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "user assistant system you are a helpful assistant answer the question.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
# SmolLM2's tokenizer files, for build_tiny_smol (tests/conftest.py's smol_tokenizer_dir)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch threads: tiny models on a shared 2-core box are far faster on one (no OpenMP spinning)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_tiny_llama(out: str | Path, vocab_size: int = 1024, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def build_tiny_smol(out: Path, tok_dir: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random Llama with SmolLM2's tokenizer (files TOKENIZER_FILES in `tok_dir`: llama.cpp's converter
    recognises it; a freshly trained BPE is rejected). Weights are drawn wide (std 0.2) so that the top-2
    logit margins are mostly clear of f16 rounding; near-ties are still possible and reported."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copyfile(tok_dir / f, out / f)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.2, rope_theta=10000.0, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def build_tiny_causal_lm(arch: str, out: str | Path, tokenizer_dir: str | Path, template: str | None = None,
                         seed: int = 0) -> Path:
    """A tiny random model of another architecture (model_type `arch`: qwen3, gemma3_text, phi3, ...)
    with tiny_llama's tokenizer and, if given, another chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(out))
    cfg = AutoConfig.for_model(
        arch, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out), safe_serialization=True)
    return out


def build_tiny_sentencepiece(arch: str, out: str | Path, template: str, specials: tuple[str, ...] = (),
                             seed: int = 0, **config: Any) -> Path:
    """A tiny random model of `arch` (gemma2, phi3, ...) whose tokenizer is a SentencePiece BPE trained here on
    CORPUS: tokenizer.model (what llama.cpp's converter reads for Gemma and Phi-3) and the tokenizer.json
    transformers makes of it. <bos> <eos> <pad> <unk> and `specials` are its special tokens."""
    import io
    import json

    import sentencepiece as spm
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=model, vocab_size=700, model_type="bpe",
        user_defined_symbols=list(specials), pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True, character_coverage=1.0,
        add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.chat_template = template
    tok.save_pretrained(str(out))  # tokenizer.json and the template; tokenizer.model stays
    cfg = AutoConfig.for_model(
        arch, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **config)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out), safe_serialization=True)
    return out


def build_tiny_embedder(out: str | Path, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = Path(out)
    base = out.parent / (out.name + "-bert")
    base.mkdir(parents=True, exist_ok=True)
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
    )
    wp.train_from_iterator(CORPUS * 4, trainer=trainer)
    vocab_file = base / "vocab.txt"
    vocab = sorted(wp.get_vocab().items(), key=lambda kv: kv[1])
    vocab_file.write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    tok.model_max_length = 128
    tok.save_pretrained(str(base))
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=hidden * 2, max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(str(base), safe_serialization=True)
    word = st_models.Transformer(str(base), max_seq_length=128)
    pool = st_models.Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    st = SentenceTransformer(modules=[word, pool], device="cpu")
    st.save(str(out))
    return out


def build_tiny_cross_encoder(embedder_dir: str | Path, out: str | Path, seed: int = 1) -> Path:
    """A tiny random cross-encoder (BERT with a one-logit head) sharing the tiny embedder's vocabulary."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out = Path(out)
    tok = BertTokenizerFast.from_pretrained(str(Path(str(embedder_dir) + "-bert")))
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=1,
    )
    BertForSequenceClassification(cfg).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def write_adapter_card(out: str | Path, base: str | Path, template: str, **fields: Any) -> Path:
    """The run card ragtune checks an adapter by (base model path and content hash, chat template
    and its hash), plus any other `fields`, as `ragtune train` writes it."""
    from ragtune.modeling import model_hash, text_sha256
    from ragtune.runcard import write_runcard

    return write_runcard(out, {"base_model": {"path": str(base), "hash": model_hash(base)},
                               "chat_template": {"template": template, "hash": text_sha256(template)}, **fields})
