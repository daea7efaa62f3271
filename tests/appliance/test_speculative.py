"""Speculative decoding on real llama.cpp: a Q8_0 target and a Q4_0 draft of the same random
weights. Whatever the draft guesses, each request's output is token for token what the target
alone produces: greedy and seeded, with a grammar, stop strings, penalties, n choices, logprobs,
a thinking budget, and four streams at once."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance.api.grammar import response_grammar
from appliance.api.schemas import ResponseFormat
from appliance.engine.draft import (
    TIMED_CATCH_UP_TOKENS,
    DraftBudget,
    DraftLength,
    DraftModel,
    DraftWant,
)
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
from tests.appliance.conftest import Daemon, run_daemon
from tests.conftest import MODEL_A

OPTIONS = RuntimeOptions(n_gpu_layers=0, context_per_slot=512, n_seq=4, n_threads=2)
GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=0.4, seed=11)
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


class EveryStep(DraftBudget):
    """Draft at every step, whatever it costs: these tests are about output, not speed."""

    def depth(self, streams: int, other_tokens: int) -> int:
        return self.draft_max


@dataclass
class Outcome:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str = ""
    choices: dict[int, str] = field(default_factory=dict)


@dataclass
class Engines:
    target: LlamaRuntime
    draft: DraftModel

    def run(self, specs: list[dict], drafted: bool) -> tuple[list[Outcome], tuple[int, int]]:
        """Submit every request at once; their outcomes, and (proposed, accepted) drafts."""
        scheduler = Scheduler(self.target, n_slots=4, max_queue=8,
                              draft=self.draft if drafted else None,
                              draft_budget=EveryStep(draft_max=6))
        try:
            outcomes = [Outcome() for _ in specs]
            finished = threading.Semaphore(0)
            ends = 0
            for spec, outcome in zip(specs, outcomes, strict=True):
                spec = dict(spec)
                prompt = self.target.tokenize(spec.pop("prompt"), add_special=False)
                n = spec.get("n", 1)
                ends += n

                def emit(event: Event, outcome: Outcome = outcome) -> None:  # engine thread
                    if isinstance(event, TextEvent):
                        outcome.choices[event.index] = outcome.choices.get(event.index, "") \
                            + event.text
                        if event.index == 0:
                            outcome.text += event.text
                            for lp in event.logprobs or []:
                                outcome.tokens.append(lp.token)
                                outcome.logprobs.append(lp.logprob)
                        return
                    if isinstance(event, ErrorEvent):
                        outcome.finish = f"error: {event.error!r}"
                    elif isinstance(event, DoneEvent) and event.index == 0:
                        outcome.finish = event.finish_reason
                    finished.release()

                scheduler.submit(GenerationRequest(prompt, emit=emit, **{
                    "max_tokens": 40, "stop": [], "sampling": GREEDY, "logprobs": 0, **spec}))
            deadline = time.monotonic() + 300
            for _ in range(ends):
                assert finished.acquire(timeout=max(0.0, deadline - time.monotonic())), \
                    "the engine stalled"
            return outcomes, (scheduler.draft_proposed, scheduler.draft_accepted)
        finally:
            scheduler.stop()

    def compare(self, specs: list[dict]) -> tuple[list[Outcome], tuple[int, int]]:
        """Outcomes with the draft, after checking they equal those without it."""
        alone, _ = self.run(specs, drafted=False)
        drafted, counts = self.run(specs, drafted=True)
        for a, b in zip(alone, drafted, strict=True):
            assert not a.finish.startswith("error"), a.finish
            assert b.tokens == a.tokens
            assert (b.text, b.finish, b.choices) == (a.text, a.finish, a.choices)
            # Same tokens from logits computed in a larger batch: equal up to float rounding.
            assert b.logprobs == pytest.approx(a.logprobs, abs=2e-3)
        assert counts[0] > 0, "the draft proposed nothing: the test would prove nothing"
        return drafted, counts


@pytest.fixture(scope="module")
def engines(draft_pair: tuple[Path, Path]) -> Iterator[Engines]:
    target_path, draft_path = draft_pair
    target = LlamaRuntime(target_path, OPTIONS)
    # Random weights are unsure of every token: propose even the unlikely ones, so that both
    # accepted and rejected guesses occur.
    draft = DraftModel(LlamaRuntime(draft_path, OPTIONS), "draft", p_min=0.0)
    yield Engines(target, draft)
    draft.close()
    target.close()


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def test_greedy_and_seeded_output_is_the_targets_own(engines: Engines) -> None:
    _, (proposed, accepted) = engines.compare([
        {"prompt": chat("Tell me a story"), "sampling": GREEDY},
        {"prompt": chat("Tell me a story"), "sampling": SEEDED},
    ])
    # Both paths ran: guesses taken, and guesses refused.
    assert 0 < accepted < proposed


def test_a_json_schema_grammar_is_kept_and_the_output_unchanged(engines: Engines) -> None:
    grammar = response_grammar(ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}))
    outcomes, _ = engines.compare([
        {"prompt": chat("Describe a person as JSON"), "max_tokens": 300,
         "sampling": SamplingParams(temperature=0.0, grammar=grammar)},
        {"prompt": chat("Describe a person as JSON"), "max_tokens": 300,
         "sampling": SamplingParams(temperature=0.7, seed=3, grammar=grammar)},
    ])
    for outcome in outcomes:
        assert outcome.finish == "stop", outcome.text
        value = json.loads(outcome.text)
        assert set(value) == {"name", "age", "tags"} and 0 <= value["age"] <= 120


def test_stop_strings_cut_at_the_same_place(engines: Engines) -> None:
    free, _ = engines.run([{"prompt": chat("Count")}], drafted=False)
    stop = free[0].text[12:15]  # a string the output reaches mid-way
    assert len(stop) == 3
    outcomes, _ = engines.compare([{"prompt": chat("Count"), "stop": [stop]},
                                   {"prompt": chat("Count"), "stop": [stop], "sampling": SEEDED}])
    assert outcomes[0].finish == "stop" and stop not in outcomes[0].text


def test_four_concurrent_streams_each_get_their_own_output(engines: Engines) -> None:
    engines.compare([
        {"prompt": chat("One"), "sampling": GREEDY, "max_tokens": 48},
        {"prompt": chat("Two two"), "sampling": SamplingParams(temperature=0.8, seed=1)},
        {"prompt": chat("Three three three"), "sampling": GREEDY, "max_tokens": 24},
        {"prompt": chat("Four"), "sampling": SamplingParams(temperature=0.3, seed=9)},
    ])


def test_penalties_bias_n_choices_and_a_thinking_budget_keep_working(engines: Engines) -> None:
    engines.compare([
        {"prompt": chat("Penalties"), "sampling": SamplingParams(
            temperature=0.0, repeat_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4,
            logit_bias={13: 5.0, 11: -3.0})},
        {"prompt": chat("Two choices"), "n": 2, "sampling": SamplingParams(temperature=0.5,
                                                                         seed=4)},
        {"prompt": chat("Think"), "open_thinking": True, "thinking_budget": 6,
         "sampling": GREEDY},
    ])


# -- through the daemon ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drafting_daemon(tiny_gguf: Path, tiny_checkpoint: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The tiny model with a Q4_0 of its own weights as its configured draft."""
    from converter.pipeline import ConvertOptions, convert

    folder = tmp_path_factory.mktemp("drafting-models")
    shutil.copy(tiny_gguf, folder / f"{MODEL_A}.gguf")
    convert(ConvertOptions(source=str(tiny_checkpoint), out=folder / "tiny-draft-q4_0.gguf",
                           quant="Q4_0", quiet=True))
    config = folder.parent / "drafting.toml"
    config.write_text(f'[models.{MODEL_A}]\ndraft = "tiny-draft-q4_0"\n')
    with run_daemon(folder, tmp_path_factory.mktemp("drafting-daemon"), config=str(config),
                    default_model=MODEL_A, parallel="2") as daemon:
        yield daemon


def test_the_daemon_drafts_and_counts_it(drafting_daemon: Daemon) -> None:
    from openai import OpenAI

    with drafting_daemon.http() as http:
        deadline = time.monotonic() + 120
        while (http.get("/api/status").json().get("model") or {}).get("id") != MODEL_A:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.2)
        draft = http.get("/api/status").json()["model"]["draft"]
        assert draft["model"] == "tiny-draft-q4_0" and draft["reason"] == "set in configuration"
    client = OpenAI(base_url=drafting_daemon.base_url, api_key="unused", max_retries=0)
    reply = client.completions.create(model=MODEL_A, prompt="Once upon a time", max_tokens=32,
                                      temperature=0.0)
    assert reply.usage.completion_tokens == 32
    with drafting_daemon.http() as http:
        metrics = http.get("/metrics").text
        status = http.get("/api/status").json()["model"]["draft"]
    proposed = metric(metrics, "appliance_draft_tokens_total")
    accepted = metric(metrics, "appliance_draft_accepted_total")
    assert proposed > 0 and 0 < accepted <= proposed
    assert (status["proposed_tokens"], status["accepted_tokens"]) == (proposed, accepted)


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


# -- how much to draft (pure) -----------------------------------------------------------------


def budget_after(step_s: Callable[[int], float], round_s: float,
                 acceptance: float) -> DraftBudget:
    budget = DraftBudget(draft_max=8)
    for _ in range(20):
        for n in (1, 3, 5, 9):
            budget.observe_step(n, step_s(n))
        budget.observe_draft(1, round_s, 10, round(10 * acceptance))
    return budget


def test_drafting_pays_where_a_step_of_several_tokens_costs_about_one() -> None:
    gpu = budget_after(lambda n: 0.020 + 0.0002 * n, round_s=0.003, acceptance=0.7)
    assert gpu.depth(1, 0) >= 3
    # Many busy slots make the step compute-bound even on a GPU: less or no drafting.
    assert gpu.depth(32, 0) < gpu.depth(1, 0)


def test_drafting_stops_where_each_verified_token_costs_a_decoded_one() -> None:
    cpu = budget_after(lambda n: 0.030 * n, round_s=0.010, acceptance=0.7)
    assert cpu.depth(1, 0) == 0
    # ...but it tries again now and then, to notice when that changes.
    assert any(cpu.depth(1, 0) for _ in range(DraftBudget.EXPLORE_EVERY))


def test_a_streams_draft_length_follows_its_acceptance() -> None:
    length = DraftLength(limit=8)
    start = length.length
    length.update(proposed=start, accepted=start)
    assert length.length == start + 2
    length.update(proposed=6, accepted=1)
    assert length.length == 2
    for _ in range(10):
        length.update(proposed=length.length, accepted=length.length)
    assert length.length == 8


def test_reading_a_prompt_is_not_timed_as_a_guessing_round(engines: Engines) -> None:
    """The draft's first decode for a new stream reads its whole prompt: timing that as a guess
    round made DraftBudget think guessing costs a prompt's time and stop drafting for good."""
    draft = engines.draft
    prompt = engines.target.tokenize(chat("Tell me about rivers and the sea. " * 8),
                                     add_special=False)
    assert len(prompt) > TIMED_CATCH_UP_TOKENS
    draft.runtime.forget(0)
    draft.cached.pop(0, None)
    first = draft.propose([DraftWant(0, prompt, 3)])
    guessed = first.drafts.get(0, [])
    assert first.rounds == len(guessed) - 1 if guessed else first.rounds == 0
    # In step: the accepted guesses plus the target's token are read, and that decode counts.
    follow = prompt + guessed + [guessed[0] if guessed else prompt[-1]]
    second = draft.propose([DraftWant(0, follow, 3)])
    assert second.rounds >= 1 and second.seconds > 0
    draft.runtime.forget(0)
    draft.cached.pop(0, None)
