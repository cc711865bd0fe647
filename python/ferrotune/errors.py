"""The exceptions ferrotune raises.

Every exception is a :class:`FerrotuneError`. The local engine raises
:class:`ModelNotFoundError`, :class:`InvalidRequestError` and :class:`UnsupportedError`; the
REST client raises :class:`APIError` for an error answer from the server (carrying its
``error`` message and machine ``code``) and :class:`TaskFailedError` when a task it waits for
fails.
"""

from __future__ import annotations

from typing import Any, Optional


class FerrotuneError(Exception):
    """Base class of every ferrotune exception."""


class ModelNotFoundError(FerrotuneError, LookupError):
    """No base model of that name in the models directory."""


class InvalidRequestError(FerrotuneError, ValueError):
    """Bad messages, sampling parameters or adapter."""


class UnsupportedError(FerrotuneError):
    """A model architecture or adapter type the engine cannot run."""


class APIError(FerrotuneError):
    """An error answer from the server.

    Attributes:
        status: the HTTP status (0 when the server could not be reached).
        error: the server's human-readable message.
        code: the server's machine code (``not_found``, ``invalid``, …), or ``None``.
        body: the decoded JSON body, when there was one.
    """

    def __init__(
        self,
        status: int,
        error: str,
        code: Optional[str] = None,
        body: Any = None,
        method: str = "",
        url: str = "",
    ) -> None:
        self.status = status
        self.error = error
        self.code = code
        self.body = body
        self.method = method
        self.url = url
        where = f" ({method} {url})" if method else ""
        label = f"{status} {code}" if code else str(status)
        super().__init__(f"{label}: {error}{where}")


class TaskFailedError(FerrotuneError):
    """A training task ended ``failed`` (or ``cancelled``) while :meth:`Client.wait` waited.

    Attributes:
        task: the task's detail, with ``status``, ``error`` and ``diagnosis``.
    """

    def __init__(self, task: dict) -> None:
        self.task = task
        message = f"task {task.get('task_id')} {task.get('status')}"
        if task.get("error"):
            message += f": {task['error']}"
        if task.get("diagnosis"):
            message += f"\n{task['diagnosis']}"
        super().__init__(message)
