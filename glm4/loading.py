"""Resolve the model (auto | tiny | HF id | local dir), quantization, dtype and placement; load it.

Only native transformers classes are used (model_type glm / glm4 via AutoModelForCausalLM); a
checkpoint that needs remote code is refused with a message naming the -hf conversion.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm4.engine.base import ModelInfo
from glm4.settings import Settings

log = logging.getLogger(__name__)

REAL_MODEL_ID = "THUDM/glm-4-9b-chat-hf"
# The real architecture ships with the project so --plan-only works offline for the default model.
BUNDLED_CONFIGS = {REAL_MODEL_ID: Path(__file__).resolve().parent.parent / "assets" / "configs" / "glm-4-9b-chat-hf"}
NATIVE_MODEL_TYPES = ("glm", "glm4")
QUANTIZATION_LABELS = {"4bit": "4-bit", "8bit": "8-bit", "none": "16-bit"}


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message is one paragraph a user can act on."""


@dataclass
class LoadedModel:
    models: list[Any]  # one model, or one replica per GPU with --placement replicate
    tokenizer: Any
    info: ModelInfo
    plan: Any  # placement.PlacementPlan
    load_seconds: float = 0.0
    generation_defaults: dict[str, Any] = field(default_factory=dict)


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
    """Placement plan plus the resolved quantization and dtype, without touching weights."""
    from glm4 import placement

    if gpus is None:
        gpus = placement.parse_simulated_gpus(settings.simulate_gpus) if settings.simulate_gpus \
            else placement.detect_gpus()
    quantization = resolve_quantization(settings.quantization, bool(gpus))
    max_len = min(settings.max_model_len, getattr(config, "max_position_embeddings", settings.max_model_len))
    plan = placement.plan_placement(
        config, quantization=quantization, dtype=settings.dtype, gpus=gpus,
        gpu_memory_caps=placement.parse_gpu_memory_caps(settings.gpu_memory),
        max_model_len=max_len, mode=settings.placement,
    )
    return plan, quantization, plan.dtype, max_len


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
    max_len: int


def prepare_load(settings: Settings) -> LoadPlan:
    """Resolve the model, read its config and plan the placement; raises ModelLoadError / PlacementError."""
    source = resolve_model_source(settings.model)
    if is_tiny(source):
        reason = "no CUDA GPU found" if settings.model == "auto" else "--model tiny"
        log.info("%s: serving the embedded tiny GLM-4 demo model (%s); pass --model with a GLM-4 checkpoint "
                 "for the real one", reason, source)
    config = load_config(source, settings)
    plan, quantization, dtype_name, max_len = plan_for(settings, config)
    log.info("Placement: %s", plan.summary)
    return LoadPlan(settings, source, config, plan, quantization, dtype_name, max_len)


def load_weights(prepared: LoadPlan) -> LoadedModel:
    """The tokenizer and the weights as planned (the slow part: minutes for GLM-4-9B)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings, source, quantization, dtype_name = prepared.settings, prepared.source, prepared.quantization, \
        prepared.dtype
    dtype = getattr(torch, dtype_name)
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=settings.revision,
                                                  trust_remote_code=settings.trust_remote_code)
    except OSError as error:
        raise ModelLoadError(not_found_message(source, error)) from None
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
        models.append(model)
    seconds = time.perf_counter() - started
    name = settings.served_model_name
    info = ModelInfo(
        name=name, source=source, quantization=quantization, dtype=dtype_name, placement=prepared.plan.summary,
        max_model_len=prepared.max_len, aliases=model_aliases(name, source), created=int(time.time()),
        generation_defaults=generation_defaults(source), vocab_size=int(prepared.config.vocab_size),
    )
    log.info("Loaded %s (%s, %s) in %.1f s", source, QUANTIZATION_LABELS[quantization], dtype_name, seconds)
    return LoadedModel(models=models, tokenizer=tokenizer, info=info, plan=prepared.plan, load_seconds=seconds,
                       generation_defaults=info.generation_defaults)


def load_model(settings: Settings) -> LoadedModel:
    """Everything app.py needs to build an engine; raises ModelLoadError / PlacementError with clear text."""
    return load_weights(prepare_load(settings))


def model_aliases(served_name: str, source: str) -> list[str]:
    """Other names clients may send: the old project's "glm4", the HF id / dir name."""
    aliases = ["glm4", REAL_MODEL_ID, source, Path(source).name]
    return [alias for i, alias in enumerate(aliases) if alias and alias != served_name and alias not in aliases[:i]]
