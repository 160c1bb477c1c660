"""Reasoning (`<think>…</think>`) split from the answer, for whole replies and for streams.

GLM-Z1's generation prompt ends `<|assistant|>\\n<think>`, so its reply reads `reasoning</think>answer`; a
model whose prompt does not open the block may still start its reply with `<think>`. `--reasoning-parser`
(vLLM's flag name) decides whether replies are split: `auto` when the checkpoint's template opens a
`<think>` block in its generation prompt (glm4/chat_template.py renders one and looks), `think` always,
`none` never. Like vLLM's parsers, the splitter answers two questions:

- `split_reasoning(text, starts_open)`: a whole reply → (reasoning, answer);
- `ReasoningSplitter.feed(delta)`: one streamed delta, given what came before → ReasoningDelta(reasoning,
  answer). A tag split across deltas is held back until it is complete or ruled out, and released
  exactly once; a reply that never closes the block is all reasoning.

The answer stream is what feeds the tool-call parser (glm4/tools.py), so a call written after the
reasoning is found. `drop_reasoning_from_history` removes past reasoning from assistant messages (the
`reasoning_content` / `reasoning` fields clients send back, and `<think>…</think>` in content), as the
Z1 template does. `default_max_tokens` gives a reasoning model the whole remaining context to think in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
REASONING_PARSERS = ("auto", "think", "none")
HISTORY_REASONING_FIELDS = ("reasoning_content", "reasoning")  # DeepSeek's field, and vLLM >= 0.12's


@dataclass(frozen=True)
class ReasoningMode:
    """What --reasoning-parser resolved to for the served model."""

    enabled: bool  # replies are split into reasoning and answer
    prompt_opens_block: bool  # the template's generation prompt ends inside <think> (GLM-Z1)
    reason: str

    def splitter(self, starts_open: bool | None = None) -> "ReasoningSplitter | None":
        """A splitter for one reply, or None when reasoning is off. starts_open: the rendered prompt ends in an
        open block (RenderedPrompt.opens_reasoning; False when a forced tool call skipped the reasoning)."""
        if not self.enabled:
            return None
        return ReasoningSplitter(self.prompt_opens_block if starts_open is None else starts_open)


def resolve_reasoning(setting: str, prompt_opens_block: bool) -> ReasoningMode:
    """--reasoning-parser for a model whose template does (or does not) open a <think> block."""
    if setting not in REASONING_PARSERS:
        raise ValueError(f"unknown --reasoning-parser {setting!r}: use one of {', '.join(REASONING_PARSERS)}")
    if setting == "none":
        return ReasoningMode(False, prompt_opens_block, "--reasoning-parser none: replies are not split")
    if setting == "think":
        return ReasoningMode(True, prompt_opens_block, "--reasoning-parser think: <think>…</think> is reasoning")
    if prompt_opens_block:
        return ReasoningMode(True, True, "auto: the chat template opens a <think> block in its generation prompt")
    return ReasoningMode(False, False, "auto: the chat template opens no <think> block (not a reasoning model)")


def reasoning_mode_for(tokenizer, setting: str) -> ReasoningMode:
    """The mode for the model behind this tokenizer (its renderer is chosen once, glm4/chat_template.py)."""
    from glm4.chat_template import renderer_for

    return resolve_reasoning(setting, renderer_for(tokenizer).opens_reasoning)


def split_reasoning(text: str, starts_open: bool = False) -> tuple[str, str]:
    """A whole reply → (reasoning, answer). starts_open: the prompt already opened <think>.

    Without an open block, only a reply that begins (after whitespace) with <think> has reasoning. A
    <think> repeated at the start of an open block is dropped. No </think> → everything is reasoning.
    """
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        body = stripped[len(THINK_OPEN):]
    elif starts_open:
        body = text
    else:
        return "", text
    reasoning, closed, answer = body.partition(THINK_CLOSE)
    return (reasoning, answer) if closed else (body, "")


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    answer: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.answer)


class ReasoningSplitter:
    """Splits one reply's stream into reasoning and answer deltas (see the module docstring).

    States: "start" (no block open yet: is the reply opening one?), "opening" (a block is open but
    nothing released: a repeated <think> is dropped), "reasoning", "answer". The concatenated output of
    feed() + finish() always equals split_reasoning(whole text).
    """

    def __init__(self, starts_open: bool = False):
        self._state = "opening" if starts_open else "start"
        self._held = ""
        self.reasoning = ""  # everything released so far, for the non-streamed response and usage
        self.answer = ""

    @property
    def in_reasoning(self) -> bool:
        return self._state in ("opening", "reasoning")

    def feed(self, text: str) -> ReasoningDelta:
        if not text:
            return ReasoningDelta()
        self._held += text
        out = ReasoningDelta()
        while True:  # each pass either changes state or holds/releases text and stops
            if self._state == "answer":
                out.answer += self._held
                self._held = ""
                break
            stripped = self._held.lstrip()
            if self._state in ("start", "opening"):
                if THINK_OPEN.startswith(stripped):  # blank, or a piece of <think>: wait
                    break
                if stripped.startswith(THINK_OPEN):
                    self._held = stripped[len(THINK_OPEN):]
                    self._state = "reasoning"
                    continue
                self._state = "answer" if self._state == "start" else "reasoning"
                continue
            # reasoning: release up to </think>, hold a trailing piece of it
            before, closed, after = self._held.partition(THINK_CLOSE)
            if closed:
                out.reasoning += before
                self._held, self._state = after, "answer"
                continue
            hold = _partial_tag(self._held, THINK_CLOSE)
            out.reasoning += self._held[:len(self._held) - hold]
            self._held = self._held[len(self._held) - hold:]
            break
        self.reasoning += out.reasoning
        self.answer += out.answer
        return out

    def finish(self) -> ReasoningDelta:
        """End of the reply: what is held goes where it stands (an unclosed block stays reasoning)."""
        held, self._held = self._held, ""
        out = ReasoningDelta(answer=held) if self._state in ("start", "answer") else ReasoningDelta(reasoning=held)
        self.reasoning += out.reasoning
        self.answer += out.answer
        return out


def _drop_reasoning_text(text: str) -> str:
    return text.split(THINK_CLOSE)[-1].strip() if THINK_CLOSE in text else text


def drop_reasoning_from_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant messages without their past reasoning: the reasoning fields go, and content keeps only
    what follows the last </think> (stripped, as the GLM-Z1 template renders it). Other messages and
    content without </think> are returned unchanged; the input is not modified."""
    result = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "assistant":
            result.append(message)
            continue
        message = {key: value for key, value in message.items() if key not in HISTORY_REASONING_FIELDS}
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = _drop_reasoning_text(content)
        elif isinstance(content, list) and any(isinstance(part, dict) and THINK_CLOSE in str(part.get("text", ""))
                                               for part in content):
            joined = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            message["content"] = _drop_reasoning_text(joined)
        result.append(message)
    return result


class ContextLengthExceeded(ValueError):
    """The prompt (plus the max_tokens asked for) does not fit in --max-model-len: a 400 for the client."""

    def __init__(self, prompt_tokens: int, requested: int | None, limit: int):
        asked = requested if requested is not None else 1
        self.prompt_tokens, self.requested, self.limit = prompt_tokens, requested, limit
        self.param = "messages" if prompt_tokens >= limit else "max_tokens"
        super().__init__(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the completion). "
            "Please reduce the length of the messages or the completion.")


def default_max_tokens(prompt_tokens: int, max_model_len: int, requested: int | None = None,
                       reasoning: bool = False, generation_default: int | None = None) -> int:
    """max_tokens for one reply. Raises ContextLengthExceeded only when the prompt itself does not fit, or
    an explicit request is larger than what is left.

    A reasoning model gets the whole remaining context: GLM-Z1 thinks for thousands of tokens before it
    answers, and a cap would cut the answer off (finish_reason "length" inside the reasoning). Other models
    get the checkpoint's max_new_tokens when it sets one, else the remaining context too.
    """
    room = max_model_len - prompt_tokens
    if room <= 0 or (requested is not None and requested > room):
        raise ContextLengthExceeded(prompt_tokens, requested, max_model_len)
    if requested is not None:
        return requested
    if reasoning or not generation_default:
        return room
    return min(room, int(generation_default))
