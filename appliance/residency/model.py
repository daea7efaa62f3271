"""A loaded model as the HTTP layer sees it: prepare a prompt, submit a request, cancel it.

Routes never reach into the runtime, the formatter or the scheduler; this face is all they get.
Preparing (template rendering, tokenizing) is blocking work: callers run it in a worker thread.
Two kinds: a chat model (LoadedModel: slots, a scheduler) and an embedding model
(EmbeddingModel: pooled vectors from its own worker thread). Both carry the same residency
fields (in_flight, last_used, keep-alive, pin) that the manager reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from appliance.engine.chat import ChatFormatter
from appliance.engine.draft import DraftModel
from appliance.engine.embedding import (
    POOLING_NAMES,
    EmbeddingJob,
    EmbeddingRuntime,
    EmbeddingWorker,
)
from appliance.engine.prompt import ControlTextGuard
from appliance.engine.runtime import LlamaRuntime
from appliance.engine.scheduler import GenerationRequest, Scheduler
from appliance.errors import InvalidValue
from appliance.offload import OffloadPlan
from appliance.registry import ModelEntry
from appliance.residency.footprint import Footprint

CHAT = "chat"
EMBEDDING = "embedding"
# What /v1/models calls an embedding-kind model with RANK pooling; it stays EMBEDDING for
# residency (same runtime, worker, keep-alive and memory rules).
RERANKER = "reranker"
# GGUF `<arch>.pooling_type` values that make a model an embedding model (mean, cls, last,
# rank: a reranker's classifier outputs).
EMBEDDING_POOLING = {1, 2, 3, 4}
RANK_POOLING = 4


def model_kind(entry: ModelEntry) -> str:
    """"embedding" for a GGUF that stores an embedding pooling type, else "chat"."""
    if entry.info is None:
        return CHAT
    pooling = entry.info.arch_value("pooling_type")
    return EMBEDDING if isinstance(pooling, int) and pooling in EMBEDDING_POOLING else CHAT


def is_reranker(entry: ModelEntry) -> bool:
    """Whether the GGUF stores RANK pooling (a reranker such as Qwen3-Reranker)."""
    return entry.info is not None and entry.info.arch_value("pooling_type") == RANK_POOLING


def pooling_name(entry: ModelEntry) -> str | None:
    """An embedding model's pooling ("last", "mean", "cls"), None for a chat model."""
    if model_kind(entry) != EMBEDDING:
        return None
    assert entry.info is not None  # model_kind read the pooling type from it
    return POOLING_NAMES[entry.info.arch_value("pooling_type")]


@dataclass
class Prompt:
    text: str  # as the model reads it, for output parsing (e.g. a template that opens <think>)
    tokens: list[int]


class _Resident:
    """What every resident model answers the same way, chat or embedding."""

    entry: ModelEntry
    runtime: Any
    in_flight: int

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def n_vocab(self) -> int:
        return self.runtime.n_vocab

    @property
    def busy(self) -> bool:
        return self.in_flight > 0


@dataclass
class LoadedModel(_Resident):
    entry: ModelEntry
    runtime: LlamaRuntime
    scheduler: Scheduler
    formatter: ChatFormatter
    plan: OffloadPlan
    enable_thinking: bool
    control_texts: set[str]
    draft: DraftModel | None = None  # speculative decoding's draft model, beside the runtime
    draft_note: str = ""  # why this draft, or why none
    load_seconds: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    kind: str = CHAT
    pinned: bool = False
    keep_alive_s: float | None = None  # the last request's override; None: the kind's default
    expires_at: float | None = None  # time.time() of the keep-alive unload, when armed
    footprint: Footprint | None = None  # measured at load

    def healthy(self) -> bool:
        return self.scheduler.alive()

    @property
    def context_per_slot(self) -> int:
        return self.runtime.context_per_slot

    @property
    def metadata(self) -> dict[str, Any]:
        return self.entry.info.metadata if self.entry.info else {}

    def prepare_chat(self, messages: list[dict[str, Any]], tools: list[dict] | None,
                     enable_thinking: bool) -> Prompt:
        """Render and tokenize a chat; client text never becomes control tokens."""
        guard = ControlTextGuard(self.control_texts)
        rendered = self.formatter.render(guard.protect(messages), tools=guard.protect(tools),
                                         enable_thinking=enable_thinking)
        tokens = guard.tokenize(rendered, self._tokenize, self._wants_bos(rendered))
        return Prompt(guard.restore(rendered), tokens)

    def prepare_text(self, text: str) -> Prompt:
        """A raw completion prompt: the client formats it, special tokens included."""
        return Prompt(text, self._tokenize(text, self._wants_bos(text), True))

    def check_tokens(self, tokens: list[int], param: str) -> Prompt:
        if any(not 0 <= t < self.n_vocab for t in tokens):
            raise InvalidValue(f"{param} has token ids outside the vocabulary "
                               f"(0..{self.n_vocab - 1})", param=param)
        return Prompt("", list(tokens))

    def submit(self, request: GenerationRequest) -> None:
        self.scheduler.submit(request)

    def cancel(self, request: GenerationRequest) -> None:
        self.scheduler.cancel(request)

    def _wants_bos(self, text: str) -> bool:
        bos = self.formatter.bos_token
        return self.runtime.add_bos and not (bos and text.startswith(bos))

    def _tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.runtime.tokenize(text, add_special=add_special, parse_special=parse_special)

    def describe(self) -> dict[str, Any]:
        sched = self.scheduler
        return {
            "id": self.id,
            "kind": self.kind,
            "offload": self.plan.describe(),
            **context_fields(self),
            "slots": len(sched.slots),
            "slots_busy": sched.busy_slots,
            "queue": sched.queue_depth,
            "tokens_per_second": round(sched.tokens_per_second(), 2),
            "load_seconds": round(self.load_seconds, 3),
            "in_flight": self.in_flight,
            "draft": {"model": self.draft.model_id if self.draft else None,
                      "reason": self.draft_note,
                      "proposed_tokens": sched.draft_proposed,
                      "accepted_tokens": sched.draft_accepted},
        }


def context_fields(model: LoadedModel) -> dict[str, Any]:
    """What /api/status shows of a chat model's context: tokens per slot, the KV cache's type,
    and why (auto sizing says which rule chose them)."""
    return {"context_per_slot": model.context_per_slot,
            "kv_cache_type": model.plan.kv_cache_type,
            "context_reason": model.plan.context_reason}


@dataclass
class EmbeddingModel(_Resident):
    """An embedding model: tokenize (blocking, callers use a thread), embed through its worker."""

    entry: ModelEntry
    runtime: EmbeddingRuntime
    worker: EmbeddingWorker
    plan: OffloadPlan
    load_seconds: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    kind: str = EMBEDDING
    pinned: bool = False
    keep_alive_s: float | None = None
    expires_at: float | None = None
    footprint: Footprint | None = None

    @property
    def dimensions(self) -> int:
        return self.runtime.n_embd

    @property
    def reranker(self) -> bool:
        """Scores (query, document) pairs instead of embedding texts."""
        return getattr(self.runtime, "rerank", None) is not None  # fakes may lack the field

    def rerank_tokens(self, query: str, documents: list[str],
                      instruction: str | None) -> list[list[int]]:
        """Blocking: each (query, document) pair's prompt tokens, as the reranker scores it."""
        assert self.runtime.rerank is not None
        return [self.runtime.rerank.tokens(query, d, instruction) for d in documents]

    @property
    def max_input_tokens(self) -> int:
        return self.runtime.n_batch

    def healthy(self) -> bool:
        return True

    def tokenize(self, texts: list[str], limit: int | None = None) -> list[list[int]]:
        """Blocking: each text's tokens, the end-of-text token appended as the model expects.
        With `limit`, a longer text loses the end of its text, never its special tokens
        (Ollama's `truncate`: last-token pooling reads the appended end-of-text token)."""
        tokens = [self.runtime.tokenize(t) for t in texts]
        if limit is None:
            return tokens
        return [ids if len(ids) <= limit else self._cut(text, ids, limit)
                for text, ids in zip(texts, tokens, strict=True)]

    def _cut(self, text: str, ids: list[int], limit: int) -> list[int]:
        plain = self.runtime.tokenize(text, add_special=False)
        start = next((i for i in range(len(ids) - len(plain) + 1)
                      if ids[i:i + len(plain)] == plain), None)
        if start is None:  # the special tokens do not wrap the text: cut the end
            return ids[:limit]
        prefix, suffix = ids[:start], ids[start + len(plain):]
        return prefix + plain[:max(limit - len(prefix) - len(suffix), 0)] + suffix

    def check_tokens(self, tokens: list[int], param: str) -> list[int]:
        if any(not 0 <= t < self.n_vocab for t in tokens):
            raise InvalidValue(f"{param} has token ids outside the vocabulary "
                               f"(0..{self.n_vocab - 1})", param=param)
        return list(tokens)

    def submit(self, job: EmbeddingJob) -> None:
        self.worker.submit(job)

    def describe(self) -> dict[str, Any]:
        # One worker embeds one request at a time (its inputs n_seq to a decode): one slot.
        return {"id": self.id, "kind": RERANKER if self.reranker else self.kind,
                "offload": self.plan.describe(), "dimensions": self.dimensions,
                "pooling": self.runtime.pooling_name, "max_input_tokens": self.max_input_tokens,
                "sequences_per_decode": self.runtime.n_seq,
                "slots": 1, "slots_busy": 1 if self.worker.busy else 0,
                "queue": self.worker.queue_depth, "load_seconds": round(self.load_seconds, 3),
                "in_flight": self.in_flight}

    def close(self, reason: str) -> None:
        self.worker.stop(reason)
        self.runtime.close()
