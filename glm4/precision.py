"""fp16 that cannot overflow silently: GLM-4 with an fp32 residual stream and range-safe fp16 matmuls.

GLM-4-0414 checkpoints (model_type `glm4`) were trained in bf16, whose range is fp32's. Their "sandwich"
layers normalize each sub-block's output (post_self_attn_layernorm, post_mlp_layernorm) before adding it
to the residual stream, so the values inside a sub-block and in the stream may exceed fp16's 65504 — in
fp16 they become inf, the norms turn inf into NaN, and every reply is `!!!!` (vLLM #17154, zai-org/GLM-4
#755). Cards without bf16 (RTX 2080 Ti sm_75, GTX 1070 sm_61) have only fp16.

`install_fp16_guard(model)` keeps fp16 weights, fp16 matmuls and the fp16 KV cache, and moves only the
ranges that overflow to fp32 (chosen by measurement: bench/fp16_overflow.py, bench/results/fp16_overflow.md):
- the residual stream is fp32 (the embedding output is upcast; every norm then computes in fp32);
- the norms that feed fp16 matmuls (input_layernorm, post_attention_layernorm, the final norm) hand their
  bounded outputs back in fp16;
- the matmuls whose outputs are normalized next or feed the MLP's product (o_proj, gate_up_proj,
  down_proj) run in fp16 on inputs whose every row is scaled by a power of two (exact) and return fp32
  outputs scaled back. The scale brings the row's largest |value| to the module's target: ROW_TARGET, or
  less when the weights' largest row L1 norm says the output could pass OUTPUT_BOUND (|Wx| <= max|x| ·
  max_j ||W_j||_1, measured once at install, also for 4-bit and 8-bit weights). So no input row and no
  output, partial sums included, can overflow, and SiLU(gate) · up is computed in fp32.
It works the same on plain fp16 Linears and on bitsandbytes 4-bit / 8-bit ones (their compute dtype stays
fp16): no weight is copied, so it costs no weight memory, only fp32 activations in a forward pass
(`guard_activation_bytes`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

ROW_TARGET = 64.0  # guarded matmul inputs are scaled per row to a max |x| in (T/2, T], T <= ROW_TARGET
OUTPUT_BOUND = 32768.0  # the most a guarded matmul output (or partial sum) may reach: half of fp16's range
FP16_GUARD_SETTINGS = ("auto", "on", "off")
GUARDED_MODEL_TYPES = ("glm4",)  # the checkpoints known to overflow fp16 (glm-4-9b-chat-hf runs in fp16)
_SCALED_LINEARS = ("self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
_FP16_OUTPUT_NORMS = ("input_layernorm", "post_attention_layernorm")


class Fp16GuardError(ValueError):
    """The model's layout is not the one the guard knows (no GLM decoder layers)."""


def guard_wanted(setting: str, model_type: str | None, dtype: str) -> bool:
    """Whether --fp16-guard applies: auto = glm4 checkpoints in float16; on = any model in float16."""
    if setting not in FP16_GUARD_SETTINGS:
        raise ValueError(f"unknown --fp16-guard {setting!r}: use one of {', '.join(FP16_GUARD_SETTINGS)}")
    if dtype != "float16" or setting == "off":
        return False
    return setting == "on" or model_type in GUARDED_MODEL_TYPES


@dataclass
class Fp16Guard:
    """The hooks one install_fp16_guard put on a model; `remove()` takes them off again."""

    handles: list = field(default_factory=list)
    scaled_linears: int = 0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _to_fp32(module, args, output):
    return output.float()


def _to_fp16(module, args, output):
    return output.to(torch.float16)


def _rotary_to_fp16(module, args, output):
    cos, sin = output  # computed in the dtype of the (now fp32) embeddings; attention runs in fp16
    return cos.to(torch.float16), sin.to(torch.float16)


def _row_scale(hidden: torch.Tensor, target: float) -> torch.Tensor:
    """A power of two per row (shape [..., 1]) that brings the row's largest |value| into (target/2, target]."""
    amax = hidden.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min(2.0**-24)
    return torch.exp2(torch.floor(torch.log2(target / amax)))


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The weight as a dense tensor: nn.Linear's own, or bitsandbytes' 4-bit / 8-bit one dequantized."""
    weight = linear.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    if weight.dtype == torch.int8 and getattr(weight, "SCB", None) is not None:  # Int8Params: row scale / 127
        return weight.data.float() * (weight.SCB.float().unsqueeze(1) / 127.0)
    return weight


def input_target(linear: nn.Module) -> float:
    """The largest input |value| per row this module may get: ROW_TARGET, or a smaller power of two when its
    largest row L1 norm could carry the output past OUTPUT_BOUND."""
    with torch.no_grad():
        l1 = float(dense_weight(linear).abs().sum(dim=1, dtype=torch.float32).max())
    if l1 * ROW_TARGET <= OUTPUT_BOUND:
        return ROW_TARGET
    return 2.0 ** math.floor(math.log2(OUTPUT_BOUND / l1))


def _scale_input(module, args):
    (hidden, *rest) = args
    scale = _row_scale(hidden, module._fp16_guard_target)
    module._fp16_guard_scale = scale  # read by _unscale_output right after this module's forward
    return ((hidden.float() * scale).to(torch.float16), *rest)


def _unscale_output(module, args, output):
    return output.float().div_(module._fp16_guard_scale)


def _decoder_layers(model) -> list[nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "embed_tokens") or not hasattr(inner, "norm"):
        raise Fp16GuardError(f"{type(model).__name__} has no GLM-style model.layers / embed_tokens / norm")
    return list(layers)


def install_fp16_guard(model) -> Fp16Guard:
    """Put the fp32-residual / range-safe-matmul hooks (module docstring) on a GLM or GLM-4 model in fp16."""
    inner = getattr(model, "model", model)
    layers = _decoder_layers(model)
    guard = Fp16Guard()
    guard.handles.append(inner.embed_tokens.register_forward_hook(_to_fp32))
    guard.handles.append(inner.norm.register_forward_hook(_to_fp16))  # lm_head reads fp16
    if hasattr(inner, "rotary_emb"):
        guard.handles.append(inner.rotary_emb.register_forward_hook(_rotary_to_fp16))
    for layer in layers:
        for name in _FP16_OUTPUT_NORMS:
            guard.handles.append(layer.get_submodule(name).register_forward_hook(_to_fp16))
        for name in _SCALED_LINEARS:
            linear = layer.get_submodule(name)
            if getattr(linear, "bias", None) is not None:  # x·s·W + b would scale b wrongly
                guard.remove()
                raise Fp16GuardError(f"{name} has a bias; the fp16 guard scales only bias-free matmuls")
            linear._fp16_guard_target = input_target(linear)
            guard.handles.append(linear.register_forward_pre_hook(_scale_input))
            guard.handles.append(linear.register_forward_hook(_unscale_output))
            guard.scaled_linears += 1
    return guard


def guard_activation_bytes(config, tokens: int) -> int:
    """Extra activation memory of a guarded forward pass over `tokens` tokens: the fp32 residual stream
    and the fp32 MLP product (gate_up output and SiLU(gate) · up), each 2 bytes more per value than fp16."""
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return tokens * 2 * (2 * hidden + 3 * intermediate)
