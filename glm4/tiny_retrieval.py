"""Build and train the tiny embedding model and the tiny reranker that ship in assets/.

    python -m glm4.tiny_retrieval          # about a minute on 2 CPU cores; reproducible (fixed seeds)

They play the part the tiny GLM-4 plays for chat: real checkpoints in the real formats (a
sentence-transformers model: BERT + mean pooling + normalisation; a cross-encoder: BERT with one
relevance logit), small enough to commit, so `--embedding-model tiny` and `--rerank-model tiny` run offline
and the tests go through the same loading and batching code a BAAI/bge-m3 goes through.

Both learn from assets/tiny_retrieval.jsonl, a small Chinese/English set written for this: topics, each
with paraphrases, queries and passages that answer them. The embedder is trained contrastively (sentences
of one topic together, other topics in the batch apart) at several output sizes at once (Matryoshka), so
`dimensions` may truncate its vectors; the reranker is trained to score a query with its topic's passages
above the others. A last pass prints how often the right answer comes first.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_EMBEDDER_DIR = ASSETS / "tiny-embedder"
TINY_RERANKER_DIR = ASSETS / "tiny-reranker"
TINY_RETRIEVAL_PATH = ASSETS / "tiny_retrieval.jsonl"

SEED = 0
MAX_LENGTH = 512  # positions, and the longest input either model takes (longer embedding inputs are a 400)
MATRYOSHKA_DIMENSIONS = [16, 32, 64]  # output sizes the embedder is trained for; 64 is the full vector
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
             max_position_embeddings=MAX_LENGTH, type_vocab_size=2,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # memorising a small set: no dropout
EMBEDDER_STEPS = 400  # batches of one anchor/positive pair per topic
RERANKER_STEPS = 2000  # batches of query/passage pairs, a quarter of them relevant
LEARNING_RATE = 1e-3
TEMPERATURE = 0.05  # contrastive softmax temperature on cosine similarities
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_topics(path: Path = TINY_RETRIEVAL_PATH) -> list[dict]:
    """One topic a line: {"topic", "texts": paraphrases, "queries", "passages": answers to the queries}."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def topic_sentences(topic: dict) -> list[str]:
    return topic["texts"] + topic["queries"] + topic["passages"]


def build_tokenizer(texts: list[str]):
    """A BERT-style WordPiece (lower-cased, CJK characters split) as a fast tokenizer with [CLS] … [SEP].

    The vocabulary is every word of the texts plus every character (alone and as a `##` continuation), sorted:
    built, not trained, so a rebuild gives the same ids (WordPiece training breaks frequency ties by chance)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = {word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))}
    chars = {c for word in words for c in word}
    pieces = sorted(words | chars) + sorted("##" + c for c in chars)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + [p for p in pieces if p not in SPECIAL_TOKENS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=MAX_LENGTH)


def bert_config(tokenizer, **extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **SIZES, **extra)


def contrastive_loss(anchors: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """InfoNCE both ways over a batch whose row i of each side is one pair; other rows are the negatives,
    summed over every Matryoshka size (each prefix, renormalised, must rank on its own)."""
    labels = torch.arange(len(anchors))
    loss = anchors.new_zeros(())
    for dim in MATRYOSHKA_DIMENSIONS:
        a, p = F.normalize(anchors[:, :dim], dim=-1), F.normalize(positives[:, :dim], dim=-1)
        logits = a @ p.T / TEMPERATURE
        loss = loss + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss / len(MATRYOSHKA_DIMENSIONS)


def train_embedder(tokenizer, topics: list[dict], out: Path, steps: int = EMBEDDER_STEPS):
    """BERT + mean pooling + normalisation as a sentence-transformers model, trained and saved to out."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertModel

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    # vLLM's convention: these keys in config.json say that `dimensions` may truncate the vectors
    config = bert_config(tokenizer, is_matryoshka=True, matryoshka_dimensions=MATRYOSHKA_DIMENSIONS)
    with tempfile.TemporaryDirectory() as scratch:
        BertModel(config).save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        transformer = Transformer(scratch, max_seq_length=MAX_LENGTH)
    model = SentenceTransformer(modules=[transformer, Pooling(SIZES["hidden_size"], "mean"), Normalize()],
                                device="cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=steps)  # settle at the end
    model.train()
    for step in range(steps):
        pairs = [rng.sample(topic_sentences(topic), 2) for topic in topics]  # one pair per topic
        anchors = embed_for_training(model, tokenizer, [a for a, _ in pairs])
        positives = embed_for_training(model, tokenizer, [p for _, p in pairs])
        loss = contrastive_loss(anchors, positives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"embedder step {step + 1:4d}/{steps}  loss {loss.item():.4f}", flush=True)
    model.eval()
    model.save_pretrained(str(out))
    return model


def embed_for_training(model, tokenizer, texts: list[str]) -> torch.Tensor:
    features = dict(tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))
    return model(features)["sentence_embedding"]


def train_reranker(tokenizer, topics: list[dict], out: Path, encoder, steps: int = RERANKER_STEPS):
    """A BERT cross-encoder with one relevance logit, trained on query/passage pairs and saved to out. Its encoder
    starts from the trained embedder's (`encoder`), which already tells the topics apart."""
    from sentence_transformers import CrossEncoder
    from transformers import BertForSequenceClassification

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    with tempfile.TemporaryDirectory() as scratch:
        BertForSequenceClassification(bert_config(tokenizer, num_labels=1)).save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        reranker = CrossEncoder(scratch, device="cpu", max_length=MAX_LENGTH)
    passages = [(i, passage) for i, topic in enumerate(topics) for passage in topic["passages"]]
    queries = [(i, query) for i, topic in enumerate(topics) for query in topic["queries"] + topic["texts"][:1]]
    network = reranker.model
    network.bert.load_state_dict(encoder.state_dict())
    optimizer = torch.optim.AdamW(network.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=steps)
    network.train()
    for step in range(steps):
        batch = []
        for _ in range(8):
            topic, query = rng.choice(queries)
            batch.append((query, rng.choice(topics[topic]["passages"]), 1.0))
            for _ in range(3):  # three passages of other topics per relevant one
                other, passage = rng.choice([p for p in passages if p[0] != topic])
                batch.append((query, passage, 0.0))
        features = tokenizer([q for q, _, _ in batch], [p for _, p, _ in batch], padding=True, truncation=True,
                             max_length=MAX_LENGTH, return_tensors="pt")
        logits = network(**features).logits.squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, torch.tensor([label for _, _, label in batch]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"reranker step {step + 1:4d}/{steps}  loss {loss.item():.4f}", flush=True)
    network.eval()
    reranker.save_pretrained(str(out))
    return reranker


def evaluate(out_embedder: Path, out_reranker: Path, topics: list[dict]) -> None:
    """Reload both checkpoints as the server does and report how often the right answer is first."""
    from sentence_transformers import CrossEncoder, SentenceTransformer

    embedder = SentenceTransformer(str(out_embedder), device="cpu")
    sentences = [(i, s) for i, topic in enumerate(topics) for s in topic_sentences(topic)]
    vectors = embedder.encode([s for _, s in sentences], convert_to_tensor=True)
    similarity = vectors @ vectors.T
    similarity.fill_diagonal_(-2.0)
    nearest = similarity.argmax(dim=1).tolist()
    same = sum(sentences[j][0] == sentences[i][0] for i, j in enumerate(nearest))
    print(f"embedder: nearest neighbour is from the same topic for {same}/{len(sentences)} sentences")

    reranker = CrossEncoder(str(out_reranker), device="cpu")
    passages = [(i, p) for i, topic in enumerate(topics) for p in topic["passages"]]
    right = total = 0
    for i, topic in enumerate(topics):
        for query in topic["queries"]:
            scores = reranker.predict([(query, p) for _, p in passages], show_progress_bar=False)
            right += passages[int(scores.argmax())][0] == i
            total += 1
    print(f"reranker: a passage of the query's topic ranks first for {right}/{total} queries")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=TINY_RETRIEVAL_PATH, help="JSONL topics")
    parser.add_argument("--embedder-out", type=Path, default=TINY_EMBEDDER_DIR)
    parser.add_argument("--reranker-out", type=Path, default=TINY_RERANKER_DIR)
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # reproducible on one machine: fixed seeds, fixed thread count
    topics = load_topics(args.data)
    tokenizer = build_tokenizer([s for topic in topics for s in topic_sentences(topic)])
    print(f"{len(topics)} topics, vocabulary {len(tokenizer)}")
    started = time.monotonic()
    for out in (args.embedder_out, args.reranker_out):  # a rebuild replaces a checkpoint, never mixes two
        if out.exists():
            for stale in sorted(out.rglob("*"), reverse=True):
                stale.unlink() if stale.is_file() else stale.rmdir()
    embedder = train_embedder(tokenizer, topics, args.embedder_out)
    train_reranker(tokenizer, topics, args.reranker_out, encoder=embedder[0].auto_model)
    print(f"trained in {time.monotonic() - started:.0f}s")
    for out in (args.embedder_out, args.reranker_out):
        (out / "README.md").unlink(missing_ok=True)  # sentence-transformers' generated card points at the Hub
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"wrote {out} ({size / 1e6:.1f} MB)")
    evaluate(args.embedder_out, args.reranker_out, topics)


if __name__ == "__main__":
    main()
