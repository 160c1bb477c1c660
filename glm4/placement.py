"""GPU inventory and memory plan: which part of the model goes on which device.

Pure: no weights are loaded and no CUDA is needed, so every plan can be computed for simulated GPUs
(`parse_simulated_gpus`, `python app.py --plan-only`). Sizes come from the config (one decoder layer
is built on the meta device to count its parameters) and bitsandbytes' storage formats.
Layers of a GPU model are never offloaded to CPU: a model that does not fit raises PlacementError.
"""
from __future__ import annotations

import logging
import math
import re
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from glm4.engine.base import PREFILL_CHUNK_TOKENS

GIB = 1024**3
MIB = 1024**2
CUDA_CONTEXT_BYTES = 512 * MIB  # CUDA context + cuBLAS workspace per GPU in use (527 MiB measured, H200)
ALLOCATOR_SLACK_BYTES = 256 * MIB  # cached-but-unused blocks: 120-370 MiB measured around 2048-token prefills
MODES = ("auto", "balanced", "replicate", "cpu")
QUANTIZATIONS = ("4bit", "8bit", "none")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANT_LABELS = {"4bit": "4-bit nf4", "8bit": "8-bit", "none": "unquantized"}

# Memory bandwidth in GB/s, matched on the words of the device name; most specific entries first.
_BANDWIDTH_GBS = [
    ("h200", 4800), ("h100 pcie", 2000), ("h100", 3350), ("a100 80gb", 2039), ("a100", 1555),
    ("l40s", 864), ("l40", 864), ("a40", 696), ("a10g", 600), ("a10", 600), ("l4", 300), ("t4", 320),
    ("v100", 900), ("p100", 732), ("p40", 346), ("a6000", 768), ("titan rtx", 672), ("titan v", 653),
    ("5090", 1792), ("5080", 960), ("4090", 1008), ("4080", 717), ("4070 ti", 504), ("4070", 504),
    ("4060 ti", 288), ("4060", 272), ("3090 ti", 1008), ("3090", 936), ("3080 ti", 912), ("3080", 760),
    ("3070 ti", 608), ("3070", 448), ("3060 ti", 448), ("3060", 360), ("2080 ti", 616),
    ("2080 super", 496), ("2080", 448), ("2070", 448), ("2060 super", 448), ("2060", 336),
    ("1080 ti", 484), ("1080", 320), ("1070", 256), ("1060", 192),
]


class PlacementError(Exception):
    """The model cannot be placed as asked; the message is one paragraph with the numbers."""


@dataclass(frozen=True)
class GpuSpec:
    index: int  # CUDA ordinal
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int]
    bandwidth_gbs: float | None = None

    @property
    def label(self) -> str:
        return f"{self.name} (GPU {self.index})"


def known_bandwidth(name: str) -> float | None:
    """Memory bandwidth of a card from its name, or None for cards not in the table."""
    words = set(re.split(r"[\s\-_/]+", name.lower()))
    for pattern, gbs in _BANDWIDTH_GBS:
        if set(pattern.split()) <= words:
            return float(gbs)
    return None


def detect_gpus() -> list[GpuSpec]:
    """The visible CUDA GPUs with their free memory now; [] without CUDA."""
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)  # creates our CUDA context first: free already lacks it
        free = min(total, free + CUDA_CONTEXT_BYTES)  # ...and the plan reserves it on every GPU: count it once
        gpus.append(GpuSpec(index, props.name, total, free, (props.major, props.minor), known_bandwidth(props.name)))
    return gpus


def parse_memory(text: str) -> int:
    """Bytes from "10GiB", "7GB", "7500MiB", "512M" or a bare number of GiB ("8")."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read memory size {text!r}: use e.g. 10GiB, 7GB, 7500MiB or 8 (GiB)")
    number, prefix, binary, unit_b = match.groups()
    if not prefix:  # a bare number means GiB; "512B" means bytes
        return int(float(number) * (1 if unit_b else GIB))
    power = "KMGT".index(prefix.upper()) + 1
    decimal = unit_b and not binary  # "GB" is 10^9 (as accelerate reads it); "G" and "GiB" are 2^30
    return int(float(number) * (1000 if decimal else 1024) ** power)


def parse_gpu_memory_caps(text: str | None) -> list[int] | None:
    """Per-GPU memory caps ("10GiB,7GiB"), in GPU index order; None when not given."""
    if not text or not text.strip():
        return None
    return [parse_memory(part) for part in text.split(",")]


def parse_simulated_gpus(spec: str) -> list[GpuSpec]:
    """GPUs from "RTX 2080 Ti:11GiB:7.5,GTX 1070:8GiB:6.1" (name:memory:capability[:GB/s]), all memory free."""
    gpus = []
    for index, item in enumerate(part for part in spec.split(",") if part.strip()):
        fields = [f.strip() for f in item.split(":")]
        if len(fields) not in (3, 4) or not re.fullmatch(r"\d+\.\d+", fields[2]):
            raise ValueError(f"cannot read simulated GPU {item!r}: use name:memory:capability[:GB/s], "
                             f"e.g. \"RTX 2080 Ti:11GiB:7.5,GTX 1070:8GiB:6.1\"")
        memory = parse_memory(fields[1])
        major, minor = (int(n) for n in fields[2].split("."))
        bandwidth = float(fields[3]) if len(fields) == 4 else known_bandwidth(fields[0])
        gpus.append(GpuSpec(index, fields[0], memory, memory, (major, minor), bandwidth))
    return gpus


def _require(what: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}: use one of {', '.join(choices)}")


def _unsupported(gpu: GpuSpec, quantization: str, dtype: str) -> str | None:
    """Why this card cannot run the model as asked, or None when it can."""
    sm = f"sm_{gpu.capability[0]}{gpu.capability[1]}"
    if quantization == "8bit" and gpu.capability < (7, 5):
        return f"{gpu.label} is {sm}; bitsandbytes 8-bit needs sm_75 or newer"
    if dtype == "bfloat16" and gpu.capability < (8, 0):
        return f"{gpu.label} is {sm}; bfloat16 needs sm_80 (Ampere) or newer"
    return None


def choose_dtype(requested: str, gpus: list[GpuSpec]) -> str:
    """Resolve --dtype for the GPUs in use: auto = bfloat16 on sm_80+, float16 on older cards, float32 on CPU."""
    if requested == "auto":
        if not gpus:
            return "float32"
        return "bfloat16" if all(g.capability >= (8, 0) for g in gpus) else "float16"
    _require("dtype", requested, DTYPE_BYTES)
    reasons = [r for r in (_unsupported(g, "none", requested) for g in gpus) if r]
    if reasons:
        raise PlacementError(f"Cannot run in {requested}: {'; '.join(reasons)}. "
                             "Use --dtype float16 (or auto, which picks float16 on these cards).")
    return requested


def check_quantization(quantization: str, gpus: list[GpuSpec]) -> None:
    """Refuse a quantization that a card in use cannot run (8-bit needs sm_75+)."""
    _require("quantization", quantization, QUANTIZATIONS)
    reasons = [r for r in (_unsupported(g, quantization, "float16") for g in gpus) if r]
    if reasons:
        raise PlacementError(f"Cannot load the model in 8-bit: {'; '.join(reasons)}. "
                             "Use --quantization 4bit (nf4 runs on Pascal and newer and is smaller).")


@dataclass(frozen=True)
class ModelSizes:
    """Bytes each top-level module occupies on its device, and what the KV cache costs per token."""
    embed_bytes: int
    layer_bytes: tuple[int, ...]
    norm_bytes: int
    lm_head_bytes: int  # 0 when tied to the embeddings
    kv_bytes_per_token_per_layer: int
    tied_embeddings: bool = False
    prefill_bytes_per_token: int = 0  # activation peak of a forward pass, per token in it
    prefill_fixed_bytes: int = 0  # bitsandbytes dequantizes the largest Linear for a prefill

    def activation_bytes(self, tokens: int) -> int:
        return self.prefill_fixed_bytes + tokens * self.prefill_bytes_per_token

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def weight_bytes(self) -> int:
        return self.embed_bytes + sum(self.layer_bytes) + self.norm_bytes + self.lm_head_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_per_layer * self.num_layers

    def module_bytes(self) -> dict[str, int]:
        """Weight bytes per entry of a device_map, in the order the forward pass runs them."""
        sizes = {"model.embed_tokens": self.embed_bytes, "model.rotary_emb": 0}
        sizes.update({f"model.layers.{i}": b for i, b in enumerate(self.layer_bytes)})
        sizes.update({"model.norm": self.norm_bytes, "lm_head": self.lm_head_bytes})
        return sizes


def _meta_decoder_layer(config) -> nn.Module:
    """One decoder layer of the config's native transformers class, on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise PlacementError(f"Cannot size model_type {config.model_type!r}: transformers has no native "
                             "causal-LM class for it (use the -hf checkpoint).") from None
    layer_class = getattr(sys.modules[model_class.__module__], model_class._no_split_modules[0])
    with torch.device("meta"):
        return layer_class(config, layer_idx=0)


def _quantized_linear_bytes(linear: nn.Linear, quantization: str) -> int:
    """Bytes of a Linear weight as bitsandbytes stores it."""
    n = linear.weight.numel()
    if quantization == "8bit":  # int8 weights + one fp32 scale per output row
        return n + 4 * linear.out_features
    # nf4: 4 bits per weight + one absmax per 64-weight block; double quantization stores the absmax
    # in 8 bits with an fp32 scale per 256 blocks, plus two fp32 code tables (256 + 16) and an offset.
    blocks = math.ceil(n / 64)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (256 + 16 + 1)


def estimate_sizes(config, quantization: str, dtype: str) -> ModelSizes:
    """Per-module bytes for the config; quantization replaces decoder Linears like transformers' bnb quantizer
    (embeddings, norms, biases and lm_head stay in `dtype`). Matched memory allocated on an H200 by a loaded
    GLM-4-9B-shaped model within 0.03% in 16-bit, nf4 and 8-bit."""
    _require("quantization", quantization, QUANTIZATIONS)
    _require("dtype (resolved, to size the model)", dtype, DTYPE_BYTES)
    element = DTYPE_BYTES[dtype]
    layer = _meta_decoder_layer(config)
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    quantized = {id(m.weight) for m in linears} if quantization != "none" else set()
    layer_bytes = sum(_quantized_linear_bytes(m, quantization) for m in linears if id(m.weight) in quantized)
    layer_bytes += sum(p.numel() * element for p in layer.parameters() if id(p) not in quantized)
    hidden, vocab = config.hidden_size, config.vocab_size
    # Activation peak, fitted to GLM-4-9B forwards of 512, 2048 and 8192 tokens on an H200: (3·intermediate
    # + 8·hidden) values per token (MLP up/gate/act, attention with K/V expanded to all heads); 8-bit 1.5×.
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    factor = 1.5 if quantization == "8bit" else 1.0
    dequantized = max(m.weight.numel() for m in linears) * element if quantized else 0
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return ModelSizes(
        embed_bytes=vocab * hidden * element,
        layer_bytes=(layer_bytes,) * config.num_hidden_layers,
        norm_bytes=hidden * element,
        lm_head_bytes=0 if tied else vocab * hidden * element,
        kv_bytes_per_token_per_layer=2 * kv_heads * head_dim * element,  # K and V, kept in the compute dtype
        tied_embeddings=tied,
        prefill_bytes_per_token=int(factor * (3 * intermediate + 8 * hidden) * element),
        prefill_fixed_bytes=int(factor * dequantized),
    )


@dataclass
class DevicePlan:
    device: int | str  # GPU index or "cpu"
    name: str
    layers: tuple[int, int] | None  # first and last decoder layer held, or None
    weight_bytes: int
    kv_bytes: int  # KV cache of max_model_len tokens for the layers held
    free_after_bytes: int | None  # left after weights, KV and headroom (None on CPU: RAM is not planned)
    headroom_bytes: int = 0
    kv_budget_tokens: int | None = None  # tokens of KV cache that fit in everything past the weights


@dataclass
class PlacementPlan:
    mode: str
    device_map: dict[str, int | str]
    devices: list[DevicePlan]
    replicas: list[dict[str, int | str]]
    kv_budget_tokens: int
    max_model_len: int
    summary: str
    quantization: str = "none"
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_indices(self) -> list[int]:
        """The GPUs this plan uses, in index order."""
        return sorted({d for m in self.replicas for d in m.values() if isinstance(d, int)})

    def table(self) -> str:
        """Human table: device → layer range → GiB of weights and KV cache, KV budget in tokens."""
        head = ("device", "layers", "weights", f"KV@{_tokens(self.max_model_len)}", "headroom", "free after",
                "KV budget")
        rows = [head]
        for plan in self.devices:
            layers = _layer_range(plan.layers) if plan.layers else "-"
            device = plan.name if plan.device == "cpu" else f"{plan.name} (GPU {plan.device})"
            free = "-" if plan.free_after_bytes is None else _gib(plan.free_after_bytes)
            budget = "-" if plan.kv_budget_tokens is None else f"{_tokens(plan.kv_budget_tokens)} tokens"
            rows.append((device, layers, _gib(plan.weight_bytes), _gib(plan.kv_bytes), _gib(plan.headroom_bytes),
                         free, budget))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def describe_plan(plan: PlacementPlan) -> str:
    """What --plan-only prints: the summary line, the table, and any notes."""
    return "\n".join([plan.summary, plan.table(), *plan.notes])


def _layer_range(layers: tuple[int, int]) -> str:
    return str(layers[0]) if layers[0] == layers[1] else f"{layers[0]}-{layers[1]}"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 else str(n)


def _speed_key(gpu: GpuSpec):
    """Fastest first: memory bandwidth (decode is bandwidth bound); unknown cards by capability, then memory."""
    return (-(gpu.bandwidth_gbs or 0.0), tuple(-c for c in gpu.capability), -gpu.total_bytes, gpu.index)



@dataclass
class _Budget:
    """What the GPUs able to run the model offer: memory (caps and free memory applied) and a reserve kept
    free on each GPU in use for the CUDA context, allocator slack and the activations of one forward pass."""
    gpus: list[GpuSpec]
    usable: dict[int, int]
    reserve: int
    caps: dict[int, int]
    excluded: list[str]  # why the other GPUs cannot run it
    prefill_tokens: int

    def room(self, gpu: GpuSpec) -> int:
        return self.usable[gpu.index] - self.reserve

    def fastest_first(self) -> list[GpuSpec]:
        return sorted(self.gpus, key=_speed_key)


def _fill_fastest_first(sizes: ModelSizes, budget: _Budget, tokens: int):
    """Modules in forward order onto the fastest GPU until it is full, then the next; None if they run out."""
    kv_layer = sizes.kv_bytes_per_token_per_layer * tokens
    items = [(("model.embed_tokens", "model.rotary_emb"), sizes.embed_bytes)]
    items += [((f"model.layers.{i}",), b + kv_layer) for i, b in enumerate(sizes.layer_bytes)]
    items.append((("model.norm", "lm_head"), sizes.norm_bytes + sizes.lm_head_bytes))
    device_map: dict[str, int | str] = {}
    for gpu in budget.fastest_first():
        left = budget.room(gpu)
        while items and items[0][1] <= left:
            names, size = items.pop(0)
            left -= size
            device_map.update(dict.fromkeys(names, gpu.index))
    return None if items else device_map


def _split_balanced(sizes: ModelSizes, budget: _Budget, tokens: int):
    """accelerate's balanced split (device_map="balanced"), run on a stand-in with the real module names and
    byte sizes (KV included in each layer) instead of a 9B-parameter meta model; None if it needs offload."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    class Sized(nn.Module):
        def __init__(self, nbytes: int):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(nbytes, dtype=torch.uint8, device="meta"), requires_grad=False)

    class DecoderLayer(Sized):  # no_split_module_classes: a layer never straddles two devices
        pass

    kv_layer = sizes.kv_bytes_per_token_per_layer * tokens
    stand_in, stand_in.model = nn.Module(), nn.Module()
    stand_in.model.embed_tokens = Sized(sizes.embed_bytes)
    stand_in.model.layers = nn.ModuleList(DecoderLayer(b + kv_layer) for b in sizes.layer_bytes)
    stand_in.model.norm, stand_in.model.rotary_emb = Sized(sizes.norm_bytes), nn.Module()
    stand_in.lm_head = Sized(sizes.lm_head_bytes)
    max_memory = {g.index: max(budget.room(g), 0) for g in sorted(budget.gpus, key=lambda g: g.index)}
    quiet = logging.getLogger("accelerate.utils.modeling")  # it warns that simulated devices do not exist
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        balanced = get_balanced_memory(stand_in, dict(max_memory), no_split_module_classes=["DecoderLayer"])
        split = infer_auto_device_map(stand_in, balanced, no_split_module_classes=["DecoderLayer"])
    finally:
        quiet.setLevel(level)
    device_map = {}
    for name in sizes.module_bytes():  # accelerate groups names ("model.layers": 1); expand them
        owner = max((key for key in split if key == "" or name == key or name.startswith(key + ".")), key=len)
        device_map[name] = split[owner]
    return device_map if all(isinstance(d, int) for d in device_map.values()) else None


def _device_plans(device_map, sizes: ModelSizes, gpus: dict[int, GpuSpec], budget: _Budget,
                  tokens: int) -> list[DevicePlan]:
    """Per-device accounting of a device_map, devices in the order the forward pass visits them."""
    plans = []
    for device in dict.fromkeys(device_map.values()):
        names = [n for n, d in device_map.items() if d == device]
        layers = [int(n.rsplit(".", 1)[1]) for n in names if n.startswith("model.layers.")]
        weights = sum(sizes.module_bytes()[n] for n in names)
        kv_per_token = len(layers) * sizes.kv_bytes_per_token_per_layer
        past_weights = budget.room(gpus[device]) - weights
        plans.append(DevicePlan(
            device=device, name=gpus[device].name, layers=(min(layers), max(layers)) if layers else None,
            weight_bytes=weights, kv_bytes=kv_per_token * tokens, free_after_bytes=past_weights - kv_per_token * tokens,
            headroom_bytes=budget.reserve, kv_budget_tokens=past_weights // kv_per_token if kv_per_token else None))
    return plans


def _cpu_plan(config, quantization: str, dtype: str, tokens: int, gpus: list[GpuSpec]) -> PlacementPlan:
    if gpus and quantization != "none":
        raise PlacementError(f"A {QUANT_LABELS[quantization]} model runs on CPU only when there is no GPU at all; "
                             "with --placement cpu use --quantization none, or drop --placement cpu to use the GPUs.")
    dtype = choose_dtype(dtype, [])
    sizes = estimate_sizes(config, quantization, dtype)
    device = DevicePlan("cpu", "CPU", (0, sizes.num_layers - 1), sizes.weight_bytes,
                        sizes.kv_bytes_per_token * tokens, None, 0, tokens)
    summary = f"all {sizes.num_layers} layers on CPU · {QUANT_LABELS[quantization]} · {dtype}"
    return PlacementPlan("cpu", {"": "cpu"}, [device], [{"": "cpu"}], tokens, tokens, summary, quantization, dtype)


def _does_not_fit(what: str, split: bool, sizes: ModelSizes, budget: _Budget, tokens: int, label: str,
                  smaller: ModelSizes | None) -> PlacementError:
    """One paragraph: what needs how many GiB, what each GPU offers, what to change. `split`: the GPUs' memory
    adds up (auto, balanced); otherwise each GPU is judged alone (replicate)."""
    kv = sizes.kv_bytes_per_token * tokens
    need = sizes.weight_bytes + kv
    offers = "; ".join(f"{g.label} {g.total_bytes / GIB:.1f} GiB"
                       + (f" capped at {budget.caps[g.index] / GIB:.1f}" if g.index in budget.caps else "")
                       + f" → {_gib(max(budget.room(g), 0))} usable" for g in budget.gpus)
    total = sum(max(budget.room(g), 0) for g in budget.gpus)
    tips = [f"--quantization 4bit (weights {smaller.weight_bytes / GIB:.1f} GiB)"] if smaller else []
    per_1k = sizes.kv_bytes_per_token * 1024 / MIB
    tips.append(f"a lower --max-model-len (KV cache costs {per_1k:.0f} MiB per 1k tokens)")
    if budget.caps:
        tips.append("higher or fewer --gpu-memory caps")
    return PlacementError(
        f"{what}: it needs {_gib(sizes.weight_bytes)} of weights ({label}) + {_gib(kv)} KV cache for "
        f"--max-model-len {tokens} = {_gib(need)}, and {_gib(budget.reserve)} more on each GPU used (CUDA context, "
        f"allocator slack, activations of a {budget.prefill_tokens}-token forward pass). Available: "
        f"{offers or 'no GPU'}" + (f" ({_gib(total)} usable together)." if split and len(budget.gpus) > 1 else ".")
        + (" That is enough in total, but not once split at layer boundaries." if split and total >= need else "")
        + "".join(f" Not usable: {reason}." for reason in budget.excluded)
        + " Layers are never offloaded to CPU. Try " + ", or ".join(tips) + ".")


def plan_placement(config, *, quantization: str, dtype: str, gpus: list[GpuSpec],
                   gpu_memory_caps: list[int] | None = None, max_model_len: int = 8192, mode: str = "auto",
                   activation_headroom_bytes: int | None = None,
                   prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> PlacementPlan:
    """Decide which device holds which module; raise PlacementError rather than offload a GPU model to CPU.

    dtype may be "auto" (resolved for the GPUs the plan uses; plan.dtype holds the answer). Caps replace each
    GPU's total memory, in GPU index order. Every used GPU keeps free: the CUDA context, allocator slack and
    the activations of one forward pass over min(max_model_len, prefill_chunk_tokens) tokens (or
    activation_headroom_bytes when given).
    """
    _require("placement", mode, MODES)
    _require("quantization", quantization, QUANTIZATIONS)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and max_model_len > limit:
        raise PlacementError(f"--max-model-len {max_model_len} exceeds what the model supports ({limit} tokens).")
    if mode == "cpu" or not gpus:
        return _cpu_plan(config, quantization, dtype, max_model_len, gpus)

    by_index = {g.index: g for g in gpus}
    if len(by_index) != len(gpus):
        raise ValueError(f"GPU indices must be unique: {[g.index for g in gpus]}")
    if gpu_memory_caps and len(gpu_memory_caps) > len(gpus):
        raise PlacementError(f"--gpu-memory lists {len(gpu_memory_caps)} caps but only {len(gpus)} GPUs are visible.")
    if all(_unsupported(g, quantization, dtype) for g in gpus):  # the checks raise with their own message
        check_quantization(quantization, gpus)
        choose_dtype(dtype, gpus)
    sizes = estimate_sizes(config, quantization, "float16" if dtype == "auto" else dtype)
    prefill = min(max_model_len, prefill_chunk_tokens)
    if activation_headroom_bytes is None:
        activation_headroom_bytes = sizes.activation_bytes(prefill)
    caps = dict(zip(sorted(by_index), gpu_memory_caps or []))
    budget = _Budget(
        gpus=[g for g in gpus if not _unsupported(g, quantization, dtype)],
        usable={g.index: min(g.free_bytes, caps.get(g.index, g.total_bytes)) for g in gpus},
        reserve=CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK_BYTES + activation_headroom_bytes,
        caps=caps, excluded=[r for r in (_unsupported(g, quantization, dtype) for g in gpus) if r],
        prefill_tokens=prefill)

    def refuse(what: str, split: bool) -> PlacementError:
        smaller = None if quantization == "4bit" else estimate_sizes(config, "4bit", "float16")
        label = f"{QUANT_LABELS[quantization]}, {choose_dtype(dtype, budget.gpus)}"
        return _does_not_fit(what, split, sizes, budget, max_model_len, label, smaller)

    whole = sizes.weight_bytes + sizes.kv_bytes_per_token * max_model_len
    if mode == "replicate":
        hosts = [g for g in budget.fastest_first() if whole <= budget.room(g)]
        if not hosts:
            raise refuse("The model fits on none of the GPUs on its own, so it cannot be replicated", split=False)
        replicas = [{name: g.index for name in sizes.module_bytes()} for g in hosts]
        devices = [_device_plans(m, sizes, by_index, budget, max_model_len)[0] for m in replicas]
        where = ", ".join(g.label for g in hosts)
        head = (f"{len(hosts)} replicas: {where} (requests go to the least-loaded)" if len(hosts) > 1
                else f"1 replica on {where}")
        head += "".join(f"; no replica on {g.label} (needs {_gib(whole + budget.reserve)}, has "
                        f"{_gib(budget.usable[g.index])})" for g in budget.fastest_first() if g not in hosts)
    else:
        device_map = (_fill_fastest_first if mode == "auto" else _split_balanced)(sizes, budget, max_model_len)
        if device_map is None:
            raise refuse("The model does not fit on the GPUs", split=True)
        if sizes.tied_embeddings:  # tied weights live in one tensor: the head goes where the embeddings are
            device_map["lm_head"] = device_map["model.embed_tokens"]
        replicas = [device_map]
        devices = _device_plans(device_map, sizes, by_index, budget, max_model_len)
        holding = [d for d in devices if d.layers]
        if len(holding) == 1:
            head = f"all {sizes.num_layers} layers on {by_index[holding[0].device].label}"
        else:
            head = "layers " + ", ".join(f"{_layer_range(d.layers)} on {by_index[d.device].label}" for d in holding)
        if device_map["lm_head"] not in [d.device for d in holding]:
            head += f", lm_head on {by_index[device_map['lm_head']].label}"
    final_dtype = choose_dtype(dtype, [by_index[i] for i in sorted({d for m in replicas for d in m.values()})])
    kv_budget = min(d.kv_budget_tokens for d in devices if d.kv_budget_tokens is not None)
    summary = (f"{head} · {QUANT_LABELS[quantization]} · {final_dtype} · KV budget {_tokens(kv_budget)} tokens"
               + (" per replica" if mode == "replicate" else ""))
    notes = [f"not used: {reason}" for reason in budget.excluded]
    return PlacementPlan(mode, replicas[0], devices, replicas, kv_budget, max_model_len, summary, quantization,
                         final_dtype, notes)


# ---------- slots: how the KV budget is cut into request slots (the slot KV cache, glm4/engine/kv.py) ----------

TARGET_CONTEXT_TOKENS = 32768  # what agents (Codex CLI ~18k) and front ends (Open WebUI ~10k + history) need
SHORT_SLOT_TOKENS = 8192  # preferred size of the other slots when not all can be long
MIN_SLOT_TOKENS = 2048  # below this a slot holds no useful conversation
CPU_AUTO_CONTEXT_TOKENS = 32768  # RAM is not planned: on CPU, auto stops here (pages are committed as used)


@dataclass
class SlotPlan:
    capacities: list[int]  # tokens per slot, longest first
    max_model_len: int  # the longest slot: prompt + reply tokens at most
    budget_tokens: int | None  # KV tokens the plan had (None on CPU: RAM is not planned)
    kv_bytes_per_token: int
    notes: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.capacities)

    def describe(self) -> str:
        counts: dict[int, int] = {}
        for capacity in self.capacities:
            counts[capacity] = counts.get(capacity, 0) + 1
        shape = " + ".join(f"{n} x {_tokens_exact(c)}" for c, n in sorted(counts.items(), reverse=True))
        return (f"slots: {shape} tokens ({len(self.capacities)} at once, "
                f"{_gib(self.total_tokens * self.kv_bytes_per_token)} KV cache); "
                f"max model len {self.max_model_len}")


def _tokens_exact(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _round_down(n: int, multiple: int = 256) -> int:
    return n // multiple * multiple


def plan_slots(*, budget_tokens: int | None, max_num_seqs: int, requested_len: int | None, max_position: int,
               kv_bytes_per_token: int) -> SlotPlan:
    """Cut the KV budget into max_num_seqs slots. `requested_len` None means --max-model-len auto: the longest
    slot gets as much as the plan fits, up to max_position. When not every slot can be that long, one long slot
    stays beside shorter ones (up to SHORT_SLOT_TOKENS each, then larger if the budget has room to spare);
    admission puts each request in the smallest free slot that holds it."""
    notes: list[str] = []
    n = max_num_seqs
    if budget_tokens is None:  # CPU: equal slots
        length = requested_len or min(max_position, CPU_AUTO_CONTEXT_TOKENS)
        return SlotPlan([length] * n, length, None, kv_bytes_per_token, notes)
    if requested_len is not None and requested_len > budget_tokens:
        raise PlacementError(
            f"--max-model-len {requested_len} needs {_gib(requested_len * kv_bytes_per_token)} of KV cache for one "
            f"request, and the plan leaves {_gib(budget_tokens * kv_bytes_per_token)} ({budget_tokens} tokens). "
            "Lower --max-model-len (or use auto), or free GPU memory.")
    want = requested_len or max_position
    if budget_tokens >= n * want:
        return SlotPlan([want] * n, want, budget_tokens, kv_bytes_per_token, notes)
    first = requested_len or min(want, TARGET_CONTEXT_TOKENS)  # the long slot must reach this
    fit = min(n, 1 + max(0, budget_tokens - first) // MIN_SLOT_TOKENS) if budget_tokens >= first else 0
    if fit == 0:  # not even one slot of the target length: auto shrinks it, equal slots
        fit = max(1, min(n, budget_tokens // MIN_SLOT_TOKENS))
        length = _round_down(budget_tokens // fit)
        capacities = [length] * fit
    else:
        short = min(SHORT_SLOT_TOKENS, _round_down((budget_tokens - first) // (fit - 1))) if fit > 1 else 0
        long = requested_len or min(want, _round_down(budget_tokens - (fit - 1) * short))
        if fit > 1:  # what the long slot cannot take (max_position) goes to the short ones
            short = min(long, _round_down((budget_tokens - long) // (fit - 1)))
        capacities = [long] + [short] * (fit - 1)
    if fit < n:
        notes.append(f"only {fit} request(s) fit at once in the KV budget ({budget_tokens} tokens), not "
                     f"--max-num-seqs {n}")
    longest = capacities[0]
    if requested_len is None and longest < min(max_position, TARGET_CONTEXT_TOKENS):
        notes.append(f"max model len {longest}: the KV budget ({budget_tokens} tokens) allows no "
                     f"{min(max_position, TARGET_CONTEXT_TOKENS)}-token slot (agents and Open WebUI send 10-20k); "
                     "use --quantization 4bit, fewer --max-num-seqs, or a larger card")
    elif longest < max_position:
        notes.append(f"max model len {longest} of the checkpoint's {max_position}: what the KV budget "
                     f"({budget_tokens} tokens) fits beside {len(capacities) - 1} shorter slot(s)")
    return SlotPlan(capacities, longest, budget_tokens, kv_bytes_per_token, notes)


# ---------------------------------------------------------------------------------------------------------
# Auxiliary models (embedding, rerank): placed AFTER the chat model's plan, only in memory that plan leaves.
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AuxiliaryModel:
    """An embedding or rerank model to place beside the chat model, sized from its config (no weights)."""
    role: str  # "embedding" | "rerank"
    name: str
    parameters: int
    activation_values: int  # values alive at the peak of the largest forward pass the batcher runs

    def weight_bytes(self, dtype: str) -> int:
        return self.parameters * DTYPE_BYTES[dtype]

    def activation_bytes(self, dtype: str) -> int:
        return self.activation_values * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class AuxiliaryPlacement:
    role: str
    name: str
    device: int | str  # GPU index or "cpu"
    dtype: str
    weight_bytes: int
    activation_bytes: int
    reason: str

    @property
    def torch_device(self) -> str:
        return "cpu" if self.device == "cpu" else f"cuda:{self.device}"

    def describe(self) -> str:
        where = "CPU" if self.device == "cpu" else f"GPU {self.device}"
        return (f"{self.role} model {self.name}: {where}, {self.dtype}, {_gib(self.weight_bytes)} weights + "
                f"{_gib(self.activation_bytes)} activations · {self.reason}")


def auxiliary_dtype(gpu: GpuSpec | None) -> str:
    """bf16 on sm_80+, fp16 on older cards (Pascal and Turing have no bf16), fp32 on CPU."""
    if gpu is None:
        return "float32"
    return "bfloat16" if gpu.capability >= (8, 0) else "float16"


def plan_auxiliary_models(plan: PlacementPlan | None, gpus: list[GpuSpec], models: list[AuxiliaryModel],
                          gpu_memory_caps: list[int] | None = None) -> list[AuxiliaryPlacement]:
    """Where each auxiliary model runs, with the reason. Pure, like plan_placement.

    Memory the chat plan counts on is never offered: a card the plan does not use offers its usable memory
    (free memory and --gpu-memory caps applied) less a CUDA context and allocator slack; a card the plan uses
    offers only what its plan leaves free after weights, KV cache and headroom. Cards the plan leaves unused
    come first, fastest first (a card with a chat layer on it would slow every chat step down); models are
    placed in the order given, sharing a card when both fit (one CUDA context). What fits nowhere runs on CPU.
    plan=None means no local chat model (--backend upstream): every card is free.
    """
    caps = dict(zip(sorted(g.index for g in gpus), gpu_memory_caps or []))
    used_by_chat = {d.device: d for d in (plan.devices if plan else []) if d.device != "cpu"}
    offers: dict[int, int] = {}
    for gpu in gpus:
        if gpu.index in used_by_chat:
            offers[gpu.index] = max(used_by_chat[gpu.index].free_after_bytes or 0, 0)
        else:
            usable = min(gpu.free_bytes, caps.get(gpu.index, gpu.total_bytes))
            offers[gpu.index] = max(usable - CUDA_CONTEXT_BYTES - ALLOCATOR_SLACK_BYTES, 0)
    order = sorted(gpus, key=lambda g: (g.index in used_by_chat, _speed_key(g)))
    placements = []
    for model in models:
        for gpu in order:
            dtype = auxiliary_dtype(gpu)
            need = model.weight_bytes(dtype) + model.activation_bytes(dtype)
            if need <= offers[gpu.index]:
                offers[gpu.index] -= need
                why = ("the chat model's plan leaves this card free" if gpu.index not in used_by_chat
                       else "room the chat model's plan leaves on this card")
                reason = f"{gpu.label}: {why} ({_gib(need)} of {_gib(offers[gpu.index] + need)} it offers)"
                placements.append(AuxiliaryPlacement(model.role, model.name, gpu.index, dtype,
                                                     model.weight_bytes(dtype), model.activation_bytes(dtype), reason))
                break
        else:
            if not gpus:
                reason = "no GPU"
            else:
                reason = "no GPU has room beside the chat model's plan (" + "; ".join(
                    f"{g.label} offers {_gib(offers[g.index])}, needs "
                    f"{_gib(model.weight_bytes(auxiliary_dtype(g)) + model.activation_bytes(auxiliary_dtype(g)))}"
                    for g in order) + ")"
            placements.append(AuxiliaryPlacement(model.role, model.name, "cpu", "float32",
                                                 model.weight_bytes("float32"), model.activation_bytes("float32"),
                                                 reason))
    return placements
