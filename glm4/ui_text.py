"""The UI's interface text in English and Chinese, and the browser-side switches for language and dark mode.

The page starts in the browser's language (`navigator.language`, which follows Accept-Language), then the
header's language radio switches it; both choices are remembered in localStorage. Dark mode follows the
system (Gradio's default) until the header's 🌓 button toggles it. Labels are re-set from Python
(`gr.update(label=...)`) so the server's `TEXT` table is the one source of every string.
"""

from __future__ import annotations

LANGUAGES = {"en": "English", "zh": "中文"}
DEFAULT_LANGUAGE = "en"

TEXT: dict[str, dict[str, str]] = {
    "en": {
        "subtitle": "OpenAI-compatible API at `/v1`",
        "download": "⬇ Download chat",
        "dark": "🌓 Dark mode",
        "input_placeholder": "Type a message… (Enter sends, Shift+Enter adds a line)",
        "chat_placeholder": "Ask anything, in Chinese or English.",
        "system_prompt": "System prompt",
        "temperature": "Temperature (0 = greedy)",
        "top_p": "Top p",
        "max_tokens": "Max new tokens",
        "parameters": "Parameters",
        "documents": "My documents",
        "use_documents": "Answer from my documents",
        "upload": "Drop .txt, .md, .pdf, .docx or .html files here",
        "files": "Documents",
        "col_name": "Name", "col_size": "Size", "col_status": "Status",
        "delete_choice": "Document to delete",
        "delete": "Delete",
        "uploaded": "Added {name}",
        "deleted": "Deleted {name}",
        "nothing_selected": "Choose a document to delete first.",
        "no_documents": "You have no documents yet: drop a file above, or turn the switch off.",
        "no_passages": "No passage of your documents matches this question",
        "dropped": "{dropped} of {found} passages left out to fit the {window}-token context window",
        "references": "References",
        "status_completed": "ready", "status_in_progress": "indexing…", "status_failed": "failed",
        "status_cancelled": "cancelled",
        "empty": "Nothing to download yet: the conversation is empty.",
    },
    "zh": {
        "subtitle": "OpenAI 兼容接口：`/v1`",
        "download": "⬇ 下载对话",
        "dark": "🌓 深色模式",
        "input_placeholder": "输入消息…（Enter 发送，Shift+Enter 换行）",
        "chat_placeholder": "用中文或英文提问。",
        "system_prompt": "系统提示词",
        "temperature": "温度（0 = 贪心）",
        "top_p": "Top p",
        "max_tokens": "最大生成词元数",
        "parameters": "参数",
        "documents": "我的文档",
        "use_documents": "根据我的文档回答",
        "upload": "把 .txt、.md、.pdf、.docx 或 .html 文件拖到这里",
        "files": "文档",
        "col_name": "名称", "col_size": "大小", "col_status": "状态",
        "delete_choice": "要删除的文档",
        "delete": "删除",
        "uploaded": "已添加 {name}",
        "deleted": "已删除 {name}",
        "nothing_selected": "请先选择要删除的文档。",
        "no_documents": "还没有文档：请在上方拖入文件，或关闭开关。",
        "no_passages": "文档中没有与此问题相关的段落",
        "dropped": "为适应 {window} 词元的上下文窗口，{found} 个段落中省去了 {dropped} 个",
        "references": "参考资料",
        "status_completed": "就绪", "status_in_progress": "索引中…", "status_failed": "失败",
        "status_cancelled": "已取消",
        "empty": "对话为空，暂无可下载的内容。",
    },
}


def language_of(tag: str | None) -> str:
    """'zh-CN', 'zh-Hant-TW', 'zh' → 'zh'; everything else (or nothing) → 'en'.

    Takes a navigator.language tag or a whole Accept-Language header (first listed language wins)."""
    first = (tag or "").split(",")[0].split(";")[0].strip().lower()
    return "zh" if first.split("-")[0] == "zh" else DEFAULT_LANGUAGE


def text(language: str, key: str, **values) -> str:
    table = TEXT.get(language, TEXT[DEFAULT_LANGUAGE])
    return table[key].format(**values) if values else table[key]


# Runs in the browser on page load: the remembered choice, else navigator.language (Accept-Language's first).
# Also restores a remembered dark-mode choice; without one the page follows the system.
LOAD_JS = """() => {
  const mode = localStorage.getItem("glm4-dark");
  if (mode !== null) document.body.classList.toggle("dark", mode === "1");
  const saved = localStorage.getItem("glm4-language");
  const tag = (navigator.language || "en").toLowerCase();
  return saved || (tag.startsWith("zh") ? "中文" : "English");
}"""
REMEMBER_LANGUAGE_JS = """(choice) => { localStorage.setItem("glm4-language", choice); document.documentElement.lang =
  choice === "中文" ? "zh-CN" : "en"; return choice; }"""
TOGGLE_DARK_JS = """() => {
  const dark = document.body.classList.toggle("dark");
  localStorage.setItem("glm4-dark", dark ? "1" : "0");
}"""
