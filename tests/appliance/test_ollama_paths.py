"""The Ollama dialect's pieces that need no daemon: per-request keep-alive in the manager (on the
fake runtime, as test_manager_paths.py does), keep_alive durations, names, digests, sizes."""

from __future__ import annotations

import datetime
import hashlib
import math
import time
from pathlib import Path

import pytest

from appliance.api.ollama_models import FileDigests, human_count, iso_time, resolve, show
from appliance.api.ollama_schemas import keep_alive_seconds
from appliance.errors import InvalidRequest, ModelNotFound
from appliance.registry import Registry
from appliance.residency.manager import ModelManager, ModelState
from tests.appliance.fakes import QWEN_LIKE_TEMPLATE, write_gguf
from tests.appliance.test_manager_paths import run, wait_for


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    write_gguf(tmp_path / "a.gguf", **{"general.sampling.top_k": 20})
    return tmp_path


def test_keep_alive_zero_unloads_once_the_requests_holding_it_end(models: Path) -> None:
    async def scenario(manager: ModelManager) -> None:
        async with manager.use("a"):
            async with manager.use("a", keep_alive_s=0):
                pass
            assert manager.state is ModelState.READY  # another request still holds it
        await wait_for(lambda: manager.state is ModelState.UNLOADED)
        assert manager.expires_at() is None
        # The latest request to start sets the timeout, as in Ollama: here the default.
        async with manager.use("a", keep_alive_s=0):
            async with manager.use("a"):
                pass
        assert manager.state is ModelState.READY
        assert manager.expires_at() == pytest.approx(time.time() + 900, abs=5)
    run(scenario, models)


def test_negative_keep_alive_keeps_the_model_until_a_request_says_otherwise(
        models: Path) -> None:
    async def scenario(manager: ModelManager) -> None:
        async with manager.use("a", keep_alive_s=-1):
            pass
        assert manager.expires_at() == math.inf and manager.state is ModelState.READY
        async with manager.use("a", keep_alive_s=30):
            assert manager.expires_at() == pytest.approx(time.time() + 30, abs=5)  # in use
        assert manager.expires_at() == pytest.approx(time.time() + 30, abs=5)
        async with manager.use("a"):  # no keep_alive: the configured 0.2 s again
            pass
        await wait_for(lambda: manager.state is ModelState.UNLOADED)
    run(scenario, models, keep_alive_s=0.2)


def test_configured_zero_still_means_never(models: Path) -> None:
    async def scenario(manager: ModelManager) -> None:
        async with manager.use("a"):
            pass
        assert manager.expires_at() == math.inf
        async with manager.use("a", keep_alive_s=0.05):  # a request may still set one
            pass
        await wait_for(lambda: manager.state is ModelState.UNLOADED)
    run(scenario, models, keep_alive_s=0)


@pytest.mark.parametrize("value,seconds", [
    ("5m", 300), ("1h30m", 5400), ("1.5h", 5400), ("500ms", 0.5), ("300", 300), (300, 300),
    (2.5, 2.5), ("0", 0), (0, 0), ("-1", -1), (-5, -1), ("-1m", -1), ("9999999h", -1),
    ("1e400", -1), (None, None)])
def test_keep_alive_durations(value: object, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["", "forever", "5 m", "5mx", "m", "nan", "1h-5m", True,
                                   [5], {"m": 5}])
def test_bad_keep_alive_durations(value: object) -> None:
    with pytest.raises(ValueError, match="keep_alive"):
        keep_alive_seconds(value)


def test_names_resolve_like_ollamas(tmp_path: Path) -> None:
    for stem in ("qwen3-8b-q4_k_m", "qwen3-14b-q4_k_m", "phi"):
        write_gguf(tmp_path / f"{stem}.gguf")
    registry = Registry(tmp_path, aliases={"fast:latest": "qwen3-8b-q4_k_m"})
    registry.scan()
    expect = {"qwen3-8b-q4_k_m": "qwen3-8b-q4_k_m", "qwen3-8b-q4_k_m:latest": "qwen3-8b-q4_k_m",
              "qwen3:8b": "qwen3-8b-q4_k_m", "library/qwen3:14b": "qwen3-14b-q4_k_m",
              "registry.ollama.ai/library/qwen3:8b-q4_K_M": "qwen3-8b-q4_k_m",
              "PHI:latest": "phi", "phi": "phi", "fast:latest": "qwen3-8b-q4_k_m"}
    for name, model_id in expect.items():
        assert resolve(registry, name).id == model_id, name
    for name in ("qwen3", "qwen3:latest", "qwen3:4b", "ph", "phi:2"):  # ambiguous or absent
        with pytest.raises(ModelNotFound, match="qwen3-8b-q4_k_m:latest"):
            resolve(registry, name)
    with pytest.raises(InvalidRequest, match="model is required"):
        resolve(registry, "  ")


def test_digests_are_computed_off_the_request_and_follow_the_file(models: Path) -> None:
    registry = Registry(models)
    [entry] = registry.scan()
    digests = FileDigests()
    assert digests.get(entry) == ""  # never computed on the caller's thread

    def settled() -> str:
        deadline = time.monotonic() + 10
        while not (digest := digests.get(registry.scan()[0])):
            assert time.monotonic() < deadline, "no digest"
            time.sleep(0.01)
        return digest

    assert settled() == hashlib.sha256(entry.path.read_bytes()).hexdigest()
    write_gguf(entry.path, **{"general.sampling.top_k": 40})  # replaced: size or mtime change
    assert settled() == hashlib.sha256(entry.path.read_bytes()).hexdigest()


def test_show_uses_ollamas_parameter_names(models: Path) -> None:
    [entry] = Registry(models).scan()
    shown = show(entry, FileDigests())
    assert shown["parameters"] == "top_k 20"
    assert shown["model_info"]["qwen3.context_length"] == 2**24
    assert shown["template"] == QWEN_LIKE_TEMPLATE and "completion" in shown["capabilities"]


@pytest.mark.parametrize("count,text", [(8_190_735_360, "8.2B"), (751_632_384, "751.63M"),
                                        (9_820_000, "9.82M"), (4_200, "4.20K"), (12, "12")])
def test_parameter_sizes_read_like_ollamas(count: int, text: str) -> None:
    assert human_count(count) == text


@pytest.mark.parametrize("seconds", [0.0, 1721680408.123456, 1721680408.9999996, 1721680409.0000004,
                                     4102444799.5, 1721680408.0000005])
def test_times_read_like_datetimes(seconds: float) -> None:
    """The per-second cache gives what datetime gives, microsecond rounding included."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    assert iso_time(seconds) == moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
