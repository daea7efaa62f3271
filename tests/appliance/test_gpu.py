"""The GPU probe: the no-GPU variant here, the real NVML one only where a GPU is present."""

from __future__ import annotations

import pytest

from appliance.gpu import NoGpu, NvmlProbe, open_probe


def test_none_means_no_gpu() -> None:
    probe = open_probe("none")
    assert isinstance(probe, NoGpu) and probe.devices() == []


def test_auto_falls_back_without_a_driver() -> None:
    probe = open_probe("auto")
    try:
        if isinstance(probe, NoGpu):
            assert probe.devices() == []
        else:
            assert probe.devices()
    finally:
        probe.close()


@pytest.mark.gpu
def test_nvml_reports_real_memory() -> None:
    try:
        probe = NvmlProbe()
    except Exception as e:
        pytest.skip(f"no NVIDIA GPU here ({e})")
    try:
        for device in probe.devices():
            assert device.total > 0 and 0 <= device.used <= device.total
            assert device.free <= device.total and device.process_used >= 0
    finally:
        probe.close()
