"""The GPU path, measured: load in 4-bit and 16-bit through the project's loader, engine vs raw generate.

    python bench/gpu_check.py                 # CUDA: builds a GLM-4-9B-shaped random checkpoint (or --model DIR)
    python bench/gpu_check.py --compile       # also the compiled decode path (sm_75+ with Triton)
    python bench/gpu_check.py --tiny          # the same code path on CPU with the embedded tiny model (CI)

Random weights cost the same compute as real ones. Prints a table and writes JSON
(bench/results/gpu_check-<card>.json). Every figure is measured in this one run, raw and engine
interleaved, so the ratios are fair on a noisy machine.
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


async def measure_mode(source: str, quantization: str, args) -> dict:
    settings = Settings(model=source, quantization=quantization, max_model_len=args.prompt_tokens + args.new_tokens + 64,
                        max_num_seqs=args.streams, compile=False)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    loaded = load_model(settings)
    sync()
    load_seconds = time.perf_counter() - started
    model = loaded.models[0]
    memory = memory_by_device()
    engine = LocalEngine(model, loaded.tokenizer, loaded.info, max_num_seqs=args.streams)
    await engine.start()
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
    batched = await engine_streams(engine, prompt_ids, args.new_tokens, args.streams)
    ttft = await time_to_first_token(engine, prompt_ids, 3)
    await engine.shutdown()
    raw = statistics.median(raws)
    single = statistics.median(s["aggregate_tok_s"] for s in singles)
    result = {
        "quantization": quantization, "dtype": loaded.info.dtype, "load_seconds": round(load_seconds, 1),
        "memory_gib": memory, "placement": loaded.info.placement,
        "raw_generate_tok_s": round(raw, 1), "engine_tok_s": round(single, 1),
        "engine_over_raw": round(single / raw, 3),
        "ttft_s": round(ttft, 3),
        f"engine_{args.streams}_streams_aggregate_tok_s": round(batched["aggregate_tok_s"], 1),
        f"engine_{args.streams}_streams_per_stream_tok_s": round(batched["per_stream_tok_s"], 1),
    }
    if args.compile and quantization == "none" and torch.cuda.is_available():
        try:
            result.update(await measure_compiled(model, loaded, prompt_ids, args))
        except Exception as error:  # report the failure with the other figures instead of losing them
            result.update(compiled=False, compile_error=f"{type(error).__name__}: {str(error)[:300]}")
    del engine, model, loaded
    return result


async def measure_compiled(model, loaded, prompt_ids, args) -> dict:
    """The --compile path on the same weights: warm-up (compilation) timed separately."""
    engine = LocalEngine(model, loaded.tokenizer, loaded.info, max_num_seqs=args.streams, compile=True)
    await engine.start()
    started = time.perf_counter()
    await engine_streams(engine, prompt_ids, args.new_tokens, 1)
    warmup = time.perf_counter() - started
    single = await engine_streams(engine, prompt_ids, args.new_tokens, 1)
    await engine.shutdown()
    return {"compiled": engine.compiled, "compile_warmup_s": round(warmup, 1),
            "compiled_engine_tok_s": round(single["aggregate_tok_s"], 1)}


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
    modes = report["modes"]
    streams = report["settings"]["streams"]
    header = ["mode", "load s", "memory GiB", "raw tok/s", "engine tok/s", "engine/raw", "TTFT s",
              f"{streams}-stream agg tok/s", "placement"]
    rows = [[f"{m['quantization']} {m['dtype']}", m["load_seconds"], " ".join(f"{k}={v}" for k, v in m["memory_gib"].items()),
             m["raw_generate_tok_s"], m["engine_tok_s"], m["engine_over_raw"], m["ttft_s"],
             m[f"engine_{streams}_streams_aggregate_tok_s"], m["placement"]] for m in modes]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    print(f"\n{report['card']} · prompt {report['settings']['prompt_tokens']} · new {report['settings']['new_tokens']}")
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    for m in modes:
        if "compiled_engine_tok_s" in m:
            print(f"compiled ({m['dtype']}): {m['compiled_engine_tok_s']} tok/s single stream "
                  f"(eager {m['engine_tok_s']}), warm-up {m['compile_warmup_s']} s, active={m['compiled']}")
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
              "settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                           "streams": args.streams, "repeats": args.repeats},
              "checkpoint_build_seconds": round(build_seconds, 1), "modes": []}
    for quantization in args.modes.split(","):
        report["modes"].append(await measure_mode(source, quantization, args))
        print(json.dumps(report["modes"][-1]), flush=True)
        args.out_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")  # partial results survive a timeout
    if not args.skip_split_check:
        report["split_check"] = await split_matches_unsplit(args)
    report["sizes"] = measure_sizes(args)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, embedded tiny model (what CI runs)")
    parser.add_argument("--model", help="a checkpoint dir instead of building a random GLM-4-9B-shaped one")
    parser.add_argument("--compile", action="store_true", help="also measure the compiled decode path")
    parser.add_argument("--modes", default="4bit,none", help="quantizations to measure (none = 16-bit on GPU)")
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--streams", type=int, default=8)
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
    slug = "".join(c if c.isalnum() else "-" for c in card_name()).strip("-").lower()
    out = args.out_path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu_check-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(main_async(args))
    print_table(report)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}")
    ok = report.get("split_check", {}).get("identical", True) and all(m["engine_tok_s"] > 0 for m in report["modes"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
