"""`appliance convert` as a user runs it: bad input gives one line with a hint, no traceback."""

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli


def broken_copy(src: Path, dest: Path, how: str) -> Path:
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    if how == "no-config":
        (dest / "config.json").unlink()
    elif how == "missing-shard":
        (dest / "model-00002-of-00002.safetensors").unlink()
    elif how == "shape":
        config["intermediate_size"] = 96
    elif how == "architecture":
        config["architectures"] = ["LlamaForCausalLM"]
    elif how == "dtype":
        shard = dest / "model-00002-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes().replace(b'"BF16"', b'"I8"\x20\x20', 1))
    (dest / "config.json").write_text(json.dumps(config)) if (dest / "config.json").exists() else None
    return dest


@pytest.mark.parametrize(("how", "expected"), [
    ("no-config", "config.json is missing"),
    ("missing-shard", "model-00002-of-00002.safetensors: shard is missing"),
    ("shape", "config.json implies"),
    ("architecture", "architecture LlamaForCausalLM is not supported"),
    ("dtype", "unsupported dtype I8"),
])
def test_bad_checkpoint(how: str, expected: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = broken_copy(tiny_checkpoint, tmp_path / "src", how)
    result = run_cli("convert", str(folder), "--out", str(tmp_path / "out" / "m.gguf"), "--quiet")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("appliance: error:") and expected in lines[0]
    assert "hint:" in lines[0]
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_unsupported_names_the_supported(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = broken_copy(tiny_checkpoint, tmp_path / "src", "architecture")
    result = run_cli("convert", str(folder), "--out", str(tmp_path / "m.gguf"))
    assert "Qwen3ForCausalLM" in result.stderr and "Qwen2ForCausalLM" in result.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (["./no/such/folder"], "no such folder"),
    (["{ckpt}", "--quant", "Q3_X"], "unknown quantization type"),
    (["{ckpt}", "--out", "{tmp}/model.bin"], "must end in .gguf"),
])
def test_bad_arguments(args: list[str], expected: str, tiny_checkpoint: Path,
                       tmp_path: Path) -> None:
    args = [a.format(ckpt=tiny_checkpoint, tmp=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "m.gguf")]
    result = run_cli("convert", *args)
    assert result.returncode == 1
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_convert_from_offline_hub_cache(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A hub repo id resolves through huggingface-hub's cache layout with HF_HUB_OFFLINE=1."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--Qwen--Qwen3-Tiny"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "qwen3-tiny.gguf"
    result = run_cli("convert", "Qwen/Qwen3-Tiny", "--out", str(out), "--quant", "BF16",
                     "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    import gguf

    assert gguf.GGUFReader(out).fields["general.name"].contents() == "Qwen3-Tiny"

    missing = run_cli("convert", "Qwen/Qwen3-Absent", "--out", str(tmp_path / "x.gguf"), env=env)
    assert missing.returncode == 1
    assert "cannot get Qwen/Qwen3-Absent" in missing.stderr
    assert "HF_HUB_OFFLINE" in missing.stderr


def test_verify_command(tiny_checkpoint: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    from converter.synthetic import build_checkpoint
    from converter.writer import plan_conversion, write_gguf

    plan = plan_conversion(tiny_checkpoint)
    unquantized = tmp_path / "bf16.gguf"
    write_gguf(plan, unquantized)
    plan.checkpoint.close()
    good = run_cli("verify", str(tiny_gguf), "--reference", str(tiny_checkpoint),
                   "--unquantized", str(unquantized))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "[PASS] tokenizer" in good.stdout and "quantized vs unquantized" in good.stdout
    # The same shapes with other weights is not this model's reference: exit 1.
    reseeded = build_checkpoint(tmp_path / "reseeded", "tiny", seed=99)
    bad = run_cli("verify", str(unquantized), "--reference", str(reseeded))
    assert bad.returncode == 1 and "[FAIL] logits" in bad.stdout
