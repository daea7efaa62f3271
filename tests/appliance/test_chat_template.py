"""Chat templates come from files anyone can publish: rendering is bounded in time and size."""

from __future__ import annotations

import time

import pytest

from appliance.engine.chat import (
    RENDER_SECONDS,
    TEMPLATE_MAX_CHARS,
    ChatFormatter,
    TemplateTooCostly,
    compile_template,
)
from appliance.errors import InvalidRequest

MESSAGES = [{"role": "user", "content": "hi"}]


def formatter(template: str) -> ChatFormatter:
    return ChatFormatter(template, bos_token="", eos_token="", architecture="qwen3")


def test_a_template_that_loops_for_ever_is_stopped_in_time() -> None:
    spin = ("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
            "{% endfor %}{% endfor %}{% endfor %}")
    started = time.monotonic()
    with pytest.raises(TemplateTooCostly, match="ran past"):
        formatter(spin).render(MESSAGES)
    assert time.monotonic() - started < RENDER_SECONDS + 1


def test_a_template_that_writes_gigabytes_is_stopped() -> None:
    flood = "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}"
    with pytest.raises(TemplateTooCostly, match="output"):
        formatter(flood).render(MESSAGES)


def test_a_template_that_fails_is_a_clear_error() -> None:
    with pytest.raises(InvalidRequest, match="template failed"):
        formatter("{{ messages[5].content }}{{ 1 / 0 }}").render(MESSAGES)
    with pytest.raises(InvalidRequest, match="does not compile"):
        compile_template("{% for m in messages %}")
    with pytest.raises(InvalidRequest, match="characters"):
        compile_template("x" * (TEMPLATE_MAX_CHARS + 1))


def test_the_sandbox_holds() -> None:
    with pytest.raises(InvalidRequest):
        formatter("{{ ''.__class__.__mro__[1].__subclasses__() }}").render(MESSAGES)


def test_a_normal_template_renders_as_before() -> None:
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert formatter(template).render(MESSAGES) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
