"""Resolve the model (auto | tiny | HF id | local dir), quantization, dtype and placement; load it.

Only native transformers classes are used (model_type glm / glm4 via AutoModelForCausalLM); a
checkpoint that needs remote code is refused with a message naming the -hf conversion. At load time the
prompt renderer is chosen (glm4/chat_template.py), --reasoning-parser is resolved (glm4/reasoning.py) and,
for a glm4 checkpoint in float16, the fp16 guard is installed (glm4/precision.py); each says so in the log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm4.engine.base import PREFILL_CHUNK_TOKENS, ModelInfo
from glm4.settings import Settings

log = logging.getLogger(__name__)

REAL_MODEL_ID = "THUDM/glm-4-9b-chat-hf"
# The real architecture ships with the project so --plan-only works offline for the default model.
BUNDLED_CONFIGS = {REAL_MODEL_ID: Path(__file__).resolve().parent.parent / "assets" / "configs" / "glm-4-9b-chat-hf"}
NATIVE_MODEL_TYPES = ("glm", "glm4")
MIN_FIT_TOKENS = 8192  # with --max-model-len auto, the model must fit with at least this much KV
QUANTIZATION_LABELS = {"4bit": "4-bit", "8bit": "8-bit", "none": "16-bit"}


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message is one paragraph a user can act on."""


@dataclass
class LoadedModel:
    models: list[Any]  # one model, or one replica per GPU with --placement replicate
    tokenizer: Any
    info: ModelInfo
    plan: Any  # placement.PlacementPlan
    slots: Any = None  # placement.SlotPlan
    load_seconds: float = 0.0
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    renderer: Any = None  # chat_template.Renderer chosen for this checkpoint
    reasoning: Any = None  # reasoning.ReasoningMode resolved from --reasoning-parser
    fp16_guard: bool = False  # precision.install_fp16_guard is on every replica


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_model_source(requested: str, has_gpu: bool | None = None) -> str:
    """auto → the real GLM-4 on a CUDA machine, the embedded tiny GLM-4 elsewhere; tiny → assets dir."""
    from glm4.tiny import TINY_MODEL_DIR

    if requested == "auto":
        if has_gpu is None:
            has_gpu = cuda_available()
        return REAL_MODEL_ID if has_gpu else str(TINY_MODEL_DIR)
    if requested == "tiny":
        return str(TINY_MODEL_DIR)
    return requested


def is_tiny(source: str) -> bool:
    from glm4.tiny import TINY_MODEL_DIR

    return Path(source).resolve() == TINY_MODEL_DIR.resolve() if Path(source).exists() else False


def not_found_message(source: str, error: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    tried = f"a local directory named {source!r} (none exists)" if not Path(source).exists() else \
        f"the directory {source!r} (no usable config.json / weights in it)"
    if "/" in source and not Path(source).exists():
        tried += f", then the Hugging Face Hub id {source!r} and its local cache"
        tried += " (offline mode is on)" if offline else " (the hub could not be reached or has no such repo)"
    return (
        f"Could not load the model {source!r}: tried {tried}. "
        f"Download the weights on a machine with internet (`huggingface-cli download {REAL_MODEL_ID} "
        f"--local-dir ./glm-4-9b-chat-hf`) and pass the directory with --model ./glm-4-9b-chat-hf, "
        f"or run with --model tiny for the embedded demo model. ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    )


def load_config(source: str, settings: Settings):
    """The model config, with a clear refusal for checkpoints that need remote code."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, revision=settings.revision,
                                            trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error) or "custom code" in str(error):
            raise ModelLoadError(remote_code_message(source)) from None
        if settings.plan_only and source in BUNDLED_CONFIGS:
            log.info("%s is not reachable: planning with the bundled copy of its config.json", source)
            return AutoConfig.from_pretrained(BUNDLED_CONFIGS[source])
        raise ModelLoadError(not_found_message(source, error)) from None
    if config.model_type not in NATIVE_MODEL_TYPES and not settings.trust_remote_code:
        raise ModelLoadError(remote_code_message(source, config.model_type))
    return config


def remote_code_message(source: str, model_type: str | None = None) -> str:
    kind = f" (model_type {model_type!r})" if model_type else ""
    return (
        f"The checkpoint {source!r}{kind} needs its own remote code, which this server does not run by default. "
        f"Use the native transformers conversion instead: --model {REAL_MODEL_ID} (or THUDM/GLM-4-9B-0414). "
        "If you trust that code, pass --trust-remote-code."
    )


def resolve_quantization(requested: str, on_gpu: bool) -> str:
    if requested == "auto":
        return "4bit" if on_gpu else "none"
    return requested


def quantization_config(quantization: str, dtype):
    """bitsandbytes settings: 4-bit = nf4 with double quantization, computing in the model dtype."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def plan_for(settings: Settings, config, gpus=None):
    """Placement plan, slot plan and the resolved quantization and dtype, without touching weights.

    The model must fit with the KV of one --max-model-len request (auto: of MIN_FIT_TOKENS); the KV budget
    that the plan leaves is then cut into slots (placement.plan_slots), after the workspace a decode step
    needs to gather the K/V of a full batch of the longest slots. A glm4 checkpoint planned in float16 gets
    the fp16 guard (glm4/precision.py): its fp32 activations are reserved on every GPU, and the plan's notes
    say what it costs; with --plan-only they also say how long a reasoning model's conversation can grow."""
    from glm4 import placement
    from glm4.precision import guard_activation_bytes, guard_wanted

    if gpus is None:
        gpus = placement.parse_simulated_gpus(settings.simulate_gpus) if settings.simulate_gpus \
            else placement.detect_gpus()
    quantization = resolve_quantization(settings.quantization, bool(gpus))
    max_position = getattr(config, "max_position_embeddings", None) or placement.CPU_AUTO_CONTEXT_TOKENS
    requested = settings.requested_model_len
    if requested is not None and requested > max_position:
        raise placement.PlacementError(f"--max-model-len {requested} exceeds what the model supports "
                                       f"({max_position} tokens).")
    fit_len = requested or min(max_position, MIN_FIT_TOKENS)
    options = dict(quantization=quantization, dtype=settings.dtype, gpus=gpus,
                   gpu_memory_caps=placement.parse_gpu_memory_caps(settings.gpu_memory),
                   max_model_len=fit_len, mode=settings.placement)
    plan = placement.plan_placement(config, **options)
    guarded = guard_wanted(settings.fp16_guard, config.model_type, plan.dtype)
    prefill = min(fit_len, placement.PREFILL_CHUNK_TOKENS)
    if guarded and gpus:  # plan again with the guard's fp32 activations kept free beside the usual ones
        sizes = placement.estimate_sizes(config, quantization, "float16")
        plan = placement.plan_placement(config, **options, activation_headroom_bytes=sizes.activation_bytes(prefill)
                                        + guard_activation_bytes(config, prefill))
    plan.notes.extend(fp16_notes(settings, config, plan.dtype, prefill, reserved=bool(gpus)))
    sizes = placement.estimate_sizes(config, quantization, plan.dtype)
    budget = None if plan.mode == "cpu" else plan.kv_budget_tokens
    slots = placement.plan_slots(budget_tokens=budget, max_num_seqs=settings.max_num_seqs, requested_len=requested,
                                 max_position=max_position, kv_bytes_per_token=sizes.kv_bytes_per_token)
    if budget is not None:
        # A decode step gathers one layer's K/V of every row at a time: n x longest tokens of ONE layer, i.e.
        # n x longest / layers tokens of the budget (counted per token over a device's layers); the device
        # with the fewest layers pays the most.
        fewest_layers = min(d.layers[1] - d.layers[0] + 1 for d in plan.devices if d.layers)
        workspace = math.ceil(len(slots.capacities) * slots.max_model_len / fewest_layers)
        slots = placement.plan_slots(budget_tokens=max(0, budget - workspace), max_num_seqs=settings.max_num_seqs,
                                     requested_len=requested, max_position=max_position,
                                     kv_bytes_per_token=sizes.kv_bytes_per_token)
    if settings.plan_only:
        source = resolve_model_source(settings.model, has_gpu=bool(gpus))
        plan.notes.extend(reasoning_notes(settings, source, slots))
    return plan, quantization, plan.dtype, slots


def host_cache_bytes(settings: Settings, replicas: int = 1) -> int:
    """--cache-ram in bytes per replica: given, or min(8 GiB, RAM / 8); 0 with prefix caching off."""
    if settings.no_enable_prefix_caching:
        return 0
    if settings.cache_ram is not None:
        return int(settings.cache_ram * 2**30) // replicas
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not Linux: assume a 16 GiB machine
        ram = 16 * 2**30
    return min(8 * 2**30, ram // 8) // replicas


FP16_RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "fp16_overflow.json"


def _measured_guard_speed() -> float | None:
    """Decode speed of the guard relative to plain fp16, from bench/fp16_overflow.py's results file."""
    try:
        return float(json.loads(FP16_RESULTS.read_text())["modes"]["fp16 + guard"]["speed_vs_fp16"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fp16_notes(settings: Settings, config, dtype: str, prefill_tokens: int, reserved: bool = False) -> list[str]:
    """What the fp16 guard does and costs for this plan (nothing when it does not apply)."""
    from glm4.precision import GUARDED_MODEL_TYPES, guard_activation_bytes, guard_wanted

    if dtype != "float16":
        return []
    if not guard_wanted(settings.fp16_guard, config.model_type, dtype):
        if config.model_type in GUARDED_MODEL_TYPES:
            return [f"WARNING: --fp16-guard off with a {config.model_type} checkpoint in float16: GLM-4-0414 "
                    "checkpoints overflow fp16 (inf/NaN logits, '!!!!' replies); use --fp16-guard auto or "
                    "--dtype float32"]
        return []
    speed = _measured_guard_speed()
    extra = guard_activation_bytes(config, prefill_tokens) / 2**20
    return [f"fp16 guard (--fp16-guard {settings.fp16_guard}): {config.model_type} checkpoints overflow fp16, so "
            "the residual stream stays fp32 and matmul outputs in range; weights unchanged, "
            f"+{extra:.0f} MiB of activations per {prefill_tokens}-token prefill"
            + (" (reserved on every GPU in this plan)" if reserved else "")
            + (f", decode {speed:.2f}x plain fp16's speed (measured on CPU: bench/results/fp16_overflow.md)"
               if speed else "")]


def reasoning_notes(settings: Settings, source: str, slots) -> list[str]:
    """For --plan-only: whether replies are split into reasoning, and how long a conversation can grow."""
    from transformers import AutoTokenizer

    from glm4.chat_template import renderer_for
    from glm4.reasoning import resolve_reasoning

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=settings.revision,
                                                  trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError):  # not downloaded yet: whether it reasons shows in the start-up log
        return []
    mode = resolve_reasoning(settings.reasoning_parser, renderer_for(tokenizer).opens_reasoning)
    if not mode.enabled:
        return [f"reasoning: off ({mode.reason})"]
    full = sum(1 for capacity in slots.capacities if capacity == slots.max_model_len)
    return [f"reasoning model ({mode.reason}): one conversation (prompt + thinking + answer) can grow to "
            f"{slots.max_model_len} tokens (the longest slot); {full} such conversation(s) fit at once beside "
            f"{len(slots.capacities) - full} shorter slot(s); a reply's default max_tokens is all the context its "
            "prompt leaves in its slot, since GLM-Z1 thinks for thousands of tokens"]


def generation_defaults(source: str) -> dict[str, Any]:
    """temperature / top_p / top_k from the checkpoint's generation_config.json, when it has one."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(source)
    except OSError:
        return {}
    defaults = {}
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"):
        value = getattr(generation, name, None)
        if value is not None:
            defaults[name] = value
    return defaults


@dataclass
class LoadPlan:
    """What will be loaded and where, decided from the config alone (seconds, no weights): app.py makes it
    before listening, so a missing model or an impossible placement is refused at once."""

    settings: Settings
    source: str
    config: Any
    plan: Any  # placement.PlacementPlan
    quantization: str
    dtype: str
    slots: Any  # placement.SlotPlan

    @property
    def max_len(self) -> int:
        return self.slots.max_model_len


def prepare_load(settings: Settings) -> LoadPlan:
    """Resolve the model, read its config and plan the placement; raises ModelLoadError / PlacementError."""
    source = resolve_model_source(settings.model)
    if is_tiny(source):
        reason = "no CUDA GPU found" if settings.model == "auto" else "--model tiny"
        log.info("%s: serving the embedded tiny GLM-4 demo model (%s); pass --model with a GLM-4 checkpoint "
                 "for the real one", reason, source)
    config = load_config(source, settings)
    plan, quantization, dtype_name, slots = plan_for(settings, config)
    log.info("Placement: %s", plan.summary)
    log.info("KV %s%s", slots.describe(), "".join(f"; {note}" for note in slots.notes))
    return LoadPlan(settings, source, config, plan, quantization, dtype_name, slots)


def load_weights(prepared: LoadPlan) -> LoadedModel:
    """The tokenizer and the weights as planned (the slow part: minutes for GLM-4-9B)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glm4.chat_template import renderer_for
    from glm4.precision import guard_wanted, install_fp16_guard
    from glm4.reasoning import resolve_reasoning

    settings, source, quantization, dtype_name = prepared.settings, prepared.source, prepared.quantization, \
        prepared.dtype
    config = prepared.config
    dtype = getattr(torch, dtype_name)
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=settings.revision,
                                                  trust_remote_code=settings.trust_remote_code)
    except OSError as error:
        raise ModelLoadError(not_found_message(source, error)) from None
    renderer = renderer_for(tokenizer)  # logs which renderer serves this checkpoint, and why
    reasoning = resolve_reasoning(settings.reasoning_parser, renderer.opens_reasoning)
    log.info("Reasoning: %s (%s)", "on" if reasoning.enabled else "off", reasoning.reason)
    guarded = guard_wanted(settings.fp16_guard, config.model_type, dtype_name)
    models = []
    for device_map in prepared.plan.replicas:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, revision=settings.revision, trust_remote_code=settings.trust_remote_code,
                dtype=dtype, device_map=device_map, quantization_config=quantization_config(quantization, dtype),
            )
        except OSError as error:
            raise ModelLoadError(not_found_message(source, error)) from None
        model.eval()
        if guarded:
            install_fp16_guard(model)
        models.append(model)
    seconds = time.perf_counter() - started
    name = settings.served_model_name
    info = ModelInfo(
        name=name, source=source, quantization=quantization, dtype=dtype_name, placement=prepared.plan.summary,
        max_model_len=prepared.max_len, aliases=model_aliases(name, source), created=int(time.time()),
        generation_defaults=generation_defaults(source), vocab_size=int(prepared.config.vocab_size),
    )
    log.info("Loaded %s (%s, %s) in %.1f s", source, QUANTIZATION_LABELS[quantization], dtype_name, seconds)
    for note in fp16_notes(settings, config, dtype_name, min(prepared.max_len, PREFILL_CHUNK_TOKENS)):
        (log.warning if note.startswith("WARNING") else log.info)("%s", note.removeprefix("WARNING: "))
    return LoadedModel(models=models, tokenizer=tokenizer, info=info, plan=prepared.plan, slots=prepared.slots,
                       load_seconds=seconds, generation_defaults=info.generation_defaults, renderer=renderer,
                       reasoning=reasoning, fp16_guard=guarded)


def load_model(settings: Settings) -> LoadedModel:
    """Everything app.py needs to build an engine; raises ModelLoadError / PlacementError with clear text."""
    return load_weights(prepare_load(settings))


def model_aliases(served_name: str, source: str) -> list[str]:
    """Other names clients may send: the old project's "glm4", the HF id / dir name."""
    aliases = ["glm4", REAL_MODEL_ID, source, Path(source).name]
    return [alias for i, alias in enumerate(aliases) if alias and alias != served_name and alias not in aliases[:i]]
