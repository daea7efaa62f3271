"""Whether a model fits this machine, and how fast it will decode, before it is loaded (or even
downloaded).

The fit is the offload planner's own answer (appliance.offload.plan_offload) for this machine's
free VRAM now (NVML), from the model's real tensor sizes; with only a size (a hub file not yet
downloaded) it is an estimate from the size. Decode speed is memory-bound: tokens/s times the
bytes of weights read per token is about constant on a machine, so one short measured decode
(cached under ~/.cache/qwen-appliance) predicts every model's speed from its size.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.gguf_info import GGUFInfo
from appliance.gpu import GpuProbe
from appliance.offload import MIB, plan_offload

log = logging.getLogger(__name__)

SPEED_FILE = "decode_speed.json"
MEASURE_TOKENS = 32
MEASURE_MAX_BYTES = 4 * 2**30  # the measuring model: the largest installed one up to this
GIB = 2**30


@dataclass(frozen=True)
class Machine:
    """What a fit answer depends on, read once per listing."""

    device: str  # the GPU's name, or "cpu"
    free_vram: int
    gpu_build: bool
    n_ctx_total: int
    margin: int
    speed: dict[str, float]  # bytes of weights per second, by "cpu" / "gpu"


@dataclass(frozen=True)
class Fit:
    answer: str  # "all on GPU", "12 of 36 layers on GPU", "CPU only"
    n_gpu_layers: int
    n_layers: int
    tokens_per_s: float | None  # expected decode speed; None until measured
    estimate: bool = False  # from the size only (no header yet)

    def describe(self) -> dict[str, Any]:
        return {"fit": self.answer, "gpu_layers": self.n_gpu_layers, "layers": self.n_layers,
                "expected_tokens_per_s": None if self.tokens_per_s is None
                else round(self.tokens_per_s, 1), "estimate": self.estimate}

    def short(self) -> str:
        speed = f", ~{self.tokens_per_s:.0f} tok/s" if self.tokens_per_s else ""
        return ("~" if self.estimate else "") + self.answer + speed


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-appliance"


def machine_key() -> str:
    """Speed figures belong to one machine and one llama.cpp: a new one is measured afresh."""
    # os.uname, not platform.processor(): that runs `uname -p` in a child process at every
    # `appliance models`, and on Linux it answers the machine type (or nothing) anyway.
    node, cpu = os.uname().nodename, os.uname().machine
    try:
        from importlib.metadata import version

        llama = version("llama-cpp-python")
    except Exception:  # not installed: the figure is useless anyway
        llama = "?"
    return f"{node}|{cpu}|{os.cpu_count()}|llama-cpp-python {llama}"


def read_speed(folder: Path | None = None) -> dict[str, Any]:
    path = (folder or cache_dir()) / SPEED_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("machine") == machine_key() else {}


def write_speed(data: dict[str, Any], folder: Path | None = None) -> Path:
    folder = folder or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SPEED_FILE
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(json.dumps({**data, "machine": machine_key()}, indent=1) + "\n")
    os.replace(temp, path)
    return path


def read_machine(probe: GpuProbe, *, n_ctx_total: int, margin_mib: int,
                 speed_folder: Path | None = None) -> Machine:
    devices = probe.devices()
    speed = read_speed(speed_folder)
    gpu_build = bool(speed.get("gpu_build", bool(devices)))
    rates = {k: float(v["bytes_per_s"]) for k, v in speed.items()
             if isinstance(v, dict) and "bytes_per_s" in v}
    if devices:
        return Machine(devices[0].name, devices[0].free, gpu_build, n_ctx_total,
                       margin_mib * MIB, rates)
    return Machine("cpu", 0, gpu_build, n_ctx_total, margin_mib * MIB, rates)


def expected_speed(machine: Machine, weights: int, gpu_fraction: float) -> float | None:
    """Tokens/s from the measured rates: each token reads every weight once."""
    cpu = machine.speed.get("cpu")
    gpu = machine.speed.get("gpu") if machine.device != "cpu" else None
    if weights <= 0 or (cpu is None and gpu is None):
        return None
    on_gpu = weights * gpu_fraction
    on_cpu = weights - on_gpu
    if on_gpu and gpu is None:
        gpu = cpu  # GPU not measured yet: no faster than the CPU, say so rather than guess
    seconds = (on_cpu / cpu if on_cpu and cpu else 0.0) + (on_gpu / gpu if on_gpu and gpu
                                                           else 0.0)
    return 1.0 / seconds if seconds > 0 else None


def fit_model(info: GGUFInfo, machine: Machine, forced_layers: int | None = None) -> Fit:
    plan = plan_offload(info, n_ctx_total=machine.n_ctx_total, free_vram=machine.free_vram,
                        device=machine.device, margin=machine.margin,
                        gpu_build=machine.gpu_build, forced_layers=forced_layers)
    weights = sum(t.nbytes for t in info.tensors) or info.file_size
    n = plan.n_layers
    if plan.n_gpu_layers > n:
        answer, fraction = "all on GPU", 1.0
    elif plan.n_gpu_layers > 0:
        answer = f"{plan.n_gpu_layers} of {n} layers on GPU"
        fraction = plan.weights_on_gpu / weights if weights else 0.0
    else:
        answer, fraction = "CPU only", 0.0
    return Fit(answer, plan.n_gpu_layers, n, expected_speed(machine, weights, fraction))


def fit_size(size: int, machine: Machine) -> Fit:
    """An estimate from the file size alone (a hub file before download)."""
    if machine.device == "cpu" or not machine.gpu_build:
        return Fit("CPU only", 0, 0, expected_speed(machine, size, 0.0), estimate=True)
    # Weights plus about a fifth for the KV cache and compute buffers at the usual contexts.
    budget = machine.free_vram - machine.margin
    need = size * 1.2
    if need <= budget:
        return Fit("all on GPU", 1, 1, expected_speed(machine, size, 1.0), estimate=True)
    fraction = max(0.0, budget / need)
    if fraction < 0.05:
        return Fit("CPU only", 0, 0, expected_speed(machine, size, 0.0), estimate=True)
    return Fit(f"{fraction * 100:.0f} % of layers on GPU", 0, 0,
               expected_speed(machine, size, fraction), estimate=True)


def measure(path: Path, *, gpu: bool, threads: int | None = None,
            tokens: int = MEASURE_TOKENS) -> dict[str, Any]:
    """Decode `tokens` tokens one at a time with llama.cpp and return the rate in bytes of
    weights per second (the model all on the GPU when `gpu`, else all on the CPU)."""
    import llama_cpp
    from llama_cpp import Llama

    from appliance.gguf_info import read_gguf_info

    weights = sum(t.nbytes for t in read_gguf_info(path).tensors)
    llm = Llama(model_path=str(path), n_ctx=256, n_batch=64, n_gpu_layers=-1 if gpu else 0,
                n_threads=threads or os.cpu_count(), verbose=False)
    try:
        prompt = llm.tokenize(b"The quick brown fox", add_bos=True)
        llm.eval(prompt)
        token = prompt[-1]
        started = time.perf_counter()
        for _ in range(tokens):
            llm.eval([token])  # the same token each step: the sampler is not what we measure
        seconds = time.perf_counter() - started
    finally:
        llm.close()
    return {"bytes_per_s": weights * tokens / seconds, "tokens_per_s": tokens / seconds,
            "model": path.name, "weights": weights, "measured_at": time.time(),
            "gpu_build": bool(llama_cpp.llama_supports_gpu_offload())}


def measure_and_cache(models: list[tuple[Path, int]], has_gpu: bool,
                      threads: int | None = None, folder: Path | None = None) -> dict[str, Any]:
    """Measure with the largest model up to MEASURE_MAX_BYTES (decode speed is memory-bound
    only once the weights are well past the caches) and cache the figures."""
    candidates = sorted((size, p) for p, size in models if size <= MEASURE_MAX_BYTES)
    if not candidates:
        candidates = sorted((size, p) for p, size in models)[:1]
    if not candidates:
        return {}
    path = candidates[-1][1]
    from appliance.library.durability import settle
    from appliance.library.manifest import split_id

    settle(path.parent, split_id(path.stem)[0])  # as before any load (durability.py)
    data: dict[str, Any] = {"cpu": measure(path, gpu=False, threads=threads)}
    data["gpu_build"] = data["cpu"].pop("gpu_build")
    if has_gpu and data["gpu_build"]:
        try:
            data["gpu"] = measure(path, gpu=True, threads=threads)
            data["gpu"].pop("gpu_build")
        except Exception as e:  # not enough VRAM left beside the daemon: CPU figure only
            log.info("GPU decode speed not measured: %s", e)
    write_speed(data, folder)
    return data
