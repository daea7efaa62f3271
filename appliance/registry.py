"""Which models exist: every .gguf in the models folder, with metadata read from its header."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ModelNotFound, ModelUnusable
from appliance.gguf_info import GGUFError, GGUFInfo, read_gguf_info

log = logging.getLogger(__name__)


def model_id(path: Path) -> str:
    """A readable id from the file name: `Qwen3-8B-Q4_K_M.gguf` → `qwen3-8b-q4_k_m`."""
    return path.stem.lower()


@dataclass
class ModelEntry:
    id: str
    path: Path
    info: GGUFInfo | None
    error: str | None  # why the model is unusable, or None
    signature: tuple[int, float]  # (size, mtime): re-read the header when it changes

    @property
    def usable(self) -> bool:
        return self.error is None

    def describe(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "path": str(self.path), "usable": self.usable,
                                "error": self.error, "file_size": self.signature[0]}
        if self.info is not None:
            data.update({
                "architecture": self.info.architecture,
                "name": self.info.metadata.get("general.name"),
                "parameters": self.info.parameter_count,
                "quantization": self.info.quantization,
                "trained_context_length": self.info.context_length,
                "layers": self.info.n_layers,
                "chat_template": self.info.has_chat_template,
            })
        return data


class Registry:
    """The models folder, re-scanned on demand; headers are re-read only for changed files."""

    def __init__(self, models_dir: Path, aliases: dict[str, str] | None = None) -> None:
        self.models_dir = models_dir
        self.aliases = {k.lower(): v.lower() for k, v in (aliases or {}).items()}
        self._entries: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()

    def scan(self) -> list[ModelEntry]:
        with self._lock:
            found: dict[str, ModelEntry] = {}
            paths = sorted(self.models_dir.glob("*.gguf")) if self.models_dir.is_dir() else []
            for path in paths:
                try:
                    stat = path.stat()
                except OSError:
                    continue
                signature = (stat.st_size, stat.st_mtime)
                mid = model_id(path)
                old = self._entries.get(mid)
                if old is not None and old.path == path and old.signature == signature:
                    found[mid] = old
                    continue
                try:
                    info, error = read_gguf_info(path), None
                except GGUFError as e:
                    info, error = None, str(e)
                    log.warning("model %s is unusable: %s", path, error)
                except Exception as e:  # a crafted file must never stop a scan
                    info, error = None, f"unreadable header: {e!r}"
                    log.warning("model %s is unusable: %s", path, error)
                found[mid] = ModelEntry(mid, path, info, error, signature)
            self._entries = found
            return list(found.values())

    def resolve(self, name: str) -> ModelEntry:
        """The entry for an id or alias; raises ModelNotFound or ModelUnusable."""
        key = name.lower()
        key = self.aliases.get(key, key)
        entry = self._entries.get(key)
        if entry is None or not entry.path.exists():
            self.scan()
            entry = self._entries.get(key)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none; add .gguf files to " + str(
                self.models_dir)
            raise ModelNotFound(f"model {name!r} does not exist (available: {known})",
                                param="model")
        if not entry.usable:
            raise ModelUnusable(f"model {entry.id!r} is unusable: {entry.error}", param="model")
        return entry

    def aliases_of(self, mid: str) -> list[str]:
        return sorted(a for a, target in self.aliases.items() if target == mid)
