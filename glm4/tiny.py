"""The embedded tiny GLM-4: where it lives and the code that builds it.

`assets/tiny-glm4/` holds a checkpoint with the real GLM-4-9B-chat-hf conventions at toy size:
architecture `GlmForCausalLM` (model_type `glm`, native in transformers, no remote code), a byte-level
BPE tokenizer whose special tokens sit at the end of the vocabulary in GLM-4's order, the same stop ids
(`<|endoftext|>`, `<|user|>`, `<|observation|>`), a post-processor that prepends `[gMASK]<sop>`, and a
chat template that renders prompts byte-identical to the real checkpoint's (see shared/glm4-format.md
and tests/data/glm4_prompts.json). Everything that works on it works on the real weights.

`build_tiny()` writes such a checkpoint with random weights; `glm4.tiny_train` trains the committed
one on `assets/tiny_corpus.jsonl` (a few hundred Chinese/English conversations about this server) and
saves it through `save_checkpoint()` below.

The 2025 family is built here too, on the same tokenizer, with random weights (format tests only):
`build_tiny_glm4(out, "0414")` writes a `Glm4ForCausalLM` (model_type `glm4`, as GLM-4-9B-0414) with a
0414-style chat template, and `build_tiny_glm4(out, "z1")` the GLM-Z1-9B-0414-style reasoning variant
(its generation prompt opens a `<think>` block; past reasoning is stripped from the history; sampling
defaults T=0.6, top_p=0.95, top_k=40). NOTE(family): these two templates are written from the model
cards and public copies of the 0414 templates (see GLM4_0414_CHAT_TEMPLATE); they exist so every path is
tested offline. A real checkpoint is always served with its own template (glm4/chat_template.py).

    python -m glm4.tiny_train                      # rebuild the committed, trained assets/tiny-glm4
    python -m glm4.tiny --out /tmp/tiny-random     # a random-weight checkpoint with the same tokenizer
    python -m glm4.tiny --out /tmp/tiny-z1 --variant z1   # the GLM-Z1-style tiny checkpoint
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TINY_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-glm4"
TINY_CORPUS_PATH = Path(__file__).resolve().parent.parent / "assets" / "tiny_corpus.jsonl"

# GLM-4's special tokens in the order of their real ids 151329..151338; the tiny vocabulary appends
# them, in this order, after the BPE tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]
STOP_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]  # the real generation_config's eos ids

BPE_VOCAB_SIZE = 3000  # BPE tokens before the 10 special tokens; enough to merge common Chinese characters

# Model sizes: big enough to memorize the ~40k-token corpus in a few CPU minutes, small enough that the
# fp16 weights stay well under 20 MB. head_dim must be set explicitly (GlmConfig defaults to 128).
TINY_SIZES = dict(
    hidden_size=256,
    intermediate_size=704,  # a multiple of 64: bitsandbytes' CPU 4-bit kernels quantize in 64-wide blocks
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in GLM-4 (32 heads, 2 KV heads)
    head_dim=64,
    max_position_embeddings=32768,  # rope stretched past the short training sequences: long-prompt paths run offline
)

# The system block GLM-4's own template writes when tools are offered (glm4-format.md, "Tools").
TOOLS_SYSTEM_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。"
)
TOOL_CALL_HINT = "在调用上述函数时，请使用 Json 格式表示调用的参数。"

# Jinja chat template. Every literal is emitted through an expression and every tag strips the
# whitespace around it, so the output does not depend on the Jinja environment's trim settings.
CHAT_TEMPLATE = (
    "{{- '[gMASK]<sop>' -}}"
    "{%- if tools -%}"
    "{{- '<|system|>\\n" + TOOLS_SYSTEM_PROMPT + "\\n\\n# 可用工具' -}}"
    "{%- for tool in tools -%}"
    "{%- set function = tool.function if tool.function is defined else tool -%}"
    "{{- '\\n## ' + function.name + '\\n\\n' -}}"
    "{{- function | tojson(indent=4) -}}"
    "{{- '\\n" + TOOL_CALL_HINT + "' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    # content: a string, or a list of text parts joined with no separator; None counts as empty
    "{%- if message.content is string -%}"
    "{%- set content = message.content -%}"
    "{%- elif message.content -%}"
    "{%- set content = message.content | map(attribute='text') | join('') -%}"
    "{%- else -%}"
    "{%- set content = '' -%}"
    "{%- endif -%}"
    "{%- if message.role in ['system', 'developer'] -%}"
    "{%- set role = 'system' -%}"
    "{%- elif message.role == 'tool' -%}"
    "{%- set role = 'observation' -%}"
    "{%- else -%}"
    "{%- set role = message.role -%}"
    "{%- endif -%}"
    "{%- if content -%}"
    "{{- '<|' + role + '|>\\n' + content -}}"
    "{%- endif -%}"
    # tool calls: `<|assistant|>{name}\n{arguments JSON}`, one per call
    "{%- if role == 'assistant' and message.tool_calls -%}"
    "{%- for call in message.tool_calls -%}"
    "{%- set function = call.function if call.function is defined else call -%}"
    "{%- set arguments = function.arguments -%}"
    "{%- if arguments is not string -%}"
    "{%- set arguments = arguments | tojson -%}"
    "{%- endif -%}"
    "{{- '<|assistant|>' + function.name + '\\n' + arguments -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|assistant|>' -}}"
    "{%- endif -%}"
)

# GLM-4-0414-style template, written from the model cards (THUDM/GLM-4 README "Prompt Implementation":
# tools become one system block prepended to the messages) and the public copies of the 0414 templates
# (the GLM-Z1-Rumination-32B-0414 one dumped by llama.cpp's converter, ms-swift's glm4_0414 agent
# template). What differs from -hf, and what the probes in glm4/chat_template.py must notice:
# - the tool block is "# 可用工具" with no self-introduction, then a blank line before the first "## name";
# - every system message is hoisted to the top, in order, whatever its position;
# - a tool call is an assistant turn whose `metadata` is the function name (followed by a space, as in the
#   Rumination dump) and whose content is the arguments; a tool result is an `observation` turn;
# - every message is rendered, empty ones included (`<|user|>\n`);
# - it is written in the checkpoints' own style and relies on transformers' Jinja settings
#   (trim_blocks: the newline right after a block tag is dropped).
GLM4_0414_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- if tools -%}<|system|>\n# 可用工具\n"
    "{% for tool in tools %}{%- set function = tool.function if tool.get(\"function\") else tool %}\n\n"
    "## {{ function.name }}\n\n{{ function | tojson(indent=4, ensure_ascii=False) }}\n"
    + TOOL_CALL_HINT + "{%- endfor %}{%- endif -%}"
    "{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}{%- endif %}{%- endfor %}"
    "{%- for message in messages if message.role != 'system' %}"
    "{%- set role = message['role'] %}{%- set content = message['content'] %}"
    "{%- set meta = message.get(\"metadata\", \"\") %}"
    "{%- if role == 'user' %}<|user|>\n{{ content }}"
    "{%- elif role == 'assistant' and not meta %}<|assistant|>\n{{ content }}"
    "{%- elif role == 'assistant' and meta %}<|assistant|>{{ meta }} \n{{ content }}"
    "{%- elif role == 'observation' %}<|observation|>\n{{ content }}"
    "{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# GLM-Z1-0414-style: the 0414 layout, every turn shown as `content.split('</think>')[-1].strip()` (past
# reasoning never reaches the prompt) and a generation prompt that opens the reasoning block, so the
# reply reads `reasoning</think>answer` (model cards; zai-org/GLM-4 #755 shows the prompt vLLM rendered).
GLM_Z1_CHAT_TEMPLATE = (
    GLM4_0414_CHAT_TEMPLATE
    .replace("{%- set meta = ", "{%- set visible = content.split('</think>')[-1].strip() %}{%- set meta = ")
    .replace("\n{{ content }}", "\n{{ visible }}")
    .replace("{% if add_generation_prompt %}<|assistant|>{% endif %}",
             "{% if add_generation_prompt %}<|assistant|>\n<think>{% endif %}")
)

# generation_config.json of each tiny variant. -hf and 0414 keep GLM-4's T=0.8, top_p=0.8; Z1's model card
# recommends T=0.6, top_p=0.95, top_k=40 for its long reasoning.
GENERATION_DEFAULTS = {
    "hf": {"do_sample": True, "temperature": 0.8, "top_p": 0.8},
    "0414": {"do_sample": True, "temperature": 0.8, "top_p": 0.8},
    "z1": {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 40},
}
GLM4_TEMPLATES = {"0414": GLM4_0414_CHAT_TEMPLATE, "z1": GLM_Z1_CHAT_TEMPLATE}

# A few lines so that a checkpoint built without the project corpus still has Chinese, English and
# code merges in its BPE.
DEFAULT_CORPUS = [
    "你好！我是一个运行在本地的 GLM-4 聊天服务器。有什么可以帮你？",
    "Hello! I am a GLM-4 chat server with an OpenAI-compatible API and a Gradio web UI.",
    "介绍一下你自己。北京天气怎么样？今天是晴天，气温二十一度。",
    "def main():\n    print('hello, world')\n\treturn 0\n",
    'curl http://127.0.0.1:8003/v1/chat/completions -H "Content-Type: application/json"',
    TOOLS_SYSTEM_PROMPT + "\n\n# 可用工具\n" + TOOL_CALL_HINT,
    "You are a helpful assistant. Answer in English.",
]


def build_tokenizer(texts: list[str]):
    """Train a byte-level BPE on DEFAULT_CORPUS + texts; wrap it as a GLM-4-style fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level pre-tokenizer and decoder without a prefix space: every string, Chinese, emoji and
    # code with tabs included, round-trips exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(DEFAULT_CORPUS + list(texts), trainer=trainer)
    # Added after training so they take the last ids, in GLM-4's order.
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A",
        pair="[gMASK] <sop> $A $B",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[gMASK]", "<sop>")],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        padding_side="left",  # batched generation left-pads
        model_max_length=TINY_SIZES["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer):
    """A GlmConfig shaped like THUDM/glm-4-9b-chat-hf's, at TINY_SIZES."""
    from transformers import GlmConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = GlmConfig(
        vocab_size=len(tokenizer),
        **TINY_SIZES,
        hidden_act="silu",
        attention_bias=True,
        attention_dropout=0.0,
        initializer_range=0.02,
        rms_norm_eps=1.5625e-07,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids[t] for t in STOP_TOKENS],
        bos_token_id=None,
        use_cache=True,
    )
    config.architectures = ["GlmForCausalLM"]
    return config


def build_model(tokenizer, seed: int = 0):
    """A randomly initialised GlmForCausalLM (float32) for the tokenizer."""
    import torch
    from transformers import GlmForCausalLM

    torch.manual_seed(seed)
    return GlmForCausalLM(build_config(tokenizer))


def save_checkpoint(model, tokenizer, out_dir: str | Path, variant: str = "hf") -> Path:
    """Save weights (float16 safetensors), config, generation config and tokenizer to out_dir.

    variant picks the generation defaults (GENERATION_DEFAULTS) and where the chat template lives: inside
    tokenizer_config.json as in glm-4-9b-chat-hf ("hf"), or in chat_template.jinja as in the 0414 repos.
    """
    import torch
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():  # a rebuild replaces the whole checkpoint, never mixes two
        if stale.is_file():
            stale.unlink()
    config = model.config
    model.generation_config = GenerationConfig(
        eos_token_id=list(config.eos_token_id), pad_token_id=config.pad_token_id, **GENERATION_DEFAULTS[variant])
    # float16 halves the files; loaders pick their own dtype (fp32 on CPU) when they load it.
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    if variant == "hf":
        _embed_chat_template(out, tokenizer.chat_template)
    return out


def _embed_chat_template(out: Path, template: str) -> None:
    """Keep the chat template inside tokenizer_config.json, where the real -hf checkpoint has it."""
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def build_tiny(out_dir: str | Path, corpus_texts: list[str] | None = None, seed: int = 0) -> Path:
    """Write a random-weight tiny GLM-4 checkpoint whose BPE is trained on corpus_texts."""
    tokenizer = build_tokenizer(corpus_texts or [])
    model = build_model(tokenizer, seed=seed)
    return save_checkpoint(model, tokenizer, out_dir)


def build_glm4_config(tokenizer, **overrides):
    """A Glm4Config (GLM-4-9B-0414's architecture: four norms per layer, fused gate_up_proj) at TINY_SIZES."""
    from transformers import Glm4Config

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Glm4Config(
        vocab_size=len(tokenizer),
        **{**TINY_SIZES, **overrides},
        hidden_act="silu",
        attention_bias=True,
        attention_dropout=0.0,
        initializer_range=0.02,
        rms_norm_eps=1e-5,  # GLM-4-0414's config value
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids[t] for t in STOP_TOKENS],
        bos_token_id=None,
        use_cache=True,
    )
    config.architectures = ["Glm4ForCausalLM"]
    return config


def tiny_glm4_tokenizer(variant: str):
    """The embedded tiny model's tokenizer, carrying the 0414- or Z1-style chat template."""
    from transformers import AutoTokenizer

    if variant not in GLM4_TEMPLATES:
        raise ValueError(f"unknown tiny glm4 variant {variant!r}: use one of {', '.join(GLM4_TEMPLATES)}")
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tokenizer.chat_template = GLM4_TEMPLATES[variant]
    return tokenizer


def build_tiny_glm4(out_dir: str | Path, variant: str = "0414", seed: int = 0) -> Path:
    """Write a random-weight tiny Glm4ForCausalLM: "0414" (GLM-4-9B-0414-style) or "z1" (GLM-Z1-9B-0414-style)."""
    import torch
    from transformers import Glm4ForCausalLM

    tokenizer = tiny_glm4_tokenizer(variant)
    torch.manual_seed(seed)
    model = Glm4ForCausalLM(build_glm4_config(tokenizer))
    return save_checkpoint(model, tokenizer, out_dir, variant=variant)


def build_overflowing_glm4(seed: int = 0):
    """A random tiny Glm4ForCausalLM (float32) whose fp16 forward overflows where GLM-4-0414's can.

    The "sandwich" norms let values exceed fp16's 65504 without changing what the model computes in fp32
    (the norm after each site divides the scale away): layer 1's MLP product SiLU(gate)·up (the up rows of
    gate_up_proj × 2^18), layer 2's MLP output (down_proj × 2^18), layer 3's attention output (o_proj ×
    2^19), and a massive residual channel (channel 0 of every embedding at 60000, grown by every layer's
    MLP) that the norms' weights compensate, as learned ones do. Every weight stays below 65504, so
    `.half()` stores it exactly enough; the fp16 forward then produces inf and NaN. Returns (model, tokenizer).
    """
    import torch
    from transformers import Glm4ForCausalLM

    tokenizer = tiny_glm4_tokenizer("0414")
    torch.manual_seed(seed)
    model = Glm4ForCausalLM(build_glm4_config(tokenizer)).eval()
    layers, intermediate = model.model.layers, model.config.intermediate_size
    with torch.no_grad():
        layers[1].mlp.gate_up_proj.weight[intermediate:] *= 2**18
        layers[2].mlp.down_proj.weight *= 2**18
        layers[3].self_attn.o_proj.weight *= 2**19
        model.model.embed_tokens.weight[:, 0] = 60000.0
        for norm in [model.model.norm, *(n for layer in layers for n in (layer.input_layernorm,
                                                                           layer.post_attention_layernorm))]:
            norm.weight.fill_(4096.0)  # the other channels, divided by the massive one's RMS, scaled back
            norm.weight[0] = 2**-10  # the massive channel itself barely reaches the matmuls
        for layer in layers:
            layer.post_mlp_layernorm.weight[0] = 4096.0
    return model, tokenizer


def load_corpus(path: str | Path = TINY_CORPUS_PATH) -> list[dict]:
    """The JSONL corpus: one OpenAI-shaped conversation per line, {"messages": [...], "tools": [...]}."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def conversation_texts(conversations: list[dict]) -> list[str]:
    """Every text the chat template will put around the special tokens, for training the BPE."""
    texts = []
    for conv in conversations:
        for message in conv["messages"]:
            if message.get("content"):
                texts.append(message["content"])
            for call in message.get("tool_calls") or []:
                texts.append(call["function"]["name"] + "\n" + call["function"]["arguments"])
        for tool in conv.get("tools") or []:
            texts.append(json.dumps(tool["function"], ensure_ascii=False, indent=4))
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # No default: writing random weights over the trained assets/tiny-glm4 is never what one wants.
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--variant", choices=["hf", *GLM4_TEMPLATES], default="hf",
                        help="hf = glm-4-9b-chat-hf style (glm); 0414 / z1 = GLM-4-9B-0414 / GLM-Z1-9B-0414 style (glm4)")
    parser.add_argument("--corpus", type=Path, default=TINY_CORPUS_PATH, help="JSONL corpus for the BPE (hf only)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)
    if args.variant == "hf":
        out = build_tiny(args.out, conversation_texts(load_corpus(args.corpus)), seed=args.seed)
    else:
        out = build_tiny_glm4(args.out, args.variant, seed=args.seed)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
