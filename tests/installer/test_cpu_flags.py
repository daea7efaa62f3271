"""installer/cpu-flags.sh: the instruction sets llama.cpp is built for, read from cpuinfo."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "installer" / "cpu-flags.sh"
PORTABLE = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
SAPPHIRE_RAPIDS = ("fpu sse sse4_2 avx avx2 fma f16c bmi2 avx512f avx512dq avx512cd avx512bw "
                   "avx512vl avx512vbmi avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile "
                   "amx_int8")


def flags(*args: str, env: dict[str, str] | None = None) -> list[str]:
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, check=True,
                          env={**os.environ, **(env or {})})
    return done.stdout.split()


def cpuinfo(tmp_path: Path, cpu_flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: {cpu_flags}\n\nprocessor\t: 1\n"
                    f"flags\t\t: {cpu_flags}\n")
    return str(path)


def test_portable_is_the_default_and_keeps_its_cache_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPLIANCE_LLAMA_CPU", raising=False)
    # The exact string the wheelhouse is keyed on: a change would rebuild every cached wheel.
    assert " ".join(flags()) == PORTABLE and " ".join(flags("portable")) == PORTABLE


def test_native_names_every_avx512_set_but_never_amx(tmp_path: Path) -> None:
    out = flags("native", cpuinfo(tmp_path, SAPPHIRE_RAPIDS))
    for wanted in ("-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_AVX512=ON",
                   "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
                   "-DGGML_AVX_VNNI=ON"):
        assert wanted in out
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(out)
    assert not any("AMX" in f and f.endswith("=ON") for f in out)


def test_native_needs_all_of_ggmls_avx512_base(tmp_path: Path) -> None:
    # ggml's GGML_AVX512 compiles with -mavx512f/cd/vl/dq/bw: a CPU missing one must not get it
    out = flags("native", cpuinfo(tmp_path, "avx avx2 fma f16c bmi2 avx512f avx512cd "
                                            "avx512_vnni"))
    assert not any(f.startswith("-DGGML_AVX512") for f in out)


def test_native_on_an_avx2_only_cpu_is_the_portable_isa(tmp_path: Path) -> None:
    out = flags("native", cpuinfo(tmp_path, "fpu sse sse4_2 avx avx2 fma f16c bmi2"))
    on = {f for f in out if f.endswith("=ON")}
    # BMI2 is on in the portable build too (ggml enables it with the others when not native)
    assert on == {f for f in PORTABLE.split() if f.endswith("=ON")} | {"-DGGML_BMI2=ON"}


def test_native_reads_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    have = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    out = flags(env={"APPLIANCE_LLAMA_CPU": "native"})
    assert ("-DGGML_AVX2=ON" in out) == (" avx2" in have)
    assert ("-DGGML_AVX512=ON" in out) == (" avx512bw" in have and " avx512vl" in have
                                           and " avx512dq" in have and " avx512cd" in have)


def test_an_unknown_mode_is_refused() -> None:
    done = subprocess.run([str(SCRIPT), "fastest"], capture_output=True, text=True)
    assert done.returncode == 2 and "portable or native" in done.stderr
