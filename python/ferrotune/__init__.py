"""ferrotune for Python.

- :class:`Engine` chats locally with the models of a models directory, through the same
  candle engine the server uses (LoRA adapters applied at run time).
- :class:`Client` drives a ferrotune server: datasets, training tasks (with a live progress
  bar), chat, and an OpenAI client pointed at it.

>>> import ferrotune
>>> engine = ferrotune.Engine("models")
>>> engine.chat("SmolLM2-135M-Instruct", "What is the capital of France?", temperature=0)
'The capital of France is Paris.'
"""

from ferrotune._native import ChatStream, Engine, __version__
from ferrotune.client import Client
from ferrotune.errors import (
    APIError,
    FerrotuneError,
    InvalidRequestError,
    ModelNotFoundError,
    TaskFailedError,
    UnsupportedError,
)

__all__ = [
    "APIError",
    "ChatStream",
    "Client",
    "Engine",
    "FerrotuneError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "TaskFailedError",
    "UnsupportedError",
    "__version__",
]
