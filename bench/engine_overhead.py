"""Engine overhead: LocalEngine stream tok/s vs raw `model.generate` on the same model and params.

Both decode greedily, the same prompt, exactly --tokens new tokens (generate with min_new_tokens, the
engine with its stop ids cleared: "ignore EOS"), in the same process and thread settings. Runs are
interleaved (raw, engine, raw, engine, ...) so machine noise hits both alike; the ratio is of medians.

    python bench/engine_overhead.py [--tokens 256] [--runs 7] [--model tiny] [--out bench/results/engine_overhead.md]

Target: engine / raw >= 0.95.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from common import RESULTS, load_tiny, machine_summary, markdown_table, median, prompt_for


def raw_generate(model, prompt_ids: list[int], tokens: int) -> tuple[float, list[int]]:
    import torch

    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=model.config.pad_token_id)
    seconds = time.perf_counter() - started
    return seconds, out[0, len(prompt_ids):].tolist()


async def engine_generate(engine, prompt, tokens: int, run: int) -> tuple[float, list[int]]:
    from glm4.engine.base import SamplingParams

    ids: list[int] = []
    started = time.perf_counter()
    async for delta in engine.submit(prompt, SamplingParams(temperature=0, max_tokens=tokens), f"bench-{run}"):
        ids.extend(delta.token_ids)
        if delta.finished:
            assert delta.usage.completion_tokens == tokens, delta
    return time.perf_counter() - started, ids


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per run")
    parser.add_argument("--runs", type=int, default=7, help="measured runs of each (after one warm-up each)")
    parser.add_argument("--out", default=str(RESULTS / "engine_overhead.md"), help="markdown table ('' = none)")
    args = parser.parse_args()

    import torch

    from glm4.engine.local import LocalEngine

    loaded = load_tiny(args.model)
    model, tokenizer = loaded.models[0], loaded.tokenizer
    engine = LocalEngine(model, tokenizer, loaded.info, max_num_seqs=8, max_queue=8)
    engine.stop_ids = set()  # ignore EOS, as min_new_tokens does for generate: both make exactly --tokens
    await engine.start()
    prompt = prompt_for(tokenizer)
    print(f"{machine_summary()}; torch threads {torch.get_num_threads()}")
    print(f"model {loaded.info.source} ({loaded.info.dtype}), prompt {len(prompt.token_ids)} tokens, "
          f"{args.tokens} new tokens, greedy, {args.runs} interleaved runs after a warm-up")

    raw_generate(model, prompt.token_ids, args.tokens)  # warm-up: allocator, kernels, lazy imports
    await engine_generate(engine, prompt, args.tokens, -1)
    rows, raw_rates, engine_rates = [], [], []
    for run in range(args.runs):
        raw_seconds, raw_ids = raw_generate(model, prompt.token_ids, args.tokens)
        engine_seconds, engine_ids = await engine_generate(engine, prompt, args.tokens, run)
        same = "yes" if raw_ids == engine_ids else "NO"
        raw_rates.append(args.tokens / raw_seconds)
        engine_rates.append(args.tokens / engine_seconds)
        rows.append([run + 1, raw_rates[-1], engine_rates[-1], f"{engine_rates[-1] / raw_rates[-1]:.3f}", same])
        print(f"run {run + 1}: raw {raw_rates[-1]:7.1f} tok/s  engine {engine_rates[-1]:7.1f} tok/s  "
              f"same tokens: {same}", flush=True)
    await engine.shutdown()

    ratio = median(engine_rates) / median(raw_rates)
    rows.append(["median", median(raw_rates), median(engine_rates), f"{ratio:.3f}", ""])
    table = markdown_table(["run", "raw generate tok/s", "engine stream tok/s", "engine / raw", "same tokens"],
                           rows)
    verdict = "meets" if ratio >= 0.95 else "MISSES"
    summary = f"engine / raw = {ratio:.3f} ({verdict} the >= 0.95 target)"
    print()
    print(table)
    print(summary)
    if args.out:
        with open(args.out, "w") as out:
            out.write(f"# Engine overhead\n\n`python bench/engine_overhead.py --tokens {args.tokens} --runs "
                      f"{args.runs}`: {machine_summary()}, torch threads {torch.get_num_threads()}; model "
                      f"{loaded.info.source.rsplit('/', 1)[-1]}, prompt {len(prompt.token_ids)} tokens, "
                      f"{args.tokens} new tokens, greedy.\n\n{table}\n\n{summary}\n")


if __name__ == "__main__":
    asyncio.run(main())
