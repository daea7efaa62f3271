"""Split a Qwen chat completion as it streams: thinking → `reasoning_content`, `<tool_call>`
blocks → `tool_calls`, the rest → `content`."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from appliance.engine.text import partial_suffix

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it


class ChatOutputParser:
    """Feed text pieces in order; get reasoning and content deltas back; tool calls at the end."""

    def __init__(self, *, prompt: str, parse_tools: bool, forced_tool: bool = False) -> None:
        # Some templates open the thinking block in the prompt itself.
        self._mode = "reasoning" if prompt.rstrip().endswith(THINK_OPEN) else "start"
        self._parse_tools = parse_tools
        self._forced_tool = forced_tool  # markup from a forced call is never content
        self._buffer = ""
        self._tool_text = ""
        self._strip_leading = False
        self._reasoning_started = False

    def feed(self, text: str) -> Delta:
        self._buffer += text
        delta = Delta()
        progressed = True
        while progressed:
            progressed = self._advance(delta)
        return delta

    def _advance(self, delta: Delta) -> bool:
        buf = self._buffer
        if self._mode == "start":
            stripped = buf.lstrip()
            if stripped.startswith(THINK_OPEN):
                self._buffer = stripped[len(THINK_OPEN):]
                self._mode = "reasoning"
                return True
            if THINK_OPEN.startswith(stripped):  # still could become "<think>"
                return False
            self._mode = "content"
            return True
        if self._mode == "reasoning":
            if not self._reasoning_started:  # the newline after <think> is markup, not thought
                buf = self._buffer = buf.lstrip("\n")
                if not buf:
                    return False
                self._reasoning_started = True
            end = buf.find(THINK_CLOSE)
            if end >= 0:
                delta.reasoning += buf[:end].rstrip("\n")
                self._buffer = buf[end + len(THINK_CLOSE):]
                self._mode = "content"
                self._strip_leading = True
                return True
            keep = partial_suffix(buf, THINK_CLOSE)
            # Hold a trailing newline too: the one before </think> is not part of the thinking.
            cut = len(buf) - keep
            while cut > 0 and buf[cut - 1] == "\n":
                cut -= 1
            delta.reasoning += buf[:cut]
            self._buffer = buf[cut:]
            return False
        if self._mode == "content":
            if self._strip_leading:
                buf = buf.lstrip()
                self._buffer = buf
                if not buf:
                    return False
                self._strip_leading = False
            if self._parse_tools:
                start = buf.find(TOOL_OPEN)
                if start >= 0:
                    delta.content += buf[:start]
                    self._tool_text += buf[start:]
                    self._buffer = ""
                    self._mode = "tools"
                    return True
                keep = partial_suffix(buf, TOOL_OPEN)
            else:
                keep = 0
            delta.content += buf[:len(buf) - keep]
            self._buffer = buf[len(buf) - keep:]
            return False
        # tools: everything from the first <tool_call> on is kept for finish()
        self._tool_text += buf
        self._buffer = ""
        return False

    def finish(self) -> tuple[Delta, list[ToolCall]]:
        """The held-back tail, and the tool calls (when they parse as JSON calls)."""
        delta = Delta()
        tail, self._buffer = self._buffer, ""
        if self._mode == "reasoning":
            delta.reasoning = tail
        elif self._mode != "tools":
            delta.content = tail.lstrip() if self._strip_leading else tail
        calls = parse_tool_calls(self._tool_text) if self._tool_text else []
        if self._tool_text and not calls and not self._forced_tool:
            delta.content += self._tool_text  # not a real call: give the text back
        return delta, calls


def parse_tool_calls(text: str) -> list[ToolCall]:
    calls = []
    for body in _TOOL_BLOCK.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return []
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return []
        arguments = obj.get("arguments", {})
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", obj["name"],
                              arguments if isinstance(arguments, str) else json.dumps(arguments)))
    return calls
