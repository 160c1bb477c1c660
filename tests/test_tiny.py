"""The embedded tiny GLM-4 (assets/tiny-glm4): loads natively, matches GLM-4's tokens and prompts."""

import difflib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from glm4.tiny import SPECIAL_TOKENS, STOP_TOKENS, TINY_MODEL_DIR, load_corpus

FIXTURES = Path(__file__).resolve().parent / "data" / "glm4_prompts.json"  # copy of shared/fixtures
CASES = json.loads(FIXTURES.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32).eval()


def test_checkpoint_is_native_glm_and_small():
    config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "glm"
    assert config["architectures"] == ["GlmForCausalLM"]
    assert "auto_map" not in config  # no remote code
    assert config["tie_word_embeddings"] is False
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.5
    size = sum(f.stat().st_size for f in TINY_MODEL_DIR.iterdir() if f.is_file())
    assert size <= 20_000_000


def test_special_tokens_are_last_in_glm_order(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ids == list(range(len(tokenizer) - len(SPECIAL_TOKENS), len(tokenizer)))
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"


def test_config_stop_and_pad_ids_match_tokenizer(tokenizer, model):
    stop_ids = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    assert model.config.eos_token_id == stop_ids
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.vocab_size == len(tokenizer)
    generation = model.generation_config
    assert generation.eos_token_id == stop_ids
    assert (generation.do_sample, generation.temperature, generation.top_p) == (True, 0.8, 0.8)


@pytest.mark.parametrize(
    "text",
    [
        "你好！有什么可以帮你？介绍一下你自己。",
        "emoji 🙂👍🏽 and 中文 mixed",
        "def f(x):\n\tif x:\n        return  x   * 2\n\n\n  # done \r\n",
        "  leading and trailing spaces  ",
        "<|user|> literal role text [gMASK]",
    ],
)
def test_text_round_trips_exactly(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_add_special_tokens_prepends_gmask_sop(tokenizer):
    prefix = tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    plain = tokenizer.encode("hello 你好", add_special_tokens=False)
    assert tokenizer.encode("hello 你好") == prefix + plain


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_chat_template_renders_fixture_prompts(tokenizer, case):
    rendered = tokenizer.apply_chat_template(
        case["messages"], tools=case.get("tools") or None, add_generation_prompt=True, tokenize=False
    )
    choice = case.get("tool_choice")
    if isinstance(choice, dict):  # forcing a function is the server's job: it appends "name\n"
        rendered += choice["function"]["name"] + "\n"
    assert rendered == case["prompt"]


def test_chat_template_tokenizes_without_doubling_prefix(tokenizer):
    messages = [{"role": "user", "content": "你好"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_forward_and_generate(tokenizer, model):
    messages = [{"role": "user", "content": "hello"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits  # (1, seq, vocab)
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[0] == 1 and ids.shape[1] < out.shape[1] <= ids.shape[1] + 8


def _corpus_answer(question: str) -> str:
    """The corpus reply to a single-turn question without a system prompt."""
    for conv in load_corpus():
        messages = conv["messages"]
        if not conv.get("tools") and len(messages) == 2 and messages[0]["content"] == question:
            return messages[1]["content"]
    raise LookupError(question)


HELD_IN_QUESTIONS = ["你好", "How do I use 4-bit?", "What is this server?", "怎么用 curl 调用 API？", "你是谁？"]


@pytest.fixture(scope="module")
def greedy_replies(tokenizer, model):
    """{question: generated ids} from one left-padded greedy `generate` over all held-in questions."""
    encoded = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
        for q in HELD_IN_QUESTIONS
    ]
    batch = tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=200, do_sample=False)  # (questions, prompt + new)
    return dict(zip(HELD_IN_QUESTIONS, out[:, batch["input_ids"].shape[1] :].tolist()))


@pytest.mark.parametrize("question", HELD_IN_QUESTIONS)
def test_greedy_reply_to_corpus_prompt_stops_and_matches(tokenizer, model, greedy_replies, question):
    """Issue 10: the trained weights answer held-in prompts legibly and stop on a GLM-4 stop token."""
    out = greedy_replies[question]
    stop = next((i for i, t in enumerate(out) if t in model.config.eos_token_id), None)
    assert stop is not None, "the reply must end on a stop token before max_new_tokens"
    reply = tokenizer.decode(out[:stop])
    assert reply.startswith("\n")  # GLM-4's first generated token is the newline after <|assistant|>
    reply = reply[1:]
    assert "\ufffd" not in reply
    assert difflib.SequenceMatcher(None, reply, _corpus_answer(question)).ratio() >= 0.6, reply
