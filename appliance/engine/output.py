"""Split a Qwen chat completion as it streams: thinking → `reasoning_content`, `<tool_call>`
blocks → `tool_calls`, the rest → `content`.

A tool call streams as it is generated: once `{"name": "...", "arguments": ` is complete its id
and name go out, then the arguments' text as it comes, less a tail that may still turn out to be
the call's closing `}` and `</tool_call>`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from appliance.engine.text import partial_suffix

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # the first delta of a call carries id and name
    name: str | None = None
    arguments: str = ""


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it


@dataclass
class _OpenCall:
    """The `<tool_call>` block being generated."""

    text: str = ""  # everything after <tool_call>
    call: ToolCall | None = None  # set once the head (name) is complete
    head_end: int = 0  # where the arguments start in `text`
    sent: str = ""  # arguments streamed so far


class ChatOutputParser:
    """Feed text pieces in order; get reasoning and content deltas back; tool calls at the end."""

    def __init__(self, *, prompt: str, parse_tools: bool, forced_tool: bool = False) -> None:
        # Some templates open the thinking block in the prompt itself.
        self._mode = "reasoning" if prompt.rstrip().endswith(THINK_OPEN) else "start"
        self._parse_tools = parse_tools
        self._forced_tool = forced_tool  # markup from a forced call is never content
        self._buffer = ""
        self._strip_leading = False
        self._reasoning_started = False
        self._open: _OpenCall | None = None
        self.calls: list[ToolCall] = []

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
                    self._buffer = buf[start + len(TOOL_OPEN):]
                    self._open = _OpenCall()
                    self._mode = "tool"
                    return True
                keep = partial_suffix(buf, TOOL_OPEN)
            else:
                keep = 0
            delta.content += buf[:len(buf) - keep]
            self._buffer = buf[len(buf) - keep:]
            return False
        # tool: inside a <tool_call> block
        call = self._open
        assert call is not None
        call.text += buf
        self._buffer = ""
        end = call.text.find(TOOL_CLOSE)
        if end < 0:
            self._stream_call(call, delta)
            return False
        rest = call.text[end + len(TOOL_CLOSE):]
        call.text = call.text[:end]
        self._close_call(call, delta, closed=True)
        self._open = None
        self._buffer = rest
        self._mode = "content"
        self._strip_leading = True  # the newline between calls is markup
        return True

    def _stream_call(self, call: _OpenCall, delta: Delta) -> None:
        if call.call is None:
            head = _CALL_HEAD.match(call.text)
            if head is None:
                return
            try:
                name = json.loads(head.group(1))
            except json.JSONDecodeError:
                return
            call.call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, "")
            call.head_end = head.end()
            delta.tool_calls.append(ToolCallDelta(len(self.calls), call.call.id, name))
        arguments = call.text[call.head_end:]
        safe = arguments[:len(arguments) - partial_suffix(arguments, TOOL_CLOSE)].rstrip()
        if safe.endswith("}"):  # perhaps the call's own closing brace: wait and see
            safe = safe[:-1].rstrip()
        self._send_arguments(call, safe, delta)

    def _send_arguments(self, call: _OpenCall, arguments: str, delta: Delta) -> None:
        if len(arguments) > len(call.sent) and arguments.startswith(call.sent):
            piece = arguments[len(call.sent):]
            call.sent = arguments
            if delta.tool_calls and delta.tool_calls[-1].index == len(self.calls):
                delta.tool_calls[-1].arguments += piece
            else:
                delta.tool_calls.append(ToolCallDelta(len(self.calls), arguments=piece))

    def _close_call(self, call: _OpenCall, delta: Delta, closed: bool = False) -> None:
        """The block is complete (or the output ended): finish its arguments, or, when it never
        looked like a call, parse it whole or give its text back."""
        if call.call is None:
            found = parse_tool_calls(f"{TOOL_OPEN}{call.text}{TOOL_CLOSE}")
            if found:
                self.calls.append(found[0])
                delta.tool_calls.append(ToolCallDelta(len(self.calls) - 1, found[0].id,
                                                      found[0].name, found[0].arguments))
            elif not self._forced_tool:
                # Not a real call: give its text back.
                delta.content += TOOL_OPEN + call.text + (TOOL_CLOSE if closed else "")
            return
        body = call.text[call.head_end:]
        # Output cut short inside the closing tag (max_tokens): the tag's start is no argument.
        body = body[:len(body) - partial_suffix(body, TOOL_CLOSE)].rstrip()
        arguments = body[:-1].rstrip() if body.endswith("}") else body
        self._send_arguments(call, arguments, delta)
        call.call.arguments = call.sent
        self.calls.append(call.call)

    def finish(self) -> tuple[Delta, list[ToolCall]]:
        """The held-back tail, and every tool call (a call cut short keeps what it has)."""
        delta = Delta()
        tail, self._buffer = self._buffer, ""
        if self._mode == "reasoning":
            delta.reasoning = tail
        elif self._mode == "tool":
            assert self._open is not None
            self._open.text += tail
            self._close_call(self._open, delta)
            self._open = None
        else:
            delta.content = tail.lstrip() if self._strip_leading else tail
        return delta, self.calls


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
