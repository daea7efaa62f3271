"""Qwen3-Embedding checkpoints through the real converter: the GGUF carries last-token pooling
and the EOS rule, has no output head, and its embeddings match transformers' (AutoModel,
last-token pooling, normalized) on the built-in corpus."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from converter.pipeline import ConvertOptions, convert
from converter.qwen import read_config
from converter.synthetic import build_checkpoint


@pytest.fixture(scope="module")
def embedding_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny-embedding"), "tiny-embedding",
                            shards=1, seed=5)


def test_the_synthetic_checkpoint_has_qwen3_embedding_layout(embedding_checkpoint: Path) -> None:
    config = json.loads((embedding_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen3Model"]
    pooling = json.loads((embedding_checkpoint / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"]
    cfg = read_config(embedding_checkpoint)
    assert cfg.embedding and cfg.tensor_prefix == ""


def test_bf16_conversion_verifies_against_transformers(embedding_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "tiny-embedding-bf16.gguf"
    result = convert(ConvertOptions(source=str(embedding_checkpoint), out=out, quant="BF16",
                                    verify=True, quiet=True))
    assert result.report is not None and result.report.passed
    text = result.report.render()
    assert "cosine mean" in text and "ranking agreement" in text
    reader = gguf.GGUFReader(out)
    pooling = reader.fields["qwen3.pooling_type"]
    assert int(pooling.parts[pooling.data[0]][0]) == int(gguf.PoolingType.LAST)
    add_eos = reader.fields["tokenizer.ggml.add_eos_token"]
    assert bool(add_eos.parts[add_eos.data[0]][0])
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names


def test_a_quantized_file_reports_its_cosine(embedding_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-embedding-q8_0.gguf"
    result = convert(ConvertOptions(source=str(embedding_checkpoint), out=out, quant="Q8_0",
                                    verify=True, quiet=True))
    assert result.report is not None and result.report.passed
    quantized = result.report.checks[-1]
    assert quantized.passed is None and "worst" in quantized.lines[0]
    worst = float(quantized.lines[0].split("worst ")[1])
    assert 0.99 < worst <= 1.0


def test_a_wrong_eos_rule_fails_verification(embedding_checkpoint: Path, tmp_path: Path) -> None:
    # Without the EOS llama.cpp would pool another token than transformers does.
    from converter import verify_embedding

    out = tmp_path / "e.gguf"
    convert(ConvertOptions(source=str(embedding_checkpoint), out=out, quant="BF16", quiet=True))
    real = verify_embedding.llama_ids

    def no_eos(path: Path, texts: list[str]) -> list[list[int]]:
        return [ids[:-1] for ids in real(path, texts)]

    verify_embedding.llama_ids = no_eos
    try:
        check = verify_embedding.check_embeddings(out, embedding_checkpoint)
    finally:
        verify_embedding.llama_ids = real
    assert check.passed is False
