"""Chat messages → prompt text with the model's own Jinja chat template (from the GGUF).

Rendered the way transformers renders it (sandboxed Jinja, trim_blocks, lstrip_blocks,
`tojson`), so a template behaves as on the hub. A GGUF without a template gets llama.cpp's
built-in template for its architecture, or ChatML.

The template comes from a file anyone can publish, so rendering is bounded: a deadline checked on
every call, attribute and item access inside the template, and a cap on the output's size.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import threading
import time
from typing import Any

import jinja2
import jinja2.ext
import llama_cpp
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.errors import InvalidRequest

RENDER_SECONDS = 2.0
RENDER_MAX_CHARS = 16 * 2**20  # well past any context: four times the largest request body
TEMPLATE_MAX_CHARS = 256 * 1024


class TemplateTooCostly(InvalidRequest):
    """Rendering ran past its time or size budget."""


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """A sandbox whose every call and lookup checks the render's deadline (thread-local)."""

    budget = threading.local()

    def _check(self) -> None:
        deadline = getattr(self.budget, "deadline", None)
        if deadline is not None and time.monotonic() > deadline:
            raise TemplateTooCostly(f"the chat template ran past {RENDER_SECONDS:g} s")

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self._check()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self._check()
        return super().getitem(obj, argument)


def compile_template(template: str) -> jinja2.Template:
    """The template compiled in our sandbox; InvalidRequest when it is too large or broken."""
    if len(template) > TEMPLATE_MAX_CHARS:
        raise InvalidRequest(f"the chat template has {len(template)} characters (at most "
                             f"{TEMPLATE_MAX_CHARS})")
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                          extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except (jinja2.TemplateError, RecursionError, MemoryError, ValueError) as e:
        raise InvalidRequest(f"the chat template does not compile: {e}") from None


def _raise(message: str) -> None:
    raise InvalidRequest(f"the chat template refused the messages: {message}")


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def builtin_templates() -> set[str]:
    n = llama_cpp.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * max(n, 1))()
    llama_cpp.llama_chat_builtin_templates(names, n)
    return {names[i].decode() for i in range(n)}


def builtin_for(architecture: str) -> str:
    """llama.cpp's template for an architecture: `gemma3` → `gemma`, `llama` → `llama3`..."""
    known = builtin_templates()
    family = architecture.rstrip("0123456789.")
    for name in (architecture, family, {"llama": "llama3", "qwen": "chatml"}.get(family, "")):
        if name in known:
            return name
    return "chatml"


class ChatFormatter:
    """Renders OpenAI-style messages with a Jinja template or a llama.cpp built-in one."""

    def __init__(self, template: str | None, *, bos_token: str, eos_token: str,
                 architecture: str) -> None:
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._builtin: str | None = None
        self._template: jinja2.Template | None = None
        if template:
            self._template = compile_template(template)
        else:
            self._builtin = builtin_for(architecture)

    @property
    def supports_thinking(self) -> bool:
        return bool(self.source and "enable_thinking" in self.source)

    @property
    def supports_tools(self) -> bool:
        return bool(self.source and "tools" in self.source)

    def render(self, messages: list[dict[str, Any]], *, tools: list[dict] | None = None,
               enable_thinking: bool = True, add_generation_prompt: bool = True) -> str:
        if self._template is not None:
            return self._render_bounded(messages=messages, tools=tools or None,
                                        add_generation_prompt=add_generation_prompt,
                                        enable_thinking=enable_thinking,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        return self._render_builtin(messages, add_generation_prompt)

    def _render_bounded(self, **context: Any) -> str:
        assert self._template is not None
        budget = _BoundedSandbox.budget
        budget.deadline = time.monotonic() + RENDER_SECONDS
        parts: list[str] = []
        size = 0
        try:
            for part in self._template.generate(**context):
                size += len(part)
                if size > RENDER_MAX_CHARS:
                    raise TemplateTooCostly("the chat template's output is over "
                                            f"{RENDER_MAX_CHARS} characters")
                parts.append(part)
                if time.monotonic() > budget.deadline:
                    raise TemplateTooCostly(f"the chat template ran past {RENDER_SECONDS:g} s")
        except InvalidRequest:
            raise
        except (jinja2.TemplateError, RecursionError, MemoryError, TypeError, ValueError,
                AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as e:
            raise InvalidRequest(f"the model's chat template failed: {e}") from None
        finally:
            budget.deadline = None
        return "".join(parts)

    def _render_builtin(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        assert self._builtin is not None
        encoded = [(str(m.get("role", "user")).encode(), str(m.get("content") or "").encode())
                   for m in messages]
        chat = (llama_cpp.llama_chat_message * len(encoded))()
        for i, (role, content) in enumerate(encoded):
            chat[i].role = role
            chat[i].content = content
        size = 1024 + sum(len(c) + 64 for _, c in encoded)
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(self._builtin.encode(), chat, len(encoded),
                                                add_generation_prompt, buffer, size)
        if n > size:
            buffer = ctypes.create_string_buffer(n)
            n = llama_cpp.llama_chat_apply_template(self._builtin.encode(), chat, len(encoded),
                                                    add_generation_prompt, buffer, n)
        if n < 0:
            raise InvalidRequest(f"llama.cpp's {self._builtin} template cannot format these "
                                 "messages")
        return buffer.raw[:n].decode("utf-8", errors="replace")
