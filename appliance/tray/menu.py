"""The tray menu as plain data built from a snapshot, so every state can be unit-tested."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.tray.snapshot import Snapshot, TrayState, memory_line


@dataclass(frozen=True)
class Item:
    label: str
    action: str | None = None  # name of a TrayActions method; None for a status line
    arg: str | None = None
    enabled: bool = True
    checked: bool = False
    radio: bool = False
    default: bool = False  # what a left click does (the only action on plain X trays)
    submenu: tuple[Item, ...] | None = None


SEPARATOR = Item("-")


def menu_spec(s: Snapshot) -> tuple[Item, ...]:
    running = s.running
    loading = s.state is TrayState.LOADING
    if running:
        status = f"{s.model or 'No model loaded'}: {s.state.value}"
        if s.state is TrayState.ERROR and s.message:
            status = f"Error: {s.message[:80]}"
    else:
        status = "Daemon not running"
    models = tuple(
        Item(m.id if m.usable else f"{m.id} (unusable: {(m.reason or '')[:60]})",
             "switch", m.id, enabled=running and m.usable and not loading,
             checked=m.loaded, radio=True)
        for m in s.models)
    return (
        Item(status, enabled=False),
        Item(memory_line(s) if running else "Start it to serve models", enabled=False),
        SEPARATOR,
        Item("Start daemon", "start", enabled=not running, default=not running),
        Item("Stop daemon", "stop", enabled=running),
        Item("Models", submenu=models or (Item("No models found", enabled=False),),
             enabled=running),
        Item("Unload model", "unload", enabled=running and bool(s.model) and not loading),
        SEPARATOR,
        Item("Open API docs", "open_docs", enabled=running, default=running),
        Item("Open models folder", "open_models_folder"),
        SEPARATOR,
        Item("Quit tray", "quit"),
    )
