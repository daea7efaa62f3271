"""The real converter, quantizer and verifier on tiny checkpoints, loaded by llama.cpp."""

from dataclasses import replace
from pathlib import Path

import pytest

from converter.errors import ConversionError
from converter.pipeline import ConvertOptions, convert
from converter.verify import verify
from converter.writer import plan_conversion, write_gguf


def test_q4_k_m_output_generates(tiny_gguf: Path) -> None:
    import gguf
    from llama_cpp import Llama

    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tiny_gguf).tensors}
    assert types["blk.0.ffn_gate.weight"] in {gguf.GGMLQuantizationType.Q4_K,
                                              gguf.GGMLQuantizationType.Q5_0}
    llm = Llama(model_path=str(tiny_gguf), n_ctx=128, n_threads=2, verbose=False)
    try:
        out = llm.create_completion("Hello", max_tokens=8, temperature=0.0)
        assert out["usage"]["completion_tokens"] > 0
    finally:
        llm.close()


def test_no_intermediate_left_behind(tiny_gguf: Path) -> None:
    assert sorted(p.name for p in tiny_gguf.parent.iterdir()) == [tiny_gguf.name]


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_untied_checkpoint",
                                     "tiny_qwen2_checkpoint"])
def test_verified_conversion_passes(fixture: str, request: pytest.FixtureRequest,
                                    tmp_path: Path) -> None:
    folder = request.getfixturevalue(fixture)
    out = tmp_path / "m.gguf"
    result = convert(ConvertOptions(source=str(folder), out=out, verify=True, quiet=True,
                                    keep_intermediate=True))
    report = result.report
    assert report is not None and report.passed, report.render()
    assert [c.passed for c in report.checks] == [True, True, None]
    assert out.exists() and result.intermediate is not None and result.intermediate.exists()


def _broken_gguf(folder: Path, out: Path, how: str) -> Path:
    plan = plan_conversion(folder)
    if how == "swapped":
        jobs = list(plan.jobs)
        i = next(n for n, j in enumerate(jobs) if j.mapping.gguf_name == "blk.0.ffn_gate.weight")
        k = next(n for n, j in enumerate(jobs) if j.mapping.gguf_name == "blk.0.ffn_up.weight")
        jobs[i] = replace(jobs[i], mapping=replace(jobs[i].mapping, gguf_name="blk.0.ffn_up.weight"))
        jobs[k] = replace(jobs[k], mapping=replace(jobs[k].mapping, gguf_name="blk.0.ffn_gate.weight"))
        plan = replace(plan, jobs=jobs)
    elif how == "rope":
        plan = replace(plan, config=replace(plan.config, rope_theta=10000.0))
    write_gguf(plan, out)
    return out


@pytest.mark.parametrize("how", ["swapped", "rope"])
def test_verification_catches_a_broken_conversion(how: str, tiny_checkpoint: Path,
                                                  tmp_path: Path) -> None:
    report = verify(_broken_gguf(tiny_checkpoint, tmp_path / "bad.gguf", how), tiny_checkpoint)
    assert not report.passed, report.render()
    assert report.checks[0].passed is True  # the tokenizer was fine; the logits were not
    assert report.checks[1].passed is False


def test_interrupted_conversion_leaves_nothing(tiny_checkpoint: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import converter.writer as writer

    real = writer.tensor_data
    calls = []

    def interrupt_midway(checkpoint, job):
        calls.append(job)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(checkpoint, job)

    monkeypatch.setattr(writer, "tensor_data", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        convert(ConvertOptions(source=str(tiny_checkpoint), out=tmp_path / "m.gguf", quiet=True))
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(ConversionError, match="already exists"):
        convert(ConvertOptions(source=str(tiny_checkpoint), out=out, quiet=True))
    assert out.read_bytes() == b"precious"
