"""Settings: flags over GLM4_* env vars over defaults; the README's flags table matches the code."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from glm4.settings import flags_markdown, parse_settings
from tests.conftest import ROOT


def test_defaults_are_safe():
    settings = parse_settings([])
    assert (settings.host, settings.port, settings.model) == ("127.0.0.1", 8003, "auto")
    assert settings.api_key == [] and settings.cors_origins == []


def test_flags_override_env(monkeypatch):
    monkeypatch.setenv("GLM4_PORT", "9000")
    monkeypatch.setenv("GLM4_API_KEY", "k1,k2")
    assert parse_settings([]).port == 9000 and parse_settings([]).api_key == ["k1", "k2"]
    assert parse_settings(["--port", "9100"]).port == 9100
    assert parse_settings(["--api-key", "a", "--api-key", "b"]).api_key == ["a", "b"]


def test_hosting_port_is_honoured(monkeypatch):
    monkeypatch.setenv("PORT", "7860")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    settings = parse_settings([])
    assert (settings.host, settings.port) == ("0.0.0.0", 7860)


def test_sizes_and_choices():
    assert parse_settings(["--max-body-size", "10MiB"]).max_body_size == 10 * 2**20
    with pytest.raises(SystemExit):
        parse_settings(["--placement", "sideways"])
    with pytest.raises(ValidationError):
        parse_settings(["--ui-auth", "no-colon"])
    with pytest.raises(ValidationError):
        parse_settings(["--backend", "upstream"])  # needs --upstream-url


def test_readme_flags_table_is_current():
    assert flags_markdown() in (ROOT / "README.md").read_text(encoding="utf-8")
