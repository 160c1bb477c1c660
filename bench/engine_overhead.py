"""Engine overhead: LocalEngine stream tok/s vs raw `model.generate` on the same model and params.

Both decode greedily, the same prompt, exactly --tokens new tokens with EOS ignored (generate with
eos_token_id=None, the engine with SamplingParams.ignore_eos), in the same process and thread settings. Runs are
interleaved (raw, engine, raw, engine, ...) so machine noise hits both alike; the ratio is of medians.
CPU time per token (the whole process: the engine's worker thread plus the event loop consuming the
stream) is reported too: on a shared box it moves far less with other load than wall-clock does.

    python bench/engine_overhead.py [--tokens 256] [--runs 7] [--model tiny] [--out bench/results]

Writes engine_overhead.json (figures + provenance: what bench/readme_figures.py quotes) and engine_overhead.md.

Target: engine / raw >= 0.95.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from pathlib import Path

from common import (RESULTS, finish_provenance, load_tiny, machine_summary, markdown_table,
                    median, prompt_for, provenance, write_results)


def raw_generate(model, prompt_ids: list[int], tokens: int) -> tuple[float, float, list[int]]:
    """(wall seconds, process CPU seconds, new token ids)."""
    import torch

    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    started, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                             eos_token_id=None, do_sample=False, pad_token_id=model.config.pad_token_id)
    return time.perf_counter() - started, time.process_time() - cpu, out[0, len(prompt_ids):].tolist()


async def engine_generate(engine, prompt, tokens: int, run: int) -> tuple[float, float, list[int]]:
    """(wall seconds, process CPU seconds: worker thread and event loop, new token ids)."""
    from glm4.engine.base import SamplingParams

    ids: list[int] = []
    started, cpu = time.perf_counter(), time.process_time()
    async for delta in engine.submit(prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), f"bench-{run}"):
        ids.extend(delta.token_ids)
        if delta.finished:
            assert delta.usage.completion_tokens == tokens, delta
    return time.perf_counter() - started, time.process_time() - cpu, ids


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per run")
    parser.add_argument("--runs", type=int, default=7, help="measured runs of each (after one warm-up each)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for engine_overhead.json/.md ('' = none)")
    args = parser.parse_args()

    import torch

    from glm4.engine.local import LocalEngine

    loaded = load_tiny(args.model)
    model, tokenizer = loaded.models[0], loaded.tokenizer
    engine = LocalEngine(model, tokenizer, loaded.info, max_num_seqs=8, max_queue=8)
    await engine.start()
    prompt = prompt_for(tokenizer)
    record = provenance()  # after the engine set its thread count
    print(f"{machine_summary()}; torch threads {torch.get_num_threads()}")
    print(f"model {loaded.info.source} ({loaded.info.dtype}), prompt {len(prompt.token_ids)} tokens, "
          f"{args.tokens} new tokens, greedy, {args.runs} interleaved runs after a warm-up")

    raw_generate(model, prompt.token_ids, args.tokens)  # warm-up: allocator, kernels, lazy imports
    await engine_generate(engine, prompt, args.tokens, -1)
    rows, raw_rates, engine_rates, raw_cpu, engine_cpu = [], [], [], [], []
    for run in range(args.runs):
        raw_seconds, raw_cpu_seconds, raw_ids = raw_generate(model, prompt.token_ids, args.tokens)
        engine_seconds, engine_cpu_seconds, engine_ids = await engine_generate(engine, prompt, args.tokens, run)
        same = "yes" if raw_ids == engine_ids else "NO"
        raw_rates.append(args.tokens / raw_seconds)
        engine_rates.append(args.tokens / engine_seconds)
        raw_cpu.append(raw_cpu_seconds / args.tokens * 1000)
        engine_cpu.append(engine_cpu_seconds / args.tokens * 1000)
        rows.append([run + 1, raw_rates[-1], engine_rates[-1], f"{engine_rates[-1] / raw_rates[-1]:.3f}",
                     f"{raw_cpu[-1]:.2f}", f"{engine_cpu[-1]:.2f}", same])
        print(f"run {run + 1}: raw {raw_rates[-1]:7.1f} tok/s  engine {engine_rates[-1]:7.1f} tok/s  "
              f"CPU ms/token raw {raw_cpu[-1]:.2f} engine {engine_cpu[-1]:.2f}  same tokens: {same}", flush=True)
    await engine.shutdown()

    ratio = median(engine_rates) / median(raw_rates)
    cpu_ratio = median(raw_cpu) / median(engine_cpu)
    rows.append(["median", median(raw_rates), median(engine_rates), f"{ratio:.3f}", f"{median(raw_cpu):.2f}",
                 f"{median(engine_cpu):.2f}", ""])
    table = markdown_table(["run", "raw generate tok/s", "engine stream tok/s", "engine / raw", "raw CPU ms/tok",
                            "engine CPU ms/tok", "same tokens"], rows)
    verdict = "meets" if ratio >= 0.95 else "MISSES"
    summary = (f"engine / raw = {ratio:.3f} by wall-clock tok/s ({verdict} the >= 0.95 target); "
               f"{cpu_ratio:.3f} by CPU time per token (process-wide: the engine's worker thread and event loop)")
    print()
    print(table)
    print(summary)
    if args.out:
        finish_provenance(record)
        setup = (f"model {loaded.info.source.rsplit('/', 1)[-1]} ({loaded.info.dtype}), prompt {len(prompt.token_ids)} "
                 f"tokens, {args.tokens} new tokens, greedy, EOS ignored, {args.runs} interleaved runs after a "
                 f"warm-up, torch threads {torch.get_num_threads()}")
        write_results("engine_overhead", {
            "provenance": record, "setup": setup, "tokens": args.tokens, "runs": args.runs,
            "raw_tok_s": raw_rates, "engine_tok_s": engine_rates, "raw_cpu_ms_per_token": raw_cpu,
            "engine_cpu_ms_per_token": engine_cpu, "ratio": ratio, "cpu_ratio": cpu_ratio,
            "same_tokens": all(row[-1] == "yes" for row in rows[:-1])}, Path(args.out), "Engine overhead",
            f"{setup}.\n\n{table}\n\n{summary}\n")
        print(f"wrote {Path(args.out) / 'engine_overhead.json'} and engine_overhead.md")


if __name__ == "__main__":
    asyncio.run(main())
