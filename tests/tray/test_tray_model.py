"""Icon, title and menu are pure functions of a snapshot: every state, no display needed."""

from __future__ import annotations

import pytest

from appliance.tray.icon import STATE_COLOURS, render_icon
from appliance.tray.menu import SEPARATOR, menu_spec, structure
from appliance.tray.snapshot import GIB, ModelChoice, Snapshot, TrayState, from_api, stopped, title

MODELS = (ModelChoice("qwen3-8b", True, True), ModelChoice("qwen3-4b", True, False),
          ModelChoice("broken", False, False, "file is truncated"))


def gpu_snapshot(state: TrayState = TrayState.READY, used: float = 12, **kw) -> Snapshot:
    return Snapshot(state, "qwen3-8b", True, int(used * GIB), 24 * GIB, int(6 * GIB), 31.5,
                    models=MODELS, **kw)


def items(spec) -> dict:
    return {i.label: i for i in spec if i is not SEPARATOR}


@pytest.mark.parametrize("state", list(TrayState))
@pytest.mark.parametrize("size", [16, 22, 24, 64])
def test_icon_frame_has_the_state_colour(state: TrayState, size: int) -> None:
    image = render_icon(gpu_snapshot(state) if state is not TrayState.STOPPED else stopped(), size)
    assert image.size == (size, size)
    assert image.getpixel((size // 2, 0))[:3] == STATE_COLOURS[state]


def test_gauge_fills_with_memory_use() -> None:
    def filled_rows(snapshot: Snapshot) -> int:
        image = render_icon(snapshot, 64)
        colour = STATE_COLOURS[snapshot.state]
        return sum(image.getpixel((32, y))[:3] == colour for y in range(10, 54))

    low, half, full = (filled_rows(gpu_snapshot(used=u)) for u in (2.4, 12, 24))
    assert low < half < full
    assert abs(half - full / 2) <= 2


def test_every_state_looks_different() -> None:
    images = {render_icon(gpu_snapshot(s) if s is not TrayState.STOPPED else stopped(), 22)
              .tobytes() for s in TrayState}
    assert len(images) == len(TrayState)


def test_daemon_down() -> None:
    s = stopped("connection refused")
    assert title(s) == "Qwen Appliance: daemon not running"
    menu = items(menu_spec(s))
    assert menu["Daemon not running"].enabled is False
    assert menu["Start daemon"].enabled and menu["Start daemon"].default
    assert not menu["Stop daemon"].enabled and not menu["Unload model"].enabled
    assert not menu["Switch model"].enabled and not menu["Open API docs"].enabled
    assert menu["No model loaded"].checked is None
    assert menu["Open logs"].enabled and menu["Open models folder"].enabled
    assert menu["Quit tray"].enabled


def test_ready_on_gpu() -> None:
    s = gpu_snapshot()
    assert "VRAM 12.0 / 24.0 GiB (daemon 6.0)" in title(s)
    spec = menu_spec(s)
    assert [i.label for i in spec[:3]] == ["Ready", "VRAM 12.0 / 24.0 GiB (daemon 6.0)", "qwen3-8b"]
    assert spec[2].checked is True and not spec[2].enabled and not spec[2].radio  # the tick
    menu = items(spec)
    assert not menu["Start daemon"].enabled and menu["Stop daemon"].enabled
    assert menu["Unload model"].enabled
    models = {m.label: m for m in menu["Switch model"].submenu}
    assert models["qwen3-8b"].checked and models["qwen3-8b"].radio
    assert models["qwen3-4b"].enabled and not models["qwen3-4b"].checked
    assert models["qwen3-4b"].action == "switch" and models["qwen3-4b"].arg == "qwen3-4b"
    broken = next(m for m in models.values() if m.label.startswith("broken"))
    assert not broken.enabled and "file is truncated" in broken.label


def test_busy_shows_speed() -> None:
    assert "31.5 tok/s" in title(gpu_snapshot(TrayState.BUSY))
    assert menu_spec(gpu_snapshot(TrayState.BUSY))[0].label == "Busy, 31.5 tok/s"


def test_status_lines_change_in_place_and_state_changes_rebuild() -> None:
    """Memory and speed change the live lines only; a new state or model is a new menu."""
    ready, busier = gpu_snapshot(used=12), gpu_snapshot(used=13)
    assert menu_spec(ready) != menu_spec(busier)
    assert structure(menu_spec(ready)) == structure(menu_spec(busier))
    assert structure(menu_spec(ready)) == structure(menu_spec(gpu_snapshot(TrayState.BUSY)))
    assert structure(menu_spec(ready)) != structure(menu_spec(gpu_snapshot(TrayState.LOADING)))
    other = Snapshot(TrayState.READY, "qwen3-4b", True, 12 * GIB, 24 * GIB, 6 * GIB,
                     models=MODELS)
    assert structure(menu_spec(ready)) != structure(menu_spec(other))


def test_loading_disables_switching() -> None:
    spec = menu_spec(gpu_snapshot(TrayState.LOADING))
    assert spec[0].label == "Loading qwen3-8b…"
    menu = items(spec)
    assert all(not m.enabled for m in menu["Switch model"].submenu)
    assert not menu["Unload model"].enabled and "No model loaded" in menu


def test_failed_model_is_shown() -> None:
    s = gpu_snapshot(TrayState.ERROR, message="out of memory")
    assert "out of memory" in title(s)
    assert "Error: out of memory" in items(menu_spec(s))


def test_cpu_only_shows_ram() -> None:
    status = {"state": "ready", "failure": None, "model": {"id": "m", "slots_busy": 0, "queue": 0,
                                                           "tokens_per_second": 0},
              "memory": {"gpus": [], "ram": {"total": 16 * GIB, "used": 4 * GIB,
                                              "process_rss": GIB}}}
    s = from_api(status, {"models": []})
    assert not s.gpu and s.fill == 0.25
    assert "CPU only, RAM 4.0 / 16.0 GiB (daemon 1.0)" in title(s)
    assert items(menu_spec(s))["Switch model"].submenu[0].label == "No models found"


def test_from_api_states() -> None:
    base = {"failure": None, "memory": {"gpus": [{"used": 1, "total": 2, "process_used": 1}]}}
    busy = from_api({**base, "state": "ready",
                     "model": {"id": "m", "slots_busy": 2, "queue": 0}}, None)
    assert busy.state is TrayState.BUSY and busy.gpu and busy.fill == 0.5
    assert from_api({**base, "state": "loading", "target": "m", "model": None}, None).state \
        is TrayState.LOADING
    failed = from_api({**base, "state": "failed", "failure": "bad file", "model": None}, None)
    assert failed.state is TrayState.ERROR and failed.message == "bad file"
    assert from_api({**base, "state": "unloaded", "model": None}, None).state is TrayState.IDLE


def test_one_live_line_per_upstream() -> None:
    status = {"state": "ready", "model": {"id": "qwen3-8b"}, "memory": {},
              "upstreams": [{"name": "team", "up": True, "models": 3, "latency_ms": 12.4},
                            {"name": "lab", "up": False, "models": 1,
                             "error": "cannot connect (Connection refused)"},
                            {"name": "new", "up": None, "models": 0}]}
    spec = menu_spec(from_api(status, None))
    lines = [i for i in spec if i.label.startswith("Upstream ")]
    assert [i.label for i in lines] == ["Upstream team: up, 3 models, 12 ms",
                                        "Upstream lab: down (cannot connect (Connection refused))",
                                        "Upstream new: checking…"]
    assert all(i.live and not i.enabled for i in lines)
    # A new latency changes the text in place, not the menu's structure.
    status["upstreams"][0]["latency_ms"] = 30.0
    assert structure(menu_spec(from_api(status, None))) == structure(spec)
    assert not any(i.label.startswith("Upstream") for i in menu_spec(stopped()))
