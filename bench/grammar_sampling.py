"""Grammar sampling speed: json_schema decoding with the grammar applied last (the engine's way:
check the chain's pick, resample only when the grammar refuses it) against grammar-first (every
token of the vocabulary checked at every step, as before).

    python bench/grammar_sampling.py MODEL.gguf [--tokens 96] [--rounds 3] [--threads 2]

One greedy and one seeded stream per mode and round, through the engine (no HTTP), alternating
the order; the outputs of both modes must be equal for greedy. Grammar-first is emulated by the
same chain with the grammar applied to every candidate before it. Reports tokens/s, the share of
picks the grammar refused, and the ratio. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "summary": {"type": "string", "maxLength": 200},
    "score": {"type": "number", "minimum": 0, "maximum": 100},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
    "required": ["title", "summary", "score", "tags"], "additionalProperties": False}
PROMPT = "<|im_start|>user\nReview the film as JSON<|im_end|>\n<|im_start|>assistant\n"


def run(runtime: object, grammar: str, mode: str, seed: int | None, tokens: int) -> dict:
    from appliance.engine.sampling import SamplerChain, SamplingParams
    from appliance.engine.scheduler import DoneEvent, ErrorEvent, GenerationRequest, Scheduler

    class GrammarFirst(SamplerChain):
        def sample(self, rt: object, batch_index: int) -> int:
            token = self._pick(rt.logits(batch_index), with_grammar=True)  # type: ignore
            self.accept(token)
            return token

    chains: list[SamplerChain] = []

    def sampler(params: SamplingParams) -> SamplerChain:
        chain = (GrammarFirst if mode == "grammar_first" else SamplerChain)(runtime, params)
        chains.append(chain)
        return chain

    runtime.sampler = sampler  # type: ignore[attr-defined]
    scheduler = Scheduler(runtime, n_slots=1, max_queue=1)  # type: ignore[arg-type]
    text: list[str] = []
    stamps: list[float] = []
    done = threading.Event()

    def emit(event: object) -> None:
        if isinstance(event, (DoneEvent, ErrorEvent)):
            stamps.append(time.perf_counter())
            done.set()
        else:
            stamps.append(time.perf_counter())
            text.append(event.text)  # type: ignore[attr-defined]

    params = SamplingParams(temperature=0.0 if seed is None else 0.8, seed=seed, grammar=grammar)
    prompt = runtime.tokenize(PROMPT, add_special=False)  # type: ignore[attr-defined]
    try:
        scheduler.submit(GenerationRequest(prompt, params, tokens, [], emit))
        done.wait(900)
    finally:
        scheduler.stop()
    generated = max(1, len(text) - 1)
    return {"text": "".join(text), "tokens_per_s": generated / (stamps[-1] - stamps[0]),
            "refused": chains[0].resampled / max(1, len(text))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from appliance.api.grammar import response_grammar
    from appliance.api.schemas import ResponseFormat
    from appliance.engine.runtime import LlamaRuntime, RuntimeOptions

    grammar = response_grammar(ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA}}))
    assert grammar
    runtime = LlamaRuntime(args.model, RuntimeOptions(0, 2048, 1, args.threads))
    modes = ("grammar_first", "grammar_last")
    results: dict[str, dict[str, list[dict]]] = {m: {"greedy": [], "seeded": []} for m in modes}
    try:
        for r in range(args.rounds):
            for mode in modes if r % 2 == 0 else reversed(modes):
                results[mode]["greedy"].append(run(runtime, grammar, mode, None, args.tokens))
                results[mode]["seeded"].append(run(runtime, grammar, mode, 7 + r, args.tokens))
    finally:
        runtime.close()
    out: dict = {"model": args.model.name, "threads": args.threads, "tokens": args.tokens,
                 "rounds": args.rounds, "load_avg": os.getloadavg()}
    for mode in modes:
        out[mode] = {kind: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                            "refused_share": statistics.mean(r["refused"] for r in runs)}
                     for kind, runs in results[mode].items()}
    out["greedy_identical"] = all(
        a["text"] == b["text"] for a, b in zip(results["grammar_first"]["greedy"],
                                               results["grammar_last"]["greedy"], strict=True))
    for kind in ("greedy", "seeded"):
        out[f"speedup_{kind}"] = (out["grammar_last"][kind]["tokens_per_s"]
                                  / out["grammar_first"][kind]["tokens_per_s"])
    out["sample_greedy_output"] = results["grammar_last"]["greedy"][0]["text"][:300]
    print(json.dumps(out, indent=2, ensure_ascii=False))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
