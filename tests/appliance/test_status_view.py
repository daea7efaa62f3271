"""`appliance status`'s table of resident models, from /api/status answers (no daemon needed;
test_resident_api.py runs the command against a real one)."""

from __future__ import annotations

from typing import Any

from appliance.status_view import duration, resident_table, transition_line, upstream_lines

NOW = 1_000_000.0
MIB, GIB = 2**20, 2**30


def entry(model_id: str, kind: str = "chat", **over: Any) -> dict[str, Any]:
    memory = {"vram": 0, "vram_source": "planned", "vram_method": None, "rss_at_load": 300 * MIB,
              "planned_vram": 0, "planned_ram": 2 * GIB, **over.pop("memory", {})}
    return {"id": model_id, "kind": kind, "memory": memory, "slots": 4, "slots_busy": 1,
            "pinned": False, "keep_alive_s": 300.0, "keep_alive_set_by": "default",
            "expires_at": NOW + 250, **over}


def cells(table: list[str]) -> dict[str, dict[str, str]]:
    """The table parsed back by its header's column starts."""
    header = table[0]
    starts = [i for i, c in enumerate(header)
              if c != " " and (i == 0 or header[i - 2:i] == "  ")]
    names = [header[s:e].strip() for s, e in zip(starts, [*starts[1:], None], strict=True)]
    rows = {}
    for line in table[1:]:
        values = [line[s:e].strip() for s, e in zip(starts, [*starts[1:], None], strict=True)]
        rows[values[0]] = dict(zip(names, values, strict=True))
    return rows


def test_one_row_per_resident_model_with_what_it_costs_and_when_it_goes() -> None:
    table = resident_table([
        entry("qwen3-8b", memory={"vram": int(5.2 * GIB), "vram_source": "measured"}),
        entry("qwen3-embedding", "embedding", slots=1, slots_busy=0, keep_alive_s=None,
              keep_alive_set_by="request", expires_at=None),
        entry("pinned-one", pinned=True, keep_alive_s=None, keep_alive_set_by="pin",
              expires_at=None, memory={"rss_at_load": None}),
        entry("busy-one", expires_at=None, keep_alive_s=60.0),
    ], now=NOW)
    assert len(table) == 5 and table[0].split()[0] == "MODEL"
    rows = cells(table)
    chat = rows["qwen3-8b"]
    assert chat["VRAM"] == "5.2 GiB measured" and chat["RAM PLANNED"] == "2.0 GiB"
    assert chat["RSS AT LOAD"] == "300 MiB" and chat["SLOTS BUSY"] == "1/4"
    assert chat["KEEP-ALIVE"] == "5m 00s (default)" and chat["UNLOADS"] == "in 4m 10s"
    embedding = rows["qwen3-embedding"]
    assert embedding["KIND"] == "embedding" and embedding["VRAM"] == "none"
    assert embedding["SLOTS BUSY"] == "0/1"
    assert embedding["KEEP-ALIVE"] == "forever (request)" and embedding["UNLOADS"] == "never"
    pinned = rows["pinned-one"]
    assert pinned["KEEP-ALIVE"] == "pinned" and pinned["UNLOADS"] == "never"
    assert pinned["RSS AT LOAD"] == "-"
    assert rows["busy-one"]["UNLOADS"] == "1m 00s after use"


def test_nothing_resident_is_no_table() -> None:
    assert resident_table([]) == []


def test_a_load_beside_the_resident_models_is_said() -> None:
    assert transition_line({"transition": {"action": "loading", "model": "e1"}}) == \
        "loading e1…"
    assert transition_line({"transition": None}) is None


def test_durations_read_plainly() -> None:
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3600, 7325)] == [
        "0s", "59s", "1m 01s", "59m 59s", "1h 00m", "2h 02m"]
    assert duration(-3) == "0s"  # an expiry a moment ago, read late


def test_one_row_per_upstream_with_its_health() -> None:
    status = {"upstreams": [
        {"name": "team", "url": "http://gpu-box:8000/v1", "up": True, "last_check": NOW - 12,
         "latency_ms": 23.4, "models": 3, "error": None},
        {"name": "lab", "url": "http://lab:8000/v1", "up": False, "last_check": NOW - 75,
         "latency_ms": None, "models": 0, "error": "cannot connect (Connection refused)"},
        {"name": "new", "url": "http://new:8000/v1", "up": None, "last_check": None,
         "latency_ms": None, "models": 0, "error": None}]}
    table = upstream_lines(status, NOW)
    rows = cells(table)
    assert rows["team"] == {"UPSTREAM": "team", "STATE": "up", "LATENCY": "23 ms",
                            "MODELS": "3", "CHECKED": "12s ago", "LAST ERROR": "-"}
    assert rows["lab"]["STATE"] == "down" and rows["lab"]["CHECKED"] == "1m 15s ago"
    assert rows["lab"]["LAST ERROR"] == "cannot connect (Connection refused)"
    assert rows["new"]["STATE"] == "checking" and rows["new"]["CHECKED"] == "never"
    assert upstream_lines({"upstreams": []}, NOW) == []
    assert upstream_lines({}, NOW) == []
