"""Which prompt renderer serves a checkpoint: the hand-written glm-4-9b-chat-hf rules, or its own template.

Every checkpoint ships a `chat_template`, and real weights were trained on what that template writes.
`choose_renderer(tokenizer)` renders a fixed set of probe conversations (PROBES: system first and late,
developer role, tools, a call and its result, two calls in one turn, empty content, multi-turn, text
parts) both ways. Only when every probe agrees byte for byte is the hand renderer (glm4/prompt.py, fast
and independent of Jinja) used; otherwise the checkpoint's template is, through `apply_chat_template`,
with the OpenAI messages mapped onto what that template reads (`to_template_messages`). A checkpoint with
no template gets the -hf rules and a warning. The choice and its reason are logged once per model.

Both renderers neutralize special-token spellings in everything a client wrote (messages, call
arguments, tool specs), and both end a prompt that forces a function with `<|assistant|>{name}\\n`
(`Prompt.prefix`), so the model writes only the arguments.

GLM-4-0414-style templates (recognised by their `metadata` turns) read: system turns (hoisted to the top
by the template itself), `user`, `assistant` with content, `assistant` with `metadata` = function name and
content = arguments (one turn per call), and `observation` for tool results. Other templates (-hf style)
get the OpenAI shape with text content and developer → system.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from glm4.engine.base import Prompt
from glm4.prompt import (GENERATION_PROMPT, ROLE_TOKENS, PromptError, content_text, forced_function_name,
                         neutralize_special_tokens, neutralize_tools, render_prompt)

log = logging.getLogger(__name__)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
STYLE_0414 = "glm4-0414"  # calls as `metadata` turns, results as `observation` turns
STYLE_OPENAI = "openai"  # OpenAI-shaped messages (the -hf templates read `tool` and `tool_calls` themselves)


def _tool(name: str, description: str, properties: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": properties}}}


def _call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


PROBE_TOOLS = [
    _tool("get_weather", "查询城市天气", {"city": {"type": "string", "description": "城市名"}}),
    _tool("get_time", "Current time in a time zone", {"tz": {"type": "string"}}),
]
# (name, messages, tools): the conversations on which the hand renderer must equal the template.
PROBES: list[tuple[str, list[dict[str, Any]], list[dict] | None]] = [
    ("system first", [{"role": "system", "content": "You are a helpful assistant"},
                      {"role": "user", "content": "你好"}], None),
    ("system not first", [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                          {"role": "system", "content": "Answer in English."},
                          {"role": "user", "content": "Who are you?"}], None),
    ("developer role", [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}], None),
    ("tools", [{"role": "user", "content": "北京天气怎么样？"}], PROBE_TOOLS),
    ("tool call with its result", [
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "content": None, "tool_calls": [_call("call_1", "get_weather", '{"city": "北京"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"weather": "晴", "temperature": 21}'},
    ], PROBE_TOOLS),
    ("two calls in one turn", [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather and time in Beijing?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("call_1", "get_weather", '{"city": "北京"}'),
                                                            _call("call_2", "get_time", '{"tz": "Asia/Shanghai"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": "晴"},
        {"role": "tool", "tool_call_id": "call_2", "content": "09:30"},
    ], PROBE_TOOLS),
    ("content with a call", [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [_call("call_1", "get_weather", '{"city": "Paris"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
    ], PROBE_TOOLS),
    ("empty content", [{"role": "system", "content": ""}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": ""}, {"role": "user", "content": "again"}], None),
    ("multi-turn", [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "3+3?"}], None),
    ("text parts", [{"role": "user", "content": [{"type": "text", "text": "Hello "},
                                                 {"type": "text", "text": "world"}]}], None),
]


@dataclass
class RenderedPrompt:
    """One rendered request: the text, its token ids, and what the reply parsers need to know."""

    text: str
    token_ids: list[int]
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None  # the tools offered (None when tool_choice is "none")
    tool_choice: Any
    forced_name: str | None  # the function the prompt already named (`<|assistant|>{name}\n`)
    opens_reasoning: bool  # the prompt ends inside an open <think> block: the reply starts as reasoning

    @property
    def prefix(self) -> str:
        return self.forced_name + "\n" if self.forced_name else ""

    def to_prompt(self) -> Prompt:
        return Prompt(token_ids=self.token_ids, messages=self.messages, tools=self.tools,
                      tool_choice=self.tool_choice, prefix=self.prefix)


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt: it starts with [gMASK]<sop> already, so no special tokens are added
    (what apply_chat_template(tokenize=True) does too)."""
    return tokenizer.encode(text, add_special_tokens=False) if tokenizer is not None else []


def _safe_text(text: str) -> str:
    # Lone surrogates (legal in JSON, not in UTF-8) would crash the tokenizer: replace them.
    return text.encode("utf-8", "replace").decode("utf-8")


class Renderer:
    """Renders OpenAI-shaped conversations for one model. Subclasses fill `render_text`."""

    kind = ""
    opens_reasoning = False  # the generation prompt opens a <think> block (GLM-Z1)

    def __init__(self, tokenizer, reason: str = ""):
        self.tokenizer = tokenizer
        self.reason = reason

    def render_text(self, messages: list[dict[str, Any]], tools: list[dict] | None, forced: str | None) -> str:
        raise NotImplementedError

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               tool_choice: Any = None) -> RenderedPrompt:
        if not messages:
            raise PromptError("messages must contain at least one message", "messages")
        offered = tools if tools and tool_choice != "none" else None
        forced = forced_function_name(tool_choice, tools) if offered else None
        text = _safe_text(self.render_text(messages, offered, forced))
        return RenderedPrompt(text, _encode(self.tokenizer, text), messages, offered, tool_choice, forced,
                              self.opens_reasoning and not forced)

    def describe(self) -> str:
        return f"{self.kind}: {self.reason}"


class HandRenderer(Renderer):
    """glm-4-9b-chat-hf's layout written in Python (glm4/prompt.py, shared/glm4-format.md)."""

    kind = "hand (glm-4-9b-chat-hf rules)"

    def render_text(self, messages, tools, forced):
        return render_prompt(messages, tools, {"type": "function", "function": {"name": forced}} if forced else None)


class TemplateRenderer(Renderer):
    """The checkpoint's own Jinja chat template, fed messages in the shape it reads."""

    kind = "the checkpoint's chat template"

    def __init__(self, tokenizer, reason: str = ""):
        super().__init__(tokenizer, reason)
        source = tokenizer.chat_template
        source = " ".join(source.values()) if isinstance(source, dict) else str(source)
        self.style = STYLE_0414 if "metadata" in source and "observation" in source else STYLE_OPENAI
        suffix = self.generation_suffix()
        self.opens_reasoning = bool(suffix) and suffix.rstrip().endswith(THINK_OPEN)

    def apply(self, messages: list[dict[str, Any]], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(to_template_messages(messages, self.style),
                                                      tools=neutralize_tools(tools) if tools else None,
                                                      add_generation_prompt=add_generation_prompt, tokenize=False)
        except TemplateError as error:  # the template's own raise_exception, or a syntax/undefined error
            raise PromptError(f"the model's chat template refused this conversation: {error}", "messages") from None
        except (TypeError, KeyError, AttributeError) as error:  # e.g. a filter applied to a value of the wrong type
            raise PromptError(f"the model's chat template cannot render this conversation: {error}",
                              "messages") from None
        return text

    def render_text(self, messages, tools, forced):
        if forced:  # the template's own generation prompt would open reasoning; a forced call skips it
            return self.apply(messages, tools, False) + GENERATION_PROMPT + forced + "\n"
        return self.apply(messages, tools, True)

    def generation_suffix(self) -> str | None:
        """What add_generation_prompt appends (`<|assistant|>`, or `<|assistant|>\\n<think>` for GLM-Z1)."""
        probe = [{"role": "user", "content": "hi"}]
        try:
            without, with_prompt = self.apply(probe, None, False), self.apply(probe, None, True)
        except PromptError:
            return None
        return with_prompt[len(without):] if with_prompt.startswith(without) else None


def to_template_messages(messages: list[dict[str, Any]], style: str) -> list[dict[str, Any]]:
    """OpenAI messages → the message dicts a chat template reads, every client text neutralized.

    style STYLE_0414: system/developer → system; tool → observation; an assistant message becomes its
    content turn (when it has content) followed by one `metadata` = name turn per call. STYLE_OPENAI: the
    OpenAI shape with text content (parts joined), developer → system, arguments as JSON text.
    """
    mapped: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role not in ROLE_TOKENS:
            raise PromptError(f"unsupported message role {role!r}; use system, developer, user, assistant or tool",
                              "messages")
        text = neutralize_special_tokens(content_text(message.get("content")))
        calls = [_call_parts(call) for call in message.get("tool_calls") or []] if role == "assistant" else []
        if style == STYLE_0414:
            template_role = {"developer": "system", "tool": "observation"}.get(role, role)
            if text or not calls:
                mapped.append({"role": template_role, "content": text})
            mapped.extend({"role": "assistant", "metadata": name, "content": arguments} for name, arguments in calls)
        else:
            item: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
            if calls:
                item["tool_calls"] = [{"type": "function", "function": {"name": name, "arguments": arguments}}
                                      for name, arguments in calls]
            if role == "tool" and message.get("tool_call_id"):
                item["tool_call_id"] = message["tool_call_id"]
            mapped.append(item)
    return mapped


def _call_parts(call: dict[str, Any]) -> tuple[str, str]:
    """(name, arguments JSON text) of an OpenAI tool call, neutralized."""
    function = call.get("function") or {}
    arguments = function.get("arguments", "")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return neutralize_special_tokens(str(function.get("name", ""))), neutralize_special_tokens(arguments)


@dataclass
class ProbeReport:
    agreed: list[str] = field(default_factory=list)
    differed: list[tuple[str, str]] = field(default_factory=list)  # (probe name, what differed)


def compare_on_probes(tokenizer) -> ProbeReport:
    """Render every probe with the hand rules and with the checkpoint's template; report what differs."""
    hand, template = HandRenderer(tokenizer), TemplateRenderer(tokenizer)
    report = ProbeReport()
    for name, messages, tools in PROBES:
        expected = hand.render_text(messages, tools, None)
        try:
            got = template.render_text(messages, tools, None)
        except PromptError as error:
            report.differed.append((name, f"the template raised: {error}"))
            continue
        if got == expected:
            report.agreed.append(name)
        else:
            at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            report.differed.append((name, f"at character {at}: template {got[at:at + 40]!r}, "
                                          f"-hf rules {expected[at:at + 40]!r}"))
    return report


def choose_renderer(tokenizer) -> Renderer:
    """The renderer for this model's tokenizer, with the reason logged (see the module docstring)."""
    if tokenizer is None:
        return HandRenderer(None, "no local tokenizer (upstream backend): the -hf rules, for counting only")
    if not getattr(tokenizer, "chat_template", None):
        renderer = HandRenderer(tokenizer, "the checkpoint has no chat_template, so prompts follow the "
                                           "glm-4-9b-chat-hf rules; check that they suit this model")
        log.warning("Prompt renderer: %s", renderer.describe())
        return renderer
    report = compare_on_probes(tokenizer)
    if not report.differed:
        renderer: Renderer = HandRenderer(tokenizer, f"the checkpoint's chat template renders all {len(PROBES)} "
                                                     "probe conversations byte for byte the same")
    else:
        names = ", ".join(name for name, _ in report.differed)
        first_name, first_diff = report.differed[0]
        renderer = TemplateRenderer(tokenizer, "")
        renderer.reason = (f"{renderer.style} style; it differs from the glm-4-9b-chat-hf rules on "
                           f"{len(report.differed)} of {len(PROBES)} probes ({names}); first, {first_name!r} "
                           f"{first_diff}")
    if renderer.opens_reasoning:
        renderer.reason += "; its generation prompt opens a <think> block (a reasoning model)"
    log.info("Prompt renderer: %s", renderer.describe())
    return renderer


_renderers: "weakref.WeakKeyDictionary[Any, Renderer]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def renderer_for(tokenizer) -> Renderer:
    """The renderer chosen once per tokenizer (i.e. per loaded model); None → the -hf rules, no tokens."""
    if tokenizer is None:
        return HandRenderer(None)
    with _lock:
        renderer = _renderers.get(tokenizer)
        if renderer is None:
            renderer = _renderers[tokenizer] = choose_renderer(tokenizer)
        return renderer


__all__ = ["PROBES", "HandRenderer", "RenderedPrompt", "Renderer", "TemplateRenderer", "choose_renderer",
           "compare_on_probes", "renderer_for", "to_template_messages"]
