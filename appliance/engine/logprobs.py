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


# Tokens this far below the best add under 150k * e^-30 (about 1e-8) to the normalizer: below
# float32's resolution, so the exp pass skips them (most of a real model's vocabulary).
NEGLIGIBLE = 30.0
NEAR_TOP = 10.0  # the likeliest tokens are looked for among these first


def log_softmax_at(logits: np.ndarray, token: int, top: int
                   ) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) and the `top` most likely (token, log p), most likely first."""
    peak = float(logits.max())
    near = logits >= peak - NEGLIGIBLE
    # A gather only pays when it leaves few: a flat distribution takes the plain passes.
    kept = logits[near] if np.count_nonzero(near) < logits.size // 4 else logits
    log_norm = peak + float(np.log(np.exp(kept - peak).sum(dtype=np.float64)))
    best: list[tuple[int, float]] = []
    if top > 0:
        ids = np.flatnonzero(logits >= peak - NEAR_TOP)
        if not top <= len(ids) <= 4096:
            ids = np.argpartition(logits, -top)[-top:]
        ids = ids[np.argsort(-logits[ids], kind="stable")][:top]
        best = [(int(i), float(logits[i]) - log_norm) for i in ids]
    return float(logits[token]) - log_norm, best
