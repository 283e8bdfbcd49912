"""Exception types: every failure a user can cause has one, with a one-sentence message."""


class Qwen3GenError(Exception):
    """Base class; the CLI prints its message and exits non-zero, with no traceback."""


class ModelNotFoundError(Qwen3GenError):
    """The model name is neither a checkpoint directory nor a reachable Hugging Face repo."""


class CheckpointError(Qwen3GenError):
    """The checkpoint exists but is corrupt, incomplete or does not match its config."""


class ContextLengthError(Qwen3GenError):
    """The prompt plus the tokens to generate do not fit in the model's context."""


class InvalidParameterError(Qwen3GenError, ValueError):
    """A sampling or generation parameter is out of its valid range."""


class OutOfMemoryError(Qwen3GenError):
    """What the request or the KV cache needs is more memory than the device has, or than the pool holds."""


class EngineError(Qwen3GenError):
    """The engine was asked for something it cannot do, such as aborting a request it does not know."""


class QueueFullError(Qwen3GenError):
    """More requests wait for the engine than the server's queue allows (--max-queue)."""
