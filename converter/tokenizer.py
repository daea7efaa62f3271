"""The Qwen byte-level BPE tokenizer (tokenizer.json) as GGUF `tokenizer.ggml.*` metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from converter.errors import ConversionError

# llama.cpp picks its pre-tokenizer regex by this name; Qwen2 and Qwen3 share it.
QWEN_PRE_TOKENIZER = "qwen2"


@dataclass
class Vocabulary:
    """Token texts and types, indexed by id, padded to the model's embedding rows."""

    tokens: list[str]
    types: list[int]


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(
            "tokenizer file is missing", "download tokenizer.json with the weights", path
        ) from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"not valid JSON ({e.msg} at line {e.lineno})", "re-download it",
                              path) from None


def read_vocabulary(folder: Path, vocab_size: int) -> Vocabulary:
    """Read tokens and their types from tokenizer.json, padded to `vocab_size` rows."""
    path = folder / "tokenizer.json"
    data = _load_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConversionError("tokenizer is not a byte-level BPE tokenizer",
                              "Qwen checkpoints ship a BPE tokenizer.json", path)

    by_id: dict[int, tuple[str, int]] = {
        int(i): (text, gguf.TokenType.NORMAL) for text, i in model["vocab"].items()
    }
    for added in data.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)

    largest = max(by_id)
    if largest >= vocab_size:
        raise ConversionError(
            f"tokenizer has token id {largest} but the model has only {vocab_size} embedding rows",
            "config.json and tokenizer.json come from different models",
            path,
        )
    tokens, types = [], []
    for i in range(vocab_size):
        # Rows past the tokenizer are padding in Qwen checkpoints; llama.cpp wants them named.
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    return Vocabulary(tokens, types)


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int,
                  embedding: bool = False) -> Vocabulary:
    """Write the tokenizer, merges, special token ids and chat template to the GGUF.

    gguf's SpecialVocab reads merges, special ids and the chat template the way llama.cpp's own
    converter does (tokenizer_config.json, chat_template.jinja or .json).
    """
    vocab = read_vocabulary(folder, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(QWEN_PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)

    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ConversionError("tokenizer.json has no BPE merges", "re-download it",
                              folder / "tokenizer.json")
    # Qwen marks no BOS token; llama.cpp still wants an id, and <|endoftext|> is what Qwen uses.
    if "bos" not in special.special_token_ids and "<|endoftext|>" in vocab.tokens:
        special.special_token_ids["bos"] = vocab.tokens.index("<|endoftext|>")
    special.add_special_token.setdefault("bos", False)
    if embedding and "<|endoftext|>" in vocab.tokens:
        # Qwen3-Embedding's tokenizer appends <|endoftext|> and pools that last token; with
        # add_eos llama.cpp's tokenizer does the same.
        special.special_token_ids["eos"] = vocab.tokens.index("<|endoftext|>")
        special.add_special_token["eos"] = True
    special.add_to_gguf(writer, quiet=True)
    return vocab
