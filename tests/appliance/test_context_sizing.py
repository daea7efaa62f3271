"""KV cache types and `context_length = "auto"` against fake GPUs, with Qwen3-8B's real shape."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import pytest

from appliance.config import Settings, SettingsError, load_settings
from appliance.context_sizing import (
    CPU_MAX_CONTEXT,
    FLOOR_CONTEXT,
    allowed_types,
    choose_context,
    listing_context,
)
from appliance.errors import ModelUnusable
from appliance.gguf_info import read_gguf_info
from appliance.offload import kv_bytes_per_layer, plan_offload
from appliance.registry import Registry
from appliance.residency.loader import ModelLoader
from tests.appliance.shapes import header_info
from tests.appliance.test_offload import FakeGpu

GIB = 2**30
MIB = 2**20
DESKTOP = 512 * MIB  # what a desktop session holds of the card before the daemon starts


@pytest.fixture(scope="module")
def qwen3_8b():
    return header_info("qwen3-8b")


def card_plan(info, total_gib: float, margin: int = 512 * MIB):
    free = int(total_gib * GIB) - DESKTOP
    return partial(_plan, info, free)


def _plan(info, free: int, n_ctx_total: int, kv_type: str):
    return plan_offload(info, n_ctx_total=n_ctx_total, free_vram=free, device="Fake RTX",
                        margin=512 * MIB, gpu_build=True, kv_type=kv_type)


def test_the_8b_header_is_the_published_q4_k_m_size(qwen3_8b) -> None:
    assert 4.6 * GIB < sum(t.nbytes for t in qwen3_8b.tensors) < 4.75 * GIB
    assert qwen3_8b.n_layers == 36 and qwen3_8b.context_length == 40960


def test_kv_bytes_follow_ggml_blocks(qwen3_8b) -> None:
    # 8 KV heads × (128 K + 128 V) values per token and layer
    assert kv_bytes_per_layer(qwen3_8b, 1, "f16") == 8 * 256 * 2
    assert kv_bytes_per_layer(qwen3_8b, 1, "q8_0") == 8 * 256 // 32 * 34
    assert kv_bytes_per_layer(qwen3_8b, 1, "q4_0") == 8 * 256 // 32 * 18
    ratio = kv_bytes_per_layer(qwen3_8b, 4096, "q8_0") / kv_bytes_per_layer(qwen3_8b, 4096)
    assert ratio == pytest.approx(34 / 64) and ratio <= 0.55
    # 4 slots × 8K at f16 is the 4.5 GiB of the issue
    assert kv_bytes_per_layer(qwen3_8b, 4 * 8192) * 36 == pytest.approx(4.5 * GIB)


def test_planner_counts_the_chosen_type(qwen3_8b) -> None:
    f16 = _plan(qwen3_8b, 20 * GIB, 32768, "f16")
    q8 = _plan(qwen3_8b, 20 * GIB, 32768, "q8_0")
    assert f16.all_on_gpu and q8.all_on_gpu and q8.kv_cache_type == "q8_0"
    assert q8.kv_on_gpu * 64 == f16.kv_on_gpu * 34
    # A card where f16 KV pushes layers off the GPU and q8_0 does not
    tight = 4.68 * GIB + 0.37 * GIB + 512 * MIB + 3 * GIB
    assert not _plan(qwen3_8b, int(tight), 32768, "f16").all_on_gpu
    assert _plan(qwen3_8b, int(tight), 32768, "q8_0").all_on_gpu


def auto_on_card(info, total_gib: float, types=("f16", "q8_0"), n_seq: int = 4):
    return choose_context(info, plan=card_plan(info, total_gib), n_seq=n_seq, context=None,
                          types=list(types), gpu_sizing=True, ram_total=64 * GIB)


def test_12_gb_card_holds_32k_of_context_with_every_layer_on_the_gpu(qwen3_8b) -> None:
    choice = auto_on_card(qwen3_8b, 12)
    assert choice.plan.all_on_gpu
    assert choice.context_per_slot * 4 >= 32768
    assert choice.context_per_slot % 1024 == 0
    assert choice.plan.planned_vram <= 12 * GIB - DESKTOP - 512 * MIB
    # one step more would not fit: it is the largest
    bigger = card_plan(qwen3_8b, 12)((choice.context_per_slot + 1024) * 4,
                                     choice.plan.kv_cache_type)
    assert not bigger.all_on_gpu


def test_auto_prefers_f16_until_q8_0_is_needed(qwen3_8b) -> None:
    table = {gib: auto_on_card(qwen3_8b, gib) for gib in (8, 12, 16, 24)}
    # 8 GB: f16 gives each slot under 8K, so q8_0; the bigger cards keep f16
    assert table[8].plan.kv_cache_type == "q8_0" and table[8].plan.all_on_gpu
    assert auto_on_card(qwen3_8b, 8, types=("f16",)).context_per_slot < 8192
    for gib in (12, 16, 24):
        assert table[gib].plan.kv_cache_type == "f16" and table[gib].plan.all_on_gpu
    # more memory, more context, up to the trained maximum
    contexts = [table[g].context_per_slot for g in (8, 12, 16, 24)]
    assert contexts == sorted(contexts) and contexts[-1] >= 32768  # Qwen3's native context
    assert "auto" in table[8].plan.context_reason and "q8_0" in table[8].plan.context_reason


def test_the_trained_maximum_caps_auto(qwen3_8b) -> None:
    assert auto_on_card(qwen3_8b, 48).context_per_slot == 40960


def test_a_card_too_small_takes_the_floor_with_layers_in_ram(qwen3_8b) -> None:
    choice = auto_on_card(qwen3_8b, 6)
    assert choice.context_per_slot == FLOOR_CONTEXT and choice.plan.kv_cache_type == "q8_0"
    assert 0 < choice.plan.n_gpu_layers < 36 and choice.plan.kv_in_ram > 0
    assert "not every layer" in choice.plan.context_reason


def test_an_explicit_type_is_kept(qwen3_8b) -> None:
    q4 = auto_on_card(qwen3_8b, 8, types=("q4_0",))
    q8 = auto_on_card(qwen3_8b, 8, types=("q8_0",))
    assert q4.plan.kv_cache_type == "q4_0" and q4.context_per_slot > q8.context_per_slot


@pytest.mark.parametrize(("ram_gib", "context", "kv_type"), [
    (64, CPU_MAX_CONTEXT, "f16"), (24, CPU_MAX_CONTEXT, "f16"), (16, CPU_MAX_CONTEXT, "q8_0"),
    (8, 6144, "q8_0"),
])
def test_cpu_auto_is_capped_and_fits_a_quarter_of_ram(qwen3_8b, ram_gib: int, context: int,
                                                      kv_type: str) -> None:
    plan = partial(_cpu_plan, qwen3_8b)
    choice = choose_context(qwen3_8b, plan=plan, n_seq=4, context=None, types=["f16", "q8_0"],
                            gpu_sizing=False, ram_total=ram_gib * GIB)
    assert (choice.context_per_slot, choice.plan.kv_cache_type) == (context, kv_type)
    assert choice.plan.kv_in_ram <= ram_gib * GIB // 4
    assert choice.plan.n_gpu_layers == 0 and choice.plan.weights_in_ram > 4 * GIB


def _cpu_plan(info, n_ctx_total: int, kv_type: str):
    return plan_offload(info, n_ctx_total=n_ctx_total, free_vram=0, device="cpu", margin=0,
                        gpu_build=False, kv_type=kv_type)


def test_fixed_context_gets_q8_0_only_where_it_helps(qwen3_8b) -> None:
    roomy = choose_context(qwen3_8b, plan=card_plan(qwen3_8b, 24), n_seq=4, context=8192,
                           types=["f16", "q8_0"], gpu_sizing=True, ram_total=64 * GIB)
    assert roomy.context_per_slot == 8192 and roomy.plan.kv_cache_type == "f16"
    tight = choose_context(qwen3_8b, plan=card_plan(qwen3_8b, 8), n_seq=4, context=8192,
                           types=["f16", "q8_0"], gpu_sizing=True, ram_total=64 * GIB)
    assert tight.plan.kv_cache_type == "q8_0" and "more layers" in tight.plan.context_reason


def test_quantized_kv_needs_whole_blocks(tiny_gguf: Path) -> None:
    info = read_gguf_info(tiny_gguf)  # head size 32: one block
    assert allowed_types(info, "auto", True, "tiny") == ["f16", "q8_0"]
    assert allowed_types(info, "auto", False, "tiny") == ["f16"]  # no flash attention
    assert allowed_types(info, "q4_0", True, "tiny") == ["q4_0"]
    odd = header_info("qwen3-8b")
    odd.metadata["qwen3.attention.key_length"] = 80
    assert allowed_types(odd, "auto", True, "odd") == ["f16"]
    with pytest.raises(ModelUnusable, match=r"kv_cache_type q8_0 .* blocks of 32 .*f16"):
        allowed_types(odd, "q8_0", True, "odd")


def test_listing_plans_auto_at_the_floor() -> None:
    assert listing_context("auto") == FLOOR_CONTEXT and listing_context(2048) == 2048


# -- settings ------------------------------------------------------------------------------------


def test_settings_accept_auto_numbers_and_types(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "absent.toml"))
    assert Settings().context_length == "auto" and Settings().kv_cache_type == "auto"
    monkeypatch.setenv("APPLIANCE_CONTEXT_LENGTH", "4096")
    monkeypatch.setenv("APPLIANCE_KV_CACHE_TYPE", "q8_0")
    settings = load_settings()
    assert settings.context_length == 4096 and settings.kv_cache_type == "q8_0"
    config = tmp_path / "config.toml"
    config.write_text('[models.m]\ncontext_length = "auto"\nkv_cache_type = "q4_0"\n')
    monkeypatch.setenv("APPLIANCE_CONFIG", str(config))
    overrides = load_settings().model_overrides("m")
    assert (overrides.context_length, overrides.kv_cache_type) == ("auto", "q4_0")


@pytest.mark.parametrize(("env", "toml", "expected"), [
    ({"APPLIANCE_KV_CACHE_TYPE": "q5_1"}, "", "APPLIANCE_KV_CACHE_TYPE"),
    ({"APPLIANCE_CONTEXT_LENGTH": "lots"}, "", "APPLIANCE_CONTEXT_LENGTH"),
    ({"APPLIANCE_CONTEXT_LENGTH": "100"}, "", "APPLIANCE_CONTEXT_LENGTH"),
    ({}, '[models.m]\nkv_cache_typ = "q8_0"\n', "did you mean kv_cache_type"),
    ({}, 'flash_attn = false\n[models.m]\nkv_cache_type = "q8_0"\n',
     "models.m.kv_cache_type = q8_0 needs flash attention"),
    ({"APPLIANCE_FLASH_ATTN": "false"}, 'kv_cache_type = "q4_0"\n',
     "kv_cache_type = q4_0 needs flash attention"),
])
def test_bad_kv_and_context_settings_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  env: dict[str, str], toml: str,
                                                  expected: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(toml)
    monkeypatch.setenv("APPLIANCE_CONFIG", str(config))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    text = f"{error.value} {error.value.hint}"
    assert expected in text and "\n" not in str(error.value)


# -- the loader wires it -------------------------------------------------------------------------


def test_loader_sizes_auto_context_from_the_probe(tiny_gguf: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_gguf, tmp_path / "m.gguf")
    registry = Registry(tmp_path)
    registry.scan()
    entry = registry.resolve("m")
    settings = Settings(models_dir=tmp_path, parallel=2)
    loader = ModelLoader(settings, FakeGpu(24 * GIB, 20 * GIB), ram_total=lambda: 16 * GIB)
    loader._gpu_build = True  # as on a CUDA build
    plan, context = loader.plan_for(entry)
    trained = read_gguf_info(tiny_gguf).context_length
    assert context == trained and plan.all_on_gpu and plan.kv_cache_type == "f16"
    assert plan.context_per_slot == context
    cpu = ModelLoader(settings, FakeGpu(24 * GIB, 0), ram_total=lambda: 16 * GIB)
    cpu._gpu_build = True
    plan, context = cpu.plan_for(entry)
    assert context == min(trained, CPU_MAX_CONTEXT) and plan.n_gpu_layers == 0
    fixed = Settings(models_dir=tmp_path, parallel=2, context_length=2048,
                     models={"m": {"kv_cache_type": "q8_0"}})
    plan, context = ModelLoader(fixed, FakeGpu(24 * GIB, 0)).plan_for(entry)
    assert (context, plan.kv_cache_type) == (2048, "q8_0")


def test_loader_refuses_an_impossible_type_before_eviction(tmp_path: Path) -> None:
    from tests.appliance.fakes import write_gguf

    write_gguf(tmp_path / "odd.gguf")  # head size 8: no q8_0 block fits
    registry = Registry(tmp_path)
    registry.scan()
    settings = Settings(models_dir=tmp_path, models={"odd": {"kv_cache_type": "q8_0"}})
    with pytest.raises(ModelUnusable, match="kv_cache_type q8_0"):
        ModelLoader(settings, FakeGpu(24 * GIB, 0)).preflight(registry.resolve("odd"))
