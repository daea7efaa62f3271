"""Qwen3 reranker checkpoints through the real converter: recognised by card or name (or
--reranker), written as llama.cpp reads a Qwen3 reranker (RANK pooling, a [yes, no] classifier
head cut from the LM head, labels, the rerank prompt), and verified against transformers'
P("yes") on a query/document set, with a broken head caught."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from converter.errors import ConversionError
from converter.pipeline import ConvertOptions, convert
from converter.qwen import RERANK_HEAD, RERANK_TEMPLATE, read_config, rerank_token_ids
from converter.safetensors_reader import SafetensorsCheckpoint, bf16_to_f32
from converter.synthetic import SHAPES, build_checkpoint
from converter.writer import OutType, plan_conversion, write_gguf


def _field(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.fields[key]
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [bytes(field.parts[i]).decode() for i in field.data]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode()
    return int(field.parts[field.data[0]][0])


def test_a_reranker_is_recognised_by_its_card_or_name_or_the_option(
        tiny_reranker_checkpoint: Path, tiny_checkpoint: Path, tiny_embedding_checkpoint: Path,
        tmp_path: Path) -> None:
    assert read_config(tiny_reranker_checkpoint).reranker  # "# Qwen3-Reranker" in the card
    assert not read_config(tiny_reranker_checkpoint, reranker=False).reranker
    assert not read_config(tiny_checkpoint).reranker
    by_name = tmp_path / "Qwen3-Reranker-0.6B"
    shutil.copytree(tiny_checkpoint, by_name)
    assert read_config(by_name).reranker
    forced = read_config(tiny_checkpoint, reranker=True)
    assert forced.rerank_token_ids == rerank_token_ids(tiny_checkpoint)
    with pytest.raises(ConversionError, match="embedding"):
        read_config(tiny_embedding_checkpoint, reranker=True)


@pytest.mark.parametrize("tied", [True, False])
def test_the_gguf_has_what_llama_cpp_reads_for_a_qwen3_reranker(
        tiny_reranker_checkpoint: Path, tmp_path: Path, tied: bool) -> None:
    source = tiny_reranker_checkpoint
    if not tied:  # the 8B ships an untied lm_head: the head rows come from it instead
        source = build_checkpoint(tmp_path / "untied", replace(
            SHAPES["tiny-reranker"], tie_word_embeddings=False), shards=1, seed=2)
    out = tmp_path / "r.gguf"
    plan = plan_conversion(source, OutType.F32)
    try:
        write_gguf(plan, out)
    finally:
        plan.checkpoint.close()
    reader = gguf.GGUFReader(out)
    assert _field(reader, "qwen3.pooling_type") == int(gguf.PoolingType.RANK)
    assert _field(reader, "qwen3.classifier.output_labels") == ["yes", "no"]
    assert _field(reader, "tokenizer.chat_template.rerank") == RERANK_TEMPLATE
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # only two rows of the LM head are ever used
    yes, no = rerank_token_ids(source)
    checkpoint = SafetensorsCheckpoint(source)
    try:
        head = "model.embed_tokens.weight" if tied else "lm_head.weight"
        rows = bf16_to_f32(checkpoint.raw(head)[[yes, no]])
    finally:
        checkpoint.close()
    written = np.asarray(tensors[RERANK_HEAD].data).reshape(2, -1)
    assert np.array_equal(written, rows)


def test_conversion_verifies_against_transformers_and_reports_quantization(
        tiny_reranker_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-reranker-q8_0.gguf"
    result = convert(ConvertOptions(source=str(tiny_reranker_checkpoint), out=out, quant="Q8_0",
                                    verify=True, quiet=True))
    assert result.report is not None and result.report.passed, result.report.render()
    judged = next(c for c in result.report.checks if c.name.startswith("reranker:"))
    assert judged.passed is True
    text = "\n".join(judged.lines)
    assert "prompt tokens as Hugging Face makes them: yes" in text
    assert "worst" in text and "ranking agreement: top-1" in text
    quantized = result.report.checks[-1]
    assert quantized.passed is None and "ranking agreement" in "\n".join(quantized.lines)


def test_a_head_with_yes_and_no_swapped_fails_verification(tiny_reranker_checkpoint: Path,
                                                           tmp_path: Path) -> None:
    from converter.verify_rerank import check_rerank

    out = tmp_path / "swapped.gguf"
    plan = plan_conversion(tiny_reranker_checkpoint, OutType.BF16)
    head = plan.jobs[-1]
    assert head.mapping.gguf_name == RERANK_HEAD
    swapped = replace(head, mapping=replace(head.mapping, rows=head.mapping.rows[::-1]))
    try:
        write_gguf(replace(plan, jobs=[*plan.jobs[:-1], swapped]), out)
    finally:
        plan.checkpoint.close()
    check = check_rerank(out, tiny_reranker_checkpoint)
    assert check.passed is False, check.lines


def test_the_cli_takes_the_reranker_option(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    out = tmp_path / "forced.gguf"
    result = run_cli("convert", str(tiny_checkpoint), "--out", str(out), "--quant", "BF16",
                     "--reranker", "--quiet")
    assert result.returncode == 0, result.stderr
    assert _field(gguf.GGUFReader(out), "qwen3.pooling_type") == int(gguf.PoolingType.RANK)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
