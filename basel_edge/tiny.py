"""Tiny random decoder models with their own byte-level BPE tokenizer, made offline in a second or two.

Used by the test suite and by the llama.cpp build's smoke check (runtimes/llama_cpp/smoke.py): models whose
every linear is a whole number of Q8_0/Q4_0 blocks, small enough to export and run anywhere. One maker serves
every family: the HF `model_type` picks the config class (transformers' AutoConfig), and family-specific
settings are passed through.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import torch

TOKENIZER_SOURCES = ("json/encoder.py", "textwrap.py")  # stdlib files the tokenizer is trained on


def train_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on two stdlib sources, with <unk>, <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [(stdlib / name).read_text(encoding="utf-8") for name in TOKENIZER_SOURCES]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def make_tiny_model(path: Path, model_type: str = "llama", tie: bool = True, seed: int = 0, hidden: int = 64,
                    intermediate: int = 160, **family_settings: Any) -> Path:
    """Save a 2-layer random causal LM of `model_type` (hidden 64, MLP 160, GQA 4/2 heads) and its tokenizer.

    `family_settings` go to the config unchanged (e.g. Gemma 3's `head_dim`, `layer_types`, `sliding_window`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = train_tokenizer()
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **family_settings,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random init gives near-uniform logits; widen the weights so top-1 and perplexity comparisons mean
    # something. Biases (qwen2's q/k/v) get random values too: a zero bias would hide a dropped one.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(3.0)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_llama(path: Path, tie: bool = True, seed: int = 0, hidden: int = 64, intermediate: int = 160) -> Path:
    """A tiny random Llama (see make_tiny_model)."""
    return make_tiny_model(path, "llama", tie=tie, seed=seed, hidden=hidden, intermediate=intermediate)
