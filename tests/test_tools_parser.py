"""GLM-4 tool-call output parsing: whole replies and streams (glm4/tools.py)."""

from __future__ import annotations

import json
import random
import re

import pytest

from glm4.tools import (
    StreamEvent,
    ToolCall,
    ToolCallStreamParser,
    format_tool_call_markdown,
    parse_tool_call,
    tool_names,
)


def _tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": "", "parameters": {"type": "object"}}}


TOOLS = [_tool("get_weather"), _tool("get_time"), _tool("search")]

# (id, reply text, expected (name, arguments) or None for content)
WHOLE_CASES = [
    ("simple", 'get_weather\n{"city": "Paris"}', ("get_weather", '{"city": "Paris"}')),
    ("second-tool", 'search\n{"q": "glm"}', ("search", '{"q": "glm"}')),
    ("empty-object", "get_time\n{}", ("get_time", "{}")),
    ("chinese-args", 'get_weather\n{"city": "北京"}', ("get_weather", '{"city": "北京"}')),
    ("nested-args", 'search\n{"q": "x", "opts": {"n": [1, 2]}}', ("search", '{"q": "x", "opts": {"n": [1, 2]}}')),
    ("multiline-json", 'get_weather\n{\n  "city": "Oslo"\n}', ("get_weather", '{\n  "city": "Oslo"\n}')),
    ("whitespace-around", '  get_weather  \n  {"city": "Rome"}  \n', ("get_weather", '{"city": "Rome"}')),
    ("leading-newlines", '\n\nget_weather\n{"city": "Rome"}', ("get_weather", '{"city": "Rome"}')),
    ("crlf-name-line", 'get_weather\r\n{"city": "Rome"}', ("get_weather", '{"city": "Rome"}')),
    ("unknown-name", 'get_stock\n{"s": "X"}', None),
    ("name-prefix-only", 'get\n{"city": "Paris"}', None),
    ("invalid-json", 'get_weather\n{"city": "Paris"', None),
    ("trailing-text", 'get_weather\n{"city": "Paris"} thanks', None),
    ("json-array", "get_weather\n[1, 2]", None),
    ("json-scalar", "get_weather\n42", None),
    ("json-string", 'get_weather\n"Paris"', None),
    ("nan-constant", "get_weather\n{\"t\": NaN}", None),
    ("no-arguments", "get_weather", None),
    ("name-then-nothing", "get_weather\n", None),
    ("plain-content", "Hello! How can I help?", None),
    ("content-mentions-tool", "I will call get_weather\n{}", None),
    ("empty", "", None),
    ("only-whitespace", " \n ", None),
]


def _as_pair(call: ToolCall | None):
    return None if call is None else (call.name, call.arguments)


@pytest.mark.parametrize("text, expected", [c[1:] for c in WHOLE_CASES], ids=[c[0] for c in WHOLE_CASES])
def test_parse_whole(text, expected):
    call = parse_tool_call(text, TOOLS)
    assert _as_pair(call) == expected
    if call is not None:
        assert isinstance(json.loads(call.arguments), dict)
        assert re.fullmatch(r"call_[A-Za-z0-9_-]{24}", call.id)


FORCED_CASES = [
    ("object", '{"city": "北京"}', ("get_weather", '{"city": "北京"}')),
    ("whitespace", ' \n{"city": "Rome"}\n', ("get_weather", '{"city": "Rome"}')),
    ("invalid", '{"city": ', None),
    ("array", "[]", None),
    ("name-repeated", 'get_weather\n{"city": "Rome"}', None),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in FORCED_CASES], ids=[c[0] for c in FORCED_CASES])
def test_parse_forced(text, expected):
    assert _as_pair(parse_tool_call(text, TOOLS, forced_name="get_weather")) == expected


@pytest.mark.parametrize(
    "tools",
    [None, [], [{"type": "retrieval"}], [{"type": "function"}], ["junk"]],
    ids=["none", "empty", "non-function", "no-function-object", "not-a-dict"],
)
def test_no_usable_tools_means_content(tools):
    assert tool_names(tools) == set()
    assert parse_tool_call('get_weather\n{"city": "Paris"}', tools) is None


def test_tool_names_and_never_raises():
    assert tool_names(TOOLS) == {"get_weather", "get_time", "search"}
    assert parse_tool_call(None, TOOLS) is None  # type: ignore[arg-type]
    assert parse_tool_call("search\n" + "[" * 100_000, TOOLS) is None


def test_ids_are_unique():
    assert len({parse_tool_call("get_time\n{}", TOOLS).id for _ in range(50)}) == 50


# --- streaming -------------------------------------------------------------------------------------


def _run_stream(chunks: list[str], tools=TOOLS, forced_name=None) -> tuple[list[StreamEvent], ToolCallStreamParser]:
    parser = ToolCallStreamParser(tools, forced_name=forced_name)
    events: list[StreamEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    return events, parser


def _summary(events: list[StreamEvent]):
    """(content text, (name, arguments) or None) assembled from events, checking their order."""
    content = "".join(e.text for e in events if e.kind == "content")
    starts = [e for e in events if e.kind == "tool_call_start"]
    if not starts:
        assert all(e.kind == "content" for e in events)
        return content, None
    assert len(starts) == 1 and events[0] is starts[0] and starts[0].call.arguments == ""
    assert all(e.kind == "tool_call_arguments" for e in events[1:])
    return content, (starts[0].call.name, "".join(e.text for e in events[1:]))


def _chunkings(text: str, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    result = [[text], list(text)]
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6)))) if len(text) > 1 else []
        result.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return result


@pytest.mark.parametrize("text, expected", [c[1:] for c in WHOLE_CASES], ids=[c[0] for c in WHOLE_CASES])
def test_stream_matches_whole_parse(text, expected):
    for i, chunks in enumerate(_chunkings(text, seed=len(text))):
        events, parser = _run_stream(chunks)
        content, call = _summary(events)
        assert call == expected, f"chunking {i}: {chunks!r}"
        assert parser.is_tool_call == (expected is not None)
        assert _as_pair(parser.tool_call) == expected
        assert content == ("" if expected else text)  # nothing lost, nothing duplicated
        if expected:
            assert parser.tool_call.id == events[0].call.id


@pytest.mark.parametrize("text, expected", [c[1:] for c in FORCED_CASES], ids=[c[0] for c in FORCED_CASES])
def test_stream_forced(text, expected):
    for chunks in _chunkings(text, seed=1):
        parser = ToolCallStreamParser(TOOLS, forced_name="get_weather")
        assert parser.is_tool_call
        events = [e for c in chunks for e in parser.feed(c)]
        assert events == []  # arguments are held until they are validated
        content, call = _summary(parser.finish())
        assert call == expected
        assert content == ("" if expected else text)


def test_ordinary_reply_is_not_delayed():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("H") == [StreamEvent("content", "H")]  # "H" starts no tool name
    assert parser.feed("ello") == [StreamEvent("content", "ello")]
    assert parser.finish() == []


def test_name_prefix_is_held_then_released_as_content():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("get") == []  # could still be get_weather / get_time
    assert parser.feed("_") == []
    assert parser.feed(" the forecast first.") == [StreamEvent("content", "get_ the forecast first.")]
    assert parser.feed(" Done") == [StreamEvent("content", " Done")]
    assert not parser.is_tool_call and parser.finish() == []


def test_complete_name_held_until_newline():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("search ") == []  # a full name followed by spaces may still be the name line
    assert parser.feed("engines") == [StreamEvent("content", "search engines")]


def test_prefix_then_end_of_generation():
    events, parser = _run_stream(["get_wea"])
    assert events == [StreamEvent("content", "get_wea")] and parser.tool_call is None


def test_tool_call_events_and_no_name_leak():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("get_weather\n") == [] and parser.is_tool_call
    assert parser.feed('{"city": ') == [] and parser.feed('"北京"}') == []
    start, args = parser.finish()
    assert (start.kind, start.call.name, start.call.arguments, start.text) == ("tool_call_start", "get_weather", "", "")
    assert (args.kind, args.text) == ("tool_call_arguments", '{"city": "北京"}')
    assert parser.tool_call == ToolCall(start.call.id, "get_weather", '{"city": "北京"}')


def test_invalid_json_after_name_falls_back_to_all_content():
    events, parser = _run_stream(["get_weather\n", "{oops"])
    assert events == [StreamEvent("content", "get_weather\n{oops")]
    assert not parser.is_tool_call and parser.tool_call is None


@pytest.mark.parametrize("tools", [None, []], ids=["none", "empty"])
def test_no_tools_no_hold_back(tools):
    parser = ToolCallStreamParser(tools)
    assert parser.feed("get") == [StreamEvent("content", "get")]
    assert parser.feed('_weather\n{"a": 1}') == [StreamEvent("content", '_weather\n{"a": 1}')]
    assert parser.finish() == [] and not parser.is_tool_call


def test_empty_fragments_and_double_finish():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("") == []
    assert parser.finish() == [] and parser.finish() == []
    with pytest.raises(RuntimeError):
        parser.feed("late")


# --- UI helper -------------------------------------------------------------------------------------


def test_format_markdown():
    md = format_tool_call_markdown(ToolCall("call_x", "get_weather", '{"city":"北京"}'))
    assert md.startswith("<details><summary>🔧 called get_weather</summary>")
    assert '```json\n{\n  "city": "北京"\n}\n```' in md and md.endswith("</details>")


def test_format_markdown_fences_backticks_and_raw_args():
    md = format_tool_call_markdown(ToolCall("call_x", "search", '{"q": "```code```"}'))
    assert "````json" in md and md.rstrip().endswith("````\n</details>")
    assert "not json" in format_tool_call_markdown(ToolCall("call_x", "search", "not json"))


# --- several calls in one reply (<|assistant|>-separated), Python-literal arguments -------------------

from glm4.tools import CALL_SEPARATOR, parse_tool_calls  # noqa: E402

SEP = CALL_SEPARATOR
# (id, reply text, expected content, expected [(name, arguments)])
PARALLEL_CASES = [
    ("two-calls", 'get_weather\n{"city": "北京"}' + SEP + 'get_time\n{"tz": "Asia/Shanghai"}',
     "", [("get_weather", '{"city": "北京"}'), ("get_time", '{"tz": "Asia/Shanghai"}')]),
    ("three-calls", "get_time\n{}" + SEP + 'search\n{"q": "a"}' + SEP + 'search\n{"q": "b"}',
     "", [("get_time", "{}"), ("search", '{"q": "a"}'), ("search", '{"q": "b"}')]),
    ("python-literals", "get_weather\n{'city': '北京', 'hot': True, 'n': None}",
     "", [("get_weather", '{"city": "北京", "hot": true, "n": null}')]),
    ("json-and-literal", 'get_weather\n{"city": "Paris"}' + SEP + "get_time\n{'tz': 'UTC'}",
     "", [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "UTC"}')]),
    ("prose-then-call", "Let me check." + SEP + 'get_weather\n{"city": "Oslo"}',
     "Let me check.", [("get_weather", '{"city": "Oslo"}')]),
    ("second-call-invalid", 'get_weather\n{"city": "Rome"}' + SEP + "get_time\n{broken",
     "get_time\n{broken", [("get_weather", '{"city": "Rome"}')]),
    ("unknown-second-tool", "get_time\n{}" + SEP + 'launch\n{"x": 1}', 'launch\n{"x": 1}', [("get_time", "{}")]),
    ("prose-turns", "Hello." + SEP + "More prose.", "Hello.\nMore prose.", []),
    ("separator-first", SEP + "get_time\n{}", "", [("get_time", "{}")]),
    ("empty-segment", "get_time\n{}" + SEP + SEP + 'search\n{"q": "x"}', "", [("get_time", "{}"), ("search", '{"q": "x"}')]),
    ("set-literal", "get_time\n{'a': {1, 2}}", "get_time\n{'a': {1, 2}}", []),
    ("infinite-literal", "get_time\n{'a': 1e999}", "get_time\n{'a': 1e999}", []),
    ("code-is-not-evaluated", "get_time\n{'a': __import__('os').getcwd()}",
     "get_time\n{'a': __import__('os').getcwd()}", []),
    ("literal-with-trailing-text", "get_time\n{'a': 1} ok", "get_time\n{'a': 1} ok", []),
]


def _pairs(calls):
    return [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("text, content, calls", [c[1:] for c in PARALLEL_CASES], ids=[c[0] for c in PARALLEL_CASES])
def test_parse_several_calls_whole(text, content, calls):
    reply = parse_tool_calls(text, TOOLS)
    assert (reply.content, _pairs(reply.calls)) == (content, calls)
    assert SEP not in reply.content
    for call in reply.calls:
        assert isinstance(json.loads(call.arguments), dict)
    assert len({c.id for c in reply.calls}) == len(reply.calls)


def _run_parallel(chunks, tools=TOOLS, forced_name=None, parallel=True):
    parser = ToolCallStreamParser(tools, forced_name=forced_name, parallel=parallel)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    return events, parser


def _assembled(events):
    """(content, [(name, arguments)]) from events, checking each call's start comes first with its index."""
    content = "".join(e.text for e in events if e.kind == "content")
    calls: dict[int, list] = {}
    for event in events:
        if event.kind == "tool_call_start":
            assert event.index == len(calls) and event.call.arguments == ""  # indices 0, 1, 2 … in order
            calls[event.index] = [event.call.name, ""]
        elif event.kind == "tool_call_arguments":
            calls[event.index][1] += event.text  # the start of that call came first
        else:
            assert event.index is None
    return content, [tuple(calls[i]) for i in sorted(calls)]


def _all_splits(text: str) -> list[list[str]]:
    """Every two-piece split of the text, one-character pieces, and a few random ones."""
    return [[text[:i], text[i:]] for i in range(1, len(text))] + _chunkings(text, seed=7)


@pytest.mark.parametrize("text, content, calls", [c[1:] for c in PARALLEL_CASES], ids=[c[0] for c in PARALLEL_CASES])
def test_stream_of_several_calls_matches_whole_parse(text, content, calls):
    for chunks in _all_splits(text):  # includes every cut inside <|assistant|>
        events, parser = _run_parallel(chunks)
        assert _assembled(events) == (content, calls), chunks
        assert _pairs(parser.tool_calls) == calls and parser.is_tool_call == bool(calls)


def test_calls_stream_out_as_each_one_ends():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed('get_weather\n{"city": "北京"}') == []
    first = parser.feed(SEP + "get_")
    assert [(e.kind, e.index) for e in first] == [("tool_call_start", 0), ("tool_call_arguments", 0)]
    assert parser.feed('time\n{"tz": "UTC"}') == []
    second = parser.finish()
    assert [(e.kind, e.index) for e in second] == [("tool_call_start", 1), ("tool_call_arguments", 1)]
    assert second[0].call.id != first[0].call.id and second[1].text == '{"tz": "UTC"}'


def test_separator_never_reaches_content_without_tools():
    events, _ = _run_parallel(["Hi", "<|assis", "tant|>there"], tools=None)
    assert "".join(e.text for e in events) == "Hi\nthere"
    events, _ = _run_parallel(["a <", "b"], tools=None)  # a "<" that is not the separator is released
    assert "".join(e.text for e in events) == "a <b"


def test_first_call_only_mode_stops_at_the_first_call():
    text = 'get_weather\n{"city": "北京"}' + SEP + "get_time\n{}"
    reply = parse_tool_calls(text, TOOLS, parallel=False)
    assert _pairs(reply.calls) == [("get_weather", '{"city": "北京"}')] and reply.content == ""
    assert text[:reply.first_call_end] == 'get_weather\n{"city": "北京"}'
    for chunks in _all_splits(text):
        events, parser = _run_parallel(chunks, parallel=False)
        assert _assembled(events) == ("", [("get_weather", '{"city": "北京"}')])
        assert parser.done
    parser = ToolCallStreamParser(TOOLS, parallel=False)
    parser.feed('get_weather\n{"city": "北京"}')
    assert not parser.done  # the call is not known to be complete until its segment ends
    parser.feed(SEP)
    assert parser.done and parser.feed("get_time\n{}") == [] and parser.finish() == []


def test_first_call_end_keeps_prose_before_it():
    text = "Checking." + SEP + "get_time\n{}" + SEP + "search\n{\"q\": 1}"
    reply = parse_tool_calls(text, TOOLS, parallel=False)
    assert reply.content == "Checking." and _pairs(reply.calls) == [("get_time", "{}")]
    assert text[:reply.first_call_end].endswith("get_time\n{}")
    assert parse_tool_calls("no calls here", TOOLS).first_call_end is None


def test_forced_name_then_a_second_call():
    text = '{"city": "北京"}' + SEP + "get_time\n{'tz': 'UTC'}"
    expected = [("get_weather", '{"city": "北京"}'), ("get_time", '{"tz": "UTC"}')]
    assert _pairs(parse_tool_calls(text, TOOLS, forced_name="get_weather").calls) == expected
    for chunks in _all_splits(text):
        assert _assembled(_run_parallel(chunks, forced_name="get_weather")[0]) == ("", expected)


def test_single_call_helper_refuses_several_calls():
    assert parse_tool_call("get_time\n{}" + SEP + "get_time\n{}", TOOLS) is None
    assert parse_tool_call("get_time\n{'a': 'b'}", TOOLS).arguments == '{"a": "b"}'
