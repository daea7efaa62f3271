"""Log-probabilities of sampled tokens, from the model's raw distribution at each position.

OpenAI documents logprobs as the model's own view of the token, so they come from a log-softmax of
the raw logits: before temperature, penalties, logit_bias or a grammar shape the choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_TOP_LOGPROBS = 20  # OpenAI's own bound


@dataclass(frozen=True)
class Alternative:
    token: int
    piece: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token: its bytes, its log-probability, and the most likely tokens there."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[Alternative, ...]


def log_softmax_at(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) and the `top` most likely (token, log p), most likely first."""
    peak = float(logits.max())
    # One pass of exp over the vocabulary (~150k floats) is the whole cost: no copy to float64.
    log_norm = peak + float(np.log(np.exp(logits - peak, dtype=np.float32).sum(dtype=np.float64)))
    best: list[tuple[int, float]] = []
    if top > 0:
        ids = np.argpartition(logits, -top)[-top:]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        best = [(int(i), float(logits[i]) - log_norm) for i in ids]
    return float(logits[token]) - log_norm, best
