"""Measured GPU memory, from NVML (nvidia-ml-py), behind a small interface a test can fake."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's memory in bytes, as the driver reports it now."""

    index: int
    name: str
    total: int
    used: int
    free: int
    process_used: int  # what this process (the daemon) holds on it


class GpuProbe(Protocol):
    """Where the daemon learns about GPUs."""

    name: str

    def devices(self) -> list[GpuMemory]:
        """Every visible GPU with its memory figures; empty without a GPU."""
        ...

    def close(self) -> None: ...


class NoGpu:
    """The probe on machines without an NVIDIA GPU (or with `gpu = "none"`)."""

    name = "none"

    def devices(self) -> list[GpuMemory]:
        return []

    def close(self) -> None:
        pass


# Present whenever the NVIDIA kernel driver is loaded, which NVML needs anyway.
NVIDIA_DRIVER_NODES = ("/proc/driver/nvidia", "/dev/nvidiactl")


class NvmlProbe:
    """Reads memory through NVML; raises at construction when no driver or GPU is there."""

    name = "nvml"

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                         for i in range(pynvml.nvmlDeviceGetCount())]
        if not self._handles:
            pynvml.nvmlShutdown()
            raise RuntimeError("NVML found no GPU")

    def _process_used(self, handle: object) -> int:
        pid = os.getpid()
        try:
            processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except self._nvml.NVMLError:
            return 0
        return sum(p.usedGpuMemory or 0 for p in processes if p.pid == pid)

    def devices(self) -> list[GpuMemory]:
        result = []
        for index, handle in enumerate(self._handles):
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            name = self._nvml.nvmlDeviceGetName(handle)
            result.append(GpuMemory(index, name if isinstance(name, str) else name.decode(),
                                    memory.total, memory.used, memory.free,
                                    self._process_used(handle)))
        return result

    def close(self) -> None:
        self._nvml.nvmlShutdown()


@dataclass(frozen=True)
class VramReading:
    """Summed over every GPU: what this process holds (NVML's per-process accounting; 0 where
    the driver does not report it, e.g. a container whose pids differ) and what the GPUs hold."""

    process_used: int
    device_used: int
    gpus: int


def read_vram(probe: GpuProbe) -> VramReading:
    """One reading of VRAM in use (blocking: NVML)."""
    devices = probe.devices()
    return VramReading(sum(d.process_used for d in devices), sum(d.used for d in devices),
                       len(devices))


def open_probe(kind: str = "auto") -> GpuProbe:
    """NVML when asked for and available, else the no-GPU probe (and a log line saying why)."""
    if kind == "none":
        return NoGpu()
    if kind == "auto" and not any(os.path.exists(p) for p in NVIDIA_DRIVER_NODES):
        return NoGpu()  # no driver loaded: skip importing pynvml (a CLI's start pays for it)
    try:
        return NvmlProbe()
    except Exception as e:  # no library, no driver, no device: all mean "no GPU here"
        log.info("no NVIDIA GPU in use (%s); running on the CPU", str(e) or type(e).__name__)
        return NoGpu()
