"""Grammar constraints (glm4/engine/constraints.py) driving the real tiny GLM-4, which knows nothing of JSON.

Each sampling test decodes 20 seeds at temperature 1 in one batch with a loop of its own (raw forward of
the model through transformers, the mask applied with apply_bitmask, one torch.Generator per seed): the
replies must parse and validate only because the masks make them.
"""

from __future__ import annotations

import json
import threading

import jsonschema
import openai
import pydantic
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from glm4.engine.base import MatcherError
from glm4.engine.constraints import (
    AutoToolCallMatcher,
    ConstraintCompiler,
    UnsupportedSchema,
    allocate_bitmask,
    apply_bitmask,
)
from glm4.prompt import build_prompt
from glm4.tiny import TINY_MODEL_DIR
from glm4.tools import parse_tool_call

SEEDS = list(range(20))
SEPARATOR = "<|assistant|>"


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Tiny decode steps: with more intra-op threads than free cores they spin-wait (glm4/engine/local.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def compiler(tiny):
    model, tokenizer = tiny
    return ConstraintCompiler(tokenizer, vocab_size=model.config.vocab_size)


def sample_replies(tiny, compiler, prompt_ids: list[int], constraint, max_tokens: int = 256,
                   written: str = "") -> list[dict]:
    """One reply per seed: text (the leading "\\n" stripped, special tokens kept), why it ended
    ("grammar" = is_finished, "stop" = a stop token, "length"), and how many steps were masked.
    `written`: reply text the model is taken to have written already (fed to the matchers first)."""
    model, tokenizer = tiny
    written_ids = tokenizer.encode(written, add_special_tokens=False) if written else []
    matchers = [constraint.new_matcher() for _ in SEEDS]
    for matcher in matchers:
        for token in written_ids:
            matcher.accept(token)
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    bitmask = allocate_bitmask(len(SEEDS), compiler.vocab_size)
    cache = DynamicCache(config=model.config)
    inputs = torch.tensor([prompt_ids + written_ids] * len(SEEDS))
    outputs = [list(written_ids) for _ in SEEDS]
    ended: list[str | None] = [None] * len(SEEDS)
    masked = [0] * len(SEEDS)
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(input_ids=inputs, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        rows = [i for i, matcher in enumerate(matchers) if ended[i] is None and matcher.fill_bitmask(bitmask, i)]
        apply_bitmask(logits, bitmask, rows)
        for i in rows:
            masked[i] += 1
        probs = torch.softmax(logits, dim=-1)  # temperature 1
        next_tokens = []
        for i, matcher in enumerate(matchers):
            if ended[i] is not None:
                next_tokens.append(tokenizer.pad_token_id)  # a finished row keeps its place in the batch
                continue
            token = int(torch.multinomial(probs[i], 1, generator=generators[i]))
            matcher.accept(token)
            if token in compiler.stop_ids:
                ended[i] = "stop"
            else:
                outputs[i].append(token)
                if matcher.is_finished():
                    ended[i] = "grammar"
            next_tokens.append(token)
        if all(ended):
            break
        inputs = torch.tensor(next_tokens)[:, None]
    replies = []
    for ids, why, steps in zip(outputs, ended, masked):
        text = tokenizer.decode(ids, skip_special_tokens=False)
        replies.append({"text": text[1:] if text.startswith("\n") else text, "ended": why or "length",
                        "masked_steps": steps})
    return replies


def chat_prompt(tokenizer, content: str, tools=None, tool_choice=None) -> list[int]:
    return build_prompt(tokenizer, [{"role": "user", "content": content}], tools, tool_choice).token_ids


# --- JSON schema: nested objects, arrays, enums, required fields, Chinese strings ------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "city": {"type": "string", "enum": ["北京", "上海", "广州", "杭州"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["学生", "工程师", "医生"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string", "maxLength": 12},
                           "zip": {"type": "string", "pattern": "^[0-9]{6}$"}},
            "required": ["street", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "city", "age", "tags", "address"],
    "additionalProperties": False,
}

ORDER = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"},
        "items": {
            "type": "array", "minItems": 1, "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"title": {"type": "string", "maxLength": 6},
                               "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                               "price": {"type": "number", "minimum": 0, "maximum": 10000},
                               "gift": {"type": "boolean"}},
                "required": ["title", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "status": {"enum": ["待付款", "已发货", "已完成"]},
        "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
    },
    "required": ["order_id", "items", "status", "note"],
    "additionalProperties": False,
}


class Review(pydantic.BaseModel):
    """What the OpenAI SDK sends for `parse(response_format=Review)`: a strict schema with $defs/$ref."""

    class Aspect(pydantic.BaseModel):
        topic: str = pydantic.Field(max_length=6)
        score: int = pydantic.Field(ge=1, le=5)

    product: str = pydantic.Field(max_length=8)
    sentiment: str = pydantic.Field(json_schema_extra={"enum": ["好评", "中评", "差评"]})
    aspects: list[Aspect] = pydantic.Field(max_length=2)
    recommended: bool


REVIEW = openai.pydantic_function_tool(Review)["function"]["parameters"]  # the SDK's strict conversion


@pytest.mark.parametrize("schema, strict", [(PERSON, False), (ORDER, False), (REVIEW, True)],
                         ids=["person-nested-enums-chinese", "order-array-of-objects", "sdk-strict-refs"])
def test_json_schema_replies_parse_and_validate(tiny, compiler, schema, strict):
    _, tokenizer = tiny
    prompt = chat_prompt(tokenizer, "请只用 JSON 回答：介绍一下你自己。")
    replies = sample_replies(tiny, compiler, prompt, compiler.json_schema(schema, strict=strict))
    for reply in replies:
        assert reply["ended"] == "grammar", reply  # generation ends when the value is complete
        jsonschema.validate(json.loads(reply["text"]), schema)
    assert len({reply["text"] for reply in replies}) > 10, "the seeds should give different replies"


def test_strict_closes_objects_and_requires_every_property(tiny, compiler):
    """OpenAI's strict semantics: no keys beyond `properties`, none of them left out."""
    _, tokenizer = tiny
    schema = {"type": "object", "properties": {"city": {"enum": ["北京", "上海"]},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
    strict_schema = {**schema, "additionalProperties": False, "required": ["city", "days"]}
    prompt = chat_prompt(tokenizer, "请只用 JSON 回答：北京天气怎么样？")
    for reply in sample_replies(tiny, compiler, prompt, compiler.json_schema(schema, strict=True), max_tokens=64):
        assert reply["ended"] == "grammar", reply
        jsonschema.validate(json.loads(reply["text"]), strict_schema)


def test_json_object_replies_parse(tiny, compiler):
    """Any JSON object. Free strings and keys are unbounded, so a rambling model may reach max_tokens
    (finish reason "length", as with OpenAI): every reply that ends is an object, and most end."""
    _, tokenizer = tiny
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    prompt = chat_prompt(tokenizer, "北京天气怎么样？", tools)  # the model would answer with a tool call
    replies = sample_replies(tiny, compiler, prompt, compiler.json_object(), max_tokens=512)
    finished = [reply for reply in replies if reply["ended"] == "grammar"]
    for reply in finished:
        assert isinstance(json.loads(reply["text"]), dict), reply
    for reply in replies:
        assert reply["ended"] in ("grammar", "length") and reply["text"].startswith("{"), reply
    assert len(finished) >= len(replies) // 2, [reply["ended"] for reply in replies]


# --- GLM-4 tool calls -----------------------------------------------------------------------------------------

# Parameters the tiny model has never seen (it learned get_weather with {"city": ...}): only masks make them fit.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询城市天气",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "enum": ["北京", "上海", "东京"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["location", "unit"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search_docs", "description": "搜索文档", "strict": True,
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "maxLength": 12},
        "top_k": {"type": "integer", "minimum": 1, "maximum": 10}}}}}
TOOLS = [WEATHER, SEARCH]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
STRICT_SEARCH = {**SEARCH["function"]["parameters"], "additionalProperties": False, "required": ["query", "top_k"]}


def check_call(text: str, forced_name: str | None = None):
    """One call's text must be what glm4/tools.py accepts, with arguments valid for the function."""
    call = parse_tool_call(text, TOOLS, forced_name=forced_name)
    assert call is not None, text
    schema = STRICT_SEARCH if call.name == "search_docs" else PARAMETERS[call.name]
    jsonschema.validate(json.loads(call.arguments), schema)
    return call


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "single"])
def test_required_tool_choice_always_calls_with_valid_arguments(tiny, compiler, parallel):
    _, tokenizer = tiny
    prompt = chat_prompt(tokenizer, "北京天气怎么样？", TOOLS, "required")
    constraint = compiler.tool_call(TOOLS, "required", parallel_tool_calls=parallel)
    for reply in sample_replies(tiny, compiler, prompt, constraint):
        assert reply["ended"] in ("stop", "grammar"), reply
        parts = reply["text"].split(SEPARATOR)
        assert parallel or len(parts) == 1, reply
        for part in parts:
            check_call(part)


def test_parallel_calls_are_separated_by_the_assistant_token(tiny, compiler):
    """After a complete call: another call (after <|assistant|>) or the end; the second call fits too."""
    model, tokenizer = tiny
    first = 'get_weather\n{"location": "北京", "unit": "celsius"}'
    separator = tokenizer.convert_tokens_to_ids(SEPARATOR)
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    for parallel in (True, False):
        matcher = compiler.tool_call(TOOLS, "required", parallel_tool_calls=parallel).new_matcher()
        for token in tokenizer.encode(first, add_special_tokens=False):
            matcher.accept(token)
        assert matcher.fill_bitmask(bitmask, 0)
        allowed = allowed_ids(bitmask, compiler.vocab_size)
        assert compiler.stop_ids <= allowed
        assert (separator in allowed) == parallel
        assert matcher.is_finished() == (not parallel)  # one call only: nothing may follow
    prompt = chat_prompt(tokenizer, "北京天气怎么样？", TOOLS, "required")
    constraint = compiler.tool_call(TOOLS, "required", parallel_tool_calls=True)
    for reply in sample_replies(tiny, compiler, prompt, constraint, written=first + SEPARATOR):
        first_call, second_call, *more = reply["text"].split(SEPARATOR)
        assert first_call == first
        for part in [second_call, *more]:
            check_call(part)


def test_forced_function_writes_only_its_arguments(tiny, compiler):
    _, tokenizer = tiny
    choice = {"type": "function", "function": {"name": "search_docs"}}
    prompt = chat_prompt(tokenizer, "北京天气怎么样？", TOOLS, choice)  # ends with "<|assistant|>search_docs\n"
    assert tokenizer.decode(prompt).endswith("<|assistant|>search_docs\n")
    replies = sample_replies(tiny, compiler, prompt, compiler.tool_call(TOOLS, choice))
    for reply in replies:
        assert reply["ended"] == "grammar", reply
        assert check_call(reply["text"], forced_name="search_docs").name == "search_docs"


def allowed_ids(bitmask: torch.Tensor, vocab: int, row: int = 0) -> set[int]:
    logits = torch.zeros(1, vocab)
    apply_bitmask(logits, bitmask[row:row + 1], [0])
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def test_auto_lets_prose_through_and_constrains_a_call_once_begun(tiny, compiler):
    model, tokenizer = tiny
    constraint = compiler.tool_call(TOOLS, "auto")
    bitmask = allocate_bitmask(1, compiler.vocab_size)

    prose = constraint.new_matcher()  # GLM-4 prose starts with "\n": never masked
    for token in tokenizer.encode("\n你好！get_weather\n{", add_special_tokens=False):
        assert prose.fill_bitmask(bitmask, 0) is False
        prose.accept(token)
    assert prose.state == "prose" and not prose.is_finished()

    call = constraint.new_matcher()
    for token in tokenizer.encode("get_weather\n", add_special_tokens=False):
        assert call.fill_bitmask(bitmask, 0) is False  # the first line may still become prose
        call.accept(token)
    assert call.state == "call" and call.fill_bitmask(bitmask, 0)
    allowed = [tokenizer.decode([token]) for token in allowed_ids(bitmask, compiler.vocab_size)]
    assert allowed and all(text.startswith("{") for text in allowed), allowed  # the arguments object

    # Sampled: a prompt the model answers in prose and one it answers with a call; each reply is either
    # unmasked prose or a call that fits.
    kinds = set()
    for content in ("你好，介绍一下你自己。", "北京天气怎么样？"):
        for reply in sample_replies(tiny, compiler, chat_prompt(tokenizer, content, TOOLS, "auto"), constraint):
            if parse_tool_call(reply["text"].split(SEPARATOR)[0], TOOLS) is None:
                assert reply["masked_steps"] == 0, reply
                kinds.add("prose")
            else:
                for part in reply["text"].split(SEPARATOR):
                    check_call(part)
                kinds.add("call")
    assert kinds == {"prose", "call"}

    # A call begun with a name the model would continue wrongly ({"city": ...}) is held to the schema.
    prompt = chat_prompt(tokenizer, "北京天气怎么样？", TOOLS, "auto")
    for reply in sample_replies(tiny, compiler, prompt, constraint, written="get_weather\n"):
        assert reply["masked_steps"] > 0
        check_call(reply["text"].split(SEPARATOR)[0])


# --- errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schema, strict, words", [
    ({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}, False,
     ["uniqueItems", "#/properties/tags"]),
    ({"type": "object", "properties": {"code": {"type": "string", "pattern": "^(?=.*[0-9]).+$"}}}, False,
     ["look-around", "#/properties/code"]),
    ({"type": "object", "properties": {"colour": {"type": "string", "format": "favourite-colour"}}}, False,
     ["favourite-colour", "#/properties/colour"]),
    ({"$defs": {"a": {"type": "object"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}},
     False, ["/$defs/missing", "#/properties/x"]),
    ({"type": "object", "properties": {"v": {"not": {"type": "string"}}}}, False, ["not", "#/properties/v"]),
    ({"type": "object", "properties": {"meta": {"type": "object", "additionalProperties": {"type": "string"}}}},
     True, ["additionalProperties", "#/properties/meta"]),
    ({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}, "required": ["a"]},
     True, ["required", "'b'"]),
    ("not a schema", False, ["JSON object"]),
], ids=["uniqueItems", "lookahead-pattern", "unknown-format", "dangling-ref", "not", "strict-open-map",
        "strict-optional-property", "not-an-object"])
def test_unsupported_schema_names_the_feature_and_path(compiler, schema, strict, words):
    with pytest.raises(UnsupportedSchema) as raised:
        compiler.json_schema(schema, strict=strict)
    for word in words:
        assert word in str(raised.value)


def test_unsupported_tool_parameters_name_the_tool(compiler):
    bad = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"ids": {"type": "array", "contains": {"const": 1}}}}}}
    with pytest.raises(UnsupportedSchema, match=r"tools\[1\]\.function\.parameters#/properties/ids.*contains"):
        compiler.tool_call([WEATHER, bad], "required")
    with pytest.raises(UnsupportedSchema, match="not among the tools"):
        compiler.tool_call(TOOLS, {"type": "function", "function": {"name": "nope"}})


def test_refused_token_raises_matcher_error_and_leaves_other_matchers_alone(tiny, compiler):
    _, tokenizer = tiny
    constraint = compiler.json_schema(PERSON)
    broken, healthy = constraint.new_matcher(), constraint.new_matcher()
    with pytest.raises(MatcherError, match="doesn't satisfy the grammar"):
        broken.accept(tokenizer.convert_tokens_to_ids("H"))
    with pytest.raises(MatcherError):
        broken.fill_bitmask(allocate_bitmask(1, compiler.vocab_size), 0)
    text = '{"name": "小明", "city": "上海", "age": 9, "tags": [], "address": {"street": "南京路", "zip": "200001"}}'
    for token in tokenizer.encode(text, add_special_tokens=False):
        healthy.accept(token)
    assert healthy.is_finished()
    fresh = constraint.new_matcher()  # the compiled grammar is untouched by either
    assert not fresh.is_finished() and fresh.fill_bitmask(allocate_bitmask(1, compiler.vocab_size), 0)


def test_a_call_once_begun_in_auto_refuses_tokens_like_any_matcher(tiny, compiler):
    _, tokenizer = tiny
    matcher = compiler.tool_call(TOOLS, "auto").new_matcher()
    assert isinstance(matcher, AutoToolCallMatcher)
    for token in tokenizer.encode("search_docs\n", add_special_tokens=False):
        matcher.accept(token)
    with pytest.raises(MatcherError):
        matcher.accept(tokenizer.convert_tokens_to_ids("H"))


# --- masks, vocabulary, cache, threads ------------------------------------------------------------------------

def test_tokens_beyond_the_tokenizer_are_never_allowed(tiny):
    """Logits can be wider than the tokenizer (GLM-4: 151,552 rows for ~151,343 tokens)."""
    _, tokenizer = tiny
    wide = ConstraintCompiler(tokenizer, vocab_size=len(tokenizer) + 62)
    matcher = wide.json_schema({"type": "object", "properties": {"s": {"type": "string"}}}).new_matcher()
    for token in tokenizer.encode('{"s": "', add_special_tokens=False):  # inside a string nearly all is allowed
        matcher.accept(token)
    bitmask = allocate_bitmask(2, wide.vocab_size)
    assert matcher.fill_bitmask(bitmask, 1)
    logits = torch.full((2, wide.vocab_size + 10), 50.0)  # and wider still than the mask
    apply_bitmask(logits, bitmask, [1])
    assert torch.isinf(logits[1, len(tokenizer):]).all()
    assert (logits[1, :len(tokenizer)] == 50).sum() > len(tokenizer) // 2
    assert (logits[0] == 50).all()  # rows not listed are untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_bitmask_on_cuda_matches_cpu(tiny, compiler):
    _, tokenizer = tiny
    matcher = compiler.json_schema(ORDER).new_matcher()
    bitmask = allocate_bitmask(3, compiler.vocab_size)
    matcher.fill_bitmask(bitmask, 2)
    logits = torch.randn(3, compiler.vocab_size)
    on_device = logits.cuda()
    apply_bitmask(logits, bitmask, [2])
    apply_bitmask(on_device, bitmask, [2])
    assert torch.equal(on_device.cpu(), logits)


def test_repeated_schemas_compile_once(compiler):
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    before = compiler.cache_info()
    first = compiler.json_schema(schema)
    again = compiler.json_schema(json.loads(json.dumps(schema)))
    assert again is first
    assert compiler.cache_info()["hits"] == before["hits"] + 1
    assert compiler.json_schema(schema, strict=True) is not first


def test_masks_computed_on_a_background_thread_match(tiny, compiler):
    _, tokenizer = tiny
    constraint = compiler.json_schema(ORDER)
    here, there = constraint.new_matcher(), constraint.new_matcher()
    masks = allocate_bitmask(2, compiler.vocab_size)
    for token in tokenizer.encode('{"order_id": "ORD-12', add_special_tokens=False):
        here.accept(token)
        there.accept(token)
    worker = threading.Thread(target=there.fill_bitmask, args=(masks, 1))
    worker.start()
    here.fill_bitmask(masks, 0)
    worker.join()
    assert torch.equal(masks[0], masks[1])
    allowed = [tokenizer.decode([token]) for token in allowed_ids(masks, compiler.vocab_size)]
    assert "3" in allowed and all(text[0].isdigit() for text in allowed), allowed  # the pattern wants digits
