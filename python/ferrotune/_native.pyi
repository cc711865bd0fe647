"""Type stubs of the extension module (src/python.rs)."""

import os
import pathlib
from typing import Iterator, Literal, Mapping, Optional, Sequence, Tuple, Union, overload

__version__: str

Message = Union[Mapping[str, str], Tuple[str, str]]
Messages = Union[str, Sequence[Message]]
"""A list of ``{"role", "content"}`` dicts (or ``(role, content)`` pairs); a plain string is
one user message. Roles: ``system``, ``user``, ``assistant``, ``tool``."""

class ChatStream(Iterator[str]):
    """The text pieces of a streaming chat, in order.

    Iterating waits for each piece with the GIL released. Once the stream is exhausted,
    :attr:`finish_reason` and :attr:`usage` are set. :meth:`close` (or dropping the stream)
    stops the generation.
    """

    def __iter__(self) -> "ChatStream": ...
    def __next__(self) -> str: ...
    def close(self) -> None:
        """Stops the generation; the stream ends."""
    @property
    def finish_reason(self) -> Optional[Literal["stop", "length"]]:
        """``"stop"`` (end of the answer or a stop string) or ``"length"`` (``max_tokens``),
        once the stream is exhausted; ``None`` before."""
    @property
    def usage(self) -> Optional[dict[str, int]]:
        """``{"prompt_tokens", "completion_tokens", "total_tokens"}`` once the stream is
        exhausted; ``None`` before."""

class Engine:
    """Local chat with the models of a models directory, through the candle engine the server
    uses: one copy of each base model in memory, LoRA adapters applied at run time.

    Args:
        models_dir: the folder of base models (one folder each). Default: the server's
            setting — ``FERROTUNE_MODELS_DIR``, else ``models_dir`` in ``ferrotune.toml`` (or
            the file ``FERROTUNE_CONFIG`` names), else ``./models``.
        weights: what a model's weights become at load: ``"auto"`` (a Hugging Face folder's
            float weights are quantised to Q8_0, cached beside the model and memory-mapped on
            later loads; GGUF files keep their formats), ``"q8_0"``, ``"q4_0"``, ``"q4_1"``,
            or ``"keep"`` (float32). Default: the server's ``inference_weights`` setting.
        kv_cache_dtype: how the CPU's kernels keep the KV cache: ``"f16"`` (half the memory
            and attention time; logits within about 1e-2 of a 32-bit cache) or ``"f32"``.
            Default: the server's ``kv_cache_dtype`` setting (``"f16"``).
    """

    def __init__(
        self,
        models_dir: Union[str, os.PathLike[str], None] = None,
        weights: Optional[str] = None,
        kv_cache_dtype: Optional[str] = None,
    ) -> None: ...
    @property
    def kv_cache_dtype(self) -> str:
        """How this engine's models keep their KV caches: ``"f16"`` or ``"f32"``."""
    @property
    def models_dir(self) -> pathlib.Path:
        """The models directory this engine reads."""
    def models(self) -> list[str]:
        """The base models in the models directory (folder names), sorted."""
    @overload
    def chat(
        self,
        model: str,
        messages: Messages,
        *,
        adapter: Union[str, os.PathLike[str], None] = None,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        stream: Literal[False] = False,
        top_k: Optional[int] = None,
        repetition_penalty: float = 1.0,
    ) -> str: ...
    @overload
    def chat(
        self,
        model: str,
        messages: Messages,
        *,
        adapter: Union[str, os.PathLike[str], None] = None,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        stream: Literal[True],
        top_k: Optional[int] = None,
        repetition_penalty: float = 1.0,
    ) -> ChatStream: ...
    def chat(
        self,
        model: str,
        messages: Messages,
        *,
        adapter: Union[str, os.PathLike[str], None] = None,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        stream: bool = False,
        top_k: Optional[int] = None,
        repetition_penalty: float = 1.0,
    ) -> Union[str, ChatStream]:
        """Answers ``messages`` with ``model``.

        Args:
            model: a base model: its folder name in the models directory.
            messages: the conversation (see :data:`Messages`).
            adapter: a LoRA adapter folder (``adapter_config.json`` +
                ``adapter_model.safetensors``) trained on ``model``.
            temperature: 0 is greedy.
            top_p: nucleus sampling, in (0, 1].
            max_tokens: most tokens to generate.
            seed: the same seed and request give the same text.
            stop: generation ends before any of these strings.
            stream: return a :class:`ChatStream` of text pieces instead of the whole answer.
            top_k: sample among this many best tokens only.
            repetition_penalty: > 1 discourages repeating tokens.

        Raises:
            ModelNotFoundError: no such base model.
            InvalidRequestError: bad messages, parameters or adapter.
            UnsupportedError: an architecture or adapter type the engine cannot run.
            TypeError: ``messages`` is not a list of dicts (or a string).
        """
