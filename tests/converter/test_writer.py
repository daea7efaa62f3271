"""The unquantized GGUF's metadata and tensors, read back with the gguf package."""

from pathlib import Path

import gguf
import numpy as np
import pytest

from converter.safetensors_reader import SafetensorsCheckpoint
from converter.writer import OutType, plan_conversion, write_gguf


def convert_plain(folder: Path, out: Path, out_type: OutType = OutType.AUTO) -> gguf.GGUFReader:
    plan = plan_conversion(folder, out_type)
    write_gguf(plan, out)
    plan.checkpoint.close()
    return gguf.GGUFReader(out)


@pytest.fixture(scope="module")
def bf16_reader(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> gguf.GGUFReader:
    # GGUFReader takes seconds on a 151,936-token vocabulary: read each file once per module.
    return convert_plain(tiny_checkpoint, tmp_path_factory.mktemp("bf16") / "m.gguf")


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_hyperparameters_and_tokenizer(bf16_reader: gguf.GGUFReader) -> None:
    reader = bf16_reader
    assert field(reader, "general.architecture") == "qwen3"
    assert field(reader, "qwen3.block_count") == 2
    assert field(reader, "qwen3.attention.head_count") == 4
    assert field(reader, "qwen3.attention.head_count_kv") == 2
    # head_dim (32) differs from hidden / heads (16): the key must say so.
    assert field(reader, "qwen3.attention.key_length") == 32
    assert field(reader, "qwen3.attention.value_length") == 32
    assert field(reader, "qwen3.rope.freq_base") == 1e6
    assert field(reader, "qwen3.context_length") == 40960
    assert field(reader, "general.license") == "apache-2.0"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_BF16
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "qwen2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 151936
    assert tokens[151644] == "<|im_start|>" and tokens[151667] == "<think>"
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[151644] == gguf.TokenType.CONTROL
    assert types[151667] == gguf.TokenType.USER_DEFINED
    assert types[151900] == gguf.TokenType.UNUSED
    assert field(reader, "tokenizer.ggml.eos_token_id") == 151645
    assert len(field(reader, "tokenizer.ggml.merges")) > 150_000
    assert "enable_thinking" in field(reader, "tokenizer.chat_template")


def test_tensors_match_the_source(tiny_checkpoint: Path, tmp_path: Path) -> None:
    reader = convert_plain(tiny_checkpoint, tmp_path / "m.gguf", OutType.F32)
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert len(tensors) == 2 + 2 * 11
    ckpt = SafetensorsCheckpoint(tiny_checkpoint)
    for gguf_name, hf_name in [("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
                               ("blk.0.attn_k_norm.weight", "model.layers.0.self_attn.k_norm.weight"),
                               ("token_embd.weight", "model.embed_tokens.weight")]:
        t = tensors[gguf_name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(t.data).reshape(ckpt.tensors[hf_name].shape),
                              ckpt.as_f32(hf_name))


def test_bf16_keeps_norms_in_f32(bf16_reader: gguf.GGUFReader) -> None:
    types = {t.name: t.tensor_type for t in bf16_reader.tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.BF16


def test_untied_has_output(tiny_untied_checkpoint: Path, tmp_path: Path) -> None:
    reader = convert_plain(tiny_untied_checkpoint, tmp_path / "m.gguf")
    assert "output.weight" in {t.name for t in reader.tensors}


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
])
def test_rope_scaling(tiny_checkpoint: Path, tmp_path: Path, scaling: dict) -> None:
    import json
    import shutil

    folder = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = scaling
    (folder / "config.json").write_text(json.dumps(config))
    reader = convert_plain(folder, tmp_path / "m.gguf")
    assert field(reader, "qwen3.rope.scaling.type") == "yarn"
    assert field(reader, "qwen3.rope.scaling.factor") == 4.0
    assert field(reader, "qwen3.rope.scaling.original_context_length") == 32768
