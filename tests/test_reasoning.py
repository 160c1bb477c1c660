"""Reasoning split from answers (glm4/reasoning.py): whole replies, every chunking, modes, history, budgets."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from glm4.reasoning import (ContextLengthExceeded, ReasoningSplitter, default_max_tokens,
                            drop_reasoning_from_history, reasoning_mode_for, resolve_reasoning, split_reasoning)
from glm4.tiny import TINY_MODEL_DIR
from glm4.tools import CALL_SEPARATOR, ToolCallStreamParser
from tests.conftest import ROOT

# (id, reply text, starts_open, expected (reasoning, answer))
CASES = [
    ("z1-closed", "step 1, step 2</think>\n\nThe answer is 4.", True, ("step 1, step 2", "\n\nThe answer is 4.")),
    ("z1-never-closed", "thinking and thinking", True, ("thinking and thinking", "")),
    ("z1-empty-reasoning", "</think>answer", True, ("", "answer")),
    ("z1-repeated-open", "\n<think>again</think>ok", True, ("again", "ok")),
    ("z1-leading-newline-kept", "\nreason</think>ok", True, ("\nreason", "ok")),
    ("z1-chinese", "让我想想：2+2=4。</think>答案是 4。", True, ("让我想想：2+2=4。", "答案是 4。")),
    ("z1-second-close-is-answer", "a</think>b</think>c", True, ("a", "b</think>c")),
    ("z1-partial-close-at-end", "thinking </thi", True, ("thinking </thi", "")),
    ("opens-itself", "<think>hmm</think>Hi!", False, ("hmm", "Hi!")),
    ("opens-after-space", "  <think>hmm</think>Hi!", False, ("hmm", "Hi!")),
    ("opens-never-closes", "<think>still going", False, ("still going", "")),
    ("no-block", "Just an answer.", False, ("", "Just an answer.")),
    ("think-later-is-answer", "Answer <think>not reasoning</think>", False, ("", "Answer <think>not reasoning</think>")),
    ("partial-open-at-end", "  <thi", False, ("", "  <thi")),
    ("only-whitespace", " \n ", False, ("", " \n ")),
    ("empty", "", False, ("", "")),
    ("empty-open", "", True, ("", "")),
]


def _stream(chunks, starts_open):
    splitter = ReasoningSplitter(starts_open)
    reasoning = answer = ""
    for chunk in chunks:
        delta = splitter.feed(chunk)
        reasoning, answer = reasoning + delta.reasoning, answer + delta.answer
    delta = splitter.finish()
    assert (splitter.reasoning, splitter.answer) == (reasoning + delta.reasoning, answer + delta.answer)
    return reasoning + delta.reasoning, answer + delta.answer


def _every_split(text: str) -> list[list[str]]:
    """The whole text, one character at a time, every two-piece split, every three-piece split around the
    tags, and random chunkings."""
    result = [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]
    for tag in ("</think>", "<think>"):
        at = text.find(tag)
        if at >= 0:
            result += [[text[:i], text[i:j], text[j:]] for i in range(at, at + len(tag))
                       for j in range(i + 1, at + len(tag) + 1)]
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 5)))) if len(text) > 1 else []
        result.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return result


@pytest.mark.parametrize("text, starts_open, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_whole_reply_split(text, starts_open, expected):
    assert split_reasoning(text, starts_open) == expected


@pytest.mark.parametrize("text, starts_open, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_chunking_gives_the_whole_split(text, starts_open, expected):
    for chunks in _every_split(text):
        assert _stream(chunks, starts_open) == expected, chunks


def test_close_tag_is_held_only_while_it_can_still_be_one():
    splitter = ReasoningSplitter(starts_open=True)
    assert splitter.feed("abc</th").reasoning == "abc"  # "</th" may be the start of </think>: held
    delta = splitter.feed("ink>Hi")
    assert (delta.reasoning, delta.answer) == ("", "Hi") and not splitter.in_reasoning
    splitter = ReasoningSplitter(starts_open=True)
    splitter.feed("x </")
    assert splitter.feed("b>").reasoning == "</b>"  # ruled out: released at once, exactly once


def test_text_is_not_delayed_outside_tags():
    splitter = ReasoningSplitter(starts_open=False)
    assert splitter.feed("Hello").answer == "Hello"  # cannot start <think>: straight through
    splitter = ReasoningSplitter(starts_open=True)
    assert splitter.feed("deep thought").reasoning == "deep thought"


def test_tool_call_after_the_reasoning_is_found():
    """The splitter's answer stream feeds the tool parser: a call written after </think> is a call."""
    tools = [{"type": "function", "function": {"name": "get_weather"}},
             {"type": "function", "function": {"name": "get_time"}}]
    text = 'I need the weather.</think>get_weather\n{"city": "北京"}' + CALL_SEPARATOR + "get_time\n{}"
    for chunks in _every_split(text):
        splitter, parser = ReasoningSplitter(starts_open=True), ToolCallStreamParser(tools)
        events, reasoning = [], ""
        for chunk in chunks:
            delta = splitter.feed(chunk)
            reasoning += delta.reasoning
            events += parser.feed(delta.answer)
        delta = splitter.finish()
        reasoning += delta.reasoning
        events += parser.feed(delta.answer) + parser.finish()
        assert reasoning == "I need the weather."
        assert [(c.name, c.arguments) for c in parser.tool_calls] == [("get_weather", '{"city": "北京"}'),
                                                                      ("get_time", "{}")]
        assert not [e for e in events if e.kind == "content"]


@pytest.mark.parametrize("setting, opens, enabled", [
    ("auto", True, True), ("auto", False, False), ("think", False, True), ("think", True, True),
    ("none", True, False), ("none", False, False)])
def test_reasoning_parser_setting(setting, opens, enabled):
    mode = resolve_reasoning(setting, opens)
    assert mode.enabled == enabled
    splitter = mode.splitter()
    assert (splitter is not None) == enabled
    if splitter:  # think on a model whose prompt does not open the block: the reply must open it itself
        assert splitter.in_reasoning == opens


def test_unknown_reasoning_parser_is_refused():
    with pytest.raises(ValueError, match="auto, think, none"):
        resolve_reasoning("deepseek", False)


def test_auto_detects_the_z1_template_and_not_the_others(tiny_z1_dir, tiny_glm4_dir):
    assert reasoning_mode_for(AutoTokenizer.from_pretrained(tiny_z1_dir), "auto").enabled
    assert not reasoning_mode_for(AutoTokenizer.from_pretrained(tiny_glm4_dir), "auto").enabled
    assert not reasoning_mode_for(AutoTokenizer.from_pretrained(TINY_MODEL_DIR), "auto").enabled


def test_history_loses_past_reasoning():
    messages = [
        {"role": "user", "content": "<think>user text is kept</think> as is"},
        {"role": "assistant", "content": "<think>old thoughts</think>\n\nFour.", "reasoning_content": "old"},
        {"role": "assistant", "content": "plain", "reasoning": "vLLM's field"},
        {"role": "assistant", "content": [{"type": "text", "text": "<think>x</think>"}, {"type": "text", "text": " y"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]},
    ]
    original = [dict(m) for m in messages]
    cleaned = drop_reasoning_from_history(messages)
    assert cleaned[0] == messages[0]
    assert cleaned[1] == {"role": "assistant", "content": "Four."}
    assert cleaned[2] == {"role": "assistant", "content": "plain"}
    assert cleaned[3]["content"] == "y"
    assert cleaned[4] == messages[4]
    assert messages == original  # the caller's messages are not modified


def test_reasoning_model_gets_the_whole_remaining_context():
    assert default_max_tokens(1000, 32768, reasoning=True, generation_default=512) == 31768
    assert default_max_tokens(1000, 32768, reasoning=False, generation_default=512) == 512
    assert default_max_tokens(1000, 32768) == 31768
    assert default_max_tokens(1000, 32768, requested=100, reasoning=True) == 100


@pytest.mark.parametrize("prompt_tokens, requested, param", [(8192, None, "messages"), (9000, None, "messages"),
                                                             (8000, 500, "max_tokens")])
def test_context_overflow_is_a_client_error_naming_the_numbers(prompt_tokens, requested, param):
    with pytest.raises(ContextLengthExceeded) as caught:
        default_max_tokens(prompt_tokens, 8192, requested=requested, reasoning=True)
    assert caught.value.param == param and "8192" in str(caught.value) and str(prompt_tokens) in str(caught.value)


def test_plan_only_says_how_long_a_z1_conversation_can_grow(tiny_z1_dir):
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--plan-only", "--model", str(tiny_z1_dir),
                             "--simulate-gpus", "RTX 2080 Ti:11GiB:7.5", "--max-model-len", "32768"],
                            capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1",
                                                                              "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("reasoning model"))
    assert "can grow to 32768 tokens" in line and "fit at once" in line and "max_tokens" in line
