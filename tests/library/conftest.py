"""The library tests' hub: a local server with tiny GGUF and safetensors repos made by the shared
fixtures, and a Library pointed at it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.library.hub import Hub
from appliance.library.pull import Library
from tests.conftest import MODEL_B
from tests.library.hub_server import LocalHub, serve

GGUF_REPO = "tiny/Tiny-GGUF"
SPLIT_REPO = "tiny/Tiny-Split-GGUF"
ST_REPO = "tiny/Tiny"
GATED_REPO = "tiny/Tiny-Gated-GGUF"


def split_gguf(source: Path, folder: Path, stem: str, max_tensors: int) -> list[Path]:
    """Split a GGUF the way llama.cpp's gguf-split does (`STEM-0000k-of-0000N.gguf`)."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(folder / f"{stem}.gguf", arch, split_max_tensors=max_tensors)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(folder.glob(f"{stem}-*-of-*.gguf"))


@pytest.fixture(scope="session")
def hub_files(tiny_gguf: Path, models_dir: Path, tiny_checkpoint: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    folder = tmp_path_factory.mktemp("hub")
    readme = folder / "README.md"
    readme.write_text("# tiny\n")
    parts = split_gguf(tiny_gguf, folder, "Tiny-Split-Q4_K_M", max_tensors=12)
    return {
        GGUF_REPO: {"Tiny-Q4_K_M.gguf": tiny_gguf, "Tiny-Q8_0.gguf": models_dir / f"{MODEL_B}.gguf",
                    "README.md": readme},
        SPLIT_REPO: {f"Q4_K_M/{p.name}": p for p in parts},
        ST_REPO: {p.name: p for p in tiny_checkpoint.iterdir() if p.is_file()},
        GATED_REPO: {"Tiny-Q4_K_M.gguf": tiny_gguf},
    }


@pytest.fixture()
def hub(hub_files: dict[str, dict[str, Path]]) -> Iterator[LocalHub]:
    local = LocalHub()
    for repo, files in hub_files.items():
        local.add(repo, files, gated=repo == GATED_REPO)
    with serve(local) as running:
        yield running


@pytest.fixture()
def library(hub: LocalHub, tmp_path: Path) -> Library:
    folder = tmp_path / "models"
    folder.mkdir()
    return Library(folder, hub=Hub(hub.url, token=False))


def copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, dirs_exist_ok=True)
