"""`qwen3gen serve`: an OpenAI-compatible HTTP server over the engine (FastAPI on uvicorn)."""

from .app import create_app

__all__ = ["create_app"]
