"""Django registration of the fakevllm app, which only contributes the `manage.py fakevllm` command."""

from __future__ import annotations

from django.apps import AppConfig


class FakeVllmConfig(AppConfig):
    """App config of the fake vLLM server (no models, no URLs)."""

    name = "fakevllm"
    label = "fakevllm"
    verbose_name = "Fake vLLM server"
