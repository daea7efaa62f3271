"""What the KV benches share: a runtime per KV type, and llama.cpp's own KV buffer figure.

llama.cpp logs the size of the cache it allocated ("llama_kv_cache: size = 56.00 MiB (1024 cells,
28 layers, 1/1 seqs), K (f16): ..."); that line, not our formula, is the measured size.
"""

from __future__ import annotations

import ctypes
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp

from appliance.engine.runtime import LlamaRuntime, RuntimeOptions

_SIZE = re.compile(rb"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells")
_log_lines: list[bytes] = []


@llama_cpp.llama_log_callback
def _keep_kv_lines(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if text and (b"llama_kv_cache" in text or b"buffer size" in text):
        _log_lines.append(text)


def capture_kv_log() -> None:
    """Route llama.cpp's log through _keep_kv_lines (and stop it reaching stderr)."""
    llama_cpp.llama_log_set(_keep_kv_lines, ctypes.c_void_p(0))


_BUFFER = re.compile(rb"(\S+) (model|KV|compute) buffer size = +([\d.]+) MiB")


def logged_buffers() -> dict[str, int]:
    """Bytes of each buffer llama.cpp logged since the last open_runtime, as "KV CUDA0": n."""
    sizes: dict[str, int] = {}
    for line in _log_lines:
        for device, kind, mib in _BUFFER.findall(line):
            key = f"{kind.decode()} {device.decode()}"
            sizes[key] = sizes.get(key, 0) + int(float(mib) * 2**20)
    return sizes


def open_runtime(path: Path, kv_type: str, context: int, n_seq: int = 1,
                 threads: int = 2, n_gpu_layers: int = 0,
                 flash_attn: bool = True) -> tuple[LlamaRuntime, int, int]:
    """A runtime with `kv_type` K and V (`context` per sequence), the KV bytes llama.cpp logged
    for it, and its cells."""
    _log_lines.clear()
    runtime = LlamaRuntime(path, RuntimeOptions(n_gpu_layers=n_gpu_layers,
                                                context_per_slot=context, n_seq=n_seq,
                                                n_threads=threads, kv_cache_type=kv_type,
                                                flash_attn=flash_attn))
    for line in _log_lines:
        match = _SIZE.search(line)
        if match:
            return runtime, int(float(match.group(1)) * 2**20), int(match.group(2))
    runtime.close()
    raise RuntimeError("llama.cpp logged no KV cache size (was capture_kv_log called?)")


def feed(runtime: LlamaRuntime, tokens: list[int], start: int, seq: int = 0,
         logits_all: bool = False) -> None:
    """Decode `tokens` at positions start.. in batches; logits for every token or the last."""
    step = runtime.options.n_batch
    for offset in range(0, len(tokens), step):
        runtime.clear_batch()
        chunk = tokens[offset:offset + step]
        for i, token in enumerate(chunk):
            last = offset + i == len(tokens) - 1
            runtime.add_to_batch(token, start + offset + i, seq, logits_all or last)
        if runtime.decode() != 0:
            raise RuntimeError("llama_decode failed")
