"""`appliance convert`: source → unquantized GGUF → quantized GGUF → (verified) final file.

Every file is written under a hidden temporary name and renamed only when complete (and, with
--verify, only when it passed), so an interrupted or failed run never leaves a file that looks
like a model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from converter.atomic import atomic_output, check_free_space, partial_path
from converter.errors import ConversionError, VerificationFailed
from converter.quantize import BITS_PER_WEIGHT, quantize
from converter.source import resolve_source
from converter.verify import Report, verify
from converter.writer import OutType, plan_conversion, write_gguf


@dataclass
class ConvertOptions:
    source: str
    out: Path
    quant: str = "Q4_K_M"
    outtype: OutType = OutType.AUTO
    force: bool = False
    keep_intermediate: bool = False
    verify: bool = False
    revision: str | None = None
    threads: int | None = None
    quiet: bool = False
    reranker: bool | None = None  # None: recognise a Qwen3 reranker checkpoint by card or name


@dataclass
class ConvertResult:
    output: Path
    intermediate: Path | None
    timings: dict[str, float] = field(default_factory=dict)
    report: Report | None = None


def _check_output(out: Path, force: bool) -> None:
    if out.is_dir():
        raise ConversionError("is a folder", "give --out a file name ending in .gguf", out)
    if out.exists() and not force:
        raise ConversionError("already exists", "pass --force to overwrite it", out)
    if out.suffix != ".gguf":
        raise ConversionError("output name must end in .gguf", "e.g. --out qwen3-8b-q4_k_m.gguf",
                              out)


def convert(opts: ConvertOptions) -> ConvertResult:
    out = opts.out.expanduser().absolute()
    _check_output(out, opts.force)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = resolve_source(opts.source, opts.revision)
    plan = plan_conversion(folder, opts.outtype, opts.reranker)
    # Quantizing to the intermediate's own type would only copy it: write it straight out.
    direct = opts.quant == plan.out_type.name
    quant_bytes = 0 if direct else int(plan.n_parameters * BITS_PER_WEIGHT[opts.quant] / 8)
    check_free_space(out.parent, plan.output_bytes + quant_bytes, "the conversion")

    result = ConvertResult(output=out, intermediate=None)
    if direct:
        intermediate_final = out
    elif opts.keep_intermediate:
        intermediate_final = out.with_name(f"{out.stem}.{plan.out_type.value}.gguf")
        _check_output(intermediate_final, opts.force)
    else:
        intermediate_final = partial_path(out, plan.out_type.value)

    bar = tqdm(total=plan.output_bytes, unit="B", unit_scale=True, desc="convert",
               disable=opts.quiet)
    started = time.perf_counter()
    try:
        with atomic_output(intermediate_final, "convert") as temp:
            write_gguf(plan, temp, on_tensor=lambda job, _: bar.update(job.nbytes))
        bar.close()
        result.timings["convert_s"] = time.perf_counter() - started
        if not direct:
            result.intermediate = intermediate_final if opts.keep_intermediate else None
            _quantize_and_verify(opts, intermediate_final, out, folder, result)
        elif opts.verify:
            result.report = verify(out, folder)
            if not result.report.passed:
                out.unlink()
                raise VerificationFailed(result.report, out)
    finally:
        bar.close()
        plan.checkpoint.close()
        if not direct and not opts.keep_intermediate:
            intermediate_final.unlink(missing_ok=True)
    return result


def _quantize_and_verify(opts: ConvertOptions, intermediate: Path, out: Path, folder: Path,
                         result: ConvertResult) -> None:
    bar = tqdm(total=None, unit="tensor", desc=f"quantize {opts.quant}", disable=opts.quiet)

    def on_progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    started = time.perf_counter()
    with atomic_output(out, "quantize") as temp:
        quantize(intermediate, temp, opts.quant, on_progress, opts.threads)
        bar.close()
        result.timings["quantize_s"] = time.perf_counter() - started
        if opts.verify:
            result.report = verify(intermediate, folder, quantized=temp)
            if not result.report.passed:
                # Raising inside atomic_output removes the unverified file.
                raise VerificationFailed(result.report, out)
