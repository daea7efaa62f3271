"""Grammar-last sampling on real llama.cpp: the same greedy tokens as applying the grammar to every
candidate first, and the grammar is held where the chain's first pick breaks it."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.api.grammar import response_grammar
from appliance.api.schemas import ResponseFormat
from appliance.engine.runtime import LlamaRuntime, RuntimeOptions
from appliance.engine.sampling import SamplerChain, SamplingParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "n"], "additionalProperties": False}


class GrammarFirst(SamplerChain):
    """The grammar over every candidate at every step: the reference."""

    def sample(self, runtime: LlamaRuntime, batch_index: int) -> int:
        token = self._pick(runtime.logits(batch_index), with_grammar=True)
        self.accept(token)
        return token


def test_greedy_grammar_last_picks_what_grammar_first_picks(tiny_gguf: Path) -> None:
    grammar = response_grammar(ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}))
    rt = LlamaRuntime(tiny_gguf, RuntimeOptions(0, 512, 1, 2))
    params = SamplingParams(temperature=0.0, grammar=grammar)
    last, first = SamplerChain(rt, params), GrammarFirst(rt, params)
    try:
        tokens = rt.tokenize("<|im_start|>user\nJSON<|im_end|>\n<|im_start|>assistant\n",
                             add_special=False)
        rt.clear_batch()
        for i, token in enumerate(tokens):
            rt.add_to_batch(token, i, 0, i == len(tokens) - 1)
        out: list[int] = []
        for _ in range(80):
            assert rt.decode() == 0
            token = last.sample(rt, rt.batch.n_tokens - 1)
            assert first.sample(rt, rt.batch.n_tokens - 1) == token
            if rt.is_end(token):
                break
            out.append(token)
            rt.clear_batch()
            rt.add_to_batch(token, len(tokens) + len(out) - 1, 0, True)
        assert rt.is_end(token), "the grammar let the output run on"
        value = json.loads(b"".join(rt.piece(t) for t in out))
        assert set(value) == {"name", "n"}
        # The random model's own first picks break the grammar: the resampling path ran.
        assert last.resampled > 0
    finally:
        last.close()
        first.close()
        rt.close()
