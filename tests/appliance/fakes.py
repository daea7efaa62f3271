"""A fake llama.cpp runtime for fast in-process tests of the scheduler and the model manager.

Bytes are tokens (0..255); token 256 is a control token `<|ctl|>`; decoding yields the byte after
the last one fed, so outputs are predictable. Hooks inject faults and hold steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from appliance.engine.runtime import RuntimeOptions
from appliance.engine.sampling import SamplingParams
from appliance.errors import LoadFailed

CONTROL = 256
CONTROL_TEXT = "<|ctl|>"


@dataclass
class FakeBatch:
    n_tokens: int = 0
    tokens: list[tuple[int, int, int, bool]] = field(default_factory=list)


class FakeSampler:
    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime
        self.closed = False

    def sample(self, runtime: FakeRuntime, batch_index: int) -> int:
        token = runtime.batch.tokens[batch_index][0]
        return ord("a") + (token + 1) % 26

    def close(self) -> None:
        self.closed = True


class FakeRuntime:
    n_vocab = 257
    add_bos = False
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
        FakeRuntime.instances.append(self)

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        tokens: list[int] = []
        rest = text
        while rest:
            if parse_special and rest.startswith(CONTROL_TEXT):
                tokens.append(CONTROL)
                rest = rest[len(CONTROL_TEXT):]
                continue
            tokens += list(rest[0].encode())
            rest = rest[1:]
        return tokens

    def piece(self, token: int) -> bytes:
        return b"" if token == CONTROL else bytes([token])

    def token_text(self, token: int) -> str:
        return CONTROL_TEXT if token == CONTROL else chr(token)

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
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
