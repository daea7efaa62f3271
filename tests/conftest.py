"""Shared fixtures: tiny random-weight Qwen3 checkpoints and their GGUFs, built once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from converter.synthetic import build_checkpoint

REPO = Path(__file__).resolve().parent.parent
MODEL_A = "tiny-qwen3-q4_k_m"
MODEL_B = "tiny-qwen3-untied-q8_0"
EMBED = "tiny-embedding-q8_0"
RERANK = "tiny-reranker-f32"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Qwen3 with tied embeddings, bf16, in two shards with an index."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), "tiny", shards=2, seed=1)


@pytest.fixture(scope="session")
def tiny_untied_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shape with a separate lm_head, in a single safetensors file."""
    from dataclasses import replace

    from converter.synthetic import SHAPES

    shape = replace(SHAPES["tiny"], tie_word_embeddings=False)
    return build_checkpoint(tmp_path_factory.mktemp("tiny-qwen3-untied"), shape, shards=1, seed=2)


@pytest.fixture(scope="session")
def tiny_qwen2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Qwen2 (q/k/v biases, no q/k norms): the family the converter also takes."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), "tiny-qwen2", seed=3)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint through the real converter and quantizer: a Q4_K_M GGUF."""
    from converter.pipeline import ConvertOptions, convert

    out = tmp_path_factory.mktemp("gguf") / "tiny-q4_k_m.gguf"
    convert(ConvertOptions(source=str(tiny_checkpoint), out=out, quiet=True))
    return out


@pytest.fixture(scope="session")
def models_dir(tiny_gguf: Path, tiny_untied_checkpoint: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real tiny models (different shapes and quantizations) and one truncated file."""
    from converter.pipeline import ConvertOptions, convert

    folder = tmp_path_factory.mktemp("models")
    shutil.copy(tiny_gguf, folder / f"{MODEL_A}.gguf")
    convert(ConvertOptions(source=str(tiny_untied_checkpoint), out=folder / f"{MODEL_B}.gguf",
                           quant="Q8_0", quiet=True))
    (folder / "broken.gguf").write_bytes((folder / f"{MODEL_A}.gguf").read_bytes()[:200_000])
    return folder


@pytest.fixture(scope="session")
def draft_pair(tiny_untied_checkpoint: Path, models_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(target, draft) from the same random weights at two precisions, for speculative decoding:
    MODEL_B (Q8_0) and a Q4_0 of its checkpoint, which agrees with it on many greedy tokens."""
    from converter.pipeline import ConvertOptions, convert

    draft = tmp_path_factory.mktemp("draft") / "tiny-qwen3-untied-q4_0.gguf"
    convert(ConvertOptions(source=str(tiny_untied_checkpoint), out=draft, quant="Q4_0",
                           quiet=True))
    return models_dir / f"{MODEL_B}.gguf", draft


@pytest.fixture(scope="session")
def tiny_embedding_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Qwen3-Embedding (no LM head; last-token pooling)."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny-embedding"), "tiny-embedding",
                            shards=1, seed=5)


@pytest.fixture(scope="session")
def tiny_embedding_gguf(tiny_embedding_checkpoint: Path,
                        tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny embedding checkpoint through the real converter: a Q8_0 GGUF named EMBED."""
    from converter.pipeline import ConvertOptions, convert

    out = tmp_path_factory.mktemp("embedding-gguf") / f"{EMBED}.gguf"
    convert(ConvertOptions(source=str(tiny_embedding_checkpoint), out=out, quant="Q8_0",
                           quiet=True))
    return out


@pytest.fixture(scope="session")
def tiny_reranker_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Qwen3-Reranker (a Qwen3ForCausalLM whose card says so)."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny-reranker"), "tiny-reranker",
                            shards=1, seed=7)


@pytest.fixture(scope="session")
def tiny_reranker_gguf(tiny_reranker_checkpoint: Path,
                       tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny reranker through the real converter, unquantized F32 (named RERANK): scores
    then match transformers' to ~1e-6, so orderings can be compared exactly."""
    from converter.writer import OutType, plan_conversion, write_gguf

    out = tmp_path_factory.mktemp("reranker-gguf") / f"{RERANK}.gguf"
    plan = plan_conversion(tiny_reranker_checkpoint, OutType.F32)
    try:
        write_gguf(plan, out)
    finally:
        plan.checkpoint.close()
    return out


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `appliance ARGS` as a user would, in a child process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=REPO)


# -- the README's conformance table (tests/conformance.py) ------------------------------------

_OUTCOMES: dict[str, str] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    from tests.conformance import ROWS

    if report.nodeid in ROWS and (report.when == "call" or report.outcome != "passed"):
        _OUTCOMES[report.nodeid] = report.outcome


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.conformance import table

    if _OUTCOMES:
        out = REPO / "test-artifacts" / "conformance.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text(table(_OUTCOMES))
