"""GLM-4 tool-call output → OpenAI `tool_calls`, for whole replies and for streams.

GLM-4 calls a tool by answering `{name}\\n{json arguments}` and then emitting `<|observation|>` (the
engine stops there and drops the token). The text handled here is the reply after the leading "\\n";
when the prompt forced a function (`<|assistant|>{name}\\n`), it is only the arguments and the caller
passes `forced_name`. A reply is a tool call only when its first line (whitespace stripped) is the
name of an offered tool and the rest is one JSON object; anything else is ordinary content.

Streaming design (`ToolCallStreamParser`):
- No tools offered (and no forced name): every fragment is content at once, nothing is held back.
- Tools offered: the text is held only while its first line could still become a tool name. As soon
  as a character rules out every name (e.g. "H" against "get_weather"), everything held so far is
  flushed as content and the rest streams straight through.
- Once the first line equals a tool name, the arguments are held until `finish()` (they are short),
  then checked. Valid → one `tool_call_start` (id, name, arguments="") and one `tool_call_arguments`
  fragment with the whole argument text. Invalid → the entire raw reply, name line included, as
  content. Streaming arguments early would make "invalid JSON → plain content" impossible, since
  sent deltas cannot be taken back; holding them is the price of never sending a broken call.
- Forced name: the whole text is held the same way; invalid arguments come out as content.
The streamed outcome always equals `parse_tool_call` on the whole text, and no text is ever lost or
duplicated: the content events concatenate to the input whenever the reply is not a tool call.
"""

from __future__ import annotations

import html
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

__all__ = [
    "StreamEvent",
    "ToolCall",
    "ToolCallStreamParser",
    "format_tool_call_markdown",
    "new_call_id",
    "parse_tool_call",
    "tool_names",
]


def new_call_id() -> str:
    """"call_" + 24 random url-safe characters, like OpenAI's tool-call ids."""
    return "call_" + secrets.token_urlsafe(18)


@dataclass
class ToolCall:
    id: str  # "call_…"
    name: str
    arguments: str  # the model's JSON text, surrounding whitespace stripped; json.loads gives a dict


@dataclass
class StreamEvent:
    kind: str  # "content" | "tool_call_start" | "tool_call_arguments"
    text: str = ""  # content text, or an arguments fragment
    call: ToolCall | None = None  # on tool_call_start: id and name, arguments=""


def tool_names(tools: list[dict] | None) -> set[str]:
    """Names of the offered OpenAI function tools; malformed entries are skipped."""
    names: set[str] = set()
    for tool in tools or []:
        if hasattr(tool, "model_dump"):  # tolerate pydantic request models
            tool = tool.model_dump()
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            continue
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name.strip():
            names.add(name.strip())
    return names


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _json_object_text(text: str) -> str | None:
    """`text` stripped when it is exactly one JSON object (strict JSON: no NaN/Infinity), else None."""
    stripped = text.strip()
    try:
        value = json.loads(stripped, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return stripped if isinstance(value, dict) else None


def parse_tool_call(text: str, tools: list[dict] | None, forced_name: str | None = None) -> ToolCall | None:
    """Decide on a whole reply: a ToolCall, or None for ordinary content. Never raises."""
    if not isinstance(text, str):
        return None
    if forced_name:
        arguments = _json_object_text(text)
        return ToolCall(new_call_id(), forced_name, arguments) if arguments is not None else None
    first, newline, rest = text.lstrip().partition("\n")
    name = first.strip()
    if not newline or not name or name not in tool_names(tools):
        return None
    arguments = _json_object_text(rest)
    return ToolCall(new_call_id(), name, arguments) if arguments is not None else None


def _could_be_name_line(partial: str, names: set[str]) -> bool:
    """Whether `partial` (leading whitespace removed, no "\\n" yet) may still become a tool-name line."""
    name = partial.rstrip()
    if name != partial:  # whitespace after the name: only a complete name may follow it
        return name in names
    return any(candidate.startswith(name) for candidate in names)


class ToolCallStreamParser:
    """Turns a stream of reply fragments into content and tool-call events (see the module docstring)."""

    def __init__(self, tools: list[dict] | None, forced_name: str | None = None):
        self._tools = tools
        self._names = tool_names(tools)
        self._forced_name = forced_name or None
        self._raw = ""  # everything held back so far (the whole reply while undecided or a tool call)
        self._call: ToolCall | None = None
        self._finished = False
        if self._forced_name:
            self._state = "tool"
        elif self._names:
            self._state = "undecided"
        else:
            self._state = "content"

    @property
    def is_tool_call(self) -> bool:
        """True once the first line names a tool (or a name is forced); after finish(), only if valid."""
        if self._finished:
            return self._call is not None
        return self._state == "tool"

    @property
    def tool_call(self) -> ToolCall | None:
        """The complete call, available after finish() when the reply was a valid tool call."""
        return self._call

    def feed(self, text: str) -> list[StreamEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if not text:
            return []
        if self._state == "content":
            return [StreamEvent("content", text)]
        self._raw += text
        if self._state == "tool":
            return []
        return self._decide()

    def _decide(self) -> list[StreamEvent]:
        """While undecided: switch to "tool" or "content" as soon as the held text allows it."""
        held = self._raw.lstrip()
        if not held:
            return []
        first, newline, _ = held.partition("\n")
        if newline:
            if first.strip() in self._names:
                self._state = "tool"
                return []
        elif _could_be_name_line(first, self._names):
            return []
        return self._flush_as_content()

    def _flush_as_content(self) -> list[StreamEvent]:
        self._state = "content"
        text, self._raw = self._raw, ""
        return [StreamEvent("content", text)] if text else []

    def finish(self) -> list[StreamEvent]:
        """End of generation: release whatever is held, as a validated tool call or as content."""
        if self._finished:
            return []
        self._finished = True
        if self._state != "tool":
            return self._flush_as_content()
        call = parse_tool_call(self._raw, self._tools, self._forced_name)
        if call is None:
            return self._flush_as_content()
        self._call = call
        self._raw = ""
        start = ToolCall(call.id, call.name, "")
        return [StreamEvent("tool_call_start", call=start), StreamEvent("tool_call_arguments", call.arguments)]


def format_tool_call_markdown(call: ToolCall) -> str:
    """A collapsible Markdown/HTML block showing a tool call readably (for the chat UI)."""
    try:
        pretty = json.dumps(json.loads(call.arguments), indent=2, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        pretty = call.arguments
    longest_run = max((len(run) for run in re.findall(r"`+", pretty)), default=0)
    fence = "`" * max(3, longest_run + 1)
    return (
        f"<details><summary>🔧 called {html.escape(call.name)}</summary>\n\n"
        f"{fence}json\n{pretty}\n{fence}\n</details>"
    )
