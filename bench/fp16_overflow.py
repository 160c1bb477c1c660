"""Which fp16 mode keeps a GLM-4-0414 (`glm4`) model finite, and what each costs: the measurement behind
glm4/precision.py.

The model is the tiny `glm4` of `glm4.tiny.build_overflowing_glm4`: random weights scaled so that its fp16
forward overflows where GLM-4-0414's sandwich norms allow it (the MLP product, the MLP output, the
attention output, a massive residual channel), while its fp32 forward is an ordinary model. Modes:

- float32          the whole model in fp32 (`--dtype float32`): the reference
- float16          plain fp16, as `--dtype auto` picks on a 2080 Ti / 1070: overflows
- fp16 + guard     glm4/precision.py: fp32 residual stream, range-safe fp16 matmuls (inputs scaled per row by a power of two, fp32 out)
- fp16 + fp32 blocks   o_proj and the whole MLP with fp32 weights and compute, fp32 residual stream
- fp16 + clamp     HF's fp16 clamping (T5): sub-block outputs and the residual clamped to ±(65504 − 1000)

For each: whether every logit is finite, the largest |logit − fp32 logit| and top-1 agreement over a
prompt, decode speed relative to plain fp16 (greedy, CPU, one thread), and weight memory (measured on the
tiny model; for GLM-4-9B from the placement sizes). The guard is also run on the same model without the
scaling, to show it loses no accuracy where nothing overflows.

    python bench/fp16_overflow.py              # writes bench/results/fp16_overflow.{json,md}
    python bench/fp16_overflow.py --quick      # a short run that proves the script works (numbers noisy)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import RESULTS, finish_provenance, markdown_table, provenance  # noqa: F401  (and the root on sys.path)

import torch

from glm4.precision import ROW_TARGET, guard_activation_bytes, install_fp16_guard
from glm4.tiny import build_glm4_config, build_overflowing_glm4, tiny_glm4_tokenizer

PROMPT = "[gMASK]<sop><|user|>\n你好，介绍一下你自己。What is this server? 北京天气怎么样？<|assistant|>"
GIB = 1024**3


def _hook_clamp(model) -> None:
    """HF's T5-style fp16 clamping on every sub-block output and on the residual stream."""

    def clamp(module, args, output):
        if output.dtype != torch.float16:
            return output
        limit = torch.where(torch.isinf(output).any(), torch.finfo(torch.float16).max - 1000,
                            torch.finfo(torch.float16).max)
        return torch.clamp(output, min=-limit, max=limit)

    for layer in model.model.layers:
        for module in (layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj, layer):
            module.register_forward_hook(clamp)


def _hook_fp32_blocks(model) -> None:
    """o_proj and the MLP in fp32 (weights and compute), the residual stream in fp32."""
    inner = model.model
    inner.embed_tokens.register_forward_hook(lambda m, a, out: out.float())
    inner.rotary_emb.register_forward_hook(lambda m, a, out: tuple(t.half() for t in out))
    inner.norm.register_forward_hook(lambda m, a, out: out.half())
    for layer in inner.layers:
        layer.self_attn.o_proj.float()
        layer.mlp.float()
        layer.input_layernorm.register_forward_hook(lambda m, a, out: out.half())  # q/k/v stay fp16
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: (a[0].float(), *a[1:]))


def build(mode: str, overflowing: bool = True):
    model, tokenizer = build_overflowing_glm4() if overflowing else _plain_model()
    if mode == "float32":
        return model.float().eval(), tokenizer
    model = model.half().eval()
    if mode == "fp16 + guard":
        install_fp16_guard(model)
    elif mode == "fp16 + fp32 blocks":
        _hook_fp32_blocks(model)
    elif mode == "fp16 + clamp":
        _hook_clamp(model)
    return model, tokenizer


def _plain_model():
    from transformers import Glm4ForCausalLM

    tokenizer = tiny_glm4_tokenizer("0414")
    torch.manual_seed(0)
    return Glm4ForCausalLM(build_glm4_config(tokenizer)).eval(), tokenizer


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()[0]  # (positions, vocab)


def decode_tok_s(model, ids, tokens: int, runs: int) -> float:
    """Greedy decode speed, tokens per second (median of runs; prefill included, it is short)."""
    speeds = []
    for _ in range(runs):
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        speeds.append(tokens / (time.perf_counter() - started))
    return statistics.median(speeds)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def glm4_9b_costs() -> dict:
    """What each mode adds to GLM-4-9B(-0414)'s memory, from the same sizes placement uses."""
    from transformers import Glm4Config

    from glm4.placement import PREFILL_CHUNK_TOKENS, estimate_sizes

    config = Glm4Config()  # its defaults are GLM-4-9B's dimensions
    fp16, nf4 = estimate_sizes(config, "none", "float16"), estimate_sizes(config, "4bit", "float16")
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    block_params = layers * (hidden * hidden + 2 * inter * hidden + inter * hidden)  # o_proj + gate_up + down
    return {
        "fp16_weights_gib": fp16.weight_bytes / GIB,
        "nf4_weights_gib": nf4.weight_bytes / GIB,
        "guard_extra_weights_gib": 0.0,
        "guard_extra_activations_gib": guard_activation_bytes(config, PREFILL_CHUNK_TOKENS) / GIB,
        "fp32_blocks_extra_weights_gib_unquantized": 2 * block_params / GIB,
        "float32_extra_weights_gib_unquantized": fp16.weight_bytes / GIB,
        "float32_extra_weights_gib_nf4": (nf4.embed_bytes + nf4.lm_head_bytes) / GIB,  # 16-bit parts double
        "prefill_tokens": PREFILL_CHUNK_TOKENS,
    }


MODES = ["float32", "float16", "fp16 + guard", "fp16 + fp32 blocks", "fp16 + clamp"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few tokens and runs: proves the script works")
    args = parser.parse_args(argv)
    tokens, runs = (16, 1) if args.quick else (128, 7)
    torch.set_num_threads(1)  # the engine's CPU setting (DESIGN.md)
    record = provenance()

    rows, results = [], {"modes": {}, "tokens": tokens, "runs": runs, "guard_row_target": ROW_TARGET}
    reference, tokenizer = build("float32")
    ids = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False)])
    ref = logits_of(reference, ids)
    base_speed = None
    for mode in MODES:
        model, _ = build(mode)
        got = logits_of(model, ids)
        finite = bool(torch.isfinite(got).all())
        error = float((got - ref).abs().max()) if finite else float("inf")
        agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean()) if finite else 0.0
        speed = decode_tok_s(model, ids, tokens, runs)
        if mode == "float16":
            base_speed = speed
        results["modes"][mode] = {"finite": finite, "max_abs_logit_error": error, "top1_agreement": agree,
                                  "decode_tok_s": speed, "weight_bytes": weight_bytes(model)}
    for mode, r in results["modes"].items():
        r["speed_vs_fp16"] = r["decode_tok_s"] / base_speed
        rows.append([mode, "yes" if r["finite"] else "no", f"{r['max_abs_logit_error']:.4f}",
                     f"{100 * r['top1_agreement']:.0f} %", f"{r['decode_tok_s']:.1f}", f"{r['speed_vs_fp16']:.2f}x",
                     f"{r['weight_bytes'] / 2**20:.1f}"])
    # Accuracy where nothing overflows: plain fp16 vs the guard, on the same model without the scaling.
    plain_ref = logits_of(build("float32", overflowing=False)[0], ids)
    results["no_overflow"] = {
        mode: float((logits_of(build(mode, overflowing=False)[0], ids) - plain_ref).abs().max())
        for mode in ("float16", "fp16 + guard")}
    results["logit_scale"] = float(ref.abs().max())
    results["glm4_9b"] = costs = glm4_9b_costs()

    header = ["mode", "finite", "max |Δ logit| vs fp32", "top-1 = fp32", "decode tok/s (CPU)", "vs fp16",
              "weights MiB (tiny)"]
    text = [
        "# fp16 overflow on a GLM-4-0414-shaped model: which mode stays finite, and what it costs",
        "",
        "Written by `python bench/fp16_overflow.py`" + (" --quick (a smoke run: noisy)" if args.quick else "")
        + f": tiny `glm4` model with overflowing activations (glm4.tiny.build_overflowing_glm4), CPU, one "
        f"thread, greedy decode of {tokens} tokens, median of {runs} runs. Largest |logit| in fp32: "
        f"{results['logit_scale']:.2f}.",
        "",
        markdown_table(header, rows),
        "",
        f"Without overflowing weights (same model, unscaled), largest |Δ logit| vs fp32: plain fp16 "
        f"{results['no_overflow']['float16']:.4f}, guard {results['no_overflow']['fp16 + guard']:.4f}.",
        "",
        "GLM-4-9B(-0414), from the placement sizes: weights fp16 "
        f"{costs['fp16_weights_gib']:.2f} GiB, nf4 {costs['nf4_weights_gib']:.2f} GiB. The guard adds no weight "
        f"memory and {costs['guard_extra_activations_gib'] * 1024:.0f} MiB of fp32 activations for a "
        f"{costs['prefill_tokens']}-token prefill; fp32 blocks add {costs['fp32_blocks_extra_weights_gib_unquantized']:.2f}"
        f" GiB of weights unquantized (with nf4 none, but those matmuls then compute in fp32); float32 adds {costs['float32_extra_weights_gib_unquantized']:.2f} GiB "
        f"unquantized, {costs['float32_extra_weights_gib_nf4']:.2f} GiB with nf4 (embeddings and lm_head).",
        "",
        "Chosen: fp16 + guard (glm4/precision.py): finite where plain fp16 and clamping are not, as close to fp32 "
        "as plain fp16 is where nothing overflows, and no weight memory. CPU note: on CPU fp16 matmuls are not "
        "faster than fp32 ones, so the speed column compares the modes' extra work, not what tensor cores "
        "gain; on a 2080 Ti the guard keeps every matmul in fp16.",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    results["provenance"] = finish_provenance(record)
    (RESULTS / "fp16_overflow.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "fp16_overflow.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
