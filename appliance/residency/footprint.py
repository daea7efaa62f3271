"""What a model really takes: the daemon's VRAM and RSS measured around its load.

VRAM: NVML's per-process figure when the driver reports one, else the GPUs' used-memory delta
(other programs could move that too, but a load takes seconds, not minutes); without a GPU, or
when neither moved, the planner's figure stands and is labelled `planned`. RSS: the daemon's
resident set before and after the load. Loads are serialized by the manager and resident models
do not allocate while they run, so each delta is this model's share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

from appliance.gpu import GpuProbe, VramReading, read_vram

MEASURED = "measured"
PLANNED = "planned"


@dataclass(frozen=True)
class Sample:
    vram: VramReading
    rss: int


@dataclass(frozen=True)
class Footprint:
    """Measured at load; None where nothing could be measured."""

    vram: int | None = None
    vram_method: str | None = None  # "nvml-process" or "nvml-device"
    rss: int | None = None


def sample(probe: GpuProbe) -> Sample:
    """Blocking: NVML and /proc."""
    return Sample(read_vram(probe), psutil.Process(os.getpid()).memory_info().rss)


def between(before: Sample, after: Sample) -> Footprint:
    """The load's share: the per-process delta first, the device delta second."""
    vram, method = None, None
    if after.vram.gpus:
        by_process = after.vram.process_used - before.vram.process_used
        by_device = after.vram.device_used - before.vram.device_used
        if by_process > 0:
            vram, method = by_process, "nvml-process"
        elif by_device > 0:
            vram, method = by_device, "nvml-device"
    rss = after.rss - before.rss
    return Footprint(vram, method, rss if rss > 0 else None)
