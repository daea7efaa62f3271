"""Draft pairing rules on small well-formed GGUF headers: identical vocabularies only, smaller
models only, never the model itself; automatic for Qwen3 with an installed Qwen3-0.6B."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from appliance.registry import Registry
from appliance.residency.draft_pairing import DraftPairing

QWEN_TOKENS = [f"tok{i}" for i in range(300)]


def write_model(folder: Path, name: str, *, hidden: int, layers: int, params: int,
                tokens: list[str] = QWEN_TOKENS, arch: str = "qwen3",
                dtype: type = np.float32) -> None:
    writer = gguf.GGUFWriter(str(folder / f"{name}.gguf"), arch)
    writer.add_block_count(layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_head_count(1)
    writer.add_token_list(tokens)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((params // 8, 8), dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    write_model(tmp_path, "qwen3-8b-q4_k_m", hidden=4096, layers=36, params=8000)
    write_model(tmp_path, "qwen3-0.6b-q8_0", hidden=1024, layers=28, params=600)
    # The same parameters in a smaller file: the faster draft.
    write_model(tmp_path, "qwen3-0.6b-q4_k_m", hidden=1024, layers=28, params=600,
                dtype=np.float16)
    write_model(tmp_path, "other-vocab-0.6b", hidden=1024, layers=28, params=600,
                tokens=[f"x{i}" for i in range(300)])
    write_model(tmp_path, "llama-8b", hidden=4096, layers=32, params=8000, arch="llama")
    registry = Registry(tmp_path)
    registry.scan()
    return registry


def choose(registry: Registry, target: str, configured: str | None = None):
    return DraftPairing().choose(registry.resolve(target), configured, registry.scan())


def test_a_qwen3_target_gets_the_smallest_matching_0_6b(registry: Registry) -> None:
    choice = choose(registry, "qwen3-8b-q4_k_m")
    assert choice.entry is not None and choice.entry.id == "qwen3-0.6b-q4_k_m"
    assert "automatic" in choice.reason


def test_no_automatic_draft_for_itself_a_same_size_model_or_other_architectures(
        registry: Registry) -> None:
    assert choose(registry, "qwen3-0.6b-q8_0").entry is None  # the other 0.6B is no smaller
    assert choose(registry, "llama-8b").entry is None


def test_a_configured_draft_must_share_the_vocabulary_and_not_be_bigger(
        registry: Registry) -> None:
    assert choose(registry, "qwen3-8b-q4_k_m", "QWEN3-0.6B-Q8_0").entry.id == "qwen3-0.6b-q8_0"
    # Same size at another precision is what a configured pair may be (the bench pair).
    assert choose(registry, "qwen3-0.6b-q8_0", "qwen3-0.6b-q4_k_m").entry is not None
    for draft, why in [("other-vocab-0.6b", "different vocabulary"),
                       ("qwen3-8b-q4_k_m", "itself"), ("absent", "not installed")]:
        choice = choose(registry, "qwen3-8b-q4_k_m", draft)
        assert choice.entry is None and why in choice.reason
    choice = choose(registry, "qwen3-0.6b-q4_k_m", "qwen3-8b-q4_k_m")
    assert choice.entry is None and "not smaller" in choice.reason


def test_an_empty_draft_turns_drafting_off(registry: Registry) -> None:
    choice = choose(registry, "qwen3-8b-q4_k_m", "")
    assert choice.entry is None and "off" in choice.reason


def test_the_vocabulary_digest_is_read_once_per_file(registry: Registry, tmp_path: Path) -> None:
    pairing = DraftPairing()
    entry = registry.resolve("qwen3-0.6b-q8_0")
    count, digest = pairing.vocabulary(entry)
    assert count == len(QWEN_TOKENS) and len(digest) == 64
    (tmp_path / "qwen3-0.6b-q8_0.gguf").unlink()  # a cached digest needs no file
    assert pairing.vocabulary(entry) == (count, digest)


@pytest.mark.parametrize("intact", [True, False])
def test_a_draft_pulled_just_before_a_crash_is_checked_before_it_loads(
        registry: Registry, tmp_path: Path, intact: bool) -> None:
    """The draft is a second file llama.cpp reads: a draft still marked by an earlier boot is
    hashed first. Intact, it loads; damaged, it is removed and the model goes on without one."""
    import hashlib
    from dataclasses import replace
    from types import SimpleNamespace

    from appliance.config import Settings
    from appliance.gpu import NoGpu
    from appliance.library.manifest import FileRecord, Manifest, read_manifest, write_manifest
    from appliance.residency.loader import ModelLoader

    draft = tmp_path / "qwen3-0.6b-q4_k_m.gguf"
    digest = hashlib.sha256(draft.read_bytes()).hexdigest() if intact else "0" * 64
    write_manifest(tmp_path, Manifest("qwen3-0.6b-q4_k_m", "hub", [
        FileRecord(draft.name, draft.stat().st_size, digest)], repo="Qwen/Qwen3-0.6B-GGUF",
        unsynced_in="an-earlier-boot"))
    opened: list[Path] = []
    loader = ModelLoader(Settings(models_dir=tmp_path, parallel=1), NoGpu(),
                         runtime_factory=lambda path, _: opened.append(path) or object(),
                         catalog=registry.scan)
    target = registry.resolve("qwen3-8b-q4_k_m")
    plan, context = loader.plan_for(target)
    loaded, reason = loader._open_draft(target, replace(plan, draft=SimpleNamespace(
        n_gpu_layers=0)), context)
    if intact:
        assert loaded is not None and opened == [draft]
        assert read_manifest(tmp_path, "qwen3-0.6b-q4_k_m").unsynced_in is None
    else:
        assert loaded is None and opened == []
        assert "installed just before the machine stopped" in reason
        assert not draft.exists()
