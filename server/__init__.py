"""OpenAI-compatible server shell, installed as ``dsocr_server``: ``create_app(settings)`` -> Starlette."""

from .app import create_app

__all__ = ["create_app"]
