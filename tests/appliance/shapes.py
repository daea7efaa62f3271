"""Header-only GGUFInfo for real Qwen3 shapes (no weights on disk): what the planner reads of a
Qwen3-8B Q4_K_M, for fake-GPU tests and bench/context_table.py.

Tensor types follow llama.cpp's Q4_K_M recipe: Q4_K everywhere, Q6_K for the output matrix and
for attn_v and ffn_down in the first and last eighth of the layers and every third one between
(llama_model_quantize's use_more_bits); norms F32. For Qwen3-8B that is 4.68 GiB, as the
published Qwen3-8B-Q4_K_M.gguf (5.03 GB).
"""

from __future__ import annotations

from pathlib import Path

import gguf

from appliance.gguf_info import GGUFInfo, TensorInfo
from converter.synthetic import SHAPES, Shape

Q = gguf.GGMLQuantizationType


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _nbytes(dims: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    values = 1
    for d in dims:
        values *= d
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return values // block * size


def _tensors(shape: Shape) -> list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]]:
    h, ff, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.n_heads * d, shape.n_kv_heads * d
    out = [("token_embd.weight", (h, shape.vocab_size), Q.Q4_K),
           ("output_norm.weight", (h,), Q.F32)]
    if not shape.tie_word_embeddings:
        out.append(("output.weight", (h, shape.vocab_size), Q.Q6_K))
    for i in range(shape.n_layers):
        more = Q.Q6_K if _use_more_bits(i, shape.n_layers) else Q.Q4_K
        out += [(f"blk.{i}.attn_norm.weight", (h,), Q.F32),
                (f"blk.{i}.ffn_norm.weight", (h,), Q.F32),
                (f"blk.{i}.attn_q_norm.weight", (d,), Q.F32),
                (f"blk.{i}.attn_k_norm.weight", (d,), Q.F32),
                (f"blk.{i}.attn_q.weight", (h, q), Q.Q4_K),
                (f"blk.{i}.attn_k.weight", (h, kv), Q.Q4_K),
                (f"blk.{i}.attn_v.weight", (h, kv), more),
                (f"blk.{i}.attn_output.weight", (q, h), Q.Q4_K),
                (f"blk.{i}.ffn_gate.weight", (h, ff), Q.Q4_K),
                (f"blk.{i}.ffn_up.weight", (h, ff), Q.Q4_K),
                (f"blk.{i}.ffn_down.weight", (ff, h), more)]
    return out


def header_info(name: str = "qwen3-8b") -> GGUFInfo:
    """The GGUFInfo of a Q4_K_M file of SHAPES[name], built without writing one."""
    shape = SHAPES[name]
    tensors, offset = [], 0
    for tname, dims, qtype in _tensors(shape):
        size = _nbytes(dims, qtype)
        tensors.append(TensorInfo(tname, dims, qtype, offset, size))
        offset += size
    metadata = {
        "general.architecture": "qwen3", "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_K_M),
        "qwen3.block_count": shape.n_layers, "qwen3.context_length": shape.context_length,
        "qwen3.embedding_length": shape.hidden_size,
        "qwen3.feed_forward_length": shape.intermediate_size,
        "qwen3.attention.head_count": shape.n_heads,
        "qwen3.attention.head_count_kv": shape.n_kv_heads,
        "qwen3.attention.key_length": shape.head_dim,
        "qwen3.attention.value_length": shape.head_dim,
    }
    return GGUFInfo(Path(f"/nonexistent/{name}-q4_k_m.gguf"), offset, metadata,
                    {"tokenizer.ggml.tokens": shape.vocab_size}, tensors)
