"""One Settings object: CLI flags (named like vLLM's where they exist) over GLM4_* environment variables."""

from __future__ import annotations

import argparse
import os
import re
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SIZE_UNITS = {"b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20, "gb": 10**9, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """'8MiB', '10MB', '512KiB', '1048576' → bytes."""
    if isinstance(text, int):
        return text
    value = text.strip().lower().replace(" ", "")
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * SIZE_UNITS[unit])
    return int(float(value))


def _split_list(value):
    """Env vars and repeated flags both arrive here: 'a,b' or ['a', 'b'] → ['a', 'b']."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    items: list[str] = []
    for entry in value:
        items.extend(part.strip() for part in str(entry).split(",") if part.strip())
    return items


CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GLM4_", extra="ignore")

    # --- model ---
    model: str = Field("auto", description='auto | tiny | <HF repo id> | <local dir>; auto = real GLM-4 on CUDA, tiny otherwise')
    quantization: Literal["auto", "4bit", "8bit", "none"] = Field("auto", description='auto = 4bit on CUDA, none on CPU')
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description='auto = bf16 on sm_80+, fp16 older, fp32 CPU')
    trust_remote_code: bool = Field(False, description='only for checkpoints without native transformers support')
    revision: str | None = Field(None, description='HF revision (branch, tag or commit)')
    served_model_name: str = Field("glm-4", description='the name clients send in "model"')
    max_model_len: Union[int, Literal["auto"]] = Field("auto", description='prompt + completion tokens at most; auto = the longest the memory plan fits, up to the checkpoint\'s limit (32k at most on CPU)')

    # --- placement ---
    placement: Literal["auto", "balanced", "replicate"] = Field("auto", description='auto = fastest card first')
    gpu_memory: str | None = Field(None, description='per-GPU caps, e.g. "10GiB,7GiB"')
    plan_only: bool = Field(False, description='print the placement plan and exit, loading no weights')
    simulate_gpus: str | None = Field(None, description='"RTX 2080 Ti:11GiB:7.5,GTX 1070:8GiB:6.1" for --plan-only')
    compile: bool = Field(False, description='torch.compile the captured decode steps where the card has Triton (sm_75+)')
    enforce_eager: bool = Field(False, description='no CUDA graphs: decode steps run eagerly (slower; for debugging)')

    # --- scheduling ---
    max_num_seqs: int = Field(8, ge=1, le=256, description='requests decoded together in one batch (one KV slot each)')
    no_enable_prefix_caching: bool = Field(False, description='prefill every prompt from token 0 (no KV reuse across requests)')
    cache_ram: float | None = Field(None, ge=0, description='GiB of host RAM keeping KV evicted from slots, for prefix reuse; default min(8, RAM/8); 0 = off')
    max_queue: int = Field(64, ge=0, description='requests waiting for a slot; beyond this → 429')
    drain_timeout: float = Field(30.0, ge=0, description='seconds SIGTERM waits for running requests')

    # --- server ---
    host: str = Field("127.0.0.1", description='0.0.0.0 exposes the server: set --api-key too')
    port: int = Field(8003, ge=0, le=65535, description="the old project's port")
    root_path: str = Field("", description='URL prefix the server is reached under, e.g. /glm (paths may arrive with it or stripped by a proxy)')
    api_key: CommaList = Field(default_factory=list, description='Bearer keys accepted on /v1; empty = no auth')
    cors_origins: CommaList = Field(default_factory=list, description='CORS is off unless origins are given')
    max_body_size: int = Field(8 * 2**20, description='bytes; larger request bodies get 413')
    legacy_stream: bool = Field(False, description="stream the old project's NDJSON format by default")
    log_level: str = Field("info", description="debug | info | warning | error (debug also logs each request line)")

    # --- UI ---
    no_ui: bool = Field(False, description='serve the API only')
    share: bool = Field(False, description='ask Gradio for a public share link')
    ui_auth: str | None = Field(None, description='"user:pass" protects the UI')

    # --- backend ---
    backend: Literal["local", "upstream"] = Field("local", description="local = this process runs the model; upstream = forward to --upstream-url")
    upstream_url: CommaList = Field(default_factory=list, description="OpenAI-compatible engines, e.g. vLLM's /v1")
    upstream_api_key: str | None = Field(None, description="Bearer key the upstream engines expect")
    upstream_model: str | None = Field(None, description="model name to request upstream (default: its first model)")

    # --- model family (issue 21): reasoning models and fp16 on cards without bf16 ---
    reasoning_parser: Literal["auto", "think", "none"] = Field("auto", description='split `<think>…</think>` replies into reasoning and answer: auto = when the chat template opens a `<think>` block (GLM-Z1), think = always, none = never')
    fp16_guard: Literal["auto", "on", "off"] = Field("auto", description='in float16 keep the residual stream in fp32 and matmul outputs in range, so GLM-4-0414 does not overflow to "!!!!": auto = glm4 checkpoints, on = any, off = never (costs: bench/results/fp16_overflow.md)')

    # --- embeddings and rerank (glm4/embeddings.py) ---
    embedding_model: str | None = Field(None, description='sentence-transformers model served at /v1/embeddings: tiny | <HF repo id, e.g. BAAI/bge-m3> | <local dir>; none by default')
    rerank_model: str | None = Field(None, description='cross-encoder served at /v1/rerank: tiny | <HF repo id, e.g. BAAI/bge-reranker-v2-m3> | <local dir>; none by default')
    embedding_device: str = Field("auto", description='where the embedding and rerank models run: auto = a GPU the chat model\'s plan leaves room on, else CPU | cpu | cuda:N')
    embedding_dimensions: str | None = Field(None, description='Matryoshka sizes `dimensions` may ask for ("64,128,256" or "any"); default: read from the model\'s config.json, else refused')

    @field_validator("embedding_device")
    @classmethod
    def check_embedding_device(cls, value):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("--embedding-device must be auto, cpu or cuda:N (a GPU index)")
        return value

    @field_validator("embedding_dimensions")
    @classmethod
    def check_embedding_dimensions(cls, value):
        if value is not None and not re.fullmatch(r"any|\d+(,\d+)*", value.replace(" ", "")):
            raise ValueError('--embedding-dimensions must be "any" or sizes such as "64,128,256"')
        return value

    # --- knowledge base: /v1/files, /v1/vector_stores (glm4/knowledge, glm4/api/files.py, vector_stores.py) ---
    data_dir: str | None = Field(None, description='where files, vector stores and their index live; default '
                                 '$XDG_DATA_HOME/glm4-chat, i.e. ~/.local/share/glm4-chat')
    max_file_size: int = Field(32 * 2**20, ge=1, description='bytes per uploaded file; larger uploads get 413 '
                               '(uploads may exceed --max-body-size up to this)')
    max_files: int = Field(1000, ge=0, description='uploaded files per API key (per server without --api-key)')
    max_vector_stores: int = Field(100, ge=0, description='vector stores per API key (per server without --api-key)')
    max_unpacked_size: int = Field(128 * 2**20, ge=1, description='bytes a .docx (a zip) may unpack to; checked '
                                   'before it is opened (zip bombs get 400)')

    @field_validator("max_file_size", "max_unpacked_size", mode="before")
    @classmethod
    def _knowledge_sizes(cls, value):
        return parse_size(value)

    # --- tests ---
    test_hooks: bool = Field(False, description='lets any client inject faults and force replies: tests only (loopback --host only)')

    @field_validator("api_key", "cors_origins", "upstream_url", mode="before")
    @classmethod
    def _lists(cls, value):
        return _split_list(value)

    @field_validator("max_body_size", mode="before")
    @classmethod
    def _size(cls, value):
        return parse_size(value)

    @field_validator("max_model_len")
    @classmethod
    def check_max_model_len(cls, value):
        if isinstance(value, int) and value < 16:
            raise ValueError("--max-model-len must be auto or at least 16 tokens")
        return value

    @property
    def requested_model_len(self) -> int | None:
        """--max-model-len as a number, or None for auto."""
        return None if self.max_model_len == "auto" else int(self.max_model_len)

    @field_validator("ui_auth")
    @classmethod
    def check_ui_auth(cls, value):
        if value is not None and ":" not in value:
            raise ValueError("--ui-auth must look like user:password")
        return value

    @model_validator(mode="after")
    def check_backend(self):
        if self.backend == "upstream" and not self.upstream_url:
            raise ValueError("--backend upstream needs at least one --upstream-url")
        return self

    @property
    def model_names(self) -> list[str]:
        return [self.served_model_name]


def _hosting_defaults() -> dict[str, object]:
    """Hugging Face Spaces (and other hosts) announce where to listen via these variables."""
    defaults: dict[str, object] = {}
    port = os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT")
    if port and "GLM4_PORT" not in os.environ:
        defaults["port"] = int(port)
    host = os.environ.get("GRADIO_SERVER_NAME")
    if host and "GLM4_HOST" not in os.environ:
        defaults["host"] = host
    return defaults


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="GLM-4 chat server: OpenAI-compatible /v1 API and a Gradio chat UI on one engine. "
        "Every flag can also be set as a GLM4_<FLAG> environment variable.",
        argument_default=argparse.SUPPRESS,  # unset flags fall through to env vars / defaults
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif name in ("api_key", "cors_origins", "upstream_url"):
            parser.add_argument(flag, action="append", help=help_text)
        elif get_origin(annotation) is Literal:
            parser.add_argument(flag, choices=get_args(annotation), help=help_text)
        else:
            parser.add_argument(flag, help=help_text)
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    args = vars(build_parser().parse_args(argv))
    return Settings(**{**_hosting_defaults(), **args})


def flags_markdown() -> str:
    """The README's flags table, generated so it cannot drift from the code (`python -m glm4.settings`)."""
    rows = ["| flag | env var | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if name == "test_hooks":
            continue  # test-only, deliberately undocumented for users
        default = field.default_factory() if field.default_factory else field.default
        shown = "" if default in (None, [], "", False) else f"`{default}`"
        flag = "--" + name.replace("_", "-")
        meaning = (field.description or "").replace("|", "\\|")  # a pipe would end the table cell
        rows.append(f"| `{flag}` | `GLM4_{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(flags_markdown())
