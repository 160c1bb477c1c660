"""Which search engine and analyzer for the knowledge base: recall@3 and query time on a labelled set.

The set (tests/data/knowledge/): six documents written for it (three Chinese, three English, in .md, .txt and
.html, two of each language on neighbouring topics so that words like 申请/审批 or reset/firmware/Wi-Fi recur
across files) and questions worded as a user would ask, each labelled with the document and a verbatim snippet
of the answering passage. A retrieved passage is a hit when it comes from that document and contains the snippet
(whitespace-normalized), so labels survive changes to the passage size.

Compared, all with BM25 over the same passages (glm4.knowledge.ingest.split):
- engines: SQLite FTS5 (stdlib sqlite3; the index glm4.knowledge.index builds), bm25s 0.3 (sparse matrices in
  memory), tantivy 0.27 (Rust, on-disk segments; pre-analyzed text, whitespace tokenizer);
- analyzers (on FTS5): jieba search mode + character bigrams + Snowball stemming (the default), jieba only,
  bigrams only, no stemming, and FTS5's own unicode61 tokenizer on raw text (no Chinese segmentation at all).

Usage: python bench/knowledge_search.py [--repeat N]   → bench/results/knowledge_search.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import finish_provenance, provenance  # noqa: E402
from glm4.knowledge import index  # noqa: E402
from glm4.knowledge.ingest import Passage, parse, split  # noqa: E402

DATA = ROOT / "tests" / "data" / "knowledge"
RESULTS = ROOT / "bench" / "results"
TOP_K = 3


@dataclass
class Corpus:
    passages: list[tuple[str, Passage]]  # (document file name, passage)
    questions: list[dict]


def load_corpus(max_tokens: int, overlap: int) -> Corpus:
    questions = json.loads((DATA / "questions.json").read_text())["questions"]
    passages = []
    for path in sorted(DATA.iterdir()):
        if path.suffix == ".json":
            continue
        for passage in split(parse(path.name, path.read_bytes()), max_tokens, overlap):
            passages.append((path.name, passage))
    return Corpus(passages, questions)


def is_hit(corpus: Corpus, question: dict, ranked: list[int]) -> bool:
    snippet = " ".join(question["answer"].split())
    for position in ranked[:TOP_K]:
        name, passage = corpus.passages[position]
        if name == question["document"] and snippet in " ".join(passage.text.split()):
            return True
    return False


def rank_of(corpus: Corpus, question: dict, ranked: list[int]) -> int | None:
    snippet = " ".join(question["answer"].split())
    for rank, position in enumerate(ranked, start=1):
        name, passage = corpus.passages[position]
        if name == question["document"] and snippet in " ".join(passage.text.split()):
            return rank
    return None


class Fts5:
    def __init__(self, corpus: Corpus, analyzer: index.Analyzer):
        self.analyzer = analyzer
        self.db = sqlite3.connect(":memory:")
        self.store = "vs_" + "0" * 32
        index.create_table(self.db, self.store)
        index.add(self.db, self.store, [(i, index.prepare(p.heading, p.text, analyzer))
                                        for i, (_, p) in enumerate(corpus.passages)])

    def search(self, query: str, k: int) -> list[int]:
        expression = index.match_expression(query, self.analyzer)
        return [rowid for rowid, _ in index.search(self.db, self.store, expression, k)]


class Fts5Raw:
    """FTS5's own tokenizer, no analysis: a Chinese sentence without spaces is one token."""

    def __init__(self, corpus: Corpus):
        self.db = sqlite3.connect(":memory:")
        self.db.execute("CREATE VIRTUAL TABLE t USING fts5(heading, body)")
        self.db.executemany("INSERT INTO t(rowid, heading, body) VALUES (?, ?, ?)",
                            [(i, p.heading, p.text) for i, (_, p) in enumerate(corpus.passages)])

    def search(self, query: str, k: int) -> list[int]:
        words = dict.fromkeys(re.findall(r"\w+", query))
        if not words:
            return []
        expression = " OR ".join(f'"{word}"' for word in words)
        rows = self.db.execute("SELECT rowid FROM t WHERE t MATCH ? ORDER BY bm25(t) LIMIT ?", (expression, k))
        return [rowid for (rowid,) in rows]


class Bm25s:
    def __init__(self, corpus: Corpus, analyzer: index.Analyzer):
        import bm25s

        self.analyzer = analyzer
        self.retriever = bm25s.BM25()
        self.retriever.index([analyzer.terms(p.heading + "\n" + p.text) for _, p in corpus.passages],
                             show_progress=False)
        self.size = len(corpus.passages)

    def search(self, query: str, k: int) -> list[int]:
        terms = [term for term in self.analyzer.terms(query) if term in self.retriever.vocab_dict]
        if not terms:
            return []
        ids, scores = self.retriever.retrieve([terms], k=min(k, self.size), show_progress=False)
        return [int(i) for i, score in zip(ids[0], scores[0]) if score > 0]


class Tantivy:
    def __init__(self, corpus: Corpus, analyzer: index.Analyzer):
        import tantivy

        self.tantivy = tantivy
        self.analyzer = analyzer
        builder = tantivy.SchemaBuilder()
        builder.add_unsigned_field("position", stored=True)
        builder.add_text_field("terms", tokenizer_name="whitespace")
        self.schema = builder.build()
        self.directory = tempfile.TemporaryDirectory()
        self.index = tantivy.Index(self.schema, path=self.directory.name)
        writer = self.index.writer(heap_size=15_000_000, num_threads=1)
        for position, (_, passage) in enumerate(corpus.passages):
            terms = " ".join(analyzer.terms(passage.heading + "\n" + passage.text))
            writer.add_document(tantivy.Document(position=position, terms=terms))
        writer.commit()
        writer.wait_merging_threads()
        self.index.reload()
        self.searcher = self.index.searcher()

    def search(self, query: str, k: int) -> list[int]:
        tantivy = self.tantivy
        terms = dict.fromkeys(self.analyzer.terms(query))
        if not terms:
            return []
        clauses = [(tantivy.Occur.Should, tantivy.Query.term_query(self.schema, "terms", term)) for term in terms]
        hits = self.searcher.search(tantivy.Query.boolean_query(clauses), k).hits
        return [self.searcher.doc(address)["position"][0] for _, address in hits]


def evaluate(name: str, build, corpus: Corpus, repeat: int) -> dict:
    started = time.perf_counter()
    engine = build()
    build_ms = (time.perf_counter() - started) * 1000
    for question in corpus.questions:  # warm caches (jieba's dictionary, sqlite pages) before timing
        engine.search(question["question"], 10)
    timings, hits, ranks = [], {"zh": [], "en": []}, []
    for _ in range(repeat):
        for question in corpus.questions:
            started = time.perf_counter()
            ranked = engine.search(question["question"], 10)
            timings.append((time.perf_counter() - started) * 1000)
    for question in corpus.questions:
        ranked = engine.search(question["question"], 10)
        hits[question["lang"]].append(is_hit(corpus, question, ranked))
        rank = rank_of(corpus, question, ranked)
        ranks.append(1 / rank if rank else 0.0)
        if not hits[question["lang"]][-1]:
            print(f"  {name}: miss {question['question']!r} (rank {rank})")
    result = {"engine": name, "passages": len(corpus.passages), "build_ms": round(build_ms, 1),
              "query_ms_median": round(statistics.median(timings), 3),
              "query_ms_p95": round(sorted(timings)[int(len(timings) * 0.95) - 1], 3),
              "mrr_at_10": round(statistics.mean(ranks), 3)}
    for lang, values in hits.items():
        result[f"recall_at_3_{lang}"] = round(sum(values) / len(values), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20, help="timed passes over the questions per engine")
    args = parser.parse_args()
    record = provenance()
    index.warm_up()
    runs = []
    for max_tokens, overlap in ((400, 100), (120, 30)):
        corpus = load_corpus(max_tokens, overlap)
        default = index.Analyzer()
        candidates = [
            ("sqlite-fts5 + jieba + bigrams + stem", lambda: Fts5(corpus, default)),
            ("bm25s + jieba + bigrams + stem", lambda: Bm25s(corpus, default)),
            ("tantivy + jieba + bigrams + stem", lambda: Tantivy(corpus, default)),
            ("sqlite-fts5 + jieba only", lambda: Fts5(corpus, index.Analyzer(bigrams=False))),
            ("sqlite-fts5 + bigrams only", lambda: Fts5(corpus, index.Analyzer(segment=False))),
            ("sqlite-fts5 + jieba + bigrams, no stemming", lambda: Fts5(corpus, index.Analyzer(stem=False))),
            ("sqlite-fts5, its own tokenizer (no segmentation)", lambda: Fts5Raw(corpus)),
        ]
        for name, build in candidates:
            result = evaluate(name, build, corpus, args.repeat)
            result["passage_tokens"] = f"{max_tokens}/{overlap}"
            runs.append(result)
            print(json.dumps(result, ensure_ascii=False))
    questions = load_corpus(400, 100).questions
    report = {"provenance": finish_provenance(record), "questions": {lang: sum(q["lang"] == lang for q in questions) for lang in ("zh", "en")},
              "top_k": TOP_K, "repeat": args.repeat, "python": platform.python_version(),
              "sqlite": sqlite3.sqlite_version, "machine": platform.machine(),
              "note": "query_ms is per question, single thread; the box may have been loaded", "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "knowledge_search.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    lines = [f"# Knowledge search: recall@{TOP_K} and query time",
             "", f"Written by `python bench/knowledge_search.py --repeat {args.repeat}`; "
             f"{report['questions']['zh']} Chinese and {report['questions']['en']} English questions over "
             f"tests/data/knowledge/; Python {report['python']}, SQLite {report['sqlite']}. Query times are "
             "medians per question on one thread (the machine may have been loaded).", "",
             "| passage tokens (max/overlap) | engine + analyzer | passages | recall@3 zh | recall@3 en | MRR@10 "
             "| query ms (median) | query ms (p95) | build ms |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run['passage_tokens']} | {run['engine']} | {run['passages']} | {run['recall_at_3_zh']:.3f} "
                     f"| {run['recall_at_3_en']:.3f} | {run['mrr_at_10']:.3f} | {run['query_ms_median']:.3f} "
                     f"| {run['query_ms_p95']:.3f} | {run['build_ms']:.1f} |")
    (RESULTS / "knowledge_search.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
