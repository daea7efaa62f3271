"""The short built-in list of recommended models the tray offers under "Get a model…".

Sizes are the hub's, rounded, for a fit answer without asking the hub; a pull reads the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recommended:
    ref: str  # what `appliance pull` takes
    label: str
    size: int  # bytes of the GGUF, about


RECOMMENDED: tuple[Recommended, ...] = (
    Recommended("Qwen/Qwen3-0.6B-GGUF", "Qwen3 0.6B (Q8_0)", 639_000_000),
    Recommended("Qwen/Qwen3-1.7B-GGUF", "Qwen3 1.7B (Q8_0)", 1_830_000_000),
    Recommended("Qwen/Qwen3-4B-GGUF", "Qwen3 4B (Q4_K_M)", 2_500_000_000),
    Recommended("Qwen/Qwen3-8B-GGUF", "Qwen3 8B (Q4_K_M)", 5_030_000_000),
    Recommended("Qwen/Qwen3-14B-GGUF", "Qwen3 14B (Q4_K_M)", 9_000_000_000),
)
