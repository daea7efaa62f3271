"""A loaded model as the HTTP layer sees it: prepare a prompt, submit a request, cancel it.

Routes never reach into the runtime, the formatter or the scheduler; this face is all they get.
Preparing (template rendering, tokenizing) is blocking work: callers run it in a worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from appliance.engine.chat import ChatFormatter
from appliance.engine.prompt import ControlTextGuard
from appliance.engine.runtime import LlamaRuntime
from appliance.engine.scheduler import GenerationRequest, Scheduler
from appliance.errors import InvalidValue
from appliance.offload import OffloadPlan
from appliance.registry import ModelEntry


@dataclass
class Prompt:
    text: str  # as the model reads it, for output parsing (e.g. a template that opens <think>)
    tokens: list[int]


@dataclass
class LoadedModel:
    entry: ModelEntry
    runtime: LlamaRuntime
    scheduler: Scheduler
    formatter: ChatFormatter
    plan: OffloadPlan
    enable_thinking: bool
    control_texts: set[str]
    load_seconds: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def n_vocab(self) -> int:
        return self.runtime.n_vocab

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
            "offload": self.plan.describe(),
            "context_per_slot": self.context_per_slot,
            "slots": len(sched.slots),
            "slots_busy": sched.busy_slots,
            "queue": sched.queue_depth,
            "tokens_per_second": round(sched.tokens_per_second(), 2),
            "load_seconds": round(self.load_seconds, 3),
            "in_flight": self.in_flight,
        }
