"""The chat UI's logic without a browser (glm4/ui.py): history mapping, context trimming, the chat
function against the real tiny engine (streaming, stop → cancel), and the mount (auth, root path, share)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from fastapi.testclient import TestClient

from glm4 import ui
from glm4.engine.base import ModelInfo, SamplingParams
from glm4.prompt import build_prompt
from glm4.server import create_app
from glm4.settings import Settings
from glm4.tiny import TINY_MODEL_DIR


def text_part(text: str) -> list[dict]:
    return [{"type": "text", "text": text}]


def replies(yielded: list) -> list[str]:
    """The model's reply text in one yield of the chat fn (notices are ChatMessages, the reply a str)."""
    return [item for item in yielded if isinstance(item, str)]


def titles(yielded: list) -> list[str]:
    return [item.metadata["title"] for item in yielded if not isinstance(item, str)]


async def collect(generator) -> list[list]:
    return [list(item) async for item in generator]


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"condition not reached in time: {predicate.__doc__ or ''}"
        await asyncio.sleep(0.02)


# ---- history → messages ----

@pytest.mark.parametrize("content, expected", [
    ("plain", "plain"),
    (text_part("你好"), "你好"),
    ([{"type": "text", "text": "a"}, "b"], "ab"),
    ({"type": "text", "text": "single part"}, "single part"),
    ([{"type": "file", "file": {"path": "/tmp/x.png"}}, {"type": "text", "text": "caption"}], "caption"),
    (None, ""),
], ids=["string", "parts", "mixed", "one-part", "file-skipped", "none"])
def test_history_text_normalizes_gradio_content(content, expected):
    assert ui.history_text(content) == expected


def test_to_messages_maps_history_and_skips_notices():
    history = [
        {"role": "user", "content": text_part("Hi")},
        {"role": "assistant", "content": text_part("✂️"), "metadata": {"title": "✂️ Dropped the 1 oldest turn"}},
        {"role": "assistant", "content": text_part("Hello!"), "metadata": None},
        {"role": "user", "content": "第二个问题"},
        {"role": "assistant", "content": text_part("")},  # a reply stopped before its first token
    ]
    assert ui.to_messages("  Be brief.  ", history, "再见") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "第二个问题"},
        {"role": "user", "content": "再见"},
    ]
    assert ui.to_messages("", [], "x") == [{"role": "user", "content": "x"}]


# ---- context window ----

def conversation(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"question {i}: how do I use 4-bit?"},
                     {"role": "assistant", "content": f"answer {i}: pass --quantization 4bit. " * 3}]
    return messages + [{"role": "user", "content": "And on two GPUs?"}]


def test_fit_context_keeps_everything_that_fits(tiny):
    build = lambda messages: build_prompt(tiny.tokenizer, messages)  # noqa: E731
    messages = conversation(3)
    fitted = ui.fit_context(messages, build, max_model_len=4096, max_tokens=256)
    assert (fitted.dropped_turns, fitted.max_tokens) == (0, 256)
    assert fitted.prompt.messages == messages


def test_fit_context_drops_oldest_turns_and_keeps_system_prompt(tiny):
    build = lambda messages: build_prompt(tiny.tokenizer, messages)  # noqa: E731
    messages = conversation(4)
    last_two_turns = messages[:1] + messages[-5:]  # system + turns 2, 3 and the new question
    room = len(build(last_two_turns).token_ids) + 32  # exactly enough for these and a 32-token reply
    fitted = ui.fit_context(messages, build, max_model_len=room, max_tokens=32)
    assert fitted.dropped_turns == 2
    assert fitted.prompt.messages == last_two_turns
    assert len(fitted.prompt.token_ids) + fitted.max_tokens <= room


def test_fit_context_shrinks_the_reply_budget_for_one_long_message(tiny):
    build = lambda messages: build_prompt(tiny.tokenizer, messages)  # noqa: E731
    messages = conversation(2)
    alone = [messages[0], messages[-1]]
    room = len(build(alone).token_ids) + 40
    fitted = ui.fit_context(messages, build, max_model_len=room, max_tokens=1024)
    assert fitted.prompt.messages == alone
    assert fitted.max_tokens == 40


def test_fit_context_refuses_a_message_that_does_not_fit(tiny):
    build = lambda messages: build_prompt(tiny.tokenizer, messages)  # noqa: E731
    messages = [{"role": "user", "content": "很长的问题。" * 200}]
    with pytest.raises(ui.ContextOverflow, match="too long"):
        ui.fit_context(messages, build, max_model_len=128, max_tokens=64)


# ---- header, defaults, download, tool calls ----

def info(**overrides) -> ModelInfo:
    fields = dict(name="glm-4", source="THUDM/glm-4-9b-chat-hf", quantization="4bit", dtype="float16",
                  placement="all layers on RTX 2080 Ti", max_model_len=8192)
    return ModelInfo(**{**fields, **overrides})


def test_model_title_names_model_quantization_and_placement():
    assert ui.model_title(info()) == "GLM-4-9B-chat · 4-bit · all layers on RTX 2080 Ti"
    # The placement plan's own summary already names quantization and dtype.
    tiny_info = info(source=str(TINY_MODEL_DIR), quantization="none", dtype="float32",
                     placement="all 4 layers on CPU · unquantized · float32")
    assert ui.model_title(tiny_info) == "Embedded tiny GLM-4 demo model · all 4 layers on CPU · unquantized · float32"


def test_sampling_defaults_come_from_the_checkpoint_capped_by_the_window():
    assert ui.sampling_defaults(info(generation_defaults={"temperature": 0.6, "top_k": 5})) == \
        {"temperature": 0.6, "top_p": 0.8, "max_new_tokens": 1024}
    assert ui.sampling_defaults(info(max_model_len=512))["max_new_tokens"] == 512


def test_conversation_markdown_leaves_out_notices():
    history = [{"role": "user", "content": text_part("你好")},
               {"role": "assistant", "content": "", "metadata": {"title": "⏳ Waiting"}},
               {"role": "assistant", "content": text_part("你好！")}]
    assert ui.conversation_markdown("GLM-4", history) == \
        "# Conversation with GLM-4\n\n**You:**\n\n你好\n\n**GLM-4:**\n\n你好！\n"


def test_render_reply_shows_a_call_to_an_offered_tool_collapsed():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    reply = 'get_weather\n{"city": "北京"}'
    assert ui.render_reply(reply, None) == reply  # the UI offers no tools by default
    shown = ui.render_reply(reply, tools)
    assert shown.startswith("<details><summary>🔧 called get_weather</summary>") and '"city": "北京"' in shown


# ---- the chat function on the real tiny engine ----

async def test_respond_streams_the_accumulated_reply(engine):
    chat = ui.ChatSession(engine)
    history = [{"role": "user", "content": text_part("你好")}, {"role": "assistant", "content": text_part("你好！")}]
    yields = await collect(chat.respond("怎么用 curl 流式输出？", history, "", 0.0, 1.0, 64))
    texts = [replies(item)[-1] for item in yields]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))  # accumulated
    assert texts[-1] and not titles(yields[-1])
    # The same request straight through the engine gives the same text (greedy).
    prompt = build_prompt(engine.tokenizer, ui.to_messages("", history, "怎么用 curl 流式输出？"))
    direct = "".join([d.text async for d in engine.submit(prompt, SamplingParams(temperature=0, max_tokens=64), "x")])
    assert texts[-1] == direct
    assert engine.stats()["submitted"] == 2


LONG_REPLY = ui.TEST_FORCE_PREFIX + " " + "这是一个很长的故事。" * 400  # cannot end before it is stopped


async def test_forced_reply_needs_test_hooks(engine):
    assert ui.ChatSession(engine).forced_reply(LONG_REPLY) is None
    yields = await collect(ui.ChatSession(engine, test_hooks=True).respond(
        "hi", [], ui.TEST_FORCE_PREFIX + " 你好！我是测试。", 1.0, 1.0, 64))
    assert replies(yields[-1]) == ["你好！我是测试。"]


async def test_closing_the_chat_fn_cancels_the_engine_request(engine):
    """Gradio closes the generator when the user presses stop: the engine must drop the request."""
    chat = ui.ChatSession(engine, test_hooks=True)
    generator = chat.respond("Tell me everything about this server", [], LONG_REPLY, 0.8, 0.8, 4000)
    while not replies(await anext(generator)):
        pass
    await generator.aclose()
    await wait_for(lambda: engine.stats().get("finished_cancelled") == 1 and engine.stats()["running"] == 0)


async def test_cancelling_the_chat_task_cancels_the_engine_request(engine):
    chat = ui.ChatSession(engine, test_hooks=True)
    started = asyncio.Event()

    async def consume():
        async for item in chat.respond("讲一个很长的故事", [], LONG_REPLY, 0.8, 0.8, 4000):
            if replies(item):
                started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: engine.stats().get("finished_cancelled") == 1 and engine.stats()["running"] == 0)


async def test_respond_says_when_the_message_does_not_fit(engine):
    yields = await collect(ui.ChatSession(engine).respond("长" * 20000, [], "", 0.8, 0.8, 256))
    assert len(yields) == 1 and titles(yields[0]) == ["⚠️ Message too long"]
    assert engine.stats().get("submitted", 0) == 0


@pytest.fixture
async def one_slot(tiny):
    """A real engine with one batch slot and one queue place, as `--max-num-seqs 1 --max-queue 1` builds it."""
    from glm4.engine.local import LocalEngine

    local = LocalEngine(tiny.models[0], tiny.tokenizer, tiny.info, max_num_seqs=1, max_queue=1)
    await local.start()
    yield local
    await local.shutdown()


def occupy(engine, request_id: str):
    """A request that cannot finish during the test (4000 tokens past its stop token); its stream."""
    prompt = build_prompt(engine.tokenizer, [{"role": "user", "content": "讲一个很长的故事"}])
    return engine.submit(prompt, SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True), request_id)


async def test_respond_says_busy_when_the_engine_queue_is_full(one_slot):
    running = occupy(one_slot, "running")
    await anext(running)  # decoding: the one slot is taken
    queued = occupy(one_slot, "queued")  # the one queue place is taken
    assert (one_slot.stats()["running"], one_slot.stats()["waiting"]) == (1, 1)
    yields = await collect(ui.ChatSession(one_slot).respond("hi", [], "", 0.8, 0.8, 64))
    assert yields == [[ui.notice(ui.BUSY_TITLE)]]
    assert one_slot.stats()["rejected"] == 1
    for stream in (queued, running):
        await stream.aclose()  # cancels


async def test_respond_shows_waiting_until_the_first_token(one_slot):
    running = occupy(one_slot, "running")
    await anext(running)
    generator = ui.ChatSession(one_slot).respond("hi", [], "", 0, 1, 8)
    first = list(await anext(generator))
    assert titles(first) == ["⏳ Waiting for a free slot: 0 request(s) ahead of yours"] and not replies(first)
    assert one_slot.stats()["waiting"] == 1
    await running.aclose()  # the slot frees: the waiting reply gets it and streams
    rest = [list(item) async for item in generator]
    assert not titles(rest[-1]) and replies(rest[-1])
    assert one_slot.stats()["finished_cancelled"] == 1 and one_slot.stats()["running"] == 0


async def test_respond_shows_no_waiting_notice_when_a_slot_is_free(one_slot):
    yields = await collect(ui.ChatSession(one_slot).respond("hi", [], "", 0, 1, 8))
    assert all(not titles(item) for item in yields) and replies(yields[-1])


# ---- the mount ----

def test_ui_is_mounted_without_shadowing_the_api(engine):
    with TestClient(create_app(Settings(model="tiny"), engine)) as client:
        assert "<html" in client.get("/").text
        assert client.get("/config").json()["title"] == "GLM-4 chat"
        assert client.get("/v1/models").status_code == 200


def test_ui_auth_protects_the_ui_only(engine):
    with TestClient(create_app(Settings(model="tiny", ui_auth="alice:s3cret"), engine)) as client:
        assert client.get("/config").status_code == 401
        assert client.get("/v1/models").status_code == 200  # the API has its own --api-key
        assert client.post("/login", data={"username": "alice", "password": "wrong"}).status_code == 400
        assert client.post("/login", data={"username": "alice", "password": "s3cret"}).status_code == 200
        assert client.get("/config").status_code == 200


def test_root_path_is_used_for_the_ui_urls(engine):
    with TestClient(create_app(Settings(model="tiny", root_path="/chat"), engine)) as client:
        assert client.get("/config").json()["root"].endswith("/chat")


def test_no_ui_serves_the_api_only(engine):
    with TestClient(create_app(Settings(model="tiny", no_ui=True), engine)) as client:
        assert client.get("/config").status_code == 404
        assert client.get("/v1/models").status_code == 200


def test_share_without_internet_logs_one_line_and_keeps_serving(engine, monkeypatch, caplog):
    from gradio import networking

    monkeypatch.setattr(networking, "GRADIO_API_SERVER", "http://127.0.0.1:9/share-server")  # refused at once
    caplog.set_level(logging.INFO, logger="glm4.ui")
    settings = Settings(model="tiny", share=True, port=8003)
    with TestClient(create_app(settings, engine)) as client:
        deadline = time.monotonic() + 30
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/config").status_code == 200
    lines = [record for record in caplog.records if record.name == "glm4.ui"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "--share: could not create a Gradio share link" in lines[0].getMessage()
    assert "serving locally only at http://127.0.0.1:8003/" in lines[0].getMessage()
