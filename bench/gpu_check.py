"""The GPU path, measured: nf4 and 16-bit through the project's loader, the engine against raw generate.

    python bench/gpu_check.py                 # CUDA: builds a GLM-4-9B-shaped random checkpoint (or --model DIR)
    python bench/gpu_check.py --compile       # torch.compile inside the captured CUDA graphs (sm_75+ with Triton)
    python bench/gpu_check.py --enforce-eager # the same slot-cache path without CUDA graphs
    python bench/gpu_check.py --tiny          # the same code path on CPU with the embedded tiny model (CI)

Per mode, in one run: raw `model.generate` (eager, batch 1) and the engine single stream interleaved (ABBA),
then the engine with 8 and 32 concurrent streams, TTFT, the CUDA graph capture time, peak GPU memory, and a
prefix-cache check (an 8k-token prompt cold, continued in its warm slot, restored from the host cache).
Random weights cost the same compute as real ones. Writes the full report (bench/results/gpu_check-<card>.json)
and bench/results/gpu_summary.json (device, measured_at, versions, and per mode raw_generate_tok_s,
engine_1/8/32_tok_s, ttft_s, gpu_memory_gib, capture_s), which README's performance section quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from glm4.engine.base import ModelInfo, Prompt, SamplingParams  # noqa: E402
from bench.common import finish_provenance, provenance  # noqa: E402
from glm4.engine.local import LocalEngine  # noqa: E402
from glm4.loading import BUNDLED_CONFIGS, REAL_MODEL_ID, load_model  # noqa: E402
from glm4.settings import Settings  # noqa: E402
from glm4.tiny import TINY_MODEL_DIR  # noqa: E402

GIB = 2**30


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def card_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'})"


def build_random_checkpoint(out: Path, layers: int | None = None) -> Path:
    """A GLM-4-9B-shaped checkpoint with random weights (initialized on the GPU: fast), plus the tiny tokenizer;
    `layers` cuts it to that many decoder layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    config = AutoConfig.from_pretrained(BUNDLED_CONFIGS[REAL_MODEL_ID])
    if layers is not None:
        config.num_hidden_layers = layers
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="4GB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (TINY_MODEL_DIR / name).exists():
            shutil.copy(TINY_MODEL_DIR / name, out / name)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def memory_by_device() -> dict[str, float]:
    if torch.cuda.is_available():
        return {f"cuda:{i}": round(torch.cuda.memory_allocated(i) / GIB, 2) for i in range(torch.cuda.device_count())}
    import psutil

    return {"cpu (process RSS)": round(psutil.Process().memory_info().rss / GIB, 2)}


def make_prompt(tokenizer, length: int) -> list[int]:
    """[gMASK]<sop> plus ordinary tokens up to `length` ids (the content does not matter to the speed)."""
    prefix = tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>", "<|user|>"])
    filler = tokenizer.encode("GLM-4 runs in 4-bit on one 11 GB card. " * (length // 4 + 1), add_special_tokens=False)
    suffix = tokenizer.convert_tokens_to_ids(["<|assistant|>"])
    return prefix + filler[: length - len(prefix) - len(suffix)] + suffix


def raw_generate(model, prompt_ids: list[int], new_tokens: int) -> float:
    """tok/s of plain model.generate, greedy, exactly new_tokens."""
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([prompt_ids], device=device)
    sync()
    started = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)
    sync()
    return new_tokens / (time.perf_counter() - started)


async def engine_streams(engine: LocalEngine, prompt_ids: list[int], new_tokens: int, streams: int) -> dict:
    """Run `streams` greedy requests at once; aggregate tok/s, per-stream tok/s and TTFT."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    async def one(index: int):
        started = time.perf_counter()
        tokens = 0
        async for delta in engine.submit(Prompt(token_ids=prompt_ids), params, f"bench-{index}-{time.time_ns()}"):
            if delta.usage:
                tokens = delta.usage.completion_tokens
            if delta.error:
                raise RuntimeError(delta.error)
        return tokens, time.perf_counter() - started

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.perf_counter() - started
    tokens = sum(r[0] for r in results)
    return {"aggregate_tok_s": tokens / wall, "per_stream_tok_s": statistics.mean(r[0] / r[1] for r in results),
            "seconds": wall, "tokens": tokens}


async def time_to_first_token(engine: LocalEngine, prompt_ids: list[int], repeats: int) -> float:
    """Latency of a one-token request: queueing + prefill + the first sampled token."""
    times = [(await engine_streams(engine, prompt_ids, 1, 1))["seconds"] for _ in range(repeats)]
    return statistics.median(times)


MODE_KEYS = {"4bit": "nf4", "none": "bf16"}  # gpu_summary.json's names (16-bit is fp16 on cards without bf16)


async def measure_mode(source: str, quantization: str, args) -> dict:
    """One quantization: raw generate (batch 1) against the engine at 1, 8 and 32 streams, TTFT, the CUDA graph
    capture time and GPU memory, all in this run, raw and engine interleaved (ABBA)."""
    widest = max(args.stream_counts)
    slot = args.prompt_tokens + args.new_tokens + 64
    settings = Settings(model=source, quantization=quantization, max_model_len=slot, max_num_seqs=widest)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    loaded = load_model(settings)
    sync()
    load_seconds = time.perf_counter() - started
    model = loaded.models[0]
    engine = LocalEngine(model, loaded.tokenizer, loaded.info, slot_capacities=[slot] * widest,
                         compile=args.compile, cuda_graphs=not args.enforce_eager, prefix_caching=False)
    await engine.start()  # captures the CUDA graphs of every (batch, attended length) bucket
    prompt_ids = make_prompt(loaded.tokenizer, args.prompt_tokens)
    raw_generate(model, prompt_ids, 4)  # warm-up both paths
    await engine_streams(engine, prompt_ids, 4, 1)
    raws, singles = [], []
    for repeat in range(args.repeats):  # interleaved in ABBA order, so drifting clocks favour neither side
        if repeat % 2 == 0:
            raws.append(raw_generate(model, prompt_ids, args.new_tokens))
            singles.append(await engine_streams(engine, prompt_ids, args.new_tokens, 1))
        else:
            singles.append(await engine_streams(engine, prompt_ids, args.new_tokens, 1))
            raws.append(raw_generate(model, prompt_ids, args.new_tokens))
    streams = {n: await engine_streams(engine, prompt_ids, args.new_tokens, n) for n in args.stream_counts if n > 1}
    ttft = await time_to_first_token(engine, prompt_ids, 3)
    memory = memory_by_device()
    peak = round(torch.cuda.max_memory_allocated() / GIB, 2) if torch.cuda.is_available() else None
    await engine.shutdown()
    raw = statistics.median(raws)
    single = statistics.median(s["aggregate_tok_s"] for s in singles)
    result = {
        "quantization": quantization, "dtype": loaded.info.dtype, "load_seconds": round(load_seconds, 1),
        "memory_gib": memory, "gpu_memory_gib": peak, "placement": loaded.info.placement,
        "cuda_graphs": engine.runner.use_graphs, "compiled": engine.compiled,
        "graph_shapes": len([s for s in engine.runner.steps.values() if s.graph is not None]),
        "capture_s": round(engine.capture_seconds, 1),
        "raw_generate_tok_s": round(raw, 1), "engine_1_tok_s": round(single, 1),
        "engine_over_raw": round(single / raw, 3), "ttft_s": round(ttft, 3),
    }
    for n, measured in streams.items():
        result[f"engine_{n}_tok_s"] = round(measured["aggregate_tok_s"], 1)
        result[f"engine_{n}_per_stream_tok_s"] = round(measured["per_stream_tok_s"], 1)
    if not args.skip_prefix_check:
        result["prefix_cache"] = await prefix_restore_vs_prefill(model, loaded, args)
    del engine, model, loaded
    return result


async def prefix_restore_vs_prefill(model, loaded, args) -> dict:
    """TTFT of a long prompt prefilled from token 0, continued in its warm slot, and restored from the host
    cache after another prompt took the only slot (issue 20's scenarios on the device)."""
    length = args.prefix_tokens
    engine = LocalEngine(model, loaded.tokenizer, loaded.info, slot_capacities=[length + 64],
                         cuda_graphs=not args.enforce_eager, cache_ram_bytes=4 * GIB)
    await engine.start()
    prompt = make_prompt(loaded.tokenizer, length)
    other = [prompt[0]] + [prompt[3]] * (length - 2) + [prompt[-1]]  # shares nothing past the first token
    follow_up = prompt[:-1] + prompt[-40:]  # the same history, a new question
    cold = (await engine_streams(engine, prompt, 1, 1))["seconds"]
    warm = (await engine_streams(engine, follow_up, 1, 1))["seconds"]
    await engine_streams(engine, other, 1, 1)  # evicts the first prompt's KV to the host cache
    restored = (await engine_streams(engine, follow_up + prompt[-20:], 1, 1))["seconds"]
    stats = engine.stats()
    await engine.shutdown()
    return {"prompt_tokens": length, "cold_ttft_s": round(cold, 4), "warm_slot_ttft_s": round(warm, 4),
            "host_restore_ttft_s": round(restored, 4), "host_cache_hits": stats["host_cache_hits"],
            "restore_over_cold": round(restored / cold, 3)}


def summary(report: dict) -> dict:
    """gpu_summary.json: the figures issue 14 asks for, one run."""
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    out = {"device": report["card"], "measured_at": report["provenance"]["date"][:10],
           "torch": torch.__version__, "transformers": version("transformers"),
           "bitsandbytes": version("bitsandbytes"), "provenance": report["provenance"]}
    for mode in report["modes"]:
        key = MODE_KEYS.get(mode["quantization"], mode["quantization"])
        out[key] = {name: mode.get(name) for name in (
            "raw_generate_tok_s", "engine_1_tok_s", "engine_8_tok_s", "engine_32_tok_s", "ttft_s",
            "gpu_memory_gib", "capture_s", "dtype", "engine_over_raw", "cuda_graphs", "graph_shapes")}
        out[key]["prefix_cache"] = mode.get("prefix_cache")
    return out


async def split_matches_unsplit(args) -> dict:
    """Greedy tokens of the tiny model split across two devices equal those of the unsplit model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    first, second = ("cuda:0", "cpu") if torch.cuda.is_available() else ("cpu", "disk")
    split_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first,
                 "model.layers.1": first, "model.layers.2": second, "model.layers.3": second,
                 "model.norm": second, "lm_head": second}
    prompts = [[{"role": "user", "content": text}] for text in ("你好", "How do I use 4-bit?", "What is --placement?")]
    outputs = {}
    for label, device_map in (("unsplit", {"": first}), ("split", split_map)):
        offload = ROOT / "bench" / "out" / "offload"
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=dtype, device_map=device_map,
                                                     offload_folder=str(offload)).eval()
        info = ModelInfo(name="glm-4", source=str(TINY_MODEL_DIR), quantization="none", dtype=str(dtype),
                         placement=label, max_model_len=2048)
        engine = LocalEngine(model, tokenizer, info)
        await engine.start()
        from glm4.prompt import build_prompt

        texts = []
        for i, messages in enumerate(prompts):
            deltas = [d async for d in engine.submit(build_prompt(tokenizer, messages),
                                                     SamplingParams(temperature=0, max_tokens=48), f"{label}-{i}")]
            texts.append([t for d in deltas for t in d.token_ids])
        await engine.shutdown()
        outputs[label] = texts
        del model, engine
    return {"devices": f"{first} + {second}", "dtype": str(dtype).removeprefix("torch."),
            "prompts": len(prompts), "identical": outputs["split"] == outputs["unsplit"]}


def tensor_bytes(model) -> int:
    """Bytes of every tensor a loaded model holds: parameters, buffers and bitsandbytes' quantization state."""
    held: dict[tuple[int, int], int] = {}

    def add(tensor) -> None:
        if isinstance(tensor, torch.Tensor):
            held[(tensor.data_ptr(), tensor.numel())] = tensor.numel() * tensor.element_size()  # tied: once

    for tensor in [*model.parameters(), *model.buffers()]:
        add(tensor)
        state = getattr(tensor, "quant_state", None)  # 4-bit: absmax, code, offset, and the nested state
        if state is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            nested = getattr(state, "state2", None)
            if nested is not None:
                add(getattr(nested, "absmax", None))
                add(getattr(nested, "code", None))
        add(getattr(tensor, "SCB", None))  # 8-bit: the per-row scales
    return sum(held.values())


def measure_sizes(args) -> dict:
    """What glm4.placement plans with, measured (tests/test_placement.py checks its estimates against this).

    Per quantization: the bytes of the loaded weights, the KV cache per token, and the peak memory over the
    weights during one forward pass of N tokens (logits_to_keep=1, KV cache included). On CUDA the model is
    GLM-4-9B-shaped with random weights cut to 4 layers, bf16, and bytes come from the CUDA allocator; with
    --tiny (CPU) it is the tiny model, weights are counted tensor by tensor and there is no peak to read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

    from glm4.loading import quantization_config

    cuda = torch.cuda.is_available() and not args.tiny
    source = build_random_checkpoint(Path(args.workdir) / "glm-4-9b-random-4-layers", layers=4) if cuda \
        else TINY_MODEL_DIR
    device, dtype = ("cuda:0", torch.bfloat16) if cuda else ("cpu", torch.float32)
    config = AutoConfig.from_pretrained(source)
    tokens = [int(n) for n in args.size_tokens.split(",")]
    modes = {}
    for quantization in ("none", "4bit", "8bit"):
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            baseline = torch.cuda.memory_allocated(0)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map={"": device},
            quantization_config=quantization_config(quantization, dtype)).eval()
        weight_bytes = torch.cuda.memory_allocated(0) - baseline if cuda else tensor_bytes(model)
        peaks, kv_per_token = {}, None
        for count in tokens:
            ids = torch.randint(0, config.vocab_size, (1, count), device=device)
            cache = DynamicCache(config=model.config)
            if cuda:
                sync()
                torch.cuda.reset_peak_memory_stats(0)
                before = torch.cuda.memory_allocated(0)
            with torch.inference_mode():
                model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            if cuda:
                sync()
                peaks[str(count)] = round((torch.cuda.max_memory_allocated(0) - before) / 2**20, 1)
            kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
            kv_per_token = kv_bytes // count
            del cache
        modes[quantization] = {"weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token,
                               "prefill_peak_mib": peaks or None}
        print(f"sizes {quantization}: {json.dumps(modes[quantization])}", flush=True)
        del model
    return {"model": "GLM-4-9B-shaped, 4 layers, random weights" if cuda else "tiny", "device": device,
            "dtype": str(dtype).removeprefix("torch."), "num_hidden_layers": config.num_hidden_layers,
            "method": "torch.cuda.memory_allocated / max_memory_allocated" if cuda else "tensor bytes (CPU)",
            "modes": modes}


def print_table(report: dict) -> None:
    counts = [n for n in report["settings"]["stream_counts"] if n > 1]
    header = ["mode", "load s", "GPU GiB", "raw tok/s", "engine 1 tok/s", "engine/raw", "TTFT s",
              *[f"{n} streams tok/s" for n in counts], "graphs", "capture s"]
    rows = [[f"{m['quantization']} {m['dtype']}", m["load_seconds"], m["gpu_memory_gib"], m["raw_generate_tok_s"],
             m["engine_1_tok_s"], m["engine_over_raw"], m["ttft_s"], *[m.get(f"engine_{n}_tok_s") for n in counts],
             m["graph_shapes"], m["capture_s"]] for m in report["modes"]]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    print(f"\n{report['card']} · prompt {report['settings']['prompt_tokens']} · new {report['settings']['new_tokens']}")
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    for m in report["modes"]:
        if m.get("prefix_cache"):
            print(f"prefix cache ({m['quantization']}): {json.dumps(m['prefix_cache'])}")
    split = report.get("split_check")
    if split:
        print(f"split across {split['devices']} ({split['dtype']}): greedy tokens identical = {split['identical']}")


async def main_async(args) -> dict:
    started = time.perf_counter()
    if args.tiny:
        source = str(TINY_MODEL_DIR)
    elif args.model:
        source = args.model
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: pass --tiny for the CPU check, or --model with a checkpoint")
        source = str(build_random_checkpoint(Path(args.workdir) / "glm-4-9b-random"))
    build_seconds = time.perf_counter() - started
    report = {"card": card_name(), "torch": torch.__version__, "model": "tiny" if args.tiny else source,
              "provenance": provenance(),
              "settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                           "stream_counts": args.stream_counts, "repeats": args.repeats},
              "checkpoint_build_seconds": round(build_seconds, 1), "modes": []}
    for quantization in args.modes.split(","):
        report["modes"].append(await measure_mode(source, quantization, args))
        print(json.dumps(report["modes"][-1]), flush=True)
        args.out_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")  # partial results survive a timeout
    if not args.skip_split_check:
        report["split_check"] = await split_matches_unsplit(args)
    report["sizes"] = measure_sizes(args)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    finish_provenance(report["provenance"])
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, embedded tiny model (what CI runs)")
    parser.add_argument("--model", help="a checkpoint dir instead of building a random GLM-4-9B-shaped one")
    parser.add_argument("--compile", action="store_true", help="torch.compile the captured decode steps (Triton)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (to measure what they give)")
    parser.add_argument("--modes", default="4bit,none", help="quantizations to measure (none = 16-bit on GPU)")
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--streams", default="1,8,32", help="concurrent streams to measure the engine at")
    parser.add_argument("--prefix-tokens", type=int, default=None, help="prompt of the prefix-cache check")
    parser.add_argument("--skip-prefix-check", action="store_true")
    parser.add_argument("--summary-out", help="gpu_summary.json path (default: bench/results/ on a GPU, beside "
                        "--out otherwise)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--skip-split-check", action="store_true", help="skip the split-vs-unsplit greedy check")
    parser.add_argument("--size-tokens", default=None,
                        help="forward-pass lengths for the sizes measurement (default 512,2048,8192; --tiny 64,256)")
    parser.add_argument("--out", help="JSON path (default bench/results/gpu_check-<card>.json)")
    args = parser.parse_args()
    args.prompt_tokens = args.prompt_tokens or (64 if args.tiny else 512)
    args.new_tokens = args.new_tokens or (32 if args.tiny else 128)
    args.size_tokens = args.size_tokens or ("64,256" if args.tiny else "512,2048,8192")
    args.stream_counts = [int(n) for n in args.streams.split(",")]
    args.prefix_tokens = args.prefix_tokens or (512 if args.tiny else 8192)
    slug = "".join(c if c.isalnum() else "-" for c in card_name()).strip("-").lower()
    out = args.out_path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu_check-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(main_async(args))
    print_table(report)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    summary_path = Path(args.summary_out) if args.summary_out else (
        ROOT / "bench" / "results" / "gpu_summary.json" if torch.cuda.is_available() and not args.out
        else out.parent / f"gpu_summary-{slug}.json")
    summary_path.write_text(json.dumps(summary(report), indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out} and {summary_path}")
    ok = report.get("split_check", {}).get("identical", True) and all(m["engine_1_tok_s"] > 0 for m in report["modes"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
