"""GLM-4 chat server: one streaming engine behind an OpenAI-compatible API and a Gradio UI."""

__version__ = "0.1.0"
