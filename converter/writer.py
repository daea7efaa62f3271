"""Stream a Qwen safetensors checkpoint into an unquantized GGUF file, one tensor at a time."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import gguf
import numpy as np

from converter.errors import ConversionError
from converter.qwen import QwenConfig, TensorMapping, add_hyperparameters, plan_tensors, read_config
from converter.safetensors_reader import SafetensorsCheckpoint, bf16_to_f32
from converter.tokenizer import add_tokenizer


class OutType(str, Enum):
    """Storage type of the 2-D weights in the unquantized GGUF; 1-D tensors are always F32."""

    AUTO = "auto"  # BF16 from a BF16 source (lossless), else F32
    F32 = "f32"
    BF16 = "bf16"
    F16 = "f16"


GGML_TYPE = {
    OutType.F32: gguf.GGMLQuantizationType.F32,
    OutType.BF16: gguf.GGMLQuantizationType.BF16,
    OutType.F16: gguf.GGMLQuantizationType.F16,
}
FILE_TYPE = {
    OutType.F32: gguf.LlamaFileType.ALL_F32,
    OutType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    OutType.F16: gguf.LlamaFileType.MOSTLY_F16,
}
ITEM_SIZE = {OutType.F32: 4, OutType.BF16: 2, OutType.F16: 2}


@dataclass(frozen=True)
class TensorJob:
    """One tensor to write: where it comes from and how it is stored."""

    mapping: TensorMapping
    out_type: OutType

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.mapping.shape)) * ITEM_SIZE[self.out_type]


@dataclass(frozen=True)
class ConversionPlan:
    """Everything decided before the first byte is written."""

    folder: Path
    config: QwenConfig
    checkpoint: SafetensorsCheckpoint
    jobs: list[TensorJob]
    out_type: OutType

    @property
    def output_bytes(self) -> int:
        return sum(job.nbytes for job in self.jobs)

    @property
    def n_parameters(self) -> int:
        return sum(int(np.prod(job.mapping.shape)) for job in self.jobs)


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the bits as uint16."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return ((bits + rounding) >> 16).astype(np.uint16)


def plan_conversion(folder: Path, out_type: OutType = OutType.AUTO,
                    reranker: bool | None = None) -> ConversionPlan:
    """Read config and headers, check every tensor, and choose each tensor's output type.
    `reranker`: None recognises a Qwen3 reranker checkpoint; True/False decide."""
    config = read_config(folder, reranker)
    checkpoint = SafetensorsCheckpoint(folder)
    mappings = plan_tensors(checkpoint, config)
    if out_type is OutType.AUTO:
        source_types = {checkpoint.tensors[m.hf_name].dtype for m in mappings if len(m.shape) == 2}
        out_type = OutType.BF16 if source_types == {"BF16"} else OutType.F32
    jobs = [TensorJob(m, out_type if len(m.shape) >= 2 else OutType.F32) for m in mappings]
    return ConversionPlan(folder, config, checkpoint, jobs, out_type)


def tensor_data(checkpoint: SafetensorsCheckpoint, job: TensorJob) -> np.ndarray:
    """The tensor's bytes in its output type; a BF16 → BF16 copy stays a view of the mapped file."""
    name = job.mapping.hf_name
    source_dtype = checkpoint.tensors[name].dtype
    rows = job.mapping.rows
    if rows is not None:  # a few rows of a large table: select before converting
        raw = checkpoint.raw(name)[list(rows)]
        if job.out_type is OutType.BF16 and source_dtype == "BF16":
            return raw
        values = bf16_to_f32(raw) if source_dtype == "BF16" else raw.astype(np.float32)
        if job.out_type is OutType.BF16:
            return f32_to_bf16_bits(values)
    elif job.out_type is OutType.BF16:
        if source_dtype == "BF16":
            return checkpoint.raw(name)
        return f32_to_bf16_bits(checkpoint.as_f32(name))
    else:
        values = checkpoint.as_f32(name)
    if job.out_type is OutType.F16:
        with np.errstate(over="ignore"):
            values = values.astype(np.float16)
        if not np.isfinite(values).all():
            raise ConversionError(
                f"tensor {name} overflows float16",
                "use the default --outtype (bf16 or f32) instead of f16",
                checkpoint.tensors[name].file,
            )
    return values


def model_name(folder: Path) -> str:
    """A readable model name: the folder's, or the repo name for a hub snapshot."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.split("--")[-1]
    return folder.resolve().name


def read_license(folder: Path) -> str | None:
    """The `license:` from the model card's front matter, when it has one."""
    card = folder / "README.md"
    if not card.exists():
        return None
    match = re.search(r"^license:\s*(\S+)\s*$", card.read_text(encoding="utf-8", errors="replace"),
                      re.MULTILINE)
    return match.group(1) if match else None


def add_general_metadata(writer: gguf.GGUFWriter, plan: ConversionPlan) -> None:
    name = model_name(plan.folder)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(plan.n_parameters, plan.n_parameters, 0, 0))
    license_id = read_license(plan.folder)
    if license_id:
        writer.add_license(license_id)
    writer.add_file_type(FILE_TYPE[plan.out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    generation = plan.folder / "generation_config.json"
    if generation.exists():
        try:
            sampling = json.loads(generation.read_text())
        except json.JSONDecodeError:
            sampling = {}
        # llama.cpp's samplers read these defaults; Qwen publishes its recommended ones here.
        for key, add in (("temperature", writer.add_sampling_temp),
                         ("top_p", writer.add_sampling_top_p),
                         ("top_k", writer.add_sampling_top_k)):
            if isinstance(sampling.get(key), (int, float)):
                add(sampling[key])


def write_gguf(plan: ConversionPlan, path: Path,
               on_tensor: Callable[[TensorJob, int], None] | None = None) -> None:
    """Write the whole GGUF to `path`: metadata first, then each tensor as it is read."""
    writer = gguf.GGUFWriter(path=None, arch=plan.config.arch_name)
    add_general_metadata(writer, plan)
    add_hyperparameters(writer, plan.config)
    add_tokenizer(writer, plan.folder, plan.config.vocab_size, plan.config.embedding)
    for job in plan.jobs:
        item = np.dtype(np.uint16) if job.out_type is OutType.BF16 else (
            np.dtype(np.float16) if job.out_type is OutType.F16 else np.dtype(np.float32))
        writer.add_tensor_info(job.mapping.gguf_name, job.mapping.shape, item, job.nbytes,
                               raw_dtype=GGML_TYPE[job.out_type])
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for index, job in enumerate(plan.jobs):
        data = tensor_data(plan.checkpoint, job)
        writer.write_tensor_data(data)
        del data  # the converted copy is the only anonymous memory a tensor costs
        if on_tensor is not None:
            on_tensor(job, index)
    writer.close()
