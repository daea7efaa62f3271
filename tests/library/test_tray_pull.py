"""The tray's side of the library as plain data: the "Get a model…" submenu, the pull progress
in the title, and the notification when a pull ends."""

from __future__ import annotations

from appliance.tray.events import notices
from appliance.tray.menu import menu_spec
from appliance.tray.snapshot import from_api, title

STATUS = {"state": "ready", "model": {"id": "m", "slots_busy": 0}, "target": None,
          "failure": None, "memory": {"gpus": [], "ram": {"total": 8, "used": 4,
                                                          "process_rss": 1}}}
OFFERS = [{"ref": "Qwen/Qwen3-8B-GGUF", "label": "Qwen3 8B (Q4_K_M)", "size": 5_030_000_000,
           "fit": "all on GPU", "installed": False},
          {"ref": "Qwen/Qwen3-0.6B-GGUF", "label": "Qwen3 0.6B (Q8_0)", "size": 639_000_000,
           "fit": "all on GPU", "installed": True}]


def library(pulls: list[dict]) -> dict:
    return {"pulls": pulls, "recommended": OFFERS, "models": []}


def test_get_a_model_submenu_offers_sizes_and_fit() -> None:
    s = from_api(STATUS, {"models": []}, library([]))
    [get] = [i for i in menu_spec(s) if i.label == "Get a model…"]
    assert get.submenu is not None
    eight, small = get.submenu
    assert eight.label == "Qwen3 8B (Q4_K_M), 5.0 GB (all on GPU)"
    assert (eight.action, eight.arg, eight.enabled) == ("pull", "Qwen/Qwen3-8B-GGUF", True)
    assert small.label.endswith("(installed)") and not small.enabled


def test_pull_progress_in_title_and_a_notice_when_done() -> None:
    running = from_api(STATUS, {"models": []}, library([
        {"model": "qwen3-8b-q4_k_m", "stage": "download", "completed": 45, "total": 100,
         "finished": False, "error": None}]))
    assert "Pulling qwen3-8b-q4_k_m: download 45 %" in title(running)
    [get] = [i for i in menu_spec(running) if i.label == "Get a model…"]
    assert get.submenu is not None and not get.submenu[0].enabled  # no second click
    done = from_api(STATUS, {"models": []}, library([
        {"model": "qwen3-8b-q4_k_m", "stage": "done", "finished": True, "error": None}]))
    assert "Pulling" not in title(done)
    [notice] = notices(running, done, False)
    assert notice.summary == "qwen3-8b-q4_k_m is ready to use"
    failed = from_api(STATUS, {"models": []}, library([
        {"model": "qwen3-8b-q4_k_m", "stage": "error", "finished": True,
         "error": "not enough free disk space"}]))
    [notice] = notices(running, failed, False)
    assert notice.summary.startswith("Getting qwen3-8b-q4_k_m failed")
    assert "disk space" in notice.body
    assert notices(done, done, False) == []  # announced once
