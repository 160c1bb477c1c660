"""GLM-4 tool-call output → OpenAI `tool_calls`, for whole replies and for streams.

GLM-4 calls a tool by answering `{name}\\n{arguments}` and then emitting `<|observation|>` (the engine
stops there and drops the token). Several calls in one reply are separated by `<|assistant|>` (kept in
the engine's text for this parser; never shown to users):
`get_weather\\n{"city": "北京"}<|assistant|>get_time\\n{"tz": "Asia/Shanghai"}`. The text handled here is
the reply after the leading "\\n"; when the prompt forced a function (`<|assistant|>{name}\\n`), its first
segment is only the arguments and the caller passes `forced_name`.

Each `<|assistant|>`-separated segment is judged on its own: it is a call when its first line (whitespace
stripped) is the name of an offered tool and the rest is one JSON object (strict JSON preferred; a Python
literal such as `{'city': '北京'}`, which GLM-4's own demo accepts, is converted with `ast.literal_eval`,
never `eval`). Any other segment is content; content segments are joined with "\\n", and `<|assistant|>`
itself never reaches content. With `parallel=False` (`parallel_tool_calls: false`) everything after the
first call is dropped, and the parser says where that was, so the caller can stop generating.

Streaming design (`ToolCallStreamParser`):
- No tools offered (and no forced name): every fragment is content at once, nothing is held back (except
  a trailing piece that may be the start of `<|assistant|>`).
- Tools offered: a segment is held only while its first line could still become a tool name. As soon as a
  character rules out every name (e.g. "H" against "get_weather"), what is held is flushed as content and
  the rest of that segment streams straight through.
- Once the first line equals a tool name, the arguments are held until the segment ends (the next
  `<|assistant|>` or `finish()`), then checked. Valid → one `tool_call_start` (id, name, arguments="") and
  one `tool_call_arguments` fragment with the whole argument text, both carrying the call's `index`
  (0, 1, … in reply order). Invalid → the segment's raw text, name line included, as content. Streaming
  arguments early would make "invalid → plain content" impossible, since sent deltas cannot be taken back.
- Forced name: the first segment is held the same way; invalid arguments come out as content.
The streamed outcome always equals `parse_tool_calls` on the whole text, and no text is lost or
duplicated: without `<|assistant|>` in it, the content events concatenate to the input whenever the reply
is not a tool call.
"""

from __future__ import annotations

import ast
import html
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CALL_SEPARATOR",
    "ParsedReply",
    "StreamEvent",
    "ToolCall",
    "ToolCallStreamParser",
    "format_tool_call_markdown",
    "new_call_id",
    "parse_tool_call",
    "parse_tool_calls",
    "tool_names",
]

CALL_SEPARATOR = "<|assistant|>"  # GLM-4 starts each further call of one reply with a new assistant turn


def new_call_id() -> str:
    """"call_" + 24 random url-safe characters, like OpenAI's tool-call ids."""
    return "call_" + secrets.token_urlsafe(18)


@dataclass
class ToolCall:
    id: str  # "call_…"
    name: str
    arguments: str  # a JSON object's text (the model's own, stripped, or converted from a Python literal)


@dataclass
class StreamEvent:
    kind: str  # "content" | "tool_call_start" | "tool_call_arguments"
    text: str = ""  # content text, or an arguments fragment
    call: ToolCall | None = None  # on tool_call_start: id and name, arguments=""
    index: int | None = None  # on tool_call_*: which call of the reply (0, 1, …); None for content


@dataclass
class ParsedReply:
    """A whole reply, decided: its content (possibly empty) and its calls, in order."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    first_call_end: int | None = None  # offset in the text where the first call's segment ends


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


def _arguments_json(text: str) -> str | None:
    """The arguments as JSON object text, or None when `text` is not exactly one object.

    Strict JSON (no NaN/Infinity) is kept as the model wrote it, stripped. A Python literal dict
    (`{'city': '北京', 'hot': True}`) is read with ast.literal_eval — which evaluates no code — and
    re-serialized; anything JSON cannot hold (sets, bytes, inf) rules it out.
    """
    stripped = text.strip()
    try:
        value = json.loads(stripped, parse_constant=_reject_constant)
        return stripped if isinstance(value, dict) else None
    except (ValueError, RecursionError):
        pass
    if not stripped.startswith("{"):
        return None
    try:
        value = ast.literal_eval(stripped)
        return json.dumps(value, ensure_ascii=False, allow_nan=False) if isinstance(value, dict) else None
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _segment_call(segment: str, names: set[str], forced_name: str | None) -> ToolCall | None:
    """One `<|assistant|>`-separated segment as a call, or None for content."""
    if forced_name:
        arguments = _arguments_json(segment)
        return ToolCall(new_call_id(), forced_name, arguments) if arguments is not None else None
    first, newline, rest = segment.lstrip().partition("\n")
    name = first.strip()
    if not newline or not name or name not in names:
        return None
    arguments = _arguments_json(rest)
    return ToolCall(new_call_id(), name, arguments) if arguments is not None else None


def parse_tool_calls(text: str, tools: list[dict] | None, forced_name: str | None = None,
                     parallel: bool = True) -> ParsedReply:
    """Decide on a whole reply: content and calls (see the module docstring). Never raises."""
    if not isinstance(text, str):
        return ParsedReply("")
    names = tool_names(tools)
    pieces: list[str] = []
    calls: list[ToolCall] = []
    first_end: int | None = None
    offset = 0
    for i, segment in enumerate(text.split(CALL_SEPARATOR)):
        call = _segment_call(segment, names, forced_name if i == 0 else None) if names or forced_name else None
        if call is not None:
            calls.append(call)
            if first_end is None:
                first_end = offset + len(segment)
            if not parallel:
                break
        elif segment:
            pieces.append(segment)
        offset += len(segment) + len(CALL_SEPARATOR)
    return ParsedReply("\n".join(pieces), calls, first_end)


def parse_tool_call(text: str, tools: list[dict] | None, forced_name: str | None = None) -> ToolCall | None:
    """A reply that is exactly one call → that call; anything else (content, several calls) → None."""
    reply = parse_tool_calls(text, tools, forced_name)
    return reply.calls[0] if len(reply.calls) == 1 and not reply.content else None


def _could_be_name_line(partial: str, names: set[str]) -> bool:
    """Whether `partial` (leading whitespace removed, no "\\n" yet) may still become a tool-name line."""
    name = partial.rstrip()
    if name != partial:  # whitespace after the name: only a complete name may follow it
        return name in names
    return any(candidate.startswith(name) for candidate in names)


def _partial_separator(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of CALL_SEPARATOR."""
    for length in range(min(len(CALL_SEPARATOR) - 1, len(text)), 0, -1):
        if text.endswith(CALL_SEPARATOR[:length]):
            return length
    return 0


class ToolCallStreamParser:
    """Turns a stream of reply fragments into content and tool-call events (see the module docstring)."""

    def __init__(self, tools: list[dict] | None, forced_name: str | None = None, parallel: bool = True):
        self._tools = tools
        self._names = tool_names(tools)
        self._forced_name = forced_name or None
        self._parallel = parallel
        self._carry = ""  # a trailing piece that may be the start of CALL_SEPARATOR
        self._raw = ""  # the current segment while it is held (undecided, or a call being written)
        self._calls: list[ToolCall] = []
        self._content_sent = False  # some content went out: a later content segment starts with "\n"
        self._segment_sent = False  # the current segment already sent content
        self._finished = False
        self._done = False  # parallel=False and the first call is complete: the rest is ignored
        if self._forced_name:
            self._state = "tool"
        else:
            self._state = self._fresh_state()

    def _fresh_state(self) -> str:
        return "undecided" if self._names else "content"

    @property
    def is_tool_call(self) -> bool:
        """True once a call is complete or a segment is being held as one; after finish(), only if valid."""
        if self._finished:
            return bool(self._calls)
        return bool(self._calls) or self._state == "tool"

    @property
    def tool_call(self) -> ToolCall | None:
        """The first complete call (after finish(), or after its segment ended)."""
        return self._calls[0] if self._calls else None

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Every complete call so far, in order."""
        return list(self._calls)

    @property
    def done(self) -> bool:
        """parallel=False and the first call is complete: generation can stop here (the rest is ignored)."""
        return self._done

    def feed(self, text: str) -> list[StreamEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if not text or self._done:
            return []
        text = self._carry + text
        events: list[StreamEvent] = []
        *complete, tail = text.split(CALL_SEPARATOR)
        for piece in complete:
            events += self._take(piece)
            events += self._end_segment()
            if self._done:
                self._carry = ""
                return events
        hold = _partial_separator(tail)
        self._carry = tail[len(tail) - hold:] if hold else ""
        events += self._take(tail[:len(tail) - hold])
        return events

    def _take(self, text: str) -> list[StreamEvent]:
        """Text inside the current segment."""
        if not text:
            return []
        if self._state == "content":
            return self._content(text)
        self._raw += text
        if self._state == "tool":
            return []
        return self._decide()

    def _content(self, text: str) -> list[StreamEvent]:
        if not text:
            return []
        if self._content_sent and not self._segment_sent:
            text = "\n" + text  # the separator between two content segments
        self._content_sent = self._segment_sent = True
        return [StreamEvent("content", text)]

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
        return self._content(text)

    def _end_segment(self) -> list[StreamEvent]:
        """A segment ended (at CALL_SEPARATOR or the end): release it as a validated call or as content."""
        events: list[StreamEvent] = []
        if self._state == "tool":
            call = _segment_call(self._raw, self._names, self._forced_name)
            if call is None:
                events = self._flush_as_content()
            else:
                self._raw = ""
                index = len(self._calls)
                self._calls.append(call)
                events = [StreamEvent("tool_call_start", call=ToolCall(call.id, call.name, ""), index=index),
                          StreamEvent("tool_call_arguments", call.arguments, index=index)]
                self._done = not self._parallel
        elif self._state == "undecided":
            events = self._flush_as_content()
        self._forced_name = None  # only the first segment carries the forced name
        self._state, self._raw, self._segment_sent = self._fresh_state(), "", False
        return events

    def finish(self) -> list[StreamEvent]:
        """End of generation: release whatever is held, as a validated call or as content."""
        if self._finished:
            return []
        self._finished = True
        if self._done:
            return []
        carry, self._carry = self._carry, ""
        return self._take(carry) + self._end_segment()


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
