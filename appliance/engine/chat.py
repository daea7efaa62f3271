"""Chat messages → prompt text with the model's own Jinja chat template (from the GGUF).

Rendered the way transformers renders it (sandboxed Jinja, trim_blocks, lstrip_blocks,
`tojson`), so a template behaves as on the hub. A GGUF without a template gets llama.cpp's
built-in template for its architecture, or ChatML.
"""

from __future__ import annotations

import ctypes
import datetime
import json
from typing import Any

import jinja2
import jinja2.ext
import llama_cpp
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.errors import InvalidRequest


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
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            self._template = env.from_string(template)
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
            try:
                return self._template.render(
                    messages=messages, tools=tools or None,
                    add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                    bos_token=self.bos_token, eos_token=self.eos_token)
            except InvalidRequest:
                raise
            except jinja2.TemplateError as e:
                raise InvalidRequest(f"the model's chat template failed: {e}") from None
        return self._render_builtin(messages, add_generation_prompt)

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
