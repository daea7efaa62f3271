"""llama.cpp's own llama-bench as a baseline: one decode measurement per call, so a bench can
alternate it with its own rounds (a busy machine then slows both alike).

The binary is built by bench/build_llama_server.sh from the llama.cpp our wheel vendors:
    "$(dirname "$(bench/build_llama_server.sh)")/llama-bench"
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KvConfig:
    """A KV cache set-up as llama-bench takes it: K type, V type, flash attention on or off."""

    type_k: str
    type_v: str
    flash_attn: bool

    def args(self) -> list[str]:
        return ["-ctk", self.type_k, "-ctv", self.type_v, "-fa", "1" if self.flash_attn else "0"]


def decode_rate(binary: Path, model: Path, config: KvConfig, *, depth: int, steps: int,
                threads: int, gpu_layers: int = 0, timeout: float = 1800) -> float:
    """Tokens/s of `steps` single-token decodes after `depth` tokens of history (llama-bench's
    tg test at -d depth: the fill is not timed), one repetition after llama-bench's warm-up."""
    command = [str(binary), "-m", str(model), "-p", "0", "-n", str(steps), "-d", str(depth),
               "-r", "1", "-t", str(threads), "-ngl", str(gpu_layers), *config.args(),
               "-o", "jsonl"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not rows:
        raise RuntimeError(f"llama-bench failed ({done.returncode}): {done.stderr[-800:]}")
    return float(rows[0]["avg_ts"])
