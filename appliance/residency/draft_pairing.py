"""Which draft model may speed up a chat model by speculative decoding, and why (or why none).

A draft pairs with a target only when their vocabularies are identical (token count and a digest
of the token list, computed once per file), so a drafted token id means the same text to both.
It must be a smaller chat model, never the target itself. `[models.ID] draft = "..."` names one;
unset, a Qwen3 target gets the smallest installed Qwen3-0.6B (it shares Qwen3's tokenizer and is
~13x smaller than 8B); `draft = ""` turns drafting off.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from appliance.registry import ModelEntry
from appliance.residency.model import CHAT, model_kind

TOKENS_KEY = "tokenizer.ggml.tokens"
# Qwen3-0.6B's shape (hidden size, layers): what an automatic draft must look like.
AUTO_DRAFT_SHAPE = (1024, 28)
AUTO_ARCHITECTURES = {"qwen3"}


@dataclass(frozen=True)
class DraftChoice:
    entry: ModelEntry | None
    reason: str  # why this draft, or why none: /api/status shows it


class DraftPairing:
    """Chooses drafts; caches each file's vocabulary digest by (path, size, mtime)."""

    def __init__(self) -> None:
        self._digests: dict[tuple[str, int, float], tuple[int, str] | None] = {}
        self._lock = threading.Lock()

    def vocabulary(self, entry: ModelEntry) -> tuple[int, str] | None:
        """(token count, sha256 of the token list as stored), or None if the file has none."""
        key = (str(entry.path), *entry.signature)
        with self._lock:
            if key in self._digests:
                return self._digests[key]
        result = _read_vocabulary(entry)
        with self._lock:
            self._digests[key] = result
        return result

    def choose(self, target: ModelEntry, configured: str | None,
               installed: list[ModelEntry]) -> DraftChoice:
        if configured == "":
            return DraftChoice(None, "drafting is off for this model (draft = \"\")")
        if configured is not None:
            found = next((e for e in installed if e.id == configured.lower()), None)
            if found is None:
                return DraftChoice(None, f"the configured draft {configured!r} is not installed")
            problem = self.mismatch(target, found)
            if problem:
                return DraftChoice(None, f"the configured draft {found.id!r} {problem}")
            return DraftChoice(found, "set in configuration")
        if target.info is None or target.info.architecture not in AUTO_ARCHITECTURES:
            return DraftChoice(None, "no automatic draft for this architecture")
        candidates = [e for e in installed if _looks_like_auto_draft(e)
                      and self.mismatch(target, e, strictly_smaller=True) is None]
        if not candidates:
            return DraftChoice(None, "no Qwen3-0.6B GGUF with the same vocabulary is installed")
        best = min(candidates, key=lambda e: (e.signature[0], e.id))  # the fastest to run
        return DraftChoice(best, "automatic: a Qwen3-0.6B with the same vocabulary")

    def mismatch(self, target: ModelEntry, draft: ModelEntry,
                 strictly_smaller: bool = False) -> str | None:
        """Why `draft` cannot draft for `target`, or None when it can."""
        if draft.path == target.path or draft.id == target.id:
            return "is the model itself"
        if not draft.usable or draft.info is None or target.info is None:
            return f"is unusable: {draft.error}"
        if model_kind(draft) != CHAT:
            return "is an embedding model"
        draft_params, target_params = draft.info.parameter_count, target.info.parameter_count
        if draft_params > target_params or (strictly_smaller and draft_params >= target_params):
            return "is not smaller than the model"
        mine, theirs = self.vocabulary(target), self.vocabulary(draft)
        if mine is None or theirs is None or mine != theirs:
            return "has a different vocabulary"
        return None


def _looks_like_auto_draft(entry: ModelEntry) -> bool:
    info = entry.info
    if info is None or not entry.usable or info.architecture not in AUTO_ARCHITECTURES:
        return False
    shape = (int(info.arch_value("embedding_length", 0)), info.n_layers)
    return shape == AUTO_DRAFT_SHAPE and model_kind(entry) == CHAT


def _read_vocabulary(entry: ModelEntry) -> tuple[int, str] | None:
    info = entry.info
    if info is None or TOKENS_KEY not in info.array_spans:
        return None
    start, end = info.array_spans[TOKENS_KEY]
    digest = hashlib.sha256()
    try:
        with entry.path.open("rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    return None  # the file shrank since its header was read
                digest.update(chunk)
                left -= len(chunk)
    except OSError:
        return None
    return info.array_lengths[TOKENS_KEY], digest.hexdigest()
