"""The engine: continuous batching over a paged KV cache with prefix caching, one idea per file.

request.py (a request and its text), block_manager.py (blocks and the prefix cache), kv_pool.py (the pool's memory),
scheduler.py (what runs next), runner.py (one step through the model, CUDA graphs), sampler.py (per-request
sampling), engine.py (the loop), distributed.py (tensor-parallel ranks following rank 0's steps).
"""

from .engine import Engine
from .request import RequestOutput

__all__ = ["Engine", "RequestOutput"]
