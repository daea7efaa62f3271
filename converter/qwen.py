"""The Qwen family (Qwen2, Qwen2.5, Qwen3): config.json → GGUF hyperparameters and tensor names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from converter.errors import ConversionError, UnsupportedArchitectureError
from converter.safetensors_reader import SafetensorsCheckpoint

# HF architecture name → the llama.cpp architecture it converts to.
SUPPORTED_ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,
    "Qwen3Model": gguf.MODEL_ARCH.QWEN3,  # Qwen3-Embedding saved from the bare model
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
}
# llama.cpp's qwen3 loader makes the output head optional (it falls back to the token
# embedding) and reads `qwen3.pooling_type`; LAST takes each sequence's final hidden state.
EMBEDDING_POOLING = gguf.PoolingType.LAST
# Qwen3-Reranker scores a pair by P("yes") against P("no") at the last token of a fixed prompt.
# As llama.cpp converts it: the two lm_head rows become a 2-row classifier head `cls.output`
# ([yes, no]: llama-server reads the first output), RANK pooling takes the last token, and
# llama.cpp's qwen3 graph applies a softmax over the two, so output 0 is P("yes").
RERANK_POOLING = gguf.PoolingType.RANK
RERANK_LABELS = ("yes", "no")
RERANK_HEAD = "cls.output.weight"
RERANK_INSTRUCTION = ("Given a web search query, retrieve relevant passages that answer the "
                      "query")
# llama-server fills {query} and {document}; it reads this as `tokenizer.chat_template.rerank`.
RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    "and the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
    "<|im_start|>user\n<Instruct>: " + RERANK_INSTRUCTION + "\n<Query>: {query}\n"
    "<Document>: {document}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


@dataclass(frozen=True)
class QwenConfig:
    """The hyperparameters of a Qwen checkpoint that the GGUF needs."""

    hf_architecture: str
    arch: gguf.MODEL_ARCH
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None
    embedding: bool = False  # a Qwen3-Embedding checkpoint: no LM head, last-token pooling
    tensor_prefix: str = "model."  # "" when saved from Qwen3Model (Qwen3-Embedding)
    # Qwen3-Reranker: token ids of "yes" and "no", whose head rows become the classifier.
    rerank_token_ids: tuple[int, int] | None = None

    @property
    def reranker(self) -> bool:
        return self.rerank_token_ids is not None

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    @property
    def has_qk_norm(self) -> bool:
        return self.arch == gguf.MODEL_ARCH.QWEN3

    @property
    def has_qkv_bias(self) -> bool:
        return self.arch == gguf.MODEL_ARCH.QWEN2


def _last_token_pooling(folder: Path) -> bool:
    """Whether sentence-transformers' pooling config (1_Pooling/config.json) says last token."""
    path = folder / "1_Pooling" / "config.json"
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("pooling_mode_lasttoken"))
    except (OSError, ValueError, AttributeError):
        return False


def looks_like_reranker(folder: Path, raw: dict[str, Any]) -> bool:
    """Qwen3-Reranker ships as a plain Qwen3ForCausalLM; like llama.cpp, know it by its model
    card's title or its name (the folder, a hub snapshot's repo, `_name_or_path`)."""
    card = folder / "README.md"
    try:
        text = card.read_text(encoding="utf-8", errors="replace").lower() if card.exists() else ""
    except OSError:
        text = ""
    if "# qwen3-reranker" in text:
        return True
    names = [folder.resolve().name, str(raw.get("_name_or_path", ""))]
    if folder.parent.name == "snapshots":  # a hub cache: models--Qwen--Qwen3-Reranker-0.6B
        names.append(folder.parent.parent.name)
    return any("qwen3-reranker" in n.lower() for n in names)


def rerank_token_ids(folder: Path) -> tuple[int, int]:
    """The ids of "yes" and "no" in tokenizer.json (single tokens in Qwen's vocabulary)."""
    path = folder / "tokenizer.json"
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
        return int(vocab["yes"]), int(vocab["no"])
    except FileNotFoundError:
        raise ConversionError("tokenizer file is missing",
                              "download tokenizer.json with the weights", path) from None
    except (ValueError, KeyError, TypeError):
        raise ConversionError('tokenizer.json has no single "yes" and "no" tokens',
                              "a Qwen3 reranker needs Qwen's own tokenizer", path) from None


def _tensor_prefix(folder: Path) -> str:
    """"model." for causal-LM checkpoints; "" for ones saved from the bare Qwen3Model."""
    index = folder / "model.safetensors.index.json"
    names: list[str] = []
    if index.exists():
        try:
            names = list(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        except (ValueError, KeyError, TypeError):
            names = []
    else:
        for file in sorted(folder.glob("*.safetensors"))[:1]:
            with file.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if 0 < size < 100_000_000:
                    try:
                        names = list(json.loads(f.read(size)))
                    except ValueError:
                        names = []
    if names and not any(n.startswith("model.") for n in names) \
            and any(n.startswith("layers.") for n in names):
        return ""
    return "model."


def read_config(folder: Path, reranker: bool | None = None) -> QwenConfig:
    """Parse and check config.json; unsupported architectures are refused by name.
    `reranker`: None recognises a Qwen3 reranker by its card or name; True/False decide."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError("config.json is missing",
                              "point SOURCE at a Hugging Face model folder", path) from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"not valid JSON ({e.msg} at line {e.lineno})", "re-download it",
                              path) from None

    architectures = raw.get("architectures") or []
    hf_arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if hf_arch is None:
        named = ", ".join(architectures) or "none named"
        raise UnsupportedArchitectureError(
            f"architecture {named} is not supported",
            "supported architectures: " + ", ".join(SUPPORTED_ARCHITECTURES),
            path,
        )

    def need(key: str) -> Any:
        if key not in raw:
            raise ConversionError(f"config.json has no {key!r}", "re-download it", path)
        return raw[key]

    n_heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    # transformers 5 moves rope_theta and rope_scaling into rope_parameters.
    rope_params = raw.get("rope_parameters") or {}
    rope_theta = raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    rope_scaling = raw.get("rope_scaling")
    if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
        rope_scaling = rope_params
    prefix = _tensor_prefix(folder)
    arch = SUPPORTED_ARCHITECTURES[hf_arch]
    # Qwen3-Embedding ships as Qwen3Model, or as Qwen3ForCausalLM weights without an LM head
    # plus a sentence-transformers last-token pooling config.
    embedding = arch == gguf.MODEL_ARCH.QWEN3 and (
        hf_arch == "Qwen3Model" or prefix == "" or _last_token_pooling(folder))
    if reranker is None:
        reranker = hf_arch == "Qwen3ForCausalLM" and not embedding \
            and looks_like_reranker(folder, raw)
    elif reranker and (hf_arch != "Qwen3ForCausalLM" or embedding):
        raise ConversionError(f"--reranker needs a Qwen3ForCausalLM checkpoint with its LM head, "
                              f"not {hf_arch}" + (" (an embedding model)" if embedding else ""),
                              "drop --reranker", path)
    return QwenConfig(
        hf_architecture=hf_arch,
        arch=SUPPORTED_ARCHITECTURES[hf_arch],
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        n_layers=int(need("num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads", n_heads)),
        head_dim=int(raw.get("head_dim") or hidden // n_heads),
        context_length=int(raw.get("max_position_embeddings", 32768)),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope_scaling=rope_scaling,
        embedding=embedding,
        tensor_prefix=prefix,
        rerank_token_ids=rerank_token_ids(folder) if reranker else None,
    )


def add_hyperparameters(writer: gguf.GGUFWriter, cfg: QwenConfig) -> None:
    """Write the `<arch>.*` keys llama.cpp reads for Qwen models."""
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    # Always written: Qwen3-0.6B/4B/32B have head_dim != hidden / heads.
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.embedding:
        writer.add_pooling_type(EMBEDDING_POOLING)
    if cfg.reranker:
        writer.add_pooling_type(RERANK_POOLING)
        writer.add_array(gguf.Keys.Classifier.OUTPUT_LABELS.format(arch=cfg.arch_name),
                         list(RERANK_LABELS))
        # A named template beside the chat one, as llama.cpp's converter writes it.
        writer.add_string(gguf.Keys.Tokenizer.CHAT_TEMPLATE_N.format(name="rerank"),
                          RERANK_TEMPLATE)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        original = scaling.get("original_max_position_embeddings")
        if original:
            writer.add_rope_scaling_orig_ctx_len(int(original))
    elif kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


@dataclass(frozen=True)
class TensorMapping:
    """One source tensor and the GGUF tensor it becomes."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # as written; for `rows`, the selected rows' shape
    rows: tuple[int, ...] | None = None  # only these rows of the source (the reranker head)


def _expected_shapes(cfg: QwenConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen checkpoint must have, with its HF shape."""
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    h, ff = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings and not cfg.embedding and not cfg.reranker:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q_out, h),
            p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.weight": (kv_out, h),
            p + "self_attn.o_proj.weight": (h, q_out),
            p + "mlp.gate_proj.weight": (ff, h),
            p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
        })
        if cfg.has_qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (cfg.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (cfg.head_dim,)
        if cfg.has_qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
    return shapes


def plan_tensors(checkpoint: SafetensorsCheckpoint, cfg: QwenConfig) -> list[TensorMapping]:
    """Match the checkpoint's tensors to GGUF names, checking that each is present and shaped right."""
    name_map = gguf.get_tensor_name_map(cfg.arch, cfg.n_layers)
    plan = []
    for canonical, shape in _expected_shapes(cfg).items():
        # The table uses causal-LM names; a bare-model checkpoint has them without "model.".
        hf_name = canonical if canonical == "lm_head.weight" or cfg.tensor_prefix \
            else canonical.removeprefix("model.")
        entry = checkpoint.tensors.get(hf_name)
        if entry is None:
            raise ConversionError(f"tensor {hf_name} is missing from the checkpoint",
                                  "a shard may be missing or from another model", checkpoint.folder)
        if entry.shape != shape:
            raise ConversionError(
                f"tensor {hf_name} has shape {list(entry.shape)}, config.json implies {list(shape)}",
                "config.json and the weights come from different models",
                entry.file,
            )
        gguf_name = name_map.get_name(canonical, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:  # a mistake in our expected-shapes table, not the user's
            raise RuntimeError(f"no GGUF name for {hf_name}")
        plan.append(TensorMapping(hf_name, gguf_name, shape))
    if cfg.reranker:
        plan.append(_rerank_head(checkpoint, cfg))
    return plan


def _rerank_head(checkpoint: SafetensorsCheckpoint, cfg: QwenConfig) -> TensorMapping:
    """The classifier head: the "yes" and "no" rows of lm_head (the token embedding when tied);
    the rest of the LM head is never needed, so it is not written."""
    assert cfg.rerank_token_ids is not None
    source = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    entry = checkpoint.tensors.get(source)
    if entry is None:
        raise ConversionError(f"tensor {source} is missing from the checkpoint",
                              "a reranker needs its LM head", checkpoint.folder)
    if entry.shape != (cfg.vocab_size, cfg.hidden_size):
        raise ConversionError(f"tensor {source} has shape {list(entry.shape)}, config.json "
                              f"implies {[cfg.vocab_size, cfg.hidden_size]}",
                              "config.json and the weights come from different models",
                              entry.file)
    if max(cfg.rerank_token_ids) >= cfg.vocab_size:
        raise ConversionError('the "yes"/"no" token ids lie outside the LM head',
                              "config.json and tokenizer.json come from different models",
                              checkpoint.folder)
    return TensorMapping(source, RERANK_HEAD, (len(cfg.rerank_token_ids), cfg.hidden_size),
                         rows=cfg.rerank_token_ids)

