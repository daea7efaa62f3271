"""The tray menu as plain data built from a snapshot, so every state can be unit-tested."""

from __future__ import annotations

from dataclasses import dataclass, replace

from appliance.tray.snapshot import Snapshot, TrayState, memory_line


@dataclass(frozen=True)
class Item:
    label: str
    action: str | None = None  # name of a TrayActions method; None for a status line
    arg: str | None = None
    enabled: bool = True
    checked: bool | None = None  # None: not a check item
    radio: bool = False
    default: bool = False  # what a left click does (the only action on plain X trays)
    submenu: tuple[Item, ...] | None = None
    live: bool = False  # a status line whose text changes in place, without a new menu


SEPARATOR = Item("-")


def state_line(s: Snapshot) -> str:
    if s.state is TrayState.STOPPED:
        return "Daemon not running"
    if s.state is TrayState.ERROR and s.message:
        return f"Error: {s.message[:80]}"
    if s.state is TrayState.LOADING:
        return f"Loading {s.model or 'a model'}…"
    if s.state is TrayState.BUSY:
        return f"Busy, {s.tokens_per_s:.1f} tok/s"
    if s.state is TrayState.IDLE:
        return "Running, no model loaded"
    return "Ready"


def resident(s: Snapshot) -> str | None:
    """The model that is loaded and serving, if any (a loading or failed one is not)."""
    return s.model if s.state in (TrayState.READY, TrayState.BUSY) else None


def offers_menu(s: Snapshot) -> tuple[Item, ...]:
    """"Get a model…": the recommended models with size and fit; a running pull is disabled."""
    pulling = {p.model for p in s.pulls if not p.finished}
    items = []
    for o in s.offers:
        busy = any(o.ref.split("/")[-1].lower().removesuffix("-gguf") in m for m in pulling)
        note = "installed" if o.installed else "pulling…" if busy else o.fit
        items.append(Item(f"{o.label}, {o.size / 1e9:.1f} GB ({note})", "pull", o.ref,
                          enabled=s.running and not o.installed and not busy))
    return tuple(items) or (Item("Start the daemon to get models", enabled=False),)


def menu_spec(s: Snapshot) -> tuple[Item, ...]:
    running = s.running
    loading = s.state is TrayState.LOADING
    model = resident(s)
    models = tuple(
        Item(m.id if m.usable else f"{m.id} (unusable: {(m.reason or '')[:60]})",
             "switch", m.id, enabled=running and m.usable and not loading,
             checked=m.loaded, radio=True)
        for m in s.models)
    return (
        Item(state_line(s), enabled=False, live=True),
        Item(memory_line(s) if running else "Start it to serve models", enabled=False, live=True),
        *(Item(u.line, enabled=False, live=True) for u in s.upstreams if running),
        Item(model, enabled=False, checked=True) if model else
        Item("No model loaded", enabled=False),
        SEPARATOR,
        Item("Switch model", submenu=models or (Item("No models found", enabled=False),),
             enabled=running),
        Item("Unload model", "unload", enabled=bool(model)),
        Item("Get a model…", submenu=offers_menu(s), enabled=running),
        SEPARATOR,
        Item("Start daemon", "start", enabled=not running, default=not running),
        Item("Stop daemon", "stop", enabled=running),
        SEPARATOR,
        Item("Open models folder", "open_models_folder"),
        Item("Open logs", "open_logs"),
        Item("Open API docs", "open_docs", enabled=running, default=running),
        SEPARATOR,
        Item("Quit tray", "quit"),
    )


def structure(spec: tuple[Item, ...]) -> tuple[Item, ...]:
    """The menu without the text of its live lines: a change here needs a new menu."""
    return tuple(replace(item, label="") if item.live else item for item in spec)
