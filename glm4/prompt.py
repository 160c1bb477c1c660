"""OpenAI-shaped messages and tools → the exact GLM-4 prompt string → token ids.

The layout (glm-4-9b-chat-hf's) is specified in shared/glm4-format.md. Rendering here is plain Python,
the "hand renderer"; glm4/chat_template.py serves a checkpoint with it only when its own chat template
renders a fixed set of probe conversations byte for byte the same, and with the template otherwise
(GLM-4-0414, GLM-Z1). `build_prompt` goes through that per-model choice.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from glm4.engine.base import Prompt

PREFIX = "[gMASK]<sop>"
GENERATION_PROMPT = "<|assistant|>"
TOOLS_PREAMBLE = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
)
TOOL_CALL_HINT = "在调用上述函数时，请使用 Json 格式表示调用的参数。"
ROLE_TOKENS = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "observation"}
# Text that would be read as a turn boundary if a user typed it; see `neutralize_special_tokens`.
SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)


class PromptError(ValueError):
    """A conversation that cannot be rendered (bad role, bad tool_choice, ...). Maps to HTTP 400."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def content_text(content: Any) -> str:
    """A message's content as text: a string, None, or a list of text parts (joined without separator)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text"):
                texts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise PromptError(f"content part of type {kind!r} is not supported: GLM-4-9B-chat reads text only",
                                  "messages")
        return "".join(texts)
    raise PromptError("message content must be a string or a list of text parts", "messages")


def neutralize_special_tokens(text: str) -> str:
    """Break GLM-4's special-token spellings in user-supplied text with a zero-width space.

    The tokenizer matches special tokens inside plain text, so a user typing "<|assistant|>" could
    otherwise forge a turn. The visible text is unchanged.
    """
    for token in SPECIAL_TOKENS:
        if token in text:
            text = text.replace(token, token[0] + "\u200b" + token[1:])
    return text


def neutralize_tools(tools: Any) -> Any:
    """A copy of tool specs with every string neutralized: a description is client text like any other.
    Iterative, so a schema nested thousands deep is copied without exhausting the stack."""
    def copy_of(value: Any) -> Any:
        if isinstance(value, str):
            return neutralize_special_tokens(value)
        return {} if isinstance(value, dict) else [] if isinstance(value, list) else value

    root = copy_of(tools)
    pending = [(tools, root)] if isinstance(tools, (dict, list)) else []
    while pending:
        source, target = pending.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, value in items:
            copied = copy_of(value)
            if isinstance(target, dict):
                target[neutralize_special_tokens(key) if isinstance(key, str) else key] = copied
            else:
                target.append(copied)
            if isinstance(value, (dict, list)):
                pending.append((value, copied))
    return root


def function_specs(tools: Iterable[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The `function` objects of OpenAI tools of type function, in the order given."""
    specs = []
    for tool in tools or []:
        if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
            raise PromptError("only tools of type 'function' are supported", "tools")
        specs.append(tool["function"])
    return specs


def render_tools_block(tools: list[dict[str, Any]]) -> str:
    """The system block that offers tools; sections are appended with no blank line between them."""
    sections = [
        f"\n## {spec['name']}\n\n{json.dumps(spec, ensure_ascii=False, indent=4)}\n{TOOL_CALL_HINT}"
        for spec in function_specs(neutralize_tools(tools))
    ]
    return "<|system|>\n" + TOOLS_PREAMBLE + "".join(sections)


def forced_function_name(tool_choice: Any, tools: list[dict[str, Any]] | None) -> str | None:
    """The function name a tool_choice forces, or None for none/auto/required."""
    if tool_choice is None or isinstance(tool_choice, str):
        if tool_choice not in (None, "none", "auto", "required"):
            raise PromptError(f"tool_choice must be none, auto, required or a function, not {tool_choice!r}",
                              "tool_choice")
        if tool_choice == "required" and not tools:
            raise PromptError("tool_choice 'required' needs at least one tool", "tool_choice")
        return None
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if not name:
        raise PromptError("tool_choice must name a function: {\"type\": \"function\", \"function\": {\"name\": ...}}",
                          "tool_choice")
    if name not in {spec.get("name") for spec in function_specs(tools)}:
        raise PromptError(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
    return name


def render_message(message: dict[str, Any]) -> str:
    role = message.get("role")
    if role not in ROLE_TOKENS:
        raise PromptError(f"unsupported message role {role!r}; use system, developer, user, assistant or tool",
                          "messages")
    rendered = ""
    if role == "assistant":
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            arguments = function.get("arguments", "")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            rendered += f"<|assistant|>{function.get('name', '')}\n{neutralize_special_tokens(arguments)}"
    text = content_text(message.get("content"))
    if text:
        rendered = f"<|{ROLE_TOKENS[role]}|>\n{neutralize_special_tokens(text)}" + rendered
    return rendered


def render_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                  tool_choice: Any = None) -> str:
    """The GLM-4 prompt string, ending with the generation prompt (and a forced function name, if any)."""
    if not messages:
        raise PromptError("messages must contain at least one message", "messages")
    offered = tools if tools and tool_choice != "none" else None
    forced = forced_function_name(tool_choice, tools) if offered else None
    parts = [PREFIX]
    if offered:
        parts.append(render_tools_block(offered))
    parts.extend(render_message(message) for message in messages)
    parts.append(GENERATION_PROMPT)
    if forced:
        parts.append(forced + "\n")
    return "".join(parts)


def build_prompt(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 tool_choice: Any = None) -> Prompt:
    """Render with the renderer chosen for this tokenizer's model (glm4/chat_template.py) and tokenize."""
    from glm4.chat_template import renderer_for  # it builds on the rules above

    return renderer_for(tokenizer).render(messages, tools, tool_choice).to_prompt()
