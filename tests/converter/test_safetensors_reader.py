import json
import struct
from pathlib import Path

import numpy as np
import pytest

from converter.errors import ConversionError
from converter.safetensors_reader import SafetensorsCheckpoint, bf16_to_f32
from converter.writer import f32_to_bf16_bits


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def test_bf16_round_trip_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 100
    values[:4] = [0.0, -0.0, 1e-40, 3.3895e38]
    ours = f32_to_bf16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    widened = bf16_to_f32(ours)
    assert np.array_equal(widened, torch.from_numpy(values).to(torch.bfloat16).float().numpy())


def test_reads_f32_and_bf16_without_copying(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = f32_to_bf16_bits(np.array([1.5, -2.0], dtype=np.float32))
    write_safetensors(tmp_path / "model.safetensors",
                      {"a": ("F32", [2, 3], a.tobytes()), "b": ("BF16", [2], b.tobytes())})
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert np.array_equal(ckpt.as_f32("a"), a)
    assert ckpt.as_f32("b").tolist() == [1.5, -2.0]
    assert not ckpt.raw("a").flags.owndata  # a view of the mapped file


@pytest.mark.parametrize(
    ("tensors", "truncate", "message"),
    [
        ({"w": ("I64", [2], b"\0" * 16)}, 0, "unsupported dtype I64"),
        ({"w": ("F32", [3, 3], b"\0" * 16)}, 0, "does not match its 16 bytes"),
        ({"w": ("F32", [4], b"\0" * 16)}, 8, "truncated"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, tensors: dict, truncate: int, message: str) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, tensors)
    if truncate:
        path.write_bytes(path.read_bytes()[:-truncate])
    with pytest.raises(ConversionError, match=message) as info:
        SafetensorsCheckpoint(tmp_path)
    assert str(path) in str(info.value)


def test_missing_shard_names_it(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ConversionError, match="shard is missing") as info:
        SafetensorsCheckpoint(tmp_path)
    assert "model-00001-of-00002.safetensors" in str(info.value)


def test_not_safetensors(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"<html>not found</html>")
    with pytest.raises(ConversionError, match="not a safetensors file"):
        SafetensorsCheckpoint(tmp_path)
