"""The Gradio chat UI, mounted at `/` on the API's FastAPI app and streaming from the same engine.

`mount_ui(app, engine, settings)` builds a `gr.ChatInterface` whose chat function turns the Gradio
history into OpenAI-shaped messages, renders them with `build_prompt` (dropping the oldest turns when
the context window is full) and streams `engine.submit`. Conversations live in the browser
(`save_history` keeps them in localStorage, listed in a sidebar); the current one can be downloaded as
Markdown. Stopping a reply closes the engine stream, which cancels the request and frees its slot.

Notices from the UI itself (context trimmed, server busy, errors) are assistant messages with a
`metadata.title`; they are shown but never sent back to the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import gradio as gr
from fastapi import FastAPI

from glm4.engine.base import Engine, EngineOverloaded, EngineUnavailable, ModelInfo, Prompt, SamplingParams
from glm4.prompt import build_prompt
from glm4.tiny import TINY_MODEL_DIR
from glm4.tools import format_tool_call_markdown, parse_tool_call
from glm4.ui_documents import ACCEPTED_TYPES, Retrieval, UserDocuments, references_markdown, ui_owner, \
    upload_error, without_references
from glm4.ui_text import LANGUAGES, LOAD_JS, REMEMBER_LANGUAGE_JS, TOGGLE_DARK_JS, language_of
from glm4.ui_text import text as ui_text

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
FALLBACK_DEFAULTS = {"temperature": 0.8, "top_p": 0.8, "max_new_tokens": 1024}  # GLM-4-9B-chat's own
MIN_REPLY_TOKENS = 16  # below this much room a reply is pointless: ask for a shorter message instead
QUANTIZATION_LABELS = {"4bit": "4-bit", "8bit": "8-bit"}
LANGUAGE_CODES = {name: code for code, name in LANGUAGES.items()}  # "中文" → "zh", the radio's value → code
EXAMPLES = [
    "你好",
    "怎么用 openai Python SDK 调用？",
    "What flags are there?",
    "How do I stream with curl?",
]
TEST_FORCE_PREFIX = "test_force_output:"  # --test-hooks only: this system prompt forces the reply text
BUSY_TITLE = "⏳ The server is busy: too many requests are waiting. Try again in a few seconds."
# Local fonts only: the default theme fetches Google Fonts, which an offline server's users may not reach.
FONTS = ["system-ui", "-apple-system", "Segoe UI", "Noto Sans CJK SC", "WenQuanYi Micro Hei", "Microsoft YaHei",
         "PingFang SC", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
SAVE_FILE_JS = """(text) => {
  if (!text) return;
  const url = URL.createObjectURL(new Blob([text], {type: "text/markdown;charset=utf-8"}));
  const link = Object.assign(document.createElement("a"), {href: url, download: "glm4-conversation.md"});
  document.body.appendChild(link); link.click(); link.remove(); URL.revokeObjectURL(url);
}"""


# ---- pure helpers (unit-tested in tests/test_ui.py) ----

def history_text(content: Any) -> str:
    """Text of a Gradio history item's content: a string, a list of parts, or a single part."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, (list, tuple)):
        return ""
    # File and component parts carry no text the model could read; the UI accepts text only.
    return "".join(part if isinstance(part, str) else str(part.get("text", "")) for part in content
                   if isinstance(part, str) or (isinstance(part, dict) and part.get("type", "text") == "text"))


def is_notice(item: dict) -> bool:
    """A message the UI added itself (it carries a metadata title)."""
    return bool((item.get("metadata") or {}).get("title"))


def to_messages(system_prompt: str, history: list[dict], message: str) -> list[dict[str, str]]:
    """System prompt + Gradio history + the new message → OpenAI-shaped messages."""
    messages = [{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else []
    for item in history:
        text = history_text(item.get("content"))
        if item.get("role") == "assistant":
            text = without_references(text)  # the UI's references list is for the user, not the model
        if item.get("role") in ("user", "assistant") and text and not is_notice(item):
            messages.append({"role": item["role"], "content": text})
    messages.append({"role": "user", "content": history_text(message)})
    return messages


def split_turns(messages: list[dict]) -> list[list[dict]]:
    """Group messages into turns, each starting at a user message."""
    turns: list[list[dict]] = []
    for message in messages:
        if message["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(message)
    return turns


class ContextOverflow(ValueError):
    """Even the newest message alone leaves no room for a reply."""


@dataclass
class FittedPrompt:
    prompt: Prompt
    max_tokens: int  # the reply budget, lowered when the newest message alone leaves less room
    dropped_turns: int  # oldest turns left out to fit


def fit_context(messages: list[dict], build: Callable[[list[dict]], Prompt], max_model_len: int,
                max_tokens: int) -> FittedPrompt:
    """Drop the oldest turns (the system prompt stays) until prompt + max_tokens fits the context window."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = split_turns(messages[len(system):])
    dropped = 0
    while True:
        prompt = build(system + [m for turn in turns[dropped:] for m in turn])
        room = max_model_len - len(prompt.token_ids)
        if room >= max_tokens or dropped == len(turns) - 1:
            break
        dropped += 1
    if room < min(MIN_REPLY_TOKENS, max_tokens):
        raise ContextOverflow(
            f"Your message is too long: it needs {len(prompt.token_ids)} tokens (with the system prompt), and "
            f"the model's context window holds {max_model_len} tokens including the reply. "
            "Shorten it or split it up.")
    return FittedPrompt(prompt, min(max_tokens, room), dropped)


def notice(title: str, text: str = "") -> gr.ChatMessage:
    return gr.ChatMessage(role="assistant", content=text, metadata={"title": title})


def trim_notice(fitted: FittedPrompt, max_model_len: int) -> gr.ChatMessage:
    turns = "turn" if fitted.dropped_turns == 1 else "turns"
    return notice(f"✂️ Dropped the {fitted.dropped_turns} oldest {turns} to fit the {max_model_len}-token "
                  "context window", "The model no longer sees them; the system prompt is always kept.")


def render_reply(text: str, tools: list[dict] | None) -> str:
    """A finished reply for display: a tool call for an offered tool becomes a collapsible block."""
    call = parse_tool_call(text, tools) if tools else None
    return format_tool_call_markdown(call) if call else text


def model_title(info: ModelInfo) -> str:
    """'GLM-4-9B-chat · 4-bit · all layers on RTX 2080 Ti', from what the engine reports."""
    source = Path(info.source)
    if source.exists() and source.resolve() == TINY_MODEL_DIR.resolve():
        name = "Embedded tiny GLM-4 demo model"
    else:
        name = re.sub(r"-hf$", "", source.name or info.name)
        name = re.sub(r"^glm", "GLM", re.sub(r"-(\d+)b\b", r"-\1B", name))
    # The placement plan's summary already names quantization and dtype: don't say them twice.
    quantization = [] if info.dtype in info.placement else [QUANTIZATION_LABELS.get(info.quantization, info.dtype)]
    return " · ".join(part for part in [name, *quantization, info.placement] if part)


def sampling_defaults(info: ModelInfo) -> dict[str, float | int]:
    """Slider defaults: the checkpoint's generation config, else GLM-4's; max tokens within the window."""
    defaults = {**FALLBACK_DEFAULTS, **{k: v for k, v in info.generation_defaults.items() if k in FALLBACK_DEFAULTS}}
    defaults["max_new_tokens"] = min(int(defaults["max_new_tokens"]), info.max_model_len)
    return defaults


def conversation_markdown(title: str, history: list[dict]) -> str:
    """The conversation as a Markdown document, UI notices left out."""
    lines = [f"# Conversation with {title}", ""]
    for item in history:
        text = history_text(item.get("content"))
        if text and not is_notice(item):
            lines += [f"**{'You' if item.get('role') == 'user' else 'GLM-4'}:**", "", text, ""]
    return "\n".join(lines)


# ---- the chat function ----

class ChatSession:
    """The chat function and its helpers, bound to one engine (shared with the API)."""

    def __init__(self, engine: Engine, tools: list[dict] | None = None, test_hooks: bool = False,
                 documents: UserDocuments | None = None):
        self.engine = engine
        self.documents = documents  # the Documents panel's store; None: the switch does nothing
        self.tools = tools  # NOTE(ui): the UI offers no tools by default; set to render tool calls
        self.tokenizer = getattr(engine, "tokenizer", None)
        self.test_hooks = test_hooks  # browser tests need replies that cannot end before they press stop

    def build(self, messages: list[dict]) -> Prompt:
        return build_prompt(self.tokenizer, messages, self.tools)

    def waiting_notice(self) -> gr.ChatMessage | None:
        """Shown while the engine's batch is full and this request waits for a slot."""
        stats = self.engine.stats()
        if stats.get("running", 0) < stats.get("max_num_seqs", float("inf")):
            return None
        ahead = max(0, stats.get("waiting", 1) - 1)
        return notice(f"⏳ Waiting for a free slot: {ahead} request(s) ahead of yours")

    def forced_reply(self, system_prompt: str) -> str | None:
        """With --test-hooks, a system prompt "test_force_output: <text>" makes the model write <text>."""
        if self.test_hooks and system_prompt.startswith(TEST_FORCE_PREFIX):
            return system_prompt[len(TEST_FORCE_PREFIX):].strip()
        return None

    def count_tokens(self, text: str) -> int:
        return len(self.engine.encode(text))

    async def retrieve(self, system: str, message: str, max_tokens: int, owner: str, language: str) -> Retrieval:
        """Passages from the user's documents, fitted to the room the system prompt and the question leave
        (half of it at most, so the reply keeps the other half or its max tokens)."""
        max_model_len = self.engine.info.max_model_len
        base = await asyncio.to_thread(self.build, to_messages(system, [], message))
        room = max_model_len - len(base.token_ids)
        reply = min(max_tokens, max(MIN_REPLY_TOKENS, room // 2))
        # The context block is counted alone; its separator from the system prompt costs a few tokens more.
        return await asyncio.to_thread(self.documents.retrieve, owner, history_text(message), room - reply - 8,
                                       self.count_tokens, max_model_len, language)

    async def respond(self, message: str, history: list[dict], system_prompt: str, temperature: float,
                      top_p: float, max_tokens: float, use_documents: bool = False, language: str = "English",
                      request: gr.Request = None) -> AsyncIterator[list]:
        """Gradio 6 chat fn: yields the ACCUMULATED assistant messages (notices first, then the reply)."""
        max_model_len = self.engine.info.max_model_len
        forced = self.forced_reply(system_prompt or "")
        system = "" if forced else system_prompt or ""
        language = LANGUAGE_CODES.get(language, "en")
        sources: tuple = ()
        notes: list = []
        if use_documents and self.documents is not None:
            owner = ui_owner(getattr(request, "username", None))
            retrieval = await self.retrieve(system, message, int(max_tokens), owner, language)
            sources = retrieval.sources
            if retrieval.notice:
                notes.append(notice(retrieval.notice))
            if retrieval.fitted:
                system = (system.strip() + "\n\n" if system.strip() else "") + retrieval.fitted.text
        messages = to_messages(system, history, message)
        try:
            # A thread: long histories are tokenized once per dropped turn; the event loop must not wait.
            fitted = await asyncio.to_thread(fit_context, messages, self.build, max_model_len, int(max_tokens))
        except ContextOverflow as error:
            yield notes + [notice("⚠️ Message too long", str(error))]
            return
        notes += [trim_notice(fitted, max_model_len)] if fitted.dropped_turns else []
        params = SamplingParams(temperature=float(temperature), top_p=float(top_p), max_tokens=fitted.max_tokens)
        if forced:  # the reply starts with "\n" (GLM-4's format) and ends with a stop token
            params.allowed_prefixes = [self.engine.encode("\n" + forced) + self.engine.encode("<|user|>")]
        request_id = f"ui-{uuid.uuid4().hex}"
        try:
            stream = self.engine.submit(fitted.prompt, params, request_id)
        except EngineOverloaded:  # the engine's queue is full: say so instead of raising an error page
            yield notes + [notice(BUSY_TITLE)]
            return
        except EngineUnavailable as error:  # loading or shutting down
            yield notes + [notice(f"⚠️ {error}")]
            return
        waiting = self.waiting_notice()
        if waiting:
            yield notes + [waiting]
        text = ""
        # aclosing: when Gradio cancels this generator (stop button), closing the engine stream cancels
        # the request in the engine at its next step.
        async with contextlib.aclosing(stream):
            async for delta in stream:
                text += delta.text
                if delta.error:
                    yield notes + ([text] if text else []) + [notice(f"⚠️ {delta.error}")]
                    return
                if delta.text:
                    yield notes + [text]
        yield notes + [render_reply(text, self.tools) + references_markdown(text, sources, language)]


# ---- the page ----

def browser_state_secret() -> str:
    """A stable key for the conversations kept in localStorage.

    Gradio draws a random BrowserState secret per process, so after a server restart the browser's saved
    conversations would no longer decrypt. Keep one per machine in the user's cache directory.
    """
    path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glm4-chat" / "ui-secret"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(24))
            path.chmod(0o600)
        return path.read_text().strip()
    except OSError as error:  # read-only home: conversations then last until the next restart
        log.warning("UI: cannot keep a secret in %s (%s); saved conversations reset on restart", path, error)
        return secrets.token_urlsafe(24)


def build_ui(engine: Engine, settings, tools: list[dict] | None = None,
             documents: UserDocuments | None = None) -> gr.Blocks:
    """The chat page: header (language, dark mode, download), Documents panel, conversation sidebar, chat and
    parameters."""
    info = engine.info
    title = model_title(info)
    defaults = sampling_defaults(info)
    session = ChatSession(engine, tools, test_hooks=settings.test_hooks, documents=documents)

    def download_text(history: list[dict], language: str) -> str:
        if not any(history_text(item.get("content")) for item in history or []):
            gr.Warning(ui_text(LANGUAGE_CODES.get(language, "en"), "empty"))
            return ""
        return conversation_markdown(title, history)

    def heading(language: str) -> str:
        return f"## GLM-4 chat\n{title} · {ui_text(language, 'subtitle')}"

    with gr.Blocks(title="GLM-4 chat", fill_height=True) as demo:
        with gr.Row(equal_height=True, elem_id="glm4-header"):
            header = gr.Markdown(heading("en"), elem_id="glm4-title")
            language = gr.Radio(list(LANGUAGES.values()), value=LANGUAGES["en"], show_label=False, scale=0,
                                min_width=200, container=False, elem_id="glm4-language")
            dark = gr.Button(ui_text("en", "dark"), size="sm", scale=0, min_width=130, elem_id="glm4-dark")
            download = gr.Button(ui_text("en", "download"), size="sm", scale=0, min_width=160,
                                 elem_id="glm4-download")
        markdown = gr.Textbox(visible=False)  # carries the Markdown from Python to the browser
        panel = DocumentsPanel(documents) if documents is not None else None
        use_documents = gr.Checkbox(False, label=ui_text("en", "use_documents"), elem_id="glm4-use-documents",
                                    visible=documents is not None)
        if panel:
            panel.render()
        system = gr.Textbox("", label="System prompt", lines=2, placeholder="e.g. 你是一个乐于助人的助手。",
                            elem_id="glm4-system", render=False)
        temperature = gr.Slider(0.0, 2.0, value=defaults["temperature"], step=0.05, label="Temperature (0 = greedy)",
                                elem_id="glm4-temperature", render=False)
        top_p = gr.Slider(0.05, 1.0, value=defaults["top_p"], step=0.05, label="Top p", elem_id="glm4-top-p",
                          render=False)
        max_tokens = gr.Slider(16, info.max_model_len, value=defaults["max_new_tokens"], step=16,
                               label="Max new tokens", elem_id="glm4-max-tokens", render=False)
        parameters = gr.Accordion("Parameters", open=False, render=False, elem_id="glm4-parameters")
        chat = gr.ChatInterface(
            session.respond,
            chatbot=gr.Chatbot(scale=1, min_height=360, show_label=False, buttons=["copy", "copy_all"],
                               elem_id="glm4-chatbot",
                               placeholder=f"**{title}**<br>{ui_text('en', 'chat_placeholder')}"),
            textbox=gr.Textbox(placeholder=ui_text("en", "input_placeholder"),
                               elem_id="glm4-input", submit_btn=True, stop_btn=True, render=False),
            # render=False: created inside the Blocks they would render here, not in the accordion. The
            # documents switch and the language are rendered already, so they stay where they are.
            additional_inputs=[system, temperature, top_p, max_tokens, use_documents, language],
            additional_inputs_accordion=parameters,
            examples=[[example] for example in EXAMPLES],
            save_history=True,
            # Up to the engine's batch plus queue: the engine does the queueing (and the UI says when a
            # request waits for a slot); beyond that Gradio's own queue shows the user's position.
            concurrency_limit=settings.max_num_seqs + settings.max_queue,
            fill_height=True,
        )
        chat.saved_conversations.secret = browser_state_secret()
        # ChatInterface renders a copy of the accordion it was given: relabel the one on the page.
        parameters = next(block for block in demo.blocks.values()
                          if isinstance(block, gr.Accordion) and block.elem_id == "glm4-parameters")
        # The file is made in the browser: Gradio's State.change does not fire for the queue=False events
        # ChatInterface syncs its history with, so a DownloadButton could not be kept up to date.
        download.click(download_text, [chat.chatbot, language], [markdown], api_visibility="private").then(
            None, [markdown], None, js=SAVE_FILE_JS)
        dark.click(None, None, None, js=TOGGLE_DARK_JS)

        def relabel(choice: str, request: gr.Request):
            code = LANGUAGE_CODES.get(choice, "en")
            updates = [heading(code), gr.update(value=ui_text(code, "dark")), gr.update(value=ui_text(code, "download")),
                       gr.update(label=ui_text(code, "use_documents")),
                       gr.update(placeholder=ui_text(code, "input_placeholder")),
                       gr.update(placeholder=f"**{title}**<br>{ui_text(code, 'chat_placeholder')}"),
                       gr.update(label=ui_text(code, "system_prompt")), gr.update(label=ui_text(code, "temperature")),
                       gr.update(label=ui_text(code, "top_p")), gr.update(label=ui_text(code, "max_tokens")),
                       gr.update(label=ui_text(code, "parameters"))]
            return updates + (panel.relabel(code, request) if panel else [])

        relabelled = [header, dark, download, use_documents, chat.textbox, chat.chatbot, system, temperature, top_p,
                      max_tokens, parameters] + (panel.outputs if panel else [])
        # The browser's language (or the remembered choice) picks the radio's value on load; its change relabels.
        demo.load(None, None, [language], js=LOAD_JS)
        language.change(relabel, [language], relabelled, js=REMEMBER_LANGUAGE_JS, api_visibility="private")
        if panel:
            panel.wire(demo, language)
    return demo


class DocumentsPanel:
    """The Documents accordion: drop files, see them with size and status, delete them (ui_documents does the
    store work; this class only lays it out and wires the events)."""

    def __init__(self, documents: UserDocuments):
        self.documents = documents

    def render(self) -> None:
        with gr.Accordion(ui_text("en", "documents"), open=False, elem_id="glm4-documents") as self.accordion:
            self.upload = gr.File(label=ui_text("en", "upload"), file_count="multiple", file_types=ACCEPTED_TYPES,
                                  height=140, elem_id="glm4-upload")
            self.table = gr.Dataframe(headers=self.headers("en"), value=[], interactive=False, wrap=True,
                                      label=ui_text("en", "files"), elem_id="glm4-files")
            with gr.Row():
                self.choice = gr.Dropdown([], label=ui_text("en", "delete_choice"), elem_id="glm4-delete-choice",
                                          scale=3)
                self.delete_button = gr.Button(ui_text("en", "delete"), variant="stop", scale=1,
                                               elem_id="glm4-delete")
            self.refresh = gr.Timer(1.0, active=False)  # polls while a document is still being indexed

    @property
    def outputs(self) -> list:
        return [self.accordion, self.upload, self.table, self.choice, self.delete_button, self.refresh]

    @staticmethod
    def headers(language: str) -> list[str]:
        return [ui_text(language, "col_name"), ui_text(language, "col_size"), ui_text(language, "col_status")]

    def listing(self, language: str, request: gr.Request | None) -> list:
        owner = ui_owner(getattr(request, "username", None))
        rows = self.documents.rows(owner, language)
        indexing = any(row[2] == ui_text(language, "status_in_progress") for row in rows)
        table = gr.update(value=[row[:3] for row in rows] or [], headers=self.headers(language),
                          label=ui_text(language, "files"))
        choice = gr.update(choices=[(f"{row[0]} ({row[1]})", row[3]) for row in rows], value=None)
        return [table, choice, gr.Timer(active=indexing)]

    def relabel(self, language: str, request: gr.Request) -> list:
        return [gr.update(label=ui_text(language, "documents")), gr.update(label=ui_text(language, "upload")),
                *self.listing(language, request)[:1], gr.update(label=ui_text(language, "delete_choice")),
                gr.update(value=ui_text(language, "delete")), gr.update()]

    def wire(self, demo: gr.Blocks, language: gr.Radio) -> None:
        listed = [self.table, self.choice, self.refresh]

        def show(choice: str, request: gr.Request):
            return self.listing(LANGUAGE_CODES.get(choice, "en"), request)

        def upload(paths: list[str] | None, choice: str, request: gr.Request):
            code = LANGUAGE_CODES.get(choice, "en")
            try:
                for name in self.documents.upload(ui_owner(request.username), list(paths or [])):
                    gr.Info(ui_text(code, "uploaded", name=name), duration=3)
            except Exception as error:  # the store's errors say what is wrong with the file
                gr.Warning(upload_error(error))
            return [None, *self.listing(code, request)]

        def delete(file_id: str | None, choice: str, request: gr.Request):
            code = LANGUAGE_CODES.get(choice, "en")
            if not file_id:
                gr.Warning(ui_text(code, "nothing_selected"))
            else:
                try:
                    name = self.documents.delete(ui_owner(request.username), file_id)
                    gr.Info(ui_text(code, "deleted", name=name), duration=3)
                except Exception as error:
                    gr.Warning(upload_error(error))
            return self.listing(code, request)

        demo.load(show, [language], listed, api_visibility="private")
        self.upload.upload(upload, [self.upload, language], [self.upload, *listed], api_visibility="private")
        self.delete_button.click(delete, [self.choice, language], listed, api_visibility="private")
        self.refresh.tick(show, [language], listed, api_visibility="private")


def open_share_link(share_token: str, host: str, port: int, local_url: str) -> str | None:
    """Ask Gradio's share server for a public tunnel to this server; log one line either way."""
    from gradio import networking

    try:
        url = networking.setup_tunnel(local_host=host, local_port=port, share_token=share_token,
                                      share_server_address=None, share_server_tls_certificate=None)
    except Exception as error:  # offline, share server down, frpc download blocked: all end the same
        cause = f" ({error.__cause__})" if error.__cause__ else ""
        log.warning("--share: could not create a Gradio share link (%s%s); serving locally only at %s",
                    error, cause, local_url)
        return None
    log.info("--share: public link %s (tunnelled to %s)", url, local_url)
    return url


def share_link_startup(demo: gr.Blocks, settings) -> Callable:
    """A startup hook for --share. `demo.launch(share=True)` is not available to a mounted app, so this
    opens Gradio's tunnel itself, on a thread: the share server lookup may take its 30 s timeout."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    local_url = f"http://{host}:{settings.port}{settings.root_path}/"

    async def start() -> None:
        threading.Thread(target=open_share_link, args=(demo.share_token, host, settings.port, local_url),
                         name="glm4-share", daemon=True).start()

    return start


def mount_ui(app: FastAPI, engine: Engine, settings) -> FastAPI:
    """Mount the chat UI at `/` (include the /v1 router first: later routes are shadowed by the mount)."""
    store = getattr(app.state, "knowledge", None)
    demo = build_ui(engine, settings, documents=UserDocuments(store) if store is not None else None)
    if settings.share:
        demo.extra_startup_events.append(share_link_startup(demo, settings))
    auth = tuple(settings.ui_auth.split(":", 1)) if settings.ui_auth else None
    return gr.mount_gradio_app(
        app, demo, path="/", auth=auth, root_path=settings.root_path or None,
        theme=gr.themes.Soft(font=FONTS, font_mono=MONO_FONTS), css_paths=[ASSETS_DIR / "ui.css"],
        footer_links=["gradio", "settings"], run_history=False, ssr_mode=False,
    )
