"""Per-request sampling: parameters and the llama.cpp sampler chain built from them.

A grammar is applied last, as llama.cpp's common_sampler does: the chain picks a token from the
whole distribution, the grammar checks that one token, and only when it refuses is the grammar
applied to every candidate and the chain run again. llama.cpp's grammar sampler costs tens of
milliseconds when it checks all ~150k tokens, and the first pick is usually allowed. For greedy
sampling the result is the token grammar-first gives (the best allowed token either way).
"""

from __future__ import annotations

import ctypes
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np

from appliance.errors import InvalidRequest

if TYPE_CHECKING:
    from appliance.engine.runtime import LlamaRuntime

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed per chain
# llama_token_data {id, logit, p}: a numpy record array passes to llama.cpp as the candidates.
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF, root rule "root"
    # The grammar shapes only the answer after the model's own `</think>` (lazy: thinking is free).
    grammar_after_think: bool = False


def after_think(grammar: str) -> str:
    """`grammar` preceded by `</think>` and the blank line after it: a lazy grammar triggered by
    the `</think>` token starts by accepting that token's text."""
    body = re.sub(r"^root\s*::=", "answer ::=", grammar, count=1, flags=re.MULTILINE)
    return 'root ::= "</think>" [ \\n]{0,4} answer\n' + body


class GrammarRefused(Exception):
    """The grammar cannot take a token the engine wanted to put in the sequence."""


class SamplerChain:
    """Owns a llama_sampler chain (and a grammar sampler beside it); free it with close()."""

    def __init__(self, runtime: LlamaRuntime, params: SamplingParams) -> None:
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.ptr = llama_cpp.llama_sampler_chain_init(chain_params)
        self.grammar: ctypes.c_void_p | None = None
        self._candidates: np.ndarray | None = None  # reused: 150k candidates per token
        self._ids: np.ndarray | None = None
        self.resampled = 0  # picks the grammar refused (each cost a full grammar pass)
        add = lambda s: llama_cpp.llama_sampler_chain_add(self.ptr, s)  # noqa: E731
        try:
            if params.grammar:
                self.grammar = self._grammar(runtime, params)
                if not self.grammar:
                    raise InvalidRequest("the grammar for response_format could not be parsed",
                                         param="response_format")
            if params.logit_bias:
                biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))()
                for i, (token, bias) in enumerate(params.logit_bias.items()):
                    biases[i].token = token
                    biases[i].bias = bias
                add(llama_cpp.llama_sampler_init_logit_bias(runtime.n_vocab,
                                                            len(params.logit_bias), biases))
            if (params.presence_penalty or params.frequency_penalty
                    or params.repeat_penalty != 1.0):
                add(llama_cpp.llama_sampler_init_penalties(
                    runtime.n_vocab, 64, params.repeat_penalty, params.frequency_penalty,
                    params.presence_penalty))
            if params.temperature <= 0:
                add(llama_cpp.llama_sampler_init_greedy())
            else:
                if params.top_k > 0:
                    add(llama_cpp.llama_sampler_init_top_k(params.top_k))
                if params.top_p < 1.0:
                    add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
                if params.min_p > 0:
                    add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
                add(llama_cpp.llama_sampler_init_temp(params.temperature))
                seed = DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
                add(llama_cpp.llama_sampler_init_dist(seed))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _grammar(runtime: LlamaRuntime, params: SamplingParams) -> ctypes.c_void_p:
        assert params.grammar
        if not params.grammar_after_think:
            return llama_cpp.llama_sampler_init_grammar(runtime.vocab, params.grammar.encode(),
                                                        b"root")
        if runtime.think is None:
            raise InvalidRequest("this model has no </think> token, so a grammar cannot wait "
                                 "for the end of thinking: turn thinking off",
                                 param="chat_template_kwargs.enable_thinking")
        # A trigger token, not a pattern: llama.cpp matches patterns with std::regex against all
        # the text so far, at every token, which grows with the thinking.
        triggers = (llama_cpp.llama_token * 1)(runtime.think.close)
        return llama_cpp.llama_sampler_init_grammar_lazy_patterns(
            runtime.vocab, after_think(params.grammar).encode(), b"root", None, 0, triggers, 1)

    def accept(self, token: int) -> None:
        """Record a token the engine put in the sequence itself (penalties and grammar see it).
        Raises GrammarRefused, leaving the chain as it was, when the grammar cannot take it:
        llama.cpp throws a C++ exception there, which aborts the whole process."""
        if self.grammar and not self._allows(token):
            raise GrammarRefused(f"the grammar refuses token {token} here")
        self._record(token)

    def _record(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.ptr, token)
        if self.grammar:
            llama_cpp.llama_sampler_accept(self.grammar, token)

    def sample(self, runtime: LlamaRuntime, batch_index: int) -> int:
        """Pick the next token from the logits at `batch_index` (and accept it into the chain)."""
        if not self.grammar:
            return llama_cpp.llama_sampler_sample(self.ptr, runtime.ctx, batch_index)
        logits = runtime.logits(batch_index)
        token = self._pick(logits, with_grammar=False)
        if not self._allows(token):
            self.resampled += 1
            token = self._pick(logits, with_grammar=True)
        self._record(token)  # allowed: checked, or picked by the grammar
        return token

    def _pick(self, logits: np.ndarray, with_grammar: bool) -> int:
        """Run the chain (after the grammar, if asked) over every token; accept nothing."""
        if self._candidates is None or len(self._candidates) != len(logits):
            self._candidates = np.zeros(len(logits), dtype=TOKEN_DATA)
            self._ids = np.arange(len(logits), dtype=np.int32)
        cur = self._candidates
        # The chain sorts and truncates the array in place: refill all of it every time.
        cur["id"] = self._ids
        cur["logit"] = logits
        cur["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            cur.ctypes.data_as(llama_cpp.llama_token_data_p), len(cur), -1, False)
        if with_grammar:
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self.ptr, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise RuntimeError("the sampler chain selected no token")
        return int(array.data[array.selected].id)

    def _allows(self, token: int) -> bool:
        """Whether the grammar accepts `token` next (a one-candidate array, as llama.cpp's
        common_sampler checks it)."""
        single = llama_cpp.llama_token_data(token, 1.0, 0.0)
        array = llama_cpp.llama_token_data_array(ctypes.pointer(single), 1, -1, False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        return not math.isinf(single.logit)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None
