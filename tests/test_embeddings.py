"""/v1/embeddings and /v1/rerank through the live server with the project's tiny embedder and reranker,
driven by the official openai SDK (and httpx for /v1/rerank, which the SDK has no method for)."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil

import httpx
import numpy as np
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from glm4.tiny_retrieval import TINY_EMBEDDER_DIR, TINY_RETRIEVAL_PATH, load_topics
from tests.conftest import LiveServer

EMBEDDER = "tiny-embedder"
RERANKER = "tiny-reranker"
TOPICS = {topic["topic"]: topic for topic in load_topics(TINY_RETRIEVAL_PATH)}


@pytest.fixture(scope="module")
def live():
    server = LiveServer("--no-ui", "--embedding-model", "tiny", "--rerank-model", "tiny")
    yield server
    server.stop()


@pytest.fixture
def sdk(live):
    with OpenAI(base_url=live.base_url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_EMBEDDER_DIR)


def vectors(response) -> np.ndarray:
    return np.array([item.embedding for item in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)


def rerank(live, path: str = "/v1/rerank", **body) -> httpx.Response:
    return httpx.post(live.url + path, json=body, timeout=60)


# ---------- embeddings ----------

def test_models_lists_the_embedding_and_rerank_models(sdk):
    ids = [model.id for model in sdk.models.list().data]
    assert "glm-4" in ids and EMBEDDER in ids and RERANKER in ids
    assert sdk.models.retrieve(EMBEDDER).id == EMBEDDER


def test_float_and_base64_agree_and_vectors_are_unit_length(sdk):
    texts = ["It is sunny and warm today.", "今天天气晴朗温暖。"]
    as_float = sdk.embeddings.create(model=EMBEDDER, input=texts, encoding_format="float")
    decoded_by_sdk = sdk.embeddings.create(model=EMBEDDER, input=texts)  # the SDK asks for base64 and decodes it
    raw = sdk.embeddings.create(model=EMBEDDER, input=texts, encoding_format="base64")
    from_base64 = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data])
    assert vectors(as_float).shape == (2, 64)
    np.testing.assert_array_equal(vectors(as_float), from_base64)
    np.testing.assert_array_equal(vectors(as_float), vectors(decoded_by_sdk))
    np.testing.assert_allclose(np.linalg.norm(vectors(as_float), axis=1), 1.0, rtol=1e-5)
    assert as_float.model == EMBEDDER and as_float.object == "list"


def test_the_server_embeds_as_sentence_transformers_does(sdk):
    from sentence_transformers import SentenceTransformer

    texts = ["Which GPU do I need to run the model?", "运行模型需要什么显卡？", "hello"]
    reference = SentenceTransformer(str(TINY_EMBEDDER_DIR), device="cpu").encode(texts, normalize_embeddings=True)
    served = vectors(sdk.embeddings.create(model=EMBEDDER, input=texts))
    np.testing.assert_allclose(served, reference, atol=1e-5)


def test_usage_counts_the_tokens_of_every_input(sdk, tokenizer):
    texts = ["The cat sleeps on the sofa.", "猫在沙发上睡觉。", "a"]
    response = sdk.embeddings.create(model=EMBEDDER, input=texts)
    expected = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    assert response.usage.prompt_tokens == expected and response.usage.total_tokens == expected


def test_batch_order_is_kept(sdk):
    texts = [topic["texts"][0] for topic in TOPICS.values()]
    forward = vectors(sdk.embeddings.create(model=EMBEDDER, input=texts))
    backward = vectors(sdk.embeddings.create(model=EMBEDDER, input=texts[::-1]))
    assert [d.index for d in sdk.embeddings.create(model=EMBEDDER, input=texts).data] == list(range(len(texts)))
    np.testing.assert_allclose(forward, backward[::-1], atol=1e-5)
    alone = vectors(sdk.embeddings.create(model=EMBEDDER, input=texts[3]))
    np.testing.assert_allclose(alone[0], forward[3], atol=1e-5)


def test_dimensions_truncates_and_renormalises(sdk):
    text = "Streaming shows the answer while it is being written."
    full = vectors(sdk.embeddings.create(model=EMBEDDER, input=text))[0]
    short = vectors(sdk.embeddings.create(model=EMBEDDER, input=text, dimensions=32))[0]
    assert short.shape == (32,)
    np.testing.assert_allclose(short, full[:32] / np.linalg.norm(full[:32]), atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="only supports dimensions 16, 32, 64"):
        sdk.embeddings.create(model=EMBEDDER, input=text, dimensions=50)
    with pytest.raises(openai.BadRequestError, match="more than the model's 64"):
        sdk.embeddings.create(model=EMBEDDER, input=text, dimensions=65)


def test_token_ids_embed_like_their_text(sdk, tokenizer):
    texts = ["How do I cook rice?", "怎么煮米饭？"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    from_text = vectors(sdk.embeddings.create(model=EMBEDDER, input=texts))
    from_ids = vectors(sdk.embeddings.create(model=EMBEDDER, input=ids))
    one_list = vectors(sdk.embeddings.create(model=EMBEDDER, input=ids[1]))
    np.testing.assert_allclose(from_ids, from_text, atol=1e-5)
    np.testing.assert_allclose(one_list[0], from_text[1], atol=1e-5)


@pytest.mark.parametrize("anchor,similar,unrelated", [
    (TOPICS["weather"]["texts"][0], TOPICS["weather"]["texts"][2], TOPICS["git"]["texts"][0]),
    (TOPICS["gpu"]["queries"][1], TOPICS["gpu"]["passages"][0], TOPICS["rice"]["passages"][1]),
    (TOPICS["cat"]["texts"][1], TOPICS["cat"]["texts"][3], TOPICS["money"]["texts"][1]),
], ids=["weather-en-zh", "gpu-query-passage", "cat-paraphrase"])
def test_similar_sentences_embed_closer_than_unrelated_ones(sdk, anchor, similar, unrelated):
    a, s, u = vectors(sdk.embeddings.create(model=EMBEDDER, input=[anchor, similar, unrelated]))
    assert a @ s > a @ u + 0.2


async def test_concurrent_requests_each_get_their_own_vectors(live):
    texts = [s for topic in TOPICS.values() for s in topic["texts"]][:40]
    client = AsyncOpenAI(base_url=live.base_url, api_key="unused", max_retries=0)
    alone = [vectors(await client.embeddings.create(model=EMBEDDER, input=[t]))[0] for t in texts]
    together = await asyncio.gather(*(client.embeddings.create(model=EMBEDDER, input=[t]) for t in texts))
    for want, got in zip(alone, together):
        np.testing.assert_allclose(vectors(got)[0], want, atol=1e-5)


# ---------- rerank ----------

@pytest.mark.parametrize("topic,query", [("gpu", 0), ("apikey", 1), ("rerank", 0), ("weather", 1)],
                         ids=["gpu-en", "apikey-zh", "rerank-en", "weather-zh"])
def test_rerank_puts_the_known_answer_first(live, topic, query):
    others = [t for name, t in TOPICS.items() if name != topic][:6]
    answer = TOPICS[topic]["passages"][query]  # the passage in the query's language
    documents = [t["passages"][query] for t in others[:3]] + [answer] + [t["passages"][query] for t in others[3:]]
    response = rerank(live, model=RERANKER, query=TOPICS[topic]["queries"][query], documents=documents)
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert results[0]["index"] == 3 and results[0]["document"] == {"text": answer}
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(results) == len(documents)
    assert sorted(r["index"] for r in results) == list(range(len(documents)))
    assert body["model"] == RERANKER and body["usage"]["prompt_tokens"] > 0


def test_rerank_top_n_return_documents_and_other_paths(live):
    query = TOPICS["tools"]["queries"][0]
    documents = [TOPICS["cat"]["passages"][0], {"text": TOPICS["tools"]["passages"][0]}, TOPICS["tea"]["passages"][0]]
    full = rerank(live, query=query, documents=documents).json()
    short = rerank(live, query=query, documents=documents, top_n=1, return_documents=False).json()
    assert [r["index"] for r in short["results"]] == [full["results"][0]["index"]] == [1]
    assert "document" not in short["results"][0]
    for path in ("/rerank", "/v2/rerank"):  # where llama.cpp / Cohere-style clients call it
        again = rerank(live, path, query=query, documents=documents).json()
        assert [r["index"] for r in again["results"]] == [r["index"] for r in full["results"]]


# ---------- hostile input: each a clear 4xx, and the server goes on ----------

@pytest.mark.parametrize("kwargs,status,message", [
    ({"input": []}, 400, "must not be an empty list"),
    ({"input": ["x"] * 10_000}, 400, "at most 2048 inputs"),
    ({"input": "word " * 200_000}, 400, "maximum context length is 512 tokens"),  # 1 MB
    ({"input": "word " * 600}, 400, "maximum context length is 512 tokens"),
    ({"input": ["fine", ""]}, 400, "item 1 is an empty string"),
    ({"input": [1, "a"]}, 400, "item 1 is a string"),
    ({"input": [[5, 6], []]}, 400, "item 1 is an empty list of token ids"),
    ({"input": [10**9]}, 400, "outside the model's vocabulary"),
    ({"input": "x", "dimensions": 0}, 400, "dimensions"),
    ({"input": "x", "model": "glm-4"}, 400, "is a chat model"),
    ({"input": "x", "model": RERANKER}, 400, "is the rerank model"),
    ({"input": "x", "model": "text-embedding-3-small"}, 404, "does not exist"),
], ids=["empty-list", "10k-inputs", "1MB-string", "over-max-length", "empty-string", "mixed", "empty-ids",
        "unknown-id", "dimensions-0", "chat-model", "rerank-model", "unknown-model"])
def test_hostile_embedding_requests_are_clear_4xx(sdk, kwargs, status, message):
    kwargs = {"model": EMBEDDER, **kwargs}
    with pytest.raises(openai.APIStatusError) as raised:
        sdk.embeddings.create(**kwargs)
    assert raised.value.status_code == status
    assert message in raised.value.body["message"]
    assert sdk.embeddings.create(model=EMBEDDER, input="still fine").data  # nothing broke


@pytest.mark.parametrize("body,message", [
    ({"query": "q", "documents": []}, "at least 1 item"),
    ({"query": "", "documents": ["a"]}, "query"),
    ({"query": "q", "documents": ["a"] * 1001}, "at most 1000"),
    ({"query": "q", "documents": ["a", {"txt": "b"}]}, "item 1 must be a string or an object"),
    ({"query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
    ({"query": "q", "documents": ["short", "word " * 200_000]}, "documents[1] has"),  # 1 MB
    ({"query": "q", "documents": ["a"], "model": "glm-4"}, "is a chat model"),
], ids=["no-documents", "empty-query", "1001-documents", "bad-document", "negative-top-n", "1MB-document",
        "chat-model"])
def test_hostile_rerank_requests_are_clear_400s(live, body, message):
    response = rerank(live, **body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert rerank(live, query="q", documents=["a"]).status_code == 200


def test_without_an_embedding_model_the_routes_say_how_to_get_one(server):
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError, match="--embedding-model"):
            client.embeddings.create(model="anything", input="hello")
        assert all(m.id != EMBEDDER for m in client.models.list().data)
    response = httpx.post(server.url + "/v1/rerank", json={"query": "q", "documents": ["a"]}, timeout=30)
    assert response.status_code == 404 and "--rerank-model" in response.json()["error"]["message"]


def test_a_model_without_matryoshka_training_refuses_dimensions_and_keys_apply(tmp_path, start_server):
    plain = tmp_path / "plain-embedder"
    shutil.copytree(TINY_EMBEDDER_DIR, plain)
    config = json.loads((plain / "config.json").read_text())
    config.pop("is_matryoshka"), config.pop("matryoshka_dimensions")
    (plain / "config.json").write_text(json.dumps(config))
    live = start_server("--no-ui", "--embedding-model", str(plain), "--api-key", "sk-test")
    with OpenAI(base_url=live.base_url, api_key="sk-test", max_retries=0) as client:
        assert len(client.embeddings.create(model="plain-embedder", input="hi").data[0].embedding) == 64
        with pytest.raises(openai.BadRequestError, match="does not support matryoshka"):
            client.embeddings.create(model="plain-embedder", input="hi", dimensions=32)
    with OpenAI(base_url=live.base_url, api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.embeddings.create(model="plain-embedder", input="hi")
    assert httpx.post(live.url + "/rerank", json={"query": "q", "documents": ["a"]}).status_code == 401
