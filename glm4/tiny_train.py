"""Train the embedded tiny GLM-4 on the project corpus and save it to assets/tiny-glm4.

    python -m glm4.tiny_train            # about 8 minutes on 2 CPU cores; reproducible (fixed seeds)

The corpus (assets/tiny_corpus.jsonl) holds OpenAI-shaped conversations about this server. Each one is
rendered with the checkpoint's own chat template, exactly as the server renders requests, and the loss
is taken only on what the model must generate: every assistant turn from the `\\n` after
`<|assistant|>` up to and including the stop token that follows it (`<|user|>` after a reply,
`<|observation|>` after a tool call), so the model learns to stop on its own. The tokenizer is rebuilt
from the corpus, the model is trained from scratch, and the checkpoint is written by
`glm4.tiny.save_checkpoint`; a final greedy pass over every corpus prompt reports how many replies
reproduce their corpus answer and whether any failed to stop or held U+FFFD.
"""

from __future__ import annotations

import argparse
import difflib
import math
import random
import time
from pathlib import Path

import torch

from glm4.tiny import (
    STOP_TOKENS,
    TINY_CORPUS_PATH,
    TINY_MODEL_DIR,
    build_model,
    build_tokenizer,
    conversation_texts,
    load_corpus,
    save_checkpoint,
)

SEED = 0
EPOCHS = 40  # the corpus is ~21k tokens; 40 passes memorise it (loss < 0.001, greedy replies match)
BATCH_SIZE = 16  # conversations per step
LEARNING_RATE = 2e-3  # peak AdamW rate after warm-up; cosine decay to 10% of it
WARMUP_STEPS = 50
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
FINAL_STOP = "<|user|>"  # what follows the last reply: the real GLM-4 ends its turn this way too
IGNORE = -100  # label for tokens the loss skips (prompt, padding)


def encode_conversation(tokenizer, conv: dict) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that keep only the generated parts.

    The text is cut into pieces at the assistant turns' boundaries, which always sit next to a special
    token, so encoding the pieces separately gives the same ids as encoding the whole text.
    """
    messages, tools = conv["messages"], conv.get("tools") or None

    def render(msgs, generation_prompt=False):
        return tokenizer.apply_chat_template(
            msgs, tools=tools, add_generation_prompt=generation_prompt, tokenize=False
        )

    full = render(messages) + FINAL_STOP
    pieces: list[tuple[str, bool]] = []  # (text, trained?)
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:i], generation_prompt=True))  # just after <|assistant|>
        end = len(render(messages[: i + 1]))
        stop = next(t for t in STOP_TOKENS if full.startswith(t, end))  # the token that ends the turn
        pieces += [(full[done:start], False), (full[start : end + len(stop)], True)]
        done = end + len(stop)
    pieces.append((full[done:], False))

    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    assert ids == tokenizer.encode(full, add_special_tokens=False), "pieces must tokenize like the whole"
    return ids, labels


def make_batches(examples, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of example indices, grouped by length so that little padding is wasted."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 8  # sort within windows: similar lengths together, still random overall
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: len(examples[i][0]))
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples, indices: list[int], pad_id: int):
    """Right-padded (batch, seq) tensors: input_ids, attention_mask, labels."""
    width = max(len(examples[i][0]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        seq, lab = examples[i]
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(seq)] = 1
    return ids, mask, labels


def train(model, examples, pad_id: int, epochs: int = EPOCHS, log_every: int = 5) -> float:
    """AdamW with warm-up and cosine decay; returns the mean loss of the last epoch."""
    rng = random.Random(SEED)
    steps_per_epoch = math.ceil(len(examples) / BATCH_SIZE)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY
    )

    def lr_at(step: int) -> float:
        if step < WARMUP_STEPS:
            return LEARNING_RATE * (step + 1) / WARMUP_STEPS
        progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
        return LEARNING_RATE * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    step, epoch_loss, started = 0, float("nan"), time.monotonic()
    for epoch in range(epochs):
        losses = []
        for indices in make_batches(examples, BATCH_SIZE, rng):
            ids, mask, labels = collate(examples, indices, pad_id)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            losses.append(loss.item())
            step += 1
        epoch_loss = sum(losses) / len(losses)
        if epoch % log_every == 0 or epoch == epochs - 1:
            elapsed = time.monotonic() - started
            print(f"epoch {epoch + 1:3d}/{epochs}  loss {epoch_loss:.4f}  lr {lr_at(step):.2e}  {elapsed:6.0f}s", flush=True)
    model.eval()
    return epoch_loss


def corpus_prompts(conversations: list[dict]) -> list[tuple[list[dict], list | None, str]]:
    """(messages before the reply, tools, expected reply) for every plain-text assistant turn."""
    prompts, seen = [], set()
    for conv in conversations:
        messages = conv["messages"]
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and message.get("content") and not message.get("tool_calls"):
                key = repr((messages[:i], conv.get("tools")))
                if key not in seen:
                    seen.add(key)
                    prompts.append((messages[:i], conv.get("tools") or None, message["content"]))
    return prompts


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts, max_new_tokens: int = 200, batch_size: int = 16):
    """Greedy replies (text without the leading newline, and whether a stop token ended each one)."""
    stop_ids = set(tokenizer.convert_tokens_to_ids(STOP_TOKENS))
    results = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b : b + batch_size]
        encoded = [
            tokenizer.apply_chat_template(m, tools=t, add_generation_prompt=True, tokenize=True)["input_ids"]
            for m, t, _ in chunk
        ]
        batch = tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt")  # left-padded
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            stopped = next((k for k, t in enumerate(row) if t in stop_ids), None)
            reply = tokenizer.decode(row[:stopped] if stopped is not None else row)
            results.append((reply.removeprefix("\n"), stopped is not None))
    return results


def evaluate(model, tokenizer, conversations) -> None:
    """Print how well greedy replies to every corpus prompt reproduce the corpus answers."""
    prompts = corpus_prompts(conversations)
    started = time.monotonic()
    replies = greedy_replies(model, tokenizer, prompts)
    exact = sum(reply == want for (reply, _), (_, _, want) in zip(replies, prompts))
    ratios = [difflib.SequenceMatcher(None, reply, want).ratio() for (reply, _), (_, _, want) in zip(replies, prompts)]
    unstopped = sum(not stopped for _, stopped in replies)
    replacement = sum("\ufffd" in reply for reply, _ in replies)
    print(
        f"greedy on {len(prompts)} corpus prompts: {exact} exact, min similarity {min(ratios):.2f}, "
        f"mean {sum(ratios) / len(ratios):.3f}, {unstopped} without a stop token, {replacement} with U+FFFD "
        f"({time.monotonic() - started:.0f}s)"
    )
    for ratio, (reply, _), (messages, _, want) in sorted(zip(ratios, replies, prompts), key=lambda x: x[0])[:5]:
        print(f"  {ratio:.2f}  {messages[-1]['content']!r}\n        got  {reply!r}\n        want {want!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=TINY_CORPUS_PATH, help="JSONL conversations")
    parser.add_argument("--out", type=Path, default=TINY_MODEL_DIR, help="checkpoint directory to write")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="passes over the corpus")
    parser.add_argument("--no-eval", action="store_true", help="skip the final greedy check")
    args = parser.parse_args(argv)

    # Reproducible on the same machine: fixed seeds, fixed thread count, deterministic batching.
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    conversations = load_corpus(args.corpus)
    tokenizer = build_tokenizer(conversation_texts(conversations))
    examples = [encode_conversation(tokenizer, conv) for conv in conversations]
    n_tokens = sum(len(ids) for ids, _ in examples)
    n_trained = sum(sum(label != IGNORE for label in labels) for _, labels in examples)
    model = build_model(tokenizer, seed=SEED)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{len(conversations)} conversations, {n_tokens} tokens ({n_trained} trained), "
        f"vocab {len(tokenizer)}, {n_params / 1e6:.2f}M parameters"
    )

    started = time.monotonic()
    loss = train(model, examples, tokenizer.pad_token_id, epochs=args.epochs)
    print(f"trained in {time.monotonic() - started:.0f}s, final loss {loss:.4f}")

    out = save_checkpoint(model, tokenizer, args.out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    if not args.no_eval:
        # Check the saved (float16) weights, as the server will load them.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        evaluate(saved, AutoTokenizer.from_pretrained(out), conversations)


if __name__ == "__main__":
    main()
