"""A client for a ferrotune server's REST API, for scripts and notebooks.

Standard library only; ``tqdm`` (when installed) draws :meth:`Client.wait`'s progress bar, and
``openai`` (when installed) backs :meth:`Client.openai`.
"""

from __future__ import annotations

import http.client
import io
import json
import mimetypes
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ferrotune.errors import APIError, TaskFailedError

__all__ = ["Client"]

#: Statuses a task does not leave by itself.
TERMINAL = ("completed", "failed", "cancelled")

Messages = Union[str, Sequence[Any]]


def _messages(messages: Messages) -> List[Dict[str, str]]:
    """A string is one user message; ``(role, content)`` pairs become dicts."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = []
    for m in messages:
        if isinstance(m, (tuple, list)) and len(m) == 2:
            out.append({"role": m[0], "content": m[1]})
        else:
            out.append(dict(m))
    return out


class _Multipart(io.RawIOBase):
    """A multipart/form-data body with one file field, read in pieces (the file is never held
    in memory whole)."""

    def __init__(
        self,
        field: str,
        filename: str,
        file: BinaryIO,
        size: int,
        fields: Optional[Dict[str, str]] = None,
    ) -> None:
        self.boundary = f"ferrotune-{uuid.uuid4().hex}"
        ctype = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
        texts = "".join(
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
            for k, v in (fields or {}).items()
        )
        head = (
            texts + f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{quoted}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode()
        tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.length = len(head) + size + len(tail)
        self._parts: List[BinaryIO] = [io.BytesIO(head), file, io.BytesIO(tail)]

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        chunks = []
        while self._parts and (size < 0 or size > 0):
            chunk = self._parts[0].read(size if size > 0 else -1)
            if not chunk:
                self._parts.pop(0)
                continue
            chunks.append(chunk)
            if size > 0:
                size -= len(chunk)
        return b"".join(chunks)


class _Progress:
    """A tqdm bar when tqdm is installed (a widget in notebooks), else a text line."""

    def __init__(self, task_id: str, name: str) -> None:
        self.total: Optional[int] = None
        self.step = 0
        self.loss: Optional[float] = None
        self.status = ""
        self.label = name or task_id
        self._bar: Any = None
        self._last_text = 0.0
        options = dict(total=None, desc=self.label, unit="step", dynamic_ncols=True)
        try:
            # A widget in notebooks; that needs ipywidgets, else the text bar.
            from tqdm.auto import tqdm

            self._bar = tqdm(**options)
        except ImportError:
            try:
                from tqdm import tqdm

                self._bar = tqdm(**options)
            except ImportError:
                pass

    def update(
        self,
        step: Optional[int] = None,
        total: Optional[int] = None,
        loss: Optional[float] = None,
        status: Optional[str] = None,
    ) -> None:
        if total:
            self.total = int(total)
        if step is not None:
            self.step = int(step)
        if loss is not None:
            self.loss = float(loss)
        if status:
            self.status = status
        if self._bar is not None:
            if self.total and self._bar.total != self.total:
                self._bar.total = self.total
            self._bar.n = self.step
            post = {"status": self.status}
            if self.loss is not None:
                post["loss"] = f"{self.loss:.4f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.refresh()
        else:
            now = time.monotonic()
            if now - self._last_text >= 0.5 or status in TERMINAL:
                self._last_text = now
                self._text()

    def _text(self, end: str = "") -> None:
        width = 30
        if self.total:
            filled = int(width * min(self.step, self.total) / self.total)
            bar = "#" * filled + "." * (width - filled)
            count = f"{self.step}/{self.total}"
        else:
            bar, count = "." * width, f"{self.step}/?"
        loss = f" loss {self.loss:.4f}" if self.loss is not None else ""
        sys.stderr.write(f"\r{self.label} [{bar}] {count} {self.status}{loss}   {end}")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._text(end="\n")


class Client:
    """A ferrotune server's REST API.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8080``. Default: ``FERROTUNE_URL``, else
            ``http://127.0.0.1:8080``.
        api_key: an API key (``ft-…``, from ``POST /api/keys`` or :meth:`create_api_key`).
            Default: ``FERROTUNE_API_KEY``.
        token: a JWT access token instead (see also :meth:`login`).
        timeout: seconds to wait for an answer to each request.

    Every error answer raises :class:`~ferrotune.errors.APIError` with the server's ``error``
    message and ``code``.
    """

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        token: Optional[str] = None,
        *,
        timeout: float = 60.0,
    ) -> None:
        base_url = base_url or os.environ.get("FERROTUNE_URL") or "http://127.0.0.1:8080"
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("FERROTUNE_API_KEY")
        self.token = token
        self.timeout = timeout
        self._refresh_token: Optional[str] = None

    def __repr__(self) -> str:
        auth = "api_key" if self.api_key else "token" if self.token else "anonymous"
        return f"Client({self.base_url!r}, {auth})"

    # ---- HTTP ---------------------------------------------------------------------------

    def _credential(self) -> Optional[str]:
        return self.api_key or self.token

    def _open(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: Optional[Dict[str, str]] = None,
        timeout: Optional[float] = None,
        retry_auth: bool = True,
    ) -> Any:
        """Sends a request; returns the open response (2xx) or raises APIError."""
        url = self.base_url + path
        hdrs = {"accept": "application/json"}
        hdrs.update(headers or {})
        data = body
        if body is not None and not isinstance(body, (bytes, io.IOBase)):
            data = json.dumps(body).encode()
            hdrs["content-type"] = "application/json"
        cred = self._credential()
        if cred:
            hdrs["authorization"] = f"Bearer {cred}"
        req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            raw = e.read()
            e.close()
            if e.code == 401 and retry_auth and not self.api_key and self._refresh():
                return self._open(
                    method, path, body, headers=headers, timeout=timeout, retry_auth=False
                )
            raise self._error(e.code, raw, method, url) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise APIError(
                0, f"cannot reach the server: {reason}", "unreachable", None, method, url
            ) from None

    @staticmethod
    def _error(status: int, raw: bytes, method: str, url: str) -> APIError:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        message, code = raw.decode("utf-8", "replace").strip() or f"HTTP {status}", None
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict):  # OpenAI's shape, on /v1
                message = err.get("message") or message
                code = err.get("code") or err.get("type")
            elif err is not None:
                message = str(err)
                code = body.get("code")
        return APIError(status, message, code, body, method, url)

    def _json(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        with self._open(method, path, body, **kw) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def _refresh(self) -> bool:
        """Trades the refresh token from :meth:`login` for a new access token."""
        if not self._refresh_token:
            return False
        try:
            self.token = None
            r = self._json(
                "POST",
                "/api/auth/refresh",
                {"refresh_token": self._refresh_token},
                retry_auth=False,
            )
        except APIError:
            return False
        self.token = r["access_token"]
        self._refresh_token = r.get("refresh_token", self._refresh_token)
        return True

    # ---- accounts -----------------------------------------------------------------------

    def health(self) -> dict:
        """``{status, version}``; needs no credentials."""
        return self._json("GET", "/health")

    def register(self, username: str, email: str, password: str) -> dict:
        """Creates an account (the first one ever becomes ``admin``)."""
        return self._json(
            "POST",
            "/api/auth/register",
            {"username": username, "email": email, "password": password},
        )

    def login(self, username_or_email: str, password: str) -> dict:
        """Signs in: later requests carry the access token, renewed when it expires."""
        r = self._json(
            "POST",
            "/api/auth/login",
            {"username_or_email": username_or_email, "password": password},
        )
        self.api_key = None
        self.token = r["access_token"]
        self._refresh_token = r.get("refresh_token")
        return r

    def system_status(self) -> dict:
        """The training environment (``environment.state``: ``installing``, ``ready``, …),
        the base models, and the default model's pull."""
        return self._json("GET", "/api/system/status")

    def me(self) -> dict:
        """The signed-in account."""
        return self._json("GET", "/api/auth/me")

    def create_api_key(self, name: str) -> dict:
        """A new API key: the answer's ``key`` (``ft-…``) is shown this once."""
        return self._json("POST", "/api/keys", {"name": name})

    # ---- datasets -----------------------------------------------------------------------

    def upload_dataset(self, path: Union[str, "os.PathLike[str]"]) -> dict:
        """Uploads a dataset file (JSON, JSON Lines, CSV or plain ``.txt``; alpaca, sharegpt,
        openai or text records; supervised, preference, KTO or pre-training data). Returns
        ``{file_id, filename, format, kind, stages, num_rows, …}``: ``stages`` are the task
        stages it fits. An invalid file raises APIError 422 naming the first bad record."""
        return self._upload("/api/files/datasets", os.fspath(path))

    def _upload(self, url: str, path: str, fields: Optional[Dict[str, str]] = None) -> Any:
        size = os.path.getsize(path)
        for attempt in (1, 2):
            with open(path, "rb") as f:
                body = _Multipart("file", os.path.basename(path), f, size, fields)
                headers = {"content-type": body.content_type, "content-length": str(body.length)}
                try:
                    return self._json("POST", url, body, headers=headers, retry_auth=False)
                except APIError as e:
                    # The body is spent: renew an expired token and send the file again.
                    if e.status != 401 or attempt == 2 or self.api_key or not self._refresh():
                        raise
        raise AssertionError("unreachable")

    def datasets(self) -> List[dict]:
        """The caller's datasets, newest first."""
        return self._json("GET", "/api/files/datasets")["files"]

    def dataset(self, dataset_id: str) -> dict:
        return self._json("GET", f"/api/files/datasets/{_q(dataset_id)}")

    def preview_dataset(self, dataset_id: str, limit: int = 10) -> dict:
        """``{format, num_rows, rows}``: the first ``limit`` records."""
        return self._json("GET", f"/api/files/datasets/{_q(dataset_id)}/preview?limit={limit}")

    def delete_dataset(self, dataset_id: str) -> dict:
        return self._json("DELETE", f"/api/files/datasets/{_q(dataset_id)}")

    # ---- training -----------------------------------------------------------------------

    def create_task(self, **spec: Any) -> dict:
        """Queues a training task. ``spec`` is the body of ``POST /api/tasks``: ``name``,
        ``model_name``, ``dataset_id``, and optionally ``epochs``, ``learning_rate``,
        ``batch_size``, ``finetuning_type``, ``lora_rank``, ``max_steps``, … (see the README).
        Returns ``{task_id, status, template, message}``; a bad value raises APIError 422
        naming the field."""
        return self._json("POST", "/api/tasks", spec)

    def tasks(self) -> List[dict]:
        """The caller's tasks: ``task_id``, ``name``, ``status``, ``progress``, …"""
        return self._json("GET", "/api/tasks")["tasks"]

    def task(self, task_id: str) -> dict:
        """A task's parameters, ``status``, ``progress``, ``error``, ``diagnosis`` and, once
        completed, ``model_id``."""
        return self._json("GET", f"/api/tasks/{_q(task_id)}")

    def cancel(self, task_id: str) -> dict:
        """Cancels a task: a queued one at once, a running one after it saves a checkpoint."""
        return self._json("POST", f"/api/tasks/{_q(task_id)}/cancel")

    def set_priority(self, task_id: str, priority: int) -> dict:
        """Moves a queued task in the queue (priority -100..100, higher first). Returns
        ``{task_id, priority, queue_position}``; a task no longer queued raises APIError 409."""
        return self._json("POST", f"/api/tasks/{_q(task_id)}/priority", {"priority": priority})

    # ---- training templates -------------------------------------------------------------

    def templates(self) -> List[dict]:
        """Your training templates: ``[{template_id, name, settings, created_at}, …]``."""
        return self._json("GET", "/api/templates")["templates"]

    def save_template(self, name: str, task_id: Optional[str] = None, **settings: Any) -> dict:
        """Saves settings as a named template: a task's (``task_id``) or the keyword
        arguments (``create_task``'s fields; name and datasets are not kept)."""
        body: Dict[str, Any] = {"name": name}
        if task_id is not None:
            body["task_id"] = task_id
        else:
            body["settings"] = settings
        return self._json("POST", "/api/templates", body)

    def create_task_from_template(self, template_id: str, name: str, **fields: Any) -> dict:
        """Queues a task from a template: ``name``, ``dataset_id`` and any field to change
        go over the template's settings. Returns ``{task_id, status, template, message}``."""
        return self._json(
            "POST", f"/api/templates/{_q(template_id)}/tasks", {"name": name, **fields}
        )

    def delete_template(self, template_id: str) -> None:
        self._json("DELETE", f"/api/templates/{_q(template_id)}")

    def metrics(self, task_id: str) -> List[dict]:
        """The loss curve: ``[{step, loss, learning_rate, epoch, t}, …]``."""
        return self._json("GET", f"/api/tasks/{_q(task_id)}/metrics")["points"]

    def logs(self, task_id: str, tail: Optional[int] = None) -> str:
        """The worker's output (LlamaFactory, transformers); the last ``tail`` lines."""
        q = f"?tail={tail}" if tail is not None else ""
        return self._json("GET", f"/api/tasks/{_q(task_id)}/logs{q}")["logs"]

    def events(
        self, task_id: str, last_event_id: Optional[int] = None, *, timeout: float = 60.0
    ) -> Iterator[Tuple[Optional[int], str, Any]]:
        """The task's live events, ``(id, event, data)``: a ``snapshot`` (the task's detail)
        first, then ``status``, ``train_begin``, ``step``, ``log``, ``checkpoint``, … as they
        happen. With ``last_event_id``, the events after it instead of the snapshot. The
        stream does not end by itself; a read waiting longer than ``timeout`` seconds raises
        ``TimeoutError`` (the server sends a keep-alive every 15 s)."""
        headers = {"accept": "text/event-stream"}
        if last_event_id is not None:
            headers["last-event-id"] = str(last_event_id)
        resp = self._open(
            "GET", f"/api/tasks/{_q(task_id)}/events", headers=headers, timeout=timeout
        )
        with resp:
            yield from _sse(resp)

    def wait(
        self,
        task_id: str,
        progress: bool = True,
        *,
        timeout: Optional[float] = None,
        raise_on_failure: bool = True,
    ) -> dict:
        """Waits for a task to end, following its live events, with a progress bar (steps,
        loss, status) when ``progress`` is true. Returns the task's final detail (with
        ``model_id`` once completed).

        Raises:
            TaskFailedError: the task failed or was cancelled (unless ``raise_on_failure`` is
                false).
            TimeoutError: ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bar: Optional[_Progress] = None
        last_id: Optional[int] = None
        status = ""
        try:
            while status not in TERMINAL:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"task {task_id} still {status or 'running'}")
                read_timeout = 45.0 if remaining is None else max(0.1, min(45.0, remaining))
                try:
                    for _id, event, data in self.events(task_id, last_id, timeout=read_timeout):
                        if _id is not None:
                            last_id = _id
                        if not isinstance(data, dict):
                            continue
                        if event == "snapshot":
                            status = data.get("status", "")
                            if progress and bar is None:
                                bar = _Progress(task_id, data.get("name", ""))
                            p = data.get("progress") or {}
                            if bar:
                                bar.update(
                                    p.get("current_step"), p.get("total_steps"), p.get("loss"),
                                    status,
                                )
                        elif event == "status":
                            status = data.get("status", status)
                            if bar:
                                bar.update(status=status)
                        elif bar and event in ("train_begin", "step"):
                            bar.update(data.get("step"), data.get("total_steps"))
                        elif bar and event == "log":
                            bar.update(data.get("step"), loss=data.get("loss"))
                        if status in TERMINAL:
                            break
                        if deadline is not None and time.monotonic() > deadline:
                            raise TimeoutError(f"task {task_id} still {status or 'running'}")
                except (socket.timeout, TimeoutError) as e:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"task {task_id} still {status or 'running'}") from e
                except (ConnectionError, http.client.HTTPException):
                    time.sleep(1.0)  # the server restarted or the connection dropped
                except APIError as e:
                    if e.status != 0:
                        raise
                    time.sleep(1.0)
        finally:
            if bar:
                bar.close()
        task = self.task(task_id)
        if raise_on_failure and task.get("status") in ("failed", "cancelled"):
            raise TaskFailedError(task)
        return task

    # ---- models and chat ----------------------------------------------------------------

    def models(self) -> List[dict]:
        """Base models and the caller's trained models (``kind: adapter``, ``base_model``,
        ``model_path``, ``task_id``)."""
        return self._json("GET", "/api/files/models")["models"]

    def model(self, model_id: str) -> dict:
        return self._json("GET", f"/api/files/models/{_q(model_id)}")

    def download_model(
        self,
        model_id: str,
        dest: Optional[Union[str, "os.PathLike[str]"]] = None,
        *,
        timeout: float = 600.0,
    ) -> str:
        """Downloads one of your trained models (an adapter or a full fine-tune) and unpacks
        it into ``dest`` (default: ``~/.cache/ferrotune/models/<model_id>``); returns the
        folder, ready for :class:`ferrotune.Engine` (``adapter=``) or transformers. The
        server shows model paths relative to its own data dir, so this is how a notebook on
        any machine gets the files."""
        import tarfile
        import tempfile

        if dest is None:
            root = os.environ.get("XDG_CACHE_HOME") or os.path.join(
                os.path.expanduser("~"), ".cache"
            )
            dest = os.path.join(root, "ferrotune", "models", model_id)
        dest = os.fspath(dest)
        os.makedirs(dest, exist_ok=True)
        with self._open(
            "GET",
            f"/api/files/models/{_q(model_id)}/download",
            headers={"accept": "application/gzip"},
            timeout=timeout,
        ) as resp, tempfile.TemporaryFile() as tmp:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                tmp.write(chunk)
            tmp.seek(0)
            with tarfile.open(fileobj=tmp, mode="r:gz") as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                for m in members:
                    # Only plain files, flattened to their names: nothing lands outside dest.
                    name = os.path.basename(m.name)
                    src = tar.extractfile(m)
                    if not name or src is None:
                        continue
                    with src, open(os.path.join(dest, name), "wb") as out:
                        out.write(src.read())
        return dest

    def export(
        self,
        model_id: str,
        format: str = "gguf",
        quantization: Optional[str] = None,
        *,
        name: Optional[str] = None,
        wait: bool = True,
        timeout: float = 3600.0,
        poll: float = 1.0,
    ) -> dict:
        """Exports one of your trained models: an adapter merged into its base (or a full
        fine-tune) as ``format="gguf"`` (``quantization`` ``q8_0`` by default, or ``f16``,
        ``q4_0``, ``q4_k_m``, ``f32``; with an Ollama ``Modelfile``) or
        ``format="safetensors"`` (``f16`` by default, ``bf16``, ``f32``). The server runs it
        as a job and registers the result as a new model of yours (``model_id`` in the
        answer: chat with it like any model). With ``wait`` (the default) this returns the
        finished export and raises :class:`APIError` if it failed or was cancelled;
        ``report`` then lists the files, sizes, seconds, and for a GGUF of an adapter the
        ``retention`` of the fine-tune's weight change (with a ``warning`` when a 4-bit export
        loses much of it)."""
        body: Dict[str, Any] = {"format": format}
        if quantization is not None:
            body["quantization"] = quantization
        if name is not None:
            body["name"] = name
        export = self._json("POST", f"/api/files/models/{_q(model_id)}/export", body)
        if not wait:
            return export
        deadline = time.monotonic() + timeout
        while export["status"] in ("queued", "running"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"export {export['export_id']} still {export['status']}")
            time.sleep(poll)
            export = self.export_status(export["export_id"])
        if export["status"] != "succeeded":
            raise APIError(
                409,
                f"export {export['export_id']} {export['status']}: "
                f"{export.get('error') or export.get('message')}",
                code="export_" + export["status"],
                body=export,
            )
        return export

    def export_status(self, export_id: str) -> dict:
        """One export: ``status`` (queued, running, succeeded, failed, cancelled),
        ``progress`` (0–1), ``message``, and once it succeeded ``model_id`` and ``report``."""
        return self._json("GET", f"/api/exports/{_q(export_id)}")

    def exports(self) -> List[dict]:
        """Your exports, newest first."""
        return self._json("GET", "/api/exports")

    def cancel_export(self, export_id: str) -> dict:
        return self._json("POST", f"/api/exports/{_q(export_id)}/cancel", {})

    def download_export(
        self,
        export_id: str,
        dest: Union[str, "os.PathLike[str]"],
        *,
        timeout: float = 600.0,
    ) -> List[str]:
        """Downloads a succeeded export's files as they are (the ``.gguf`` and ``Modelfile``,
        or the safetensors folder's files) into the folder ``dest``; returns their paths."""
        export = self.export_status(export_id)
        dest = os.fspath(dest)
        os.makedirs(dest, exist_ok=True)
        paths = []
        for f in (export.get("report") or {}).get("files", []):
            name = os.path.basename(f["name"])
            path = os.path.join(dest, name)
            with self._open(
                "GET", f"/api/exports/{_q(export_id)}/files/{_q(name)}", timeout=timeout
            ) as resp, open(path, "wb") as out:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
            paths.append(path)
        return paths

    def evaluate(
        self,
        model: Optional[str] = None,
        *,
        dataset_id: Optional[str] = None,
        task_id: Optional[str] = None,
        baseline: Optional[bool] = None,
        max_samples: Optional[int] = None,
        max_new_tokens: Optional[int] = None,
        batch_size: Optional[int] = None,
        name: Optional[str] = None,
        wait: bool = True,
        timeout: float = 7200.0,
        poll: float = 1.0,
    ) -> dict:
        """Evaluates ``model`` (a base model's name or one of your trained models' ids) on an
        uploaded test set (``dataset_id``) or on the rows a training task held out
        (``task_id``: its ``val_size`` and seed; the model defaults to that task's). The
        server scores BLEU-4, ROUGE-1/2/L (Chinese by jieba's words), exact match, the
        references' loss and perplexity and the generation speed, as a queued job. For a
        fine-tune its base is evaluated on the same rows too (``baseline``, default true).

        Returns ``{"evaluation_id", "baseline_id", "evaluations"}``; with ``wait`` (the
        default) once every evaluation finished, each with its ``metrics``, and with
        ``comparison`` (see :meth:`evaluation_comparison`) when a baseline ran. Raises
        :class:`APIError` if one failed or was cancelled."""
        body: Dict[str, Any] = {
            k: v
            for k, v in (
                ("model", model),
                ("dataset_id", dataset_id),
                ("task_id", task_id),
                ("baseline", baseline),
                ("max_samples", max_samples),
                ("max_new_tokens", max_new_tokens),
                ("batch_size", batch_size),
                ("name", name),
            )
            if v is not None
        }
        queued = self._json("POST", "/api/evaluations", body)
        if not wait:
            return queued
        deadline = time.monotonic() + timeout
        done = []
        for e in queued["evaluations"]:
            while e["status"] in ("queued", "running"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"evaluation {e['evaluation_id']} still {e['status']}")
                time.sleep(poll)
                e = self.evaluation(e["evaluation_id"])
            if e["status"] != "completed":
                raise APIError(
                    409,
                    f"evaluation {e['evaluation_id']} {e['status']}: {e.get('error')}",
                    code="evaluation_" + e["status"],
                    body=e,
                )
            done.append(e)
        result = dict(queued, evaluations=done)
        if queued.get("baseline_id"):
            result["comparison"] = self.evaluation_comparison(queued["evaluation_id"])
        return result

    def evaluation(self, evaluation_id: str) -> dict:
        """One evaluation: ``status``, ``progress`` and, once it completed, ``metrics``."""
        return self._json("GET", f"/api/evaluations/{_q(evaluation_id)}")

    def evaluations(self) -> List[dict]:
        """Your evaluations, newest first."""
        return self._json("GET", "/api/evaluations")

    def evaluation_predictions(self, evaluation_id: str) -> List[dict]:
        """A completed evaluation's answers: ``{"prompt", "predict", "label"}`` per row."""
        return self._json(
            "GET", f"/api/evaluations/{_q(evaluation_id)}/predictions?format=json"
        )

    def evaluation_comparison(self, evaluation_id: str) -> dict:
        """A fine-tune's evaluation and its base's side by side: ``baseline`` and
        ``candidate`` (each with ``metrics``), ``delta`` (after minus before) and ``rows``
        (``prompt``, ``reference``, ``baseline`` and ``candidate`` answers)."""
        return self._json("GET", f"/api/evaluations/{_q(evaluation_id)}/comparison")

    def cancel_evaluation(self, evaluation_id: str) -> dict:
        return self._json("POST", f"/api/evaluations/{_q(evaluation_id)}/cancel", {})

    def upload_adapter(
        self,
        path: Union[str, "os.PathLike[str]"],
        *,
        name: Optional[str] = None,
        base_model: Optional[str] = None,
    ) -> dict:
        """Brings your own adapter: a PEFT LoRA folder (``adapter_config.json`` and
        ``adapter_model.safetensors``; packed here) or a ``.zip`` / ``.tar.gz`` of one becomes
        one of your models, checked against its base model (``base_model``, default the
        adapter's ``base_model_name_or_path``). Returns the model (``model_id``, ``kind:
        adapter``, ``base_model``); a refusal raises APIError 422 with the reason."""
        import tarfile
        import tempfile

        path = os.fspath(path)
        fields = {k: v for k, v in (("name", name), ("base_model", base_model)) if v}
        if not os.path.isdir(path):
            return self._upload("/api/files/models/adapters", path, fields)
        folder = os.path.basename(os.path.normpath(path)) or "adapter"
        with tempfile.TemporaryDirectory() as tmp:
            archive = os.path.join(tmp, f"{folder}.tar.gz")
            with tarfile.open(archive, "w:gz") as tar:
                for entry in sorted(os.listdir(path)):
                    full = os.path.join(path, entry)
                    if os.path.isfile(full):
                        tar.add(full, arcname=entry)
            return self._upload("/api/files/models/adapters", archive, fields)

    def chat(
        self,
        model: str,
        messages: Messages,
        *,
        stream: bool = False,
        timeout: float = 600.0,
        **kw: Any,
    ) -> Union[str, Iterator[str]]:
        """Answers ``messages`` (a list of ``{"role", "content"}`` dicts, or one user message
        as a string) with ``model``: a base model's name or a trained model's ``model_id``.
        Keywords are those of ``/v1/chat/completions``: ``temperature``, ``top_p``, ``top_k``,
        ``max_tokens``, ``stop``, ``seed``, ``repetition_penalty``. With ``stream=True``,
        returns an iterator of text pieces. ``timeout``: seconds to wait for the answer (for
        each piece when streaming)."""
        body = {"model": model, "messages": _messages(messages), **kw}
        if not stream:
            r = self._json("POST", "/v1/chat/completions", body, timeout=timeout)
            return r["choices"][0]["message"]["content"]
        body["stream"] = True
        resp = self._open(
            "POST",
            "/v1/chat/completions",
            body,
            headers={"accept": "text/event-stream"},
            timeout=timeout,
        )
        return _chat_pieces(resp)

    def openai(self, **kw: Any) -> Any:
        """An ``openai.OpenAI`` client pointed at this server's ``/v1`` (needs the ``openai``
        package: ``pip install openai``)."""
        try:
            import openai
        except ImportError:
            raise ImportError(
                "Client.openai() needs the openai package: pip install openai"
            ) from None
        cred = self._credential()
        if not cred:
            raise ValueError("the client has no api_key or token: log in first")
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=cred, **kw)


def _q(segment: str) -> str:
    return urllib.parse.quote(str(segment), safe="")


def _sse(resp: Any) -> Iterator[Tuple[Optional[int], str, Any]]:
    """Server-sent events from a response, ``(id, event, data)`` with data decoded from
    JSON when it is JSON."""
    ev_id: Optional[int] = None
    event = ""
    data: List[str] = []
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text)
                except ValueError:
                    value = text
                yield ev_id, event or "message", value
            ev_id, event, data = None, "", []
        elif line.startswith(":"):
            continue  # keep-alive comment
        else:
            name, _, value_str = line.partition(":")
            if value_str.startswith(" "):
                value_str = value_str[1:]
            if name == "id":
                try:
                    ev_id = int(value_str)
                except ValueError:
                    ev_id = None
            elif name == "event":
                event = value_str
            elif name == "data":
                data.append(value_str)


def _chat_pieces(resp: Any) -> Iterator[str]:
    with resp:
        for _id, _event, data in _sse(resp):
            if data == "[DONE]":
                return
            if isinstance(data, dict):
                if "error" in data:
                    err = data["error"]
                    message = err.get("message") if isinstance(err, dict) else str(err)
                    raise APIError(200, message or "generation failed", "generation_failed", data)
                for choice in data.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece
