"""A stand-in for GLM-4's real tokenizer, for benchmarks that need its vocabulary size.

GLM-4-9B-chat's tokenizer (151,329 BPE tokens, then its special tokens at 151329..151338, logits 151,552
wide) cannot be downloaded here. Grammar-mask cost grows with the vocabulary and with how tokens share
prefixes, so this builds a byte-level BPE of the same size: trained on local Python sources (English
identifiers, code, docstrings) plus Chinese text sampled from jieba's word-frequency dictionary (GLM-4's
vocabulary is rich in Chinese words), with GLM-4's special tokens appended in their real order so they
land on the real ids. The result is cached under bench/out/ (a minute or more to train on two cores).

    python bench/standin_tokenizer.py            # build (or reuse) the cached stand-in and print its size
"""

from __future__ import annotations

import random
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE_DIR = ROOT / "bench" / "out" / "standin-glm4-tokenizer"
GLM4_BPE_TOKENS = 151329  # regular tokens of the real GLM-4 vocabulary; its special tokens follow
GLM4_LOGITS_ROWS = 151552  # rows of GLM-4-9B's lm_head (ModelInfo.vocab_size)
CODE_BYTES = 96 * 2**20  # how much local Python source to train on
CHINESE_BYTES = 24 * 2**20  # how much sampled Chinese text to train on


def python_sources(limit: int) -> Iterator[str]:
    """The text of local .py files (stdlib first, then site-packages), about `limit` bytes in all."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    total = 0
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            total += len(text)
            yield text
            if total >= limit:
                return


def chinese_text(limit: int, seed: int = 0) -> Iterator[str]:
    """Sentences of Chinese words drawn by their corpus frequency (jieba's dictionary), ~limit bytes."""
    from importlib.resources import files

    words, weights = [], []
    for line in files("jieba").joinpath("dict.txt").read_text(encoding="utf-8").splitlines():
        word, freq, *_ = line.split(" ")
        words.append(word)
        weights.append(int(freq))
    rng = random.Random(seed)
    punctuation = ["，", "。", "、", "；", "：", "！", "？", "“", "”"]
    total = 0
    while total < limit:
        batch = rng.choices(words, weights=weights, k=4096)
        parts = []
        for i, word in enumerate(batch):
            parts.append(word)
            if i % 9 == 8:
                parts.append(rng.choice(punctuation))
        text = "".join(parts) + "\n"
        total += len(text.encode("utf-8"))
        yield text


def build(out_dir: Path = CACHE_DIR) -> Path:
    """Train the stand-in and save it as a GLM-4-style fast tokenizer (tokenizer.json) in out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from glm4.tiny import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=GLM4_BPE_TOKENS, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def corpus() -> Iterator[str]:
        yield from python_sources(CODE_BYTES)
        yield from chinese_text(CHINESE_BYTES)

    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)  # after training: they take the last ids, in GLM-4's order
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def load(out_dir: Path = CACHE_DIR):
    """The cached stand-in as a PreTrainedTokenizerFast, building it first when it is missing."""
    from transformers import PreTrainedTokenizerFast

    if not (out_dir / "tokenizer.json").exists():
        build(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


if __name__ == "__main__":
    started = time.perf_counter()
    tokenizer = load()
    print(f"{CACHE_DIR}: {len(tokenizer)} tokens ({time.perf_counter() - started:.0f} s); "
          f"<|assistant|> = {tokenizer.convert_tokens_to_ids('<|assistant|>')}")
