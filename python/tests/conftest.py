"""Fixtures: the test model (SmolLM2-135M-Instruct, pulled once into the shared test models
dir, as the Rust tests do), a local Engine over it, and a real ferrotune server on a loopback
port with a temporary data dir that trains with the managed Python environment.

Environment:
    FERROTUNE_BIN: the ferrotune binary (default: target/debug/ferrotune).
    FERROTUNE_TEST_MODELS_DIR: the models dir (default: <cache>/ferrotune/test-models).
    FERROTUNE_TEST_LOG=1: print the server's log.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

import ferrotune

MODEL = "SmolLM2-135M-Instruct"
ROOT = pathlib.Path(__file__).resolve().parents[2]


def cache_root() -> pathlib.Path:
    """The same cache root as the Rust side (src/pyenv.rs `cache_root`)."""
    if os.environ.get("FERROTUNE_CACHE_DIR"):
        return pathlib.Path(os.environ["FERROTUNE_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]) / "ferrotune"
    return pathlib.Path.home() / ".cache" / "ferrotune"


@pytest.fixture(scope="session")
def ferrotune_bin() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("FERROTUNE_BIN", ROOT / "target" / "debug" / "ferrotune"))
    if not path.is_file():
        pytest.fail(f"{path} does not exist: build it first (cargo build), or set FERROTUNE_BIN")
    return path


@pytest.fixture(scope="session")
def models_dir(ferrotune_bin: pathlib.Path) -> pathlib.Path:
    """The shared test models dir, with SmolLM2 pulled into it when missing."""
    env_dir = os.environ.get("FERROTUNE_TEST_MODELS_DIR")
    path = pathlib.Path(env_dir) if env_dir else cache_root() / "test-models"
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MODEL / "config.json").is_file():
        subprocess.run(
            [str(ferrotune_bin), "--models-dir", str(path), "models", "pull",
             "smollm2-135m-instruct"],
            check=True,
        )
    return path


@pytest.fixture(scope="session")
def engine(models_dir: pathlib.Path) -> ferrotune.Engine:
    return ferrotune.Engine(models_dir)


class Server:
    """`ferrotune serve` on 127.0.0.1:0 with a temporary data dir."""

    def __init__(self, binary: pathlib.Path, data_dir: pathlib.Path, models_dir: pathlib.Path):
        env = {k: v for k, v in os.environ.items() if k != "FERROTUNE_CONFIG"}
        env.update(
            RUST_LOG="info",
            FERROTUNE_AUTO_SETUP="true",
            FERROTUNE_DEFAULT_MODEL="smollm2-135m-instruct",
        )
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--bind", "127.0.0.1:0", "--data-dir", str(data_dir),
             "--models-dir", str(models_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.log: list[str] = []
        found = threading.Event()
        self.url = ""

        def drain() -> None:
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                self.log.append(line)
                if os.environ.get("FERROTUNE_TEST_LOG"):
                    print(f"[server] {line}", file=sys.stderr)
                if not found.is_set() and "listening on http://" in line:
                    self.url = line.split("listening on ", 1)[1].split()[0]
                    found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(60):
            self.stop()
            raise RuntimeError("the server did not report its address within 60 s:\n"
                               + "\n".join(self.log[-20:]))

    def wait_ready(self, client: ferrotune.Client, timeout: float = 1200) -> None:
        """Until the training environment is ready and the model is there."""
        deadline = time.monotonic() + timeout
        while True:
            status = client.system_status()
            env = status["environment"]["state"]
            if env == "failed":
                raise RuntimeError(f"environment install failed: {status['environment']}")
            if env == "ready" and MODEL in status["models"]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout} s: {status}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def server(ferrotune_bin, models_dir, tmp_path_factory):
    s = Server(ferrotune_bin, tmp_path_factory.mktemp("server") / "data", models_dir)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def client(server: Server) -> ferrotune.Client:
    """A client signed in as the server's first account."""
    c = ferrotune.Client(server.url)
    c.register("alice", "alice@example.com", "alice-password")
    c.login("alice", "alice-password")
    server.wait_ready(c)
    return c
