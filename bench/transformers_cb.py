"""Our LocalEngine vs transformers' continuous batching (`generate_batch`, paged attention), same model.

N requests of the same prompt, greedy, exactly --tokens new tokens each (EOS ignored everywhere),
for N in --requests. Per N the runs are interleaved (engine, CB small config, CB default config) after
one warm-up each, and the median of --runs is reported. Also checks that CB's greedy tokens equal
`generate`'s. Writes bench/results/transformers_cb.json (figures + provenance, quoted in docs/BATCHING.md by
bench/readme_figures.py) and transformers_cb.md.

    python bench/transformers_cb.py [--requests 1,8,16] [--tokens 128] [--runs 3] [--no-default]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from pathlib import Path

from common import (RESULTS, finish_provenance, load_tiny, machine_summary, markdown_table,
                    median, prompt_for, provenance, write_results)

# Explicit sizing for a small model on CPU (DESIGN.md: the defaults were ~5x slower here): 16-token
# pages, enough blocks for 16 requests of prompt + 128 tokens, and small token budgets per step.
SMALL_CB = dict(page_size=16, num_blocks=256, max_batch_tokens=128, max_requests_per_batch=16, use_cuda_graph=False)


async def engine_run(engine, prompt, tokens: int, n: int) -> float:
    from glm4.engine.base import SamplingParams

    async def one(i: int) -> int:
        async for delta in engine.submit(prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True),
                                         f"cb-{time.monotonic_ns()}-{i}"):
            if delta.finished:
                return delta.usage.completion_tokens
        return 0

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(n)))
    return sum(counts) / (time.perf_counter() - started)


def cb_run(model, prompt_ids: list[int], tokens: int, n: int, config: dict | None) -> tuple[float, list[int]]:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    generation = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1,
                                  pad_token_id=model.config.pad_token_id)
    cb_config = ContinuousBatchingConfig(**config) if config is not None else None
    started = time.perf_counter()
    outputs = model.generate_batch([prompt_ids] * n, generation_config=generation,
                                   continuous_batching_config=cb_config)
    seconds = time.perf_counter() - started
    first = next(iter(outputs.values())).generated_tokens
    return sum(len(out.generated_tokens) for out in outputs.values()) / seconds, first


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", default="1,8,16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-default", action="store_true", help="skip CB's default config (slow on CPU)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for transformers_cb.json/.md ('' = none)")
    args = parser.parse_args()

    import torch

    from glm4.engine.local import LocalEngine

    loaded = load_tiny()
    model, tokenizer = loaded.models[0], loaded.tokenizer
    engine = LocalEngine(model, tokenizer, loaded.info, max_num_seqs=16, max_queue=64)
    await engine.start()
    prompt = prompt_for(tokenizer)
    record = provenance()
    print(f"{machine_summary()}; torch threads {torch.get_num_threads()}; {args.tokens} new tokens, greedy")

    reference = model.generate(torch.tensor([prompt.token_ids]), max_new_tokens=args.tokens,
                               eos_token_id=None, do_sample=False,
                               pad_token_id=model.config.pad_token_id)[0, len(prompt.token_ids):].tolist()
    systems = {"our engine": None, "CB, small config": SMALL_CB}
    if not args.no_default:
        systems["CB, default config"] = {}
    rows = []
    same = True
    for n in [int(x) for x in args.requests.split(",")]:
        rates: dict[str, list[float]] = {name: [] for name in systems}
        for run in range(args.runs + 1):  # run 0 is the warm-up
            for name, config in systems.items():
                if config is None:
                    rate = await engine_run(engine, prompt, args.tokens, n)
                else:
                    rate, first = cb_run(model, prompt.token_ids, args.tokens, n, config or None)
                    same = same and first == reference
                if run:
                    rates[name].append(rate)
        row = [n] + [median(rates[name]) for name in systems]
        rows.append(row)
        print(f"{n:>2} requests: " + "  ".join(f"{name} {value:7.1f} tok/s" for name, value in zip(systems, row[1:])),
              flush=True)
    await engine.shutdown()
    table = markdown_table(["requests"] + [f"{name} tok/s" for name in systems], rows)
    print()
    print(table)
    print(f"CB greedy tokens equal generate's: {same}")
    if args.out:
        finish_provenance(record)
        setup = (f"tiny GLM-4, {args.tokens} new tokens per request, greedy, EOS ignored, torch threads "
                 f"{torch.get_num_threads()}; median of {args.runs} interleaved runs after a warm-up. CB small config "
                 f"= `ContinuousBatchingConfig({', '.join(f'{k}={v}' for k, v in SMALL_CB.items())})`")
        write_results("transformers_cb", {
            "provenance": record, "setup": setup, "tokens": args.tokens, "runs": args.runs,
            "systems": list(systems), "rows": [{"requests": row[0], **dict(zip(systems, row[1:]))} for row in rows],
            "cb_tokens_equal_generate": same}, Path(args.out), "Our engine vs transformers' continuous batching",
            f"{setup}.\n\n{table}\n\nCB greedy tokens equal `generate`'s: {same}\n")


if __name__ == "__main__":
    asyncio.run(main())
