"""Our models as Ollama shows them: `name:tag` names, file digests, `details` from the GGUF header.

Ollama names look like `qwen3:8b` or `library/qwen3:latest`; ours are file stems such as
`qwen3-8b-q4_k_m`. A name resolves to the first of: the name itself (an id or an alias), the name
without `:latest`, `name-tag`, and the one usable model whose id starts with `name-tag-` (so
`qwen3:8b` finds `qwen3-8b-q4_k_m` when it is the only 8B file).

Digests are the sha256 of the file. Hashing a 5 GB file takes seconds of disk and CPU, so it never
runs on a request: one background thread hashes each (path, size, mtime) once, and the listing
shows the digest once it is known (an empty string until then).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import logging
import math
import os
import queue
import threading
from pathlib import Path
from typing import Any

from appliance.errors import InvalidRequest, ModelNotFound
from appliance.library.manifest import recorded_sha256
from appliance.registry import ModelEntry, Registry

log = logging.getLogger(__name__)

DEFAULT_TAG = "latest"
_HASH_CHUNK = 4 * 2**20


def ollama_name(name: str) -> str:
    """`qwen3-8b-q4_k_m` → `qwen3-8b-q4_k_m:latest`; a name with a tag stays as it is."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:{DEFAULT_TAG}"


def _candidates(name: str) -> tuple[list[str], str]:
    """The names to try in order, and the stem for a unique-prefix match."""
    key = name.strip().lower()
    for prefix in ("registry.ollama.ai/", "library/"):
        key = key.removeprefix(prefix)
    base, tag = key, ""
    if ":" in key.rsplit("/", 1)[-1]:
        base, _, tag = key.rpartition(":")
    stem = f"{base}-{tag}" if tag and tag != DEFAULT_TAG else base
    return list(dict.fromkeys(c for c in (name, key, stem) if c)), stem


def resolve(registry: Registry, name: str) -> ModelEntry:
    """Blocking (it may scan the folder): the entry an Ollama-style name means."""
    if not name.strip():
        raise InvalidRequest("model is required", param="model")
    candidates, stem = _candidates(name)
    for candidate in candidates:
        try:
            return registry.resolve(candidate)
        except ModelNotFound:
            continue
    usable = [e for e in registry.scan() if e.usable]
    matches = [e for e in usable if e.id.startswith(stem + "-")]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(ollama_name(e.id) for e in usable) or "none"
    raise ModelNotFound(f"model {name[:256]!r} not found (available: {known}); add a .gguf file "
                        f"to {registry.models_dir} or run `appliance convert`", param="model")


def iso_time(seconds: float) -> str:
    """RFC 3339 in UTC with microseconds, as Ollama writes times (`2024-07-22T20:33:28.123Z`)."""
    whole = math.floor(seconds)
    micros = round((seconds - whole) * 1e6)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    return f"{_iso_second(whole)}.{micros:06d}Z"


@functools.lru_cache(maxsize=4)
def _iso_second(whole: int) -> str:
    # Every streamed chunk carries a time: format each second once (datetime and strftime were
    # a sixth of the NDJSON writer's time per token, measured with cProfile).
    moment = datetime.datetime.fromtimestamp(whole, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


def human_count(n: int) -> str:
    """A parameter count as Ollama prints it: 8190735360 → "8.2B", 751632384 → "751.63M"."""
    for size, unit, digits in ((10**12, "T", 1), (10**9, "B", 1), (10**6, "M", 2),
                               (10**3, "K", 2)):
        if n >= size:
            return f"{n / size:.{digits}f}{unit}"
    return str(n)


def details(entry: ModelEntry) -> dict[str, Any]:
    info = entry.info
    family = info.architecture if info else "unknown"
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
            "parameter_size": human_count(info.parameter_count) if info else "",
            "quantization_level": info.quantization.upper() if info else ""}


def capabilities(entry: ModelEntry) -> list[str]:
    """What /api/show lists; from the chat template, as Ollama reads its own templates."""
    template = entry.info.metadata.get("tokenizer.chat_template") if entry.info else None
    found = ["completion"]
    if isinstance(template, str):
        if "tools" in template:
            found.append("tools")
        if "enable_thinking" in template or "<think>" in template:
            found.append("thinking")
    return found


class FileDigests:
    """sha256 of model files, each (path, size, mtime) hashed once on one background thread."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, float], str] = {}
        self._pending: set[tuple[str, int, float]] = set()
        self._queue: queue.Queue[tuple[Path, tuple[str, int, float]]] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def get(self, entry: ModelEntry) -> str:
        """The file's sha256 in hex (as /api/tags writes it), or "" while it is computed."""
        key = (str(entry.path), *entry.signature)
        with self._lock:
            digest = self._known.get(key)
            if digest is not None:
                return digest
            if key not in self._pending:
                # A pulled model's sha256 is in its manifest: hashing it again costs a whole
                # read of the file (seconds of disk and CPU for a big model).
                recorded = recorded_sha256(entry.path, *entry.signature)
                if recorded is not None:
                    self._known[key] = recorded
                    return recorded
                self._pending.add(key)
                self._queue.put((entry.path, key))
                if self._thread is None:
                    # A daemon thread: a stop never waits for a half-hashed file.
                    self._thread = threading.Thread(target=self._work, name="digests",
                                                    daemon=True)
                    self._thread.start()
        return ""

    def _work(self) -> None:
        with contextlib.suppress(OSError):  # yield the CPU to decoding and the desktop
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            path, key = self._queue.get()
            digest = None
            try:
                digest = _sha256(path, key)
            except OSError as e:
                log.warning("could not hash %s: %s", path, e)
            with self._lock:
                self._pending.discard(key)
                if digest is not None:
                    self._known[key] = digest


def _sha256(path: Path, key: tuple[str, int, float]) -> str | None:
    """The digest of `path`, or None when the file changed while it was read."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha.update(chunk)
        stat = os.fstat(f.fileno())
    if (stat.st_size, stat.st_mtime) != key[1:]:
        return None  # replaced or rewritten meanwhile; the next listing asks again
    return sha.hexdigest()


def tag_entries(registry: Registry, digests: FileDigests) -> list[dict[str, Any]]:
    """Blocking (it scans the folder): /api/tags' models, each id and alias under its own name."""
    models = []
    for entry in registry.scan():
        if not entry.usable:
            continue
        item = {"size": entry.size, "digest": digests.get(entry),
                "modified_at": iso_time(entry.signature[1]), "details": details(entry)}
        for name in [entry.id, *registry.aliases_of(entry.id)]:
            models.append({"name": ollama_name(name), "model": ollama_name(name), **item})
    return models


def show(entry: ModelEntry, digests: FileDigests) -> dict[str, Any]:
    """Blocking: /api/show's answer for one model."""
    assert entry.info is not None
    meta = entry.info.metadata
    template = meta.get("tokenizer.chat_template")
    # Arrays (the vocabulary) are not read from the header: they show as absent, not null.
    # A crafted header's NaN would make the JSON invalid: such values are left out too.
    info: dict[str, Any] = {k: v for k, v in meta.items()
                            if _json_safe(v) and k != "tokenizer.chat_template"}
    info.setdefault("general.parameter_count", entry.info.parameter_count)
    parameters = "\n".join(_parameter(key.removeprefix("general.sampling."), value)
                           for key, value in info.items()
                           if key.startswith("general.sampling."))
    return {
        "license": str(meta.get("general.license", "")),
        "modelfile": f"# Qwen Appliance model {entry.id}\nFROM {entry.path}\n",
        "parameters": parameters,
        "template": template if isinstance(template, str) else "",
        "details": details(entry),
        "model_info": info,
        "capabilities": capabilities(entry),
        "modified_at": iso_time(entry.signature[1]),
        "digest": digests.get(entry),
    }


def _json_safe(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and not math.isfinite(value))


def _parameter(name: str, value: Any) -> str:
    """A Modelfile PARAMETER line: Ollama's names, float32 noise rounded (0.6, not 0.60000002)."""
    name = {"temp": "temperature"}.get(name, name)
    return f"{name} {value:.6g}" if isinstance(value, float) else f"{name} {value}"
