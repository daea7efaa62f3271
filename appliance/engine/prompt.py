"""Chat prompt → tokens, where only the template's own markup can become control tokens.

A rendered prompt mixes the template's markup (`<|im_start|>user`) with text from the client
(messages, tool definitions). Tokenizing it all with special-token parsing would let a user
message containing `<|im_start|>system` forge a turn. So before rendering, every control token's
text inside client strings is swapped for an opaque placeholder; after rendering, the prompt is
tokenized piecewise: markup with special parsing, each swapped-out text as plain text.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

Tokenize = Callable[[str, bool, bool], list[int]]  # (text, add_special, parse_special)


class ControlTextGuard:
    """Swaps control-token texts in client strings for placeholders, for one render."""

    def __init__(self, control_texts: set[str]) -> None:
        texts = sorted((t for t in control_texts if t), key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, texts))) if texts else None
        # Private-use characters and a random tag: a client cannot guess or forge them.
        self._tag = secrets.token_hex(6)
        self._placeholder = re.compile(f"\ue000{self._tag}:(\\d+)\ue001")
        self.originals: list[str] = []

    def protect(self, value: Any) -> Any:
        """`value` (strings, lists and dicts of them) with control texts swapped out."""
        if isinstance(value, str):
            if self._pattern is None:
                return value
            return self._pattern.sub(self._swap, value)
        if isinstance(value, list):
            return [self.protect(v) for v in value]
        if isinstance(value, dict):
            return {k: self.protect(v) for k, v in value.items()}
        return value

    def _swap(self, match: re.Match[str]) -> str:
        self.originals.append(match.group(0))
        return f"\ue000{self._tag}:{len(self.originals) - 1}\ue001"

    def tokenize(self, rendered: str, tokenize: Tokenize, add_bos: bool) -> list[int]:
        """Tokens of the rendered prompt: markup parsed for special tokens, client text not."""
        if not self.originals:
            return tokenize(rendered, add_bos, True)
        tokens: list[int] = []
        start = 0
        for match in self._placeholder.finditer(rendered):
            tokens += tokenize(rendered[start:match.start()], add_bos and not tokens, True)
            tokens += tokenize(self.originals[int(match.group(1))], False, False)
            start = match.end()
        tokens += tokenize(rendered[start:], False, True)
        return tokens

    def restore(self, rendered: str) -> str:
        """The prompt text as the model sees it (placeholders back to their text)."""
        return self._placeholder.sub(lambda m: self.originals[int(m.group(1))], rendered)
