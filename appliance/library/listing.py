"""The installed models as the user sees them: id, size, quantization, parameters, context,
source, and the fit answer; read from the folder, so it works with the daemon stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.gguf_info import GGUFError, GGUFInfo, TensorInfo, read_gguf_info
from appliance.library.fit import Machine, fit_model
from appliance.library.manifest import Installed, installed


def read_model_info(model: Installed) -> GGUFInfo:
    """The header of a model; for a split one, the first part's metadata with every part's
    tensors (later parts hold only split keys and tensors, so they read fast)."""
    info = read_gguf_info(model.path)
    if len(model.files) == 1:
        return info
    if not model.complete:
        raise GGUFError(f"split model is incomplete: {len(model.files)} parts present")
    import gguf

    tensors = list(info.tensors)
    size = info.file_size
    for part in model.files[1:]:
        try:
            reader = gguf.GGUFReader(part)
        except (ValueError, OSError) as e:
            raise GGUFError(f"part {part.name} is unreadable: {e}") from None
        size += part.stat().st_size
        tensors += [TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape.tolist())),
                               t.tensor_type, int(t.data_offset), int(t.n_bytes))
                    for t in reader.tensors]
    return GGUFInfo(model.path, size, info.metadata, info.array_lengths, tensors)


def describe(model: Installed, machine: Machine | None,
             forced_layers: int | None = None) -> dict[str, Any]:
    manifest = model.manifest
    item: dict[str, Any] = {
        "id": model.id, "files": [f.name for f in model.files], "size": model.size,
        "source": manifest.source_line if manifest else "added by hand",
        "manifest": manifest.describe() if manifest else None,
        "usable": True, "error": None,
    }
    try:
        info = read_model_info(model)
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
                 forced: dict[str, int | None] | None = None) -> list[dict[str, Any]]:
    return [describe(m, machine, (forced or {}).get(m.id)) for m in installed(models_dir)]
