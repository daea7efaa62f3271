"""The installed models as the user sees them: id, size, quantization, parameters, context,
source, and the fit answer; read from the folder, so it works with the daemon stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.gguf_info import GGUFError, GGUFInfo
from appliance.library.fit import Machine, fit_model
from appliance.library.headers import HeaderCache
from appliance.library.manifest import Installed, installed, missing_parts


def read_model_info(model: Installed, headers: HeaderCache | None = None) -> GGUFInfo:
    """The header of a model; for a split one, the first part's metadata with every part's
    tensors. `headers` keeps what was read (on disk, for the CLI)."""
    missing = missing_parts(model.files)
    if missing is not None:
        raise GGUFError(missing)
    return (headers or HeaderCache()).model_info(model.files)


def describe(model: Installed, machine: Machine | None, forced_layers: int | None = None,
             headers: HeaderCache | None = None) -> dict[str, Any]:
    manifest = model.manifest
    item: dict[str, Any] = {
        "id": model.id, "files": [f.name for f in model.files], "size": model.size,
        "source": manifest.source_line if manifest else "added by hand",
        "manifest": manifest.describe() if manifest else None,
        "usable": True, "error": None,
    }
    try:
        info = read_model_info(model, headers)
    except GGUFError as e:
        item.update(usable=False, error=str(e))
        return item
    except Exception as e:  # a crafted file must never stop a listing
        item.update(usable=False, error=f"unreadable header: {e!r}")
        return item
    item.update(quantization=info.quantization, parameters=info.parameter_count,
                trained_context_length=info.context_length, architecture=info.architecture,
                layers=info.n_layers)
    if machine is not None:
        item.update(fit_model(info, machine, forced_layers).describe())
    return item


def describe_all(models_dir: Path, machine: Machine | None,
                 forced: dict[str, int | None] | None = None,
                 headers: HeaderCache | None = None) -> list[dict[str, Any]]:
    headers = headers or HeaderCache()
    described = [describe(m, machine, (forced or {}).get(m.id), headers)
                 for m in installed(models_dir)]
    headers.save()
    return described
