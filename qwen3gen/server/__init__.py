"""`qwen3gen serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the engine in a process of its own."""

from .app import create_app
from .engine_process import EngineProcess

__all__ = ["EngineProcess", "create_app"]
