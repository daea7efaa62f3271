"""The split planner for RPC workers, and the `rpc_workers` setting, on the tiny GGUF's real
tensor sizes (no workers needed: tests/appliance/test_rpc.py runs real ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import SettingsError, load_settings, rpc_endpoint
from appliance.gguf_info import read_gguf_info
from appliance.offload import (
    DeviceShare,
    compute_buffer_bytes,
    kv_bytes_per_layer,
    output_head_bytes,
    plan_split,
)

GIB = 2**30
MIB = 2**20
N_CTX = 4 * 4096


@pytest.fixture(scope="module")
def info(tiny_gguf: Path):
    return read_gguf_info(tiny_gguf)


def worker(port: int, free: int) -> DeviceShare:
    return DeviceShare(f"rpc 10.0.0.2:{port}", "rpc", free, endpoint=f"10.0.0.2:{port}")


def units(info) -> list[int]:
    """Offload units from the top, as this llama.cpp takes them: output head, then layer n-1..0."""
    kv = kv_bytes_per_layer(info, N_CTX)
    return [output_head_bytes(info)] + [s + kv for s in reversed(info.layer_bytes())]


def test_two_roomy_workers_share_every_layer(info) -> None:
    plan = plan_split(info, [worker(1, 8 * GIB), worker(2, 8 * GIB)], n_ctx_total=N_CTX,
                      margin=0)
    first, second, cpu = plan.split
    assert plan.n_gpu_layers == info.n_layers + 1 == first.layers + second.layers
    assert first.layers >= 1 and second.layers >= 1  # both hold layers, not one of them all
    assert cpu.layers == 0 and cpu.kv == 0 and cpu.compute == 0
    assert cpu.weights == info.tensor_bytes("token_embd.weight")  # the input stays on the CPU
    # A worker's memory is not this machine's: nothing planned in VRAM.
    assert plan.planned_vram == 0 and plan.planned_ram == cpu.weights
    assert "rpc 10.0.0.2:1" in plan.device and "rpc 10.0.0.2:2" in plan.device


def test_small_workers_leave_the_lowest_layers_on_the_cpu(info) -> None:
    sizes = units(info)
    compute = compute_buffer_bytes(info)
    margin = 64 * MIB
    # Room for exactly the output head on the last worker and one layer on the first.
    last = worker(2, margin + compute + sizes[0])
    first = worker(1, margin + compute + sizes[1])
    plan = plan_split(info, [first, last], n_ctx_total=N_CTX, margin=margin)
    a, b, cpu = plan.split
    assert (a.layers, b.layers, cpu.layers) == (1, 1, info.n_layers - 1)
    assert b.weights == output_head_bytes(info) and b.kv == 0
    assert a.weights + a.kv == sizes[1]
    assert plan.n_gpu_layers == 2
    assert cpu.kv == kv_bytes_per_layer(info, N_CTX) * (info.n_layers - 1)
    assert plan.reason.startswith(f"2 of {info.n_layers + 1} layers")


def test_each_device_stays_within_its_budget(info) -> None:
    compute = compute_buffer_bytes(info)
    for free in range(compute, compute + sum(units(info)) + 1, max(1, sum(units(info)) // 37)):
        devices = [worker(1, free), worker(2, free // 2), worker(3, free)]
        plan = plan_split(info, devices, n_ctx_total=N_CTX, margin=0)
        for share, device in zip(plan.split, devices, strict=False):
            assert share.weights + share.kv + share.compute <= max(device.free, 0) or not share.layers
        assert sum(s.layers for s in plan.split) == info.n_layers + 1


def test_the_local_gpu_fills_first(info) -> None:
    gpu = DeviceShare("GPU 0", "gpu", 8 * GIB)
    plan = plan_split(info, [worker(1, 8 * GIB), gpu], n_ctx_total=N_CTX, margin=0)
    rpc, local, cpu = plan.split
    assert (rpc.layers, local.layers, cpu.layers) == (0, info.n_layers + 1, 0)
    assert plan.planned_vram == local.weights + local.kv + local.compute > 0
    assert plan.all_on_gpu


def test_no_room_anywhere_is_cpu_only(info) -> None:
    plan = plan_split(info, [worker(1, 0)], n_ctx_total=N_CTX, margin=512 * MIB)
    assert plan.n_gpu_layers == 0 and plan.device == "cpu"
    assert plan.split[-1].layers == info.n_layers + 1
    assert plan.split[-1].weights == sum(t.nbytes for t in info.tensors)


@pytest.mark.parametrize(("given", "expected"), [
    ("127.0.0.1:50052", "127.0.0.1:50052"), ("Worker-2.LAN:1", "worker-2.lan:1"),
    (" 10.0.0.2:050 ", "10.0.0.2:50")])
def test_endpoints_are_normalised(given: str, expected: str) -> None:
    assert rpc_endpoint(given) == expected


@pytest.mark.parametrize(("given", "why"), [
    ("10.0.0.2", "host:port"), ("10.0.0.2:0", "host:port"), ("h:65536", "host:port"),
    ("h:-1", "host:port"), ("[::1]:50052", "IPv6"), ("::1:50052", "IPv6"),
    ("bad host:1", "not a host name"), ("a..b:1", "not a host name"), (":1", "not a host"),
    ("x" * 300 + ":1", "not a host name")])
def test_bad_endpoints_are_refused_with_the_reason(given: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        rpc_endpoint(given)


def test_setting_names_the_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('rpc_workers = ["10.0.0.2:50052", "10.0.0.2:50052"]\n')
    monkeypatch.setenv("APPLIANCE_CONFIG", str(config))
    with pytest.raises(SettingsError, match=r"rpc_workers.*listed twice"):
        load_settings()
    config.write_text('rpc_workers = ["10.0.0.2:50052", "Gpu-Box:50053"]\n')
    assert load_settings().rpc_workers == ["10.0.0.2:50052", "gpu-box:50053"]
    monkeypatch.setenv("APPLIANCE_RPC_WORKERS", '["nohost"]')
    with pytest.raises(SettingsError, match=r"APPLIANCE_RPC_WORKERS.*host:port"):
        load_settings()


def test_the_cpu_share_counts_its_repacked_copy(info) -> None:
    """The layers left on this machine's CPU get llama.cpp's repacked copy (offload.py's
    weights_repacked, checked against llama.cpp in test_offload.py); layers on workers do not."""
    from appliance.gguf_info import GGML_TYPES
    from appliance.offload import weights_repacked

    every_type = frozenset(name for name, _, _ in GGML_TYPES.values())
    sizes = units(info)
    compute = compute_buffer_bytes(info)
    last = worker(2, 64 * MIB + compute + sizes[0])
    first = worker(1, 64 * MIB + compute + sizes[1])
    plan = plan_split(info, [first, last], n_ctx_total=N_CTX, margin=64 * MIB,
                      repack_types=every_type)
    assert plan.split[-1].layers == info.n_layers - 1
    lowest = weights_repacked(info, info.n_layers - 1, False, every_type)
    assert plan.repack_in_ram == lowest > 0
    assert lowest < weights_repacked(info, info.n_layers, True, every_type)
    roomy = plan_split(info, [worker(1, 8 * GIB), worker(2, 8 * GIB)], n_ctx_total=N_CTX,
                       margin=0, repack_types=every_type)
    assert roomy.repack_in_ram == 0
