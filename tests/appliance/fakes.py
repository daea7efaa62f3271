"""A fake llama.cpp runtime for fast in-process tests of the scheduler and the model manager.

Bytes are tokens (0..255); token 256 is a control token `<|ctl|>`, 257 and 258 are `<think>` and
`</think>`; decoding yields the letter after the last token fed, so outputs are predictable (and
never a thinking tag). Hooks inject faults and hold steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from appliance.engine.runtime import RuntimeOptions, ThinkMarkup
from appliance.engine.sampling import SamplingParams
from appliance.errors import LoadFailed

CONTROL = 256
CONTROL_TEXT = "<|ctl|>"
THINK_OPEN, THINK_CLOSE = 257, 258
SPECIAL = {CONTROL: CONTROL_TEXT, THINK_OPEN: "<think>", THINK_CLOSE: "</think>"}


@dataclass
class FakeBatch:
    n_tokens: int = 0
    tokens: list[tuple[int, int, int, bool]] = field(default_factory=list)


class FakeSampler:
    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime
        self.closed = False
        self.accepted: list[int] = []  # tokens the engine forced into the sequence

    def sample(self, runtime: FakeRuntime, batch_index: int) -> int:
        return next_token(runtime.batch.tokens[batch_index][0])

    def accept(self, token: int) -> None:
        self.accepted.append(token)

    def close(self) -> None:
        self.closed = True


def next_token(token: int) -> int:
    return ord("a") + (token + 1) % 26


class FakeRuntime:
    n_vocab = 259
    add_bos = False
    think = ThinkMarkup(THINK_OPEN, THINK_CLOSE, [THINK_OPEN, ord("\n")],
                        [ord("\n"), THINK_CLOSE, ord("\n"), ord("\n")])
    instances: ClassVar[list[FakeRuntime]] = []

    def __init__(self, path: Path, options: RuntimeOptions,
                 on_decode: Callable[[FakeRuntime], int] | None = None) -> None:
        self.path = path
        self.options = options
        self.context_per_slot = options.context_per_slot
        self.batch = FakeBatch()
        self.closed = False
        self.on_decode = on_decode
        self.steps = 0
        self.gate = threading.Event()  # cleared: decode waits (a request held in flight)
        self.gate.set()
        self.copies: list[tuple[int, int]] = []
        FakeRuntime.instances.append(self)

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        tokens: list[int] = []
        rest = text
        while rest:
            special = next((t for t, text in SPECIAL.items() if rest.startswith(text)), None)
            if parse_special and special is not None:
                tokens.append(special)
                rest = rest[len(SPECIAL[special]):]
                continue
            tokens += list(rest[0].encode())
            rest = rest[1:]
        return tokens

    def piece(self, token: int) -> bytes:
        if token == CONTROL:
            return b""
        return SPECIAL[token].encode() if token in SPECIAL else bytes([token])

    def token_text(self, token: int) -> str:
        return SPECIAL.get(token) or chr(token)

    def control_texts(self) -> set[str]:
        return {CONTROL_TEXT}

    def is_end(self, token: int) -> bool:
        return False

    def sampler(self, params: SamplingParams) -> FakeSampler:
        return FakeSampler(self)

    def clear_batch(self) -> None:
        self.batch = FakeBatch()

    def add_to_batch(self, token: int, pos: int, seq: int, logits: bool) -> int:
        self.batch.tokens.append((token, pos, seq, logits))
        self.batch.n_tokens += 1
        return self.batch.n_tokens - 1

    def decode(self) -> int:
        self.gate.wait()
        self.steps += 1
        return self.on_decode(self) if self.on_decode else 0

    def forget(self, seq: int, from_pos: int = 0) -> None:
        pass

    def copy_sequence(self, src: int, dst: int) -> None:
        self.copies.append((src, dst))

    def logits(self, batch_index: int) -> np.ndarray:
        """Certain of the fake's next token: log p = 0 for it, -20 for the rest."""
        out = np.zeros(self.n_vocab, dtype=np.float32)
        out[next_token(self.batch.tokens[batch_index][0])] = 20.0
        return out

    def close(self) -> None:
        self.closed = True


def failing_runtime(path: Path, options: RuntimeOptions) -> FakeRuntime:
    raise LoadFailed(f"llama.cpp could not load {path.name}")


QWEN_LIKE_TEMPLATE = (
    "{% for m in messages %}<|ctl|>{{ m.role }}\n{{ m.content }}<|ctl|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|ctl|>assistant\n{% endif %}")


def write_gguf(path: Path, template: str | None = QWEN_LIKE_TEMPLATE, context: int = 2**24,
               **metadata: int | str) -> Path:
    """A small but well-formed GGUF header (and one tiny tensor) for registry and manager tests;
    the fake runtime never reads the weights."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_block_count(1)
    writer.add_context_length(context)
    writer.add_embedding_length(8)
    writer.add_head_count(1)
    if template is not None:
        writer.add_chat_template(template)
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))  # stays in RAM
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
