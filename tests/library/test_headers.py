"""Our own GGUF header reader (no gguf/numpy import) and the header cache behind `appliance
models`: the reader agrees with gguf's on real files, refuses crafted headers within its bounds,
and the cache is keyed by the file, survives a damaged cache file and stays bounded."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from appliance import gguf_info
from appliance.gguf_info import GGUFError, read_gguf_info, read_header
from appliance.library.headers import HeaderCache
from appliance.registry import Registry
from tests.conftest import MODEL_B
from tests.library.conftest import split_gguf


def test_type_tables_match_the_gguf_package() -> None:
    import gguf

    assert {k: (v[1], v[2]) for k, v in gguf_info.GGML_TYPES.items()} == {
        int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}
    assert {k: v[0] for k, v in gguf_info.GGML_TYPES.items()} == {
        int(k): k.name for k in gguf.GGML_QUANT_SIZES}
    assert gguf_info.FILE_TYPES == {int(t): t.name.removeprefix("MOSTLY_")
                                    for t in gguf.LlamaFileType}
    assert gguf_info.DEFAULT_ALIGNMENT == gguf.GGUF_DEFAULT_ALIGNMENT


@pytest.mark.parametrize("name", ["tiny-qwen3-q4_k_m", MODEL_B])
def test_reader_agrees_with_gguf(models_dir: Path, name: str) -> None:
    import gguf

    path = models_dir / f"{name}.gguf"
    ours = read_gguf_info(path)
    theirs = gguf.GGUFReader(path)
    assert [(t.name, t.shape, t.type, t.offset, t.nbytes) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in reversed(t.shape.tolist())), int(t.tensor_type),
         int(t.data_offset) - theirs.data_offset, int(t.n_bytes)) for t in theirs.tensors]
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            assert ours.array_lengths[key] == len(field.data)
        elif isinstance(field.contents(), float):
            assert ours.metadata[key] == pytest.approx(field.contents())
        else:
            assert ours.metadata[key] == field.contents()
    assert ours.quantization == gguf.LlamaFileType(
        theirs.fields["general.file_type"].contents()).name.removeprefix("MOSTLY_")


def header(*items: bytes, n_kv: int | None = None, n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(items) if n_kv is None else n_kv) \
        + b"".join(items)


def text(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, value: bytes) -> bytes:
    return text(key) + struct.pack("<I", vtype) + value


ARCH = kv("general.architecture", 8, text("qwen3"))
CRAFTED = {
    "string of 2**60 bytes": (header(ARCH, kv("x", 8, struct.pack("<Q", 2**60))), "too large"),
    "string past the end": (header(ARCH, kv("x", 8, struct.pack("<Q", 5000) + b"ab")),
                            "truncated"),
    "array of 2**62 strings": (header(ARCH, kv("x", 9, struct.pack("<IQ", 8, 2**62))),
                               "too long"),
    "array of 2**40 u32": (header(ARCH, kv("x", 9, struct.pack("<IQ", 4, 2**40))), "too long"),
    "array of strings past the end": (
        header(ARCH, kv("x", 9, struct.pack("<IQ", 8, 1000) + text("a") * 3)), "truncated"),
    "nested array": (header(ARCH, kv("x", 9, struct.pack("<IQ", 9, 1))), "nested"),
    "unknown value type": (header(ARCH, kv("x", 77, b"")), "unknown value type"),
    "key of 2**32 bytes": (header(struct.pack("<Q", 2**32)), "metadata key"),
    "a million keys": (header(ARCH, n_kv=2**40), "implausible"),
    "nine dimensions": (header(ARCH, text("t") + struct.pack("<I", 9), n_kv=1, n_tensors=1),
                        "dimensions"),
    "unknown tensor type": (header(ARCH, text("t") + struct.pack("<IQIQ", 1, 32, 99, 0),
                                   n_kv=1, n_tensors=1), "unknown type 99"),
    "tensor past the end": (header(ARCH, text("t") + struct.pack("<IQIQ", 1, 2**40, 0, 0),
                                   n_kv=1, n_tensors=1), "truncated"),
    "bad magic": (b"GGUL" + b"\0" * 40, "bad magic"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_headers_are_refused(tmp_path: Path, name: str) -> None:
    data, reason = CRAFTED[name]
    path = tmp_path / "crafted.gguf"
    path.write_bytes(data + b"\0" * 64)
    with pytest.raises(GGUFError, match=reason):
        read_gguf_info(path)


def test_all_strings_kept_are_bounded(tmp_path: Path) -> None:
    big = "x" * (gguf_info.MAX_STRING - 10)
    items = [ARCH] + [kv(f"k{i}", 8, text(big)) for i in range(17)]
    path = tmp_path / "many-strings.gguf"
    path.write_bytes(header(*items))
    with pytest.raises(GGUFError, match="too large"):
        read_gguf_info(path)


def models_of(source: Path, folder: Path, n: int) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        target = folder / f"m{i}-q4_k_m.gguf"
        shutil.copy(source, target)
        paths.append(target)
    return paths


def test_cache_reads_each_file_once_across_processes(tiny_gguf: Path, tmp_path: Path) -> None:
    paths = models_of(tiny_gguf, tmp_path / "models", 3)
    file = tmp_path / "cache" / "headers.json"
    first = HeaderCache(file)
    infos = [first.model_info([p]) for p in paths]
    assert (first.hits, first.misses) == (0, 3)
    first.save()
    assert file.exists() and not list(file.parent.glob(".*tmp"))  # written whole, then renamed
    second = HeaderCache(file)  # a later `appliance models`
    again = [second.model_info([p]) for p in paths]
    assert (second.hits, second.misses) == (3, 0)
    for a, b in zip(infos, again, strict=True):
        assert (a.metadata, a.array_lengths, a.tensors, a.file_size) == (
            b.metadata, b.array_lengths, b.tensors, b.file_size)
        assert b.layer_bytes() == a.layer_bytes() and b.quantization == a.quantization
    # A changed file (new mtime) is read again; the others still come from the cache.
    os.utime(paths[1], ns=(0, paths[1].stat().st_mtime_ns + 10**9))
    third = HeaderCache(file)
    for p in paths:
        third.model_info([p])
    assert (third.hits, third.misses) == (2, 1)
    # A file replaced by another (same name) is read again too.
    paths[2].unlink()
    shutil.copy(tiny_gguf, paths[2])
    fourth = HeaderCache(file)
    fourth.model_info([paths[2]])
    assert fourth.misses == 1


def test_cached_errors_and_fixed_files(tiny_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / "x-q4_k_m.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[:100_000])
    file = tmp_path / "headers.json"
    cache = HeaderCache(file)
    with pytest.raises(GGUFError, match="truncated"):
        cache.model_info([path])
    cache.save()
    later = HeaderCache(file)
    with pytest.raises(GGUFError, match="truncated"):
        later.model_info([path])
    assert later.hits == 1  # the verdict is remembered for this size and mtime
    shutil.copy(tiny_gguf, path)  # fixed: read again, and usable
    assert HeaderCache(file).model_info([path]).n_layers == 2


@pytest.mark.parametrize("damage", [
    b"", b"{", b"[]", b'{"format": 1}', b'{"format": 99, "entries": []}',
    b'{"format": 1, "entries": [{"path": 3}]}', b"\xff\xfe garbage", b"null",
])
def test_damaged_cache_is_ignored_and_rebuilt(tiny_gguf: Path, tmp_path: Path,
                                              damage: bytes) -> None:
    [path] = models_of(tiny_gguf, tmp_path / "models", 1)
    file = tmp_path / "headers.json"
    file.write_bytes(damage)
    cache = HeaderCache(file)
    assert cache.model_info([path]).n_layers == 2
    cache.save()
    assert json.loads(file.read_text())["entries"][0]["path"] == str(path)


def test_damaged_entries_are_read_again(tiny_gguf: Path, tmp_path: Path) -> None:
    [path] = models_of(tiny_gguf, tmp_path / "models", 1)
    file = tmp_path / "headers.json"
    cache = HeaderCache(file)
    expected = cache.model_info([path])
    cache.save()
    data = json.loads(file.read_text())
    bad_type = {"names": ["t"], "shapes": [[1]], "types": [99], "offsets": [0], "nbytes": [1]}
    short = {**bad_type, "types": [0], "nbytes": []}
    for damage in ({"tensors": bad_type}, {"tensors": short}, {"tensors": [["t", [1], 0, 0, 1]]},
                   {"metadata": {"x": [1, 2]}},
                   {"size": 5}, {"tensors": "no"}, {"arrays": {"a": "b"}}):
        broken = {**data, "entries": [{**data["entries"][0],
                                       "header": {**data["entries"][0]["header"], **damage}}]}
        file.write_text(json.dumps(broken))
        again = HeaderCache(file)
        assert again.model_info([path]).tensors == expected.tensors, damage
        assert again.misses == 1, damage


def test_cache_is_bounded(tiny_gguf: Path, tmp_path: Path) -> None:
    paths = models_of(tiny_gguf, tmp_path / "models", 6)
    file = tmp_path / "headers.json"
    cache = HeaderCache(file, max_entries=4)
    for p in paths:
        cache.model_info([p])
    cache.save()
    assert len(json.loads(file.read_text())["entries"]) == 4
    # Entries of files that are gone are dropped at the next save.
    cache = HeaderCache(file, max_entries=4)
    for p in paths[:2]:
        p.unlink()
    cache.model_info([paths[2]])
    os.utime(paths[3], ns=(0, paths[3].stat().st_mtime_ns + 10**9))
    cache.model_info([paths[3]])
    cache.save()
    kept = {e["path"] for e in json.loads(file.read_text())["entries"]}
    assert kept <= {str(p) for p in paths[2:]}


def test_unwritable_cache_only_costs_speed(tiny_gguf: Path, tmp_path: Path) -> None:
    [path] = models_of(tiny_gguf, tmp_path / "models", 1)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    cache = HeaderCache(blocker / "headers.json")
    assert cache.model_info([path]).n_layers == 2
    cache.save()  # no exception: the listing still comes


def test_registry_lists_a_split_model_as_one(tiny_gguf: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    parts = split_gguf(tiny_gguf, folder, "Tiny-Split-Q4_K_M", max_tensors=12)
    assert len(parts) >= 2
    shutil.copy(tiny_gguf, folder / "whole-q4_k_m.gguf")
    registry = Registry(folder)
    entries = {e.id: e for e in registry.scan()}
    assert set(entries) == {"tiny-split-q4_k_m", "whole-q4_k_m"}
    split, whole = entries["tiny-split-q4_k_m"], entries["whole-q4_k_m"]
    assert split.usable, split.error
    assert split.path == parts[0] and split.files == parts
    assert split.size == sum(p.stat().st_size for p in parts)
    assert split.info is not None and whole.info is not None
    assert split.info.parameter_count == whole.info.parameter_count
    assert split.info.layer_bytes() == whole.info.layer_bytes()
    assert split.describe()["files"] == [p.name for p in parts]
    assert registry.resolve("Tiny-Split-Q4_K_M") is split
    # A part missing: still one entry, unusable, saying why.
    parts[-1].unlink()
    [broken] = [e for e in registry.scan() if e.id == "tiny-split-q4_k_m"]
    assert not broken.usable and "incomplete" in (broken.error or "")


def test_split_count_must_match_the_parts(tiny_gguf: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    parts = split_gguf(tiny_gguf, folder, "T-Q4_K_M", max_tensors=12)
    n = len(parts)
    # Renamed as if there were one part more: the header's split.count disagrees.
    for i, p in enumerate(parts, 1):
        p.rename(folder / f"t-q4_k_m-{i:05d}-of-{n + 1:05d}.gguf")
    shutil.copy(parts[0].with_name(f"t-q4_k_m-00001-of-{n + 1:05d}.gguf"),
                folder / f"t-q4_k_m-{n + 1:05d}-of-{n + 1:05d}.gguf")
    [entry] = Registry(folder).scan()
    assert not entry.usable and "split.count" in (entry.error or "")


def test_reader_needs_no_gguf_or_numpy(tmp_path: Path, tiny_gguf: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from appliance.gguf_info import "
            "read_gguf_info; read_gguf_info(Path(sys.argv[1])); "
            "import appliance.library.headers, appliance.registry; "
            "assert 'gguf' not in sys.modules and 'numpy' not in sys.modules, "
            "[m for m in sys.modules if m.startswith(('gguf', 'numpy'))]")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_gguf)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr


def test_read_header_of_a_later_part_needs_no_architecture(tiny_gguf: Path,
                                                           tmp_path: Path) -> None:
    parts = split_gguf(tiny_gguf, tmp_path, "T-Q4_K_M", max_tensors=12)
    later = read_header(parts[1])
    assert later.tensors and "general.architecture" not in later.metadata
    with pytest.raises(GGUFError, match="architecture"):
        read_gguf_info(parts[1])
