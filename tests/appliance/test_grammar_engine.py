"""Grammar-constrained generation at scale on the tiny random-weight model: every output is valid.

A random-weight model is the worst writer of JSON there is: it never chooses to stop a string and
puts any character anywhere the grammar lets it. So its answers, many at once through the real
engine with several slots, test what the grammar allows, not what a trained model would write.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.api.grammar import response_grammar, tool_call_grammar
from appliance.api.schemas import ResponseFormat, Tool
from appliance.engine.runtime import LlamaRuntime, RuntimeOptions
from appliance.engine.sampling import SamplingParams
from appliance.engine.scheduler import (
    DoneEvent,
    ErrorEvent,
    Event,
    GenerationRequest,
    Scheduler,
    TextEvent,
)

# llama.cpp's grammar sampler checks all ~150k tokens of the vocabulary for every token it picks
# (30-45 ms on two busy cores), so the default run is small; APPLIANCE_GRAMMAR_RUNS=200 is the run
# bench/results/grammar_validity.md reports.
N = int(os.environ.get("APPLIANCE_GRAMMAR_RUNS", "8"))
SLOTS = 8
# Above the longest output these grammars allow (a token is at least one character: the strings,
# a newline and 20 blanks at each of a dozen places, the rest): a "length" finish means the grammar
# let the output run on. (A free string without maxLength, capped at DEFAULT_MAX_STRING, would
# make each run ~10 times longer: test_grammar.py checks that cap in llama.cpp directly.)
MAX_TOKENS = 600

SEARCH = {"type": "object", "properties": {
    "query": {"type": "string", "maxLength": 60},
    "site": {"type": "string", "maxLength": 20},
    "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
    "required": ["query", "limit"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
ANSWER = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "score": {"type": "number", "minimum": 0, "maximum": 100},
    "count": {"type": "integer", "minimum": -3, "maximum": 999},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "mood": {"enum": ["happy", "sad", "neutral"]},
    "done": {"type": "boolean"},
    "note": {"type": ["string", "null"], "maxLength": 20}},
    "required": ["title", "score", "count", "tags", "mood", "done"],
    "additionalProperties": False}
TOOL_CALL = re.compile(r"<tool_call>\n(.*)\n</tool_call>", re.DOTALL)


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path) -> Iterator[Scheduler]:
    runtime = LlamaRuntime(tiny_gguf, RuntimeOptions(n_gpu_layers=0, context_per_slot=1024,
                                                     n_seq=SLOTS, n_threads=2))
    scheduler = Scheduler(runtime, n_slots=SLOTS, max_queue=N)
    yield scheduler
    scheduler.stop()
    runtime.close()


def generate(engine: Scheduler, prompt: str, grammar: str) -> list[tuple[str, str]]:
    """(text, finish_reason) of N requests with seeds 0..N-1, all submitted at once."""
    tokens = engine.runtime.tokenize(prompt, add_special=False)
    results: list[tuple[str, str]] = []
    finished = threading.Semaphore(0)

    def collector() -> Callable[[Event], None]:
        pieces: list[str] = []

        def emit(event: Event) -> None:  # engine thread
            if isinstance(event, TextEvent):
                pieces.append(event.text)
                return
            if isinstance(event, ErrorEvent):
                pieces.append(repr(event.error))
            reason = event.finish_reason if isinstance(event, DoneEvent) else "error"
            results.append(("".join(pieces), reason))
            finished.release()
        return emit

    for seed in range(N):
        sampling = SamplingParams(grammar=grammar, temperature=1.0, seed=seed)
        engine.submit(GenerationRequest(tokens, sampling, MAX_TOKENS, [], collector()))
    deadline = time.monotonic() + 120 + 15 * N  # 3-4 s per request on two busy cores
    for _ in range(N):
        assert finished.acquire(timeout=max(0.0, deadline - time.monotonic())), "engine stalled"
    return results


def chat(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def check_answer(value: object) -> None:
    """ANSWER, checked by hand (the subset it uses)."""
    assert isinstance(value, dict)
    assert set(value) <= set(ANSWER["properties"]) and set(ANSWER["required"]) <= set(value)
    assert isinstance(value["title"], str) and len(value["title"]) <= 40
    assert isinstance(value["score"], (int, float)) and 0 <= value["score"] <= 100
    assert type(value["count"]) is int and -3 <= value["count"] <= 999
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 4
    assert all(isinstance(t, str) and len(t) <= 12 for t in value["tags"])
    assert value["mood"] in ("happy", "sad", "neutral")
    assert isinstance(value["done"], bool)
    assert value.get("note") is None or (isinstance(value["note"], str)
                                         and len(value["note"]) <= 20)


def check_call(value: object) -> None:
    assert isinstance(value, dict) and set(value) == {"name", "arguments"}
    args = value["arguments"]
    assert isinstance(args, dict)
    if value["name"] == "search":
        assert set(args) <= {"query", "site", "limit"} and {"query", "limit"} <= set(args)
        assert isinstance(args["query"], str) and len(args["query"]) <= 60
        assert isinstance(args.get("site", ""), str) and len(args.get("site", "")) <= 20
        assert type(args["limit"]) is int and 1 <= args["limit"] <= 50
    else:
        assert value["name"] == "get_weather" and set(args) == {"city", "unit"}
        assert isinstance(args["city"], str) and len(args["city"]) <= 30
        assert args["unit"] in ("celsius", "fahrenheit")


def failures(results: list[tuple[str, str]], parse: object) -> list[str]:
    bad = []
    for text, reason in results:
        try:
            assert reason == "stop", f"finished by {reason}"
            parse(text)  # type: ignore[operator]
        except (AssertionError, ValueError) as e:
            bad.append(f"{e!r}: {text!r}")
    return bad


def test_forced_tool_calls_always_parse(engine: Scheduler) -> None:
    tools = [Tool.model_validate({"type": "function", "function": {"name": n, "parameters": p}})
             for n, p in (("search", SEARCH), ("get_weather", WEATHER))]
    grammar = tool_call_grammar(tools, None)  # tool_choice "required"
    results = generate(engine, chat("Find me something."), grammar)

    def parse(text: str) -> None:
        match = TOOL_CALL.fullmatch(text.strip(" \n\t"))
        assert match, "not one <tool_call> block"
        check_call(json.loads(match.group(1)))

    bad = failures(results, parse)
    assert not bad, f"{len(bad)} of {N} invalid, e.g. {bad[:3]}"


def test_json_schema_answers_always_validate(engine: Scheduler) -> None:
    fmt = ResponseFormat.model_validate({"type": "json_schema",
                                         "json_schema": {"name": "a", "schema": ANSWER}})
    grammar = response_grammar(fmt)
    assert grammar is not None
    results = generate(engine, chat("Describe your day as JSON."), grammar)

    def parse(text: str) -> None:
        value = json.loads(text)
        check_answer(value)
        try:
            import jsonschema
        except ImportError:
            return
        jsonschema.validate(value, ANSWER)

    bad = failures(results, parse)
    assert not bad, f"{len(bad)} of {N} invalid, e.g. {bad[:3]}"
