"""The library's subcommands (`appliance pull`, `rm`, `du`, `models`); the parser is in cli.py.

Pulls run in this process, so they work with the daemon stopped; the daemon sees a new model on
its next scan. `rm` goes through the daemon when it runs (it knows what is loaded), else it
removes the files itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

GIB = 2**30


def format_size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def format_params(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _machine(settings: Any) -> Any:
    from appliance.context_sizing import listing_context
    from appliance.gpu import open_probe
    from appliance.library.fit import read_machine

    probe = open_probe(settings.gpu)
    try:
        n_ctx_total = listing_context(settings.context_length) * settings.parallel
        return read_machine(probe, n_ctx_total=n_ctx_total,
                            margin_mib=settings.vram_margin_mib), bool(probe.devices())
    finally:
        probe.close()


def _library(settings: Any) -> Any:
    from appliance.library.pull import Library

    return Library(settings.models_dir.expanduser())


def cmd_pull(args: argparse.Namespace, settings: Any) -> int:
    from appliance.library.fit import fit_size
    from appliance.library.progress import for_stream

    library = _library(settings)
    plan = library.plan(args.ref, args.quant, args.revision)
    machine, _ = _machine(settings)
    fit = fit_size(plan.result_bytes, machine)
    line = (f"{plan.model_id}: {plan.kind} from {plan.ref}"
            + (f" @ {plan.hub.commit[:10]}" if plan.hub else "")
            + f", {plan.quant or '?'}, {format_size(plan.result_bytes)} on disk; "
            f"needs {format_size(plan.need_bytes)} free; here: {fit.short()}")
    if args.dry_run:
        print(line)
        if plan.hub and plan.hub.quants:
            print(f"  quantizations: {', '.join(plan.hub.quants)}")
        print("  already installed and up to date" if plan.up_to_date else
              f"  would download {format_size(plan.download_bytes)}")
        return 0
    print(line, file=sys.stderr)
    if not plan.up_to_date:
        library.check_space(plan)
    model = library.pull(plan, for_stream(sys.stderr), force=args.force)
    if model.manifest is not None and model.manifest.unsynced_in is not None:
        from appliance.library.durability import settle_later

        settle_later(library.models_dir, model.id)  # the disk catches up after we return
    print(f"{model.id} is ready ({format_size(model.size)}, {len(model.files)} file"
          f"{'s' if len(model.files) > 1 else ''} in {library.models_dir})")
    return 0


def cmd_rm(args: argparse.Namespace, settings: Any, client: Any) -> int:
    from appliance.client import DaemonUnavailable
    from appliance.library.refs import check_model_id

    mid = check_model_id(args.id)
    try:
        answer = client.delete_model(mid, force=args.force)
    except DaemonUnavailable:
        answer = None
    if answer is None:  # no daemon: nothing can have it loaded
        model = _library(settings).remove(mid)
        print(f"removed {model.id} ({format_size(model.removed_bytes)})")
        return 0
    print(f"removed {answer['id']} ({format_size(answer.get('size', 0))})"
          + (" after unloading it" if answer.get("unloaded") else ""))
    return 0


def cmd_du(args: argparse.Namespace, settings: Any) -> int:
    from appliance.library.manifest import disk_use, installed

    folder = settings.models_dir.expanduser()
    for model in installed(folder):
        print(f"{format_size(model.size):>10}  {model.id}")
    use = disk_use(folder)
    if use["partial"]:
        print(f"{format_size(use['partial']):>10}  (unfinished pulls in {folder}/.pulls; they "
              "resume on the next pull)")
    print(f"{format_size(use['models'] + use['partial']):>10}  total in {folder}, "
          f"{format_size(use['free'])} free")
    return 0


def cmd_models(args: argparse.Namespace, settings: Any, client: Any) -> int:
    from appliance.client import DaemonError, DaemonUnavailable
    from appliance.library.fit import cache_dir, measure_and_cache
    from appliance.library.headers import HEADERS_FILE, HeaderCache
    from appliance.library.listing import describe_all
    from appliance.library.manifest import disk_use, installed

    loaded = None
    folder = settings.models_dir.expanduser()
    try:  # a running daemon says which folder it serves, and what it has loaded
        status = client.status()
        loaded = (status.get("model") or {}).get("id")
        folder = Path(client.models()["models_dir"])
        daemon = f"daemon running ({status['state']})"
    except (DaemonUnavailable, DaemonError, KeyError):
        daemon = "daemon not running"
    machine, has_gpu = _machine(settings)
    # Measured once, in a terminal only: a script or a test asking for the list gets it at once.
    auto = not machine.speed and not args.no_measure and sys.stdout.isatty()
    if args.measure or (auto and installed(folder)):
        print("measuring this machine's decode speed once (appliance models --measure "
              "repeats it)…", file=sys.stderr)
        usable = [(m.path, m.size) for m in installed(folder) if m.complete]
        try:
            measure_and_cache(usable, has_gpu, settings.threads)
        except Exception as e:  # an unloadable model: the list still comes
            print(f"  not measured: {e}", file=sys.stderr)
        machine, _ = _machine(settings)
    forced = {mid: o.gpu_layers for mid, o in settings.models.items()}
    # Headers read once are kept (by path, size and mtime): a listing reads only new files.
    models = describe_all(folder, machine, forced, HeaderCache(cache_dir() / HEADERS_FILE))
    if not models:
        print(f"no models in {folder} (appliance pull Qwen/Qwen3-8B-GGUF, or add .gguf files)")
        return 0
    print(f"  {'ID':<30} {'SIZE':>9} {'QUANT':<8} {'PARAMS':>6} {'CTX':>6}  {'SOURCE':<32} FITS HERE")
    for m in models:
        mark = "*" if loaded and m["id"] == loaded else " "
        if not m["usable"]:
            print(f"{mark} {m['id']:<30} {format_size(m['size']):>9} unusable: {m['error']}")
            continue
        speed = m.get("expected_tokens_per_s")
        fits = m.get("fit", "?") + (f", ~{speed:g} tok/s" if speed else "")
        print(f"{mark} {m['id']:<30} {format_size(m['size']):>9} {m['quantization']:<8} "
              f"{format_params(m['parameters']):>6} {m['trained_context_length']:>6}  "
              f"{m['source'][:32]:<32} {fits}")
    use = disk_use(folder)
    where = "GPU " + machine.device if machine.device != "cpu" else "CPU only"
    print(f"total {format_size(use['models'])} in {folder}, {format_size(use['free'])} free; "
          f"{daemon}; fit for {where}" + ("" if machine.speed else
                                          ", speed not measured yet"))
    return 0
