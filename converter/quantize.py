"""Quantize a GGUF through llama.cpp's own `llama_model_quantize`, on all cores, with progress."""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable
from pathlib import Path

from converter.errors import ConversionError

# User-facing name → llama_ftype value (llama.h), so the CLI does not need llama_cpp to parse.
QUANT_TYPES: dict[str, int] = {
    "Q4_0": 2,
    "Q4_K_M": 15,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "Q8_0": 7,
    "F16": 1,
    "BF16": 32,
}
# Bits per weight of each type, for the free-space check before quantizing.
BITS_PER_WEIGHT = {"Q4_0": 4.5, "Q4_K_M": 4.9, "Q5_K_M": 5.7, "Q6_K": 6.6, "Q8_0": 8.5,
                   "F16": 16.0, "BF16": 16.0}

# llama-quant.cpp logs one "[  12/ 311] name - [shape], type = ..." line per tensor.
_PROGRESS = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]")


def parse_quant_type(name: str) -> str:
    key = name.upper()
    if key not in QUANT_TYPES:
        raise ConversionError(f"unknown quantization type {name!r}",
                              "choose one of " + ", ".join(QUANT_TYPES))
    return key


def quantize(source: Path, dest: Path, quant: str,
             on_progress: Callable[[int, int], None] | None = None,
             threads: int | None = None) -> None:
    """Write `dest` as `source` quantized to `quant` (a key of QUANT_TYPES)."""
    import llama_cpp
    from llama_cpp._logger import llama_log_callback as default_log_callback

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant]
    params.nthread = threads or os.cpu_count() or 1

    @llama_cpp.llama_log_callback
    def log_line(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        match = _PROGRESS.search(text or b"")
        if match and on_progress is not None:
            on_progress(int(match.group(1)), int(match.group(2)))

    llama_cpp.llama_log_set(log_line, ctypes.c_void_p(0))
    try:
        status = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(dest),
                                                ctypes.byref(params))
    finally:
        # Hand logging back to llama-cpp-python's own callback (it honours verbose=False).
        llama_cpp.llama_log_set(default_log_callback, ctypes.c_void_p(0))
    if status != 0:
        raise ConversionError(f"llama.cpp could not quantize to {quant} (status {status})",
                              "check that the input is a valid GGUF", source)
