"""Tokenizer metadata for a GGUF: the byte-level BPE ("gpt2") vocabulary, merges, pre-tokenizer, specials, template.

llama.cpp re-implements the tokenizer from this metadata, so every piece must describe exactly what the HF
tokenizer does: token strings and types in id order, the merges, the pre-tokenizer (llama.cpp names a fixed
set of pre-tokenizer regexes), special token ids, add-BOS/EOS flags and the chat template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from basel_edge.errors import UserError

# llama.cpp's "smollm" pre-tokenizer: digits split one by one, then the GPT-2 regex, no space clean-up on decode.
PRE_SMOLLM = "smollm"
# llama.cpp's "gpt-2" pre-tokenizer: the GPT-2 regex alone.
PRE_GPT2 = "gpt-2"
# llama.cpp's "qwen2" pre-tokenizer: Qwen2's split regex (single digits, case-insensitive contractions), then
# byte-level without its own regex. The regex is what Qwen2's tokenizer.json holds, character for character.
PRE_QWEN2 = "qwen2"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGIT_MIXED = re.compile(r"\d")


def _is_byte_level(step: dict) -> bool:
    return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """Name of the llama.cpp pre-tokenizer that splits text exactly as this HF byte-level BPE tokenizer does.

    Digits(individual) + ByteLevel is llama.cpp's "smollm"; Qwen2's Split regex + ByteLevel is "qwen2". A plain ByteLevel tokenizer whose vocabulary keeps
    every digit a token of its own splits exactly like "smollm" too (no merge can join a digit to anything),
    and "smollm" also decodes without GPT-2's space clean-up, like the HF tokenizer; otherwise it is "gpt-2".
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and _is_byte_level(steps[1]):
        return PRE_SMOLLM
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated" \
            and not steps[0].get("invert") and (steps[0].get("pattern") or {}).get("Regex") == QWEN2_SPLIT \
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True) \
            and not steps[1].get("add_prefix_space"):
        return PRE_QWEN2
    if len(steps) == 1 and _is_byte_level(steps[0]):
        vocab = tokenizer_json.get("model", {}).get("vocab", {})
        digit_merged = any(len(tok) > 1 and _DIGIT_MIXED.search(tok) for tok in vocab)
        return PRE_GPT2 if digit_merged else PRE_SMOLLM
    raise UserError(
        f"tokenizer pre-tokenizer {json.dumps(pre)[:120]} is not supported for GGUF export; supported: "
        "byte-level BPE (ByteLevel, optionally after Digits(individual_digits)), Qwen2's Split + ByteLevel"
    )


def source_gguf(model_dir: Path) -> Path | None:
    """The GGUF the model was converted from (basel_edge.models.SOURCE_FILE), if it is still there."""
    from basel_edge.models import source_record

    gguf = source_record(model_dir).get("gguf")
    return Path(gguf) if gguf and Path(gguf).is_file() else None


def copy_tokenizer(writer, source: Path, vocab_size: int) -> None:
    """Copy every `tokenizer.*` key of the GGUF `source` into `writer`: the tokenizer llama.cpp already ran for
    this vocabulary (SentencePiece-style ones such as Gemma's included, which the HF path cannot express)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        raise UserError(f"{source}: its tokenizer has {len(tokens.data) if tokens else 0} tokens, the model "
                        f"{vocab_size}; cannot reuse it")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def add_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    """Write `tokenizer.ggml.*` and the chat template into `writer`: copied from the GGUF the model was converted
    from when it is at hand, otherwise built from the HF tokenizer in `model_dir`."""
    import gguf

    from basel_edge.models import load_tokenizer

    source = source_gguf(model_dir)
    if source is not None:
        copy_tokenizer(writer, source, vocab_size)
        return

    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json; GGUF export needs a fast (tokenizers) BPE tokenizer")
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        raise UserError(f"{tokenizer_file}: only BPE tokenizers can be exported to GGUF")
    if tokenizer_json.get("normalizer") is not None:
        raise UserError(f"{tokenizer_file}: tokenizers with a normalizer are not supported for GGUF export")
    pre = pre_tokenizer_name(tokenizer_json)

    tokenizer = load_tokenizer(model_dir)
    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise UserError(f"{tokenizer_file} has no BPE merges")
    special.add_to_gguf(writer, quiet=True)
