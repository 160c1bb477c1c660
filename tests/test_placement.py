"""Memory plans for GLM-4-9B on simulated GPUs (no weights, no CUDA), checked against measured sizes."""
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GlmConfig

from glm4.placement import (
    CUDA_CONTEXT_BYTES, GIB, MIB, GpuSpec, PlacementError, PlacementPlan, _quantized_linear_bytes, check_quantization,
    choose_dtype, describe_plan, detect_gpus, estimate_sizes, known_bandwidth, parse_gpu_memory_caps, parse_memory,
    parse_simulated_gpus, plan_placement,
)

REAL_CONFIG = Path(__file__).parent / "data" / "glm-4-9b-chat-hf"
PAIR = "RTX 2080 Ti:11GiB:7.5,GTX 1070:8GiB:6.1"


@pytest.fixture(scope="module")
def config():
    return AutoConfig.from_pretrained(REAL_CONFIG)


@pytest.fixture
def pair():
    return parse_simulated_gpus(PAIR)


def tiny_config():
    return GlmConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=[1])


def layers_on(plan: PlacementPlan, device) -> list[int]:
    return [int(n.rsplit(".", 1)[1]) for n, d in plan.device_map.items()
            if n.startswith("model.layers.") and d == device]


def near(value, expected, tolerance=0.05):
    return abs(value - expected) <= tolerance * expected


# --- parsing ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("10GiB", 10 * GIB), ("7GB", 7 * 10**9), ("7500MiB", 7500 * MIB), ("8", 8 * GIB), ("1.5 GiB", int(1.5 * GIB)),
    ("512M", 512 * MIB), ("10gib", 10 * GIB), ("0", 0),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "ten GiB", "10 PB", "-1GiB", "GiB"])
def test_parse_memory_rejects_garbage(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_memory(text)


def test_parse_gpu_memory_caps():
    assert parse_gpu_memory_caps(None) is None
    assert parse_gpu_memory_caps("  ") is None
    assert parse_gpu_memory_caps("10GiB, 7GiB") == [10 * GIB, 7 * GIB]


def test_parse_simulated_gpus():
    first, second = parse_simulated_gpus(PAIR)
    assert first == GpuSpec(0, "RTX 2080 Ti", 11 * GIB, 11 * GIB, (7, 5), 616.0)
    assert second == GpuSpec(1, "GTX 1070", 8 * GIB, 8 * GIB, (6, 1), 256.0)
    (custom,) = parse_simulated_gpus("Mystery:24GiB:8.9:700")
    assert custom.bandwidth_gbs == 700.0 and custom.capability == (8, 9)
    assert parse_simulated_gpus("Mystery:24GiB:8.9")[0].bandwidth_gbs is None
    with pytest.raises(ValueError, match="name:memory:capability"):
        parse_simulated_gpus("RTX 2080 Ti:11GiB")


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA GeForce RTX 2080 Ti", 616), ("NVIDIA GeForce GTX 1070", 256), ("NVIDIA GeForce RTX 2080", 448),
    ("NVIDIA A100-SXM4-80GB", 2039), ("NVIDIA A100-PCIE-40GB", 1555), ("NVIDIA H100 80GB HBM3", 3350),
    ("NVIDIA H200", 4800), ("Tesla T4", 320), ("NVIDIA RTX A4000", None), ("NVIDIA GeForce RTX 4090", 1008),
])
def test_known_bandwidth(name, expected):
    assert known_bandwidth(name) == expected


def test_detect_gpus_without_cuda():
    if torch.cuda.is_available():
        assert all(g.total_bytes >= g.free_bytes > 0 for g in detect_gpus())
    else:
        assert detect_gpus() == []


def test_detect_gpus_reads_torch_and_counts_our_context_once(monkeypatch):
    cards = [("NVIDIA GeForce RTX 2080 Ti", 7, 5, 11 * GIB, 10 * GIB),
             ("NVIDIA GeForce GTX 1070", 6, 1, 8 * GIB, 8 * GIB)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name=cards[i][0], major=cards[i][1], minor=cards[i][2]))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (cards[i][4], cards[i][3]))
    ti, pascal = detect_gpus()
    assert ti == GpuSpec(0, "NVIDIA GeForce RTX 2080 Ti", 11 * GIB, 10 * GIB + CUDA_CONTEXT_BYTES, (7, 5), 616.0)
    assert pascal.free_bytes == 8 * GIB and pascal.bandwidth_gbs == 256.0  # never more than the card has


# --- dtype and quantization checks ---------------------------------------------------------------------------

def test_choose_dtype(pair):
    h100 = parse_simulated_gpus("NVIDIA H100 80GB HBM3:80GiB:9.0")
    assert choose_dtype("auto", pair) == "float16"
    assert choose_dtype("auto", h100) == "bfloat16"
    assert choose_dtype("auto", h100 + pair[1:]) == "float16"
    assert choose_dtype("auto", []) == "float32"
    assert choose_dtype("bfloat16", h100) == "bfloat16"
    assert choose_dtype("float16", pair) == "float16"
    with pytest.raises(PlacementError, match=r"RTX 2080 Ti \(GPU 0\) is sm_75.*--dtype float16"):
        choose_dtype("bfloat16", pair[:1])
    with pytest.raises(ValueError):
        choose_dtype("float8", pair)


def test_8bit_needs_turing(pair):
    check_quantization("8bit", pair[:1])
    check_quantization("4bit", pair)
    with pytest.raises(PlacementError, match=r"GTX 1070 \(GPU 1\) is sm_61.*--quantization 4bit"):
        check_quantization("8bit", pair)


# --- sizes -----------------------------------------------------------------------------------------------------

def test_sizes_match_measured_glm4_9b(config):
    bf16, nf4 = estimate_sizes(config, "none", "bfloat16"), estimate_sizes(config, "4bit", "bfloat16")
    assert near(bf16.weight_bytes / GIB, 17.5)
    assert near(nf4.weight_bytes / GIB, 6.1)
    assert near(nf4.embed_bytes / GIB, 1.16) and near(nf4.lm_head_bytes / GIB, 1.16)
    assert nf4.num_layers == 40 and near(nf4.layer_bytes[0] / GIB, 0.095)
    assert bf16.kv_bytes_per_token == nf4.kv_bytes_per_token == 40 * 1024  # 2 × 40 layers × 2 heads × 128 × 2 bytes
    eight = estimate_sizes(config, "8bit", "float16")
    assert nf4.weight_bytes < eight.weight_bytes < bf16.weight_bytes
    assert estimate_sizes(config, "none", "float32").weight_bytes == 2 * bf16.weight_bytes


# Measured by hand on a lent H200 (torch 2.11, transformers 5.17, bitsandbytes 0.50.2) when the plan was written
# (commit 8b9a826, 2026-11-26), before any script measured sizes: no results file holds them. bench/gpu_check.py
# now measures the same quantities (measure_sizes → "sizes" in bench/results/gpu_check-<card>.json); every such
# file committed from a GPU run is checked below too.
# Weights: torch.cuda.memory_allocated() after from_pretrained of GLM-4-9B-shaped random weights cut to 4 layers,
# bf16 (nf4 with double quantization).
MEASURED_4_LAYERS = {"none": 4114723840, "4bit": 2904559616, "8bit": 3300623360}
# Peak memory over the weights during one forward pass of N tokens (logits_to_keep=1), KV cache included.
MEASURED_PREFILL_MIB = {"none": {512: 105.3, 2048: 288.5, 8192: 1146.1},
                        "4bit": {512: 272.3, 2048: 406.9, 8192: 1146.1},
                        "8bit": {512: 459.9, 2048: 794.7, 8192: 2034.2}}
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def gpu_size_measurements() -> list:
    """(where from, weight bytes per quantization, prefill peak MiB per quantization and token count)."""
    found = [pytest.param(MEASURED_4_LAYERS, MEASURED_PREFILL_MIB, id="by-hand-8b9a826")]
    for path in sorted(RESULTS.glob("gpu_check-*.json")):
        sizes = json.loads(path.read_text()).get("sizes")
        if not sizes or not sizes["device"].startswith("cuda"):
            continue
        assert (sizes["num_hidden_layers"], sizes["dtype"]) == (4, "bfloat16"), path
        weights = {q: mode["weight_bytes"] for q, mode in sizes["modes"].items()}
        peaks = {q: {int(n): mib for n, mib in mode["prefill_peak_mib"].items()} for q, mode in sizes["modes"].items()}
        found.append(pytest.param(weights, peaks, id=path.stem))
    return found


@pytest.mark.parametrize("weights, peaks", gpu_size_measurements())
@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
def test_sizes_match_memory_allocated_on_a_gpu(quantization, weights, peaks):
    config = AutoConfig.from_pretrained(REAL_CONFIG)
    config.num_hidden_layers = 4
    sizes = estimate_sizes(config, quantization, "bfloat16")
    assert abs(sizes.weight_bytes / weights[quantization] - 1) < 0.001
    for tokens, peak_mib in peaks[quantization].items():
        planned = (sizes.activation_bytes(tokens) + tokens * sizes.kv_bytes_per_token) / MIB
        assert peak_mib - 64 <= planned <= 1.3 * peak_mib, tokens  # never short by more than 64 MiB


def test_sizes_equal_accelerates_count_of_the_real_model():
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes

    config = tiny_config()
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    measured = compute_module_sizes(model, dtype=torch.float16)
    estimated = estimate_sizes(config, "none", "float16").module_bytes()
    for name, size in estimated.items():
        if name != "model.rotary_emb":  # holds only a non-persistent buffer, recomputed on load
            assert size == measured[name], name


@pytest.mark.parametrize("shape", [(512, 256), (4096, 256), (1000, 77)])
def test_quantized_linear_bytes_equal_bitsandbytes_storage(shape):
    import bitsandbytes as bnb  # a pinned runtime requirement: missing is a failure, never a skip
    linear = nn.Linear(*shape, bias=False)
    weight = bnb.nn.Params4bit(linear.weight.data.half(), requires_grad=False, compress_statistics=True,
                               quant_type="nf4").to("cpu")
    state = weight.quant_state
    tensors = [weight, state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset]
    assert sum(t.numel() * t.element_size() for t in tensors) == _quantized_linear_bytes(linear, "4bit")
    int8 = bnb.nn.Int8Params(linear.weight.data.half(), requires_grad=False, has_fp16_weights=False).to("cpu")
    assert int8.numel() + int8.SCB.numel() * 4 == _quantized_linear_bytes(linear, "8bit")


def test_planning_is_fast(config, pair):
    estimate_sizes(config, "4bit", "float16")  # first call imports the modeling code once
    started = time.perf_counter()
    for mode in ("auto", "balanced", "replicate"):
        plan_placement(config, quantization="4bit", dtype="auto", gpus=pair, mode=mode)
    assert time.perf_counter() - started < 2


# --- plans on the reference box ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [PAIR, "GTX 1070:8GiB:6.1,RTX 2080 Ti:11GiB:7.5"])
def test_4bit_goes_whole_on_the_2080ti_whatever_the_order(config, spec):
    gpus = parse_simulated_gpus(spec)
    fast = next(g.index for g in gpus if g.name == "RTX 2080 Ti")
    plan = plan_placement(config, quantization="4bit", dtype="auto", gpus=gpus)
    assert plan.mode == "auto" and set(plan.device_map.values()) == {fast}
    assert plan.replicas == [plan.device_map] and plan.gpu_indices == [fast]
    assert plan.dtype == "float16"
    assert plan.summary.startswith(f"all 40 layers on RTX 2080 Ti (GPU {fast})")
    (device,) = plan.devices
    assert device.layers == (0, 39) and near(device.weight_bytes / GIB, 6.1)
    assert device.kv_bytes == 8192 * 40 * 1024


def test_device_map_names_every_module_of_the_real_model(config, pair):
    plan = plan_placement(config, quantization="4bit", dtype="auto", gpus=pair)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config())
    tiny_plan = plan_placement(tiny_config(), quantization="4bit", dtype="auto", gpus=pair)
    modules = {name for name, _ in model.named_modules()}
    assert set(tiny_plan.device_map) <= modules
    for name, _ in model.named_parameters():
        assert any(name.startswith(key + ".") for key in tiny_plan.device_map), name
    assert len([n for n in plan.device_map if n.startswith("model.layers.")]) == 40
    assert {"model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"} <= set(plan.device_map)


def test_4bit_with_caps_splits_2080ti_first(config, pair):
    plan = plan_placement(config, quantization="4bit", dtype="auto", gpus=pair,
                          gpu_memory_caps=parse_gpu_memory_caps("4GiB,8GiB"))
    first, second = layers_on(plan, 0), layers_on(plan, 1)
    assert first and second and max(first) < min(second) and sorted(first + second) == list(range(40))
    assert plan.device_map["model.embed_tokens"] == 0
    assert plan.device_map["model.norm"] == plan.device_map["lm_head"] == 1
    assert [d.device for d in plan.devices] == [0, 1]
    assert plan.devices[0].free_after_bytes >= 0 and plan.devices[0].weight_bytes + 1 * GIB <= 4 * GIB
    assert plan.summary.startswith(f"layers 0-{max(first)} on RTX 2080 Ti (GPU 0), {min(second)}-39 on GTX 1070")
    assert plan.kv_budget_tokens >= 8192


def test_16bit_on_the_pair_refuses_with_the_numbers(config, pair):
    with pytest.raises(PlacementError) as caught:
        plan_placement(config, quantization="none", dtype="auto", gpus=pair)
    message = str(caught.value)
    for fact in ("17.51 GiB of weights", "RTX 2080 Ti (GPU 0) 11.0 GiB", "GTX 1070 (GPU 1) 8.0 GiB",
                 "usable together", "never offloaded to CPU", "--quantization 4bit", "--max-model-len"):
        assert fact in message
    assert "\n" not in message


def test_8bit_on_the_1070_alone_is_refused(config, pair):
    with pytest.raises(PlacementError, match=r"GTX 1070.*sm_61.*--quantization 4bit"):
        plan_placement(config, quantization="8bit", dtype="float16", gpus=pair[1:])


def test_8bit_never_spills_onto_the_1070(config, pair):
    with pytest.raises(PlacementError, match=r"9.92 GiB of weights.*Not usable: GTX 1070"):
        plan_placement(config, quantization="8bit", dtype="float16", gpus=pair)
    h100 = parse_simulated_gpus("H100:80GiB:9.0,GTX 1070:8GiB:6.1")
    plan = plan_placement(config, quantization="8bit", dtype="auto", gpus=h100)
    assert set(plan.device_map.values()) == {0} and plan.dtype == "bfloat16"
    assert any("GTX 1070" in note for note in plan.notes)


def test_replicate_puts_one_whole_model_on_each_card(config, pair):
    plan = plan_placement(config, quantization="4bit", dtype="auto", gpus=pair, mode="replicate")
    assert plan.mode == "replicate" and len(plan.replicas) == 2
    assert [set(r.values()) for r in plan.replicas] == [{0}, {1}]
    assert all(len(r) == len(plan.replicas[0]) for r in plan.replicas) and plan.device_map == plan.replicas[0]
    assert [d.layers for d in plan.devices] == [(0, 39), (0, 39)]
    assert plan.summary.startswith(
        "2 replicas: RTX 2080 Ti (GPU 0), GTX 1070 (GPU 1) (requests go to the least-loaded)")
    assert plan.kv_budget_tokens == min(d.kv_budget_tokens for d in plan.devices) >= 8192


def test_replicate_skips_cards_too_small_and_says_so(config):
    gpus = parse_simulated_gpus("RTX 2080 Ti:11GiB:7.5,GTX 1050 Ti:4GiB:6.1")
    plan = plan_placement(config, quantization="4bit", dtype="auto", gpus=gpus, mode="replicate")
    assert len(plan.replicas) == 1 and set(plan.device_map.values()) == {0}
    assert "no replica on GTX 1050 Ti (GPU 1)" in plan.summary


def test_replicate_refuses_when_no_card_holds_the_model(config, pair):
    with pytest.raises(PlacementError, match="fits on none of the GPUs on its own"):
        plan_placement(config, quantization="none", dtype="float16", gpus=pair, mode="replicate")


def test_balanced_uses_both_cards(config, pair):
    plan = plan_placement(config, quantization="4bit", dtype="auto", gpus=pair, mode="balanced")
    first, second = layers_on(plan, 0), layers_on(plan, 1)
    assert first and second and sorted(first + second) == list(range(40))
    assert set(plan.device_map.values()) == {0, 1}
    with pytest.raises(PlacementError, match="never offloaded to CPU"):
        plan_placement(config, quantization="none", dtype="float16", gpus=pair, mode="balanced")


def test_h100_runs_bfloat16_on_one_card(config):
    h100 = parse_simulated_gpus("NVIDIA H100 80GB HBM3:80GiB:9.0")
    plan = plan_placement(config, quantization="none", dtype="auto", gpus=h100)
    assert plan.dtype == "bfloat16" and set(plan.device_map.values()) == {0}
    assert "bfloat16" in plan.summary


def test_fastest_card_is_chosen_by_bandwidth_then_capability(config):
    gpus = parse_simulated_gpus("Old:24GiB:6.1,RTX 3090:24GiB:8.6,Unknown new:24GiB:8.9")
    plan = plan_placement(config, quantization="4bit", dtype="auto", gpus=gpus)
    assert set(plan.device_map.values()) == {1}
    unknown = parse_simulated_gpus("Old:24GiB:6.1,Newer:24GiB:8.9")
    assert set(plan_placement(config, quantization="4bit", dtype="auto", gpus=unknown).device_map.values()) == {1}


def test_kv_budget_is_what_is_left_after_weights(config, pair):
    plan = plan_placement(config, quantization="4bit", dtype="auto", gpus=pair[:1])
    device = plan.devices[0]
    left = 11 * GIB - device.headroom_bytes - device.weight_bytes
    assert plan.kv_budget_tokens == device.kv_budget_tokens == left // (40 * 1024)
    assert 80_000 < plan.kv_budget_tokens < 110_000 and "KV budget 90k tokens" in plan.summary
    smaller = plan_placement(config, quantization="4bit", dtype="auto", gpus=pair[:1], max_model_len=2048)
    assert smaller.kv_budget_tokens == plan.kv_budget_tokens and smaller.devices[0].kv_bytes == 2048 * 40 * 1024
    tighter = plan_placement(config, quantization="4bit", dtype="auto", gpus=pair[:1],
                             activation_headroom_bytes=3 * GIB)
    assert tighter.kv_budget_tokens < plan.kv_budget_tokens


def test_huge_context_spills_or_refuses(config, pair):
    plan = plan_placement(config, quantization="4bit", dtype="auto", gpus=pair, max_model_len=131072)
    assert layers_on(plan, 1) and layers_on(plan, 0) and plan.kv_budget_tokens >= 131072
    with pytest.raises(PlacementError, match=r"5.00 GiB KV cache for --max-model-len 131072.*lower --max-model-len"):
        plan_placement(config, quantization="4bit", dtype="auto", gpus=pair[1:], max_model_len=131072)
    with pytest.raises(PlacementError, match="exceeds what the model supports"):
        plan_placement(config, quantization="4bit", dtype="auto", gpus=pair, max_model_len=262144)


def test_whole_prompt_prefill_needs_more_headroom(config, pair):
    chunked = plan_placement(config, quantization="4bit", dtype="auto", gpus=pair, mode="replicate")
    whole = plan_placement(config, quantization="4bit", dtype="auto", gpus=pair, mode="replicate",
                           prefill_chunk_tokens=8192)
    assert whole.devices[0].headroom_bytes - chunked.devices[0].headroom_bytes > 800 * MIB
    assert len(chunked.replicas) == 2 and len(whole.replicas) == 1 and "no replica on GTX 1070" in whole.summary


def test_caps_are_checked_and_tell_how_to_fix(config, pair):
    with pytest.raises(PlacementError, match="lists 3 caps but only 2 GPUs"):
        plan_placement(config, quantization="4bit", dtype="auto", gpus=pair, gpu_memory_caps=[GIB] * 3)
    with pytest.raises(PlacementError, match=r"capped at 2.0.*--gpu-memory caps"):
        plan_placement(config, quantization="4bit", dtype="auto", gpus=pair, gpu_memory_caps=[2 * GIB, 2 * GIB])


def test_memory_in_use_by_others_counts(config):
    busy = [GpuSpec(0, "NVIDIA GeForce RTX 2080 Ti", 11 * GIB, 5 * GIB, (7, 5), 616.0)]
    with pytest.raises(PlacementError):
        plan_placement(config, quantization="4bit", dtype="auto", gpus=busy)


# --- CPU -------------------------------------------------------------------------------------------------------

def test_no_gpu_means_cpu_even_quantized(config):
    plan = plan_placement(config, quantization="4bit", dtype="auto", gpus=[])
    assert plan.mode == "cpu" and plan.device_map == {"": "cpu"} and plan.replicas == [{"": "cpu"}]
    assert plan.dtype == "float32" and plan.summary.startswith("all 40 layers on CPU")


def test_quantized_cpu_placement_is_refused_when_gpus_exist(config, pair):
    with pytest.raises(PlacementError, match="only when there is no GPU"):
        plan_placement(config, quantization="4bit", dtype="auto", gpus=pair, mode="cpu")
    assert plan_placement(config, quantization="none", dtype="auto", gpus=pair, mode="cpu").device_map == {"": "cpu"}


# --- output ----------------------------------------------------------------------------------------------------

def test_describe_plan_prints_summary_and_table(config, pair):
    plan = plan_placement(config, quantization="4bit", dtype="auto", gpus=pair,
                          gpu_memory_caps=parse_gpu_memory_caps("4GiB,8GiB"))
    text = describe_plan(plan)
    lines = text.splitlines()
    assert lines[0] == plan.summary
    assert lines[1].split()[:3] == ["device", "layers", "weights"]
    assert lines[2].startswith("RTX 2080 Ti (GPU 0)") and lines[3].startswith("GTX 1070 (GPU 1)")
    assert "GiB" in lines[2] and "tokens" in lines[2]
    assert describe_plan(plan_placement(config, quantization="none", dtype="auto", gpus=[])).count("CPU") >= 2
