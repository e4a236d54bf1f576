"""Start and stop llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`) for tests.

The server runs from its own Python environment (llama-cpp-python compiles llama.cpp; it is not a dependency of
llmgw itself): `find_llamacpp_python()` looks in $LLMGW_LLAMACPP_PYTHON, then the repository's `.venv-llamacpp`,
then the running interpreter. It listens on port 0; the port is read from uvicorn's startup line, and the server
is ready once GET /v1/models answers (it has no /health).

Flags that matter (measured on llama-cpp-python 0.3.x):
- `--interrupt_requests False`: otherwise a new request cuts a running stream short;
- `--n_threads 1`: a test machine's cores are shared; one thread per server keeps several servers responsive.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

PYTHON_ENV_VAR = "LLMGW_LLAMACPP_PYTHON"
REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_VENV_PYTHON = REPO_ROOT / ".venv-llamacpp" / "bin" / "python"
_LISTENING = re.compile(r"Uvicorn running on http://[^:\s]+:(\d+)")


class LlamaCppUnavailable(RuntimeError):
    """No Python environment with llama-cpp-python[server] was found."""


def find_llamacpp_python() -> str:
    """The interpreter that can run `python -m llama_cpp.server`."""
    configured = os.environ.get(PYTHON_ENV_VAR)
    if configured:
        if not os.access(configured, os.X_OK):
            raise LlamaCppUnavailable(f"${PYTHON_ENV_VAR} = {configured!r} is not an executable")
        return configured
    if os.access(REPO_VENV_PYTHON, os.X_OK):
        return str(REPO_VENV_PYTHON)
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    raise LlamaCppUnavailable(
        f"llama-cpp-python[server] not found: set ${PYTHON_ENV_VAR} to a Python that has it, or run "
        f"`make llamacpp` to build {REPO_VENV_PYTHON}")


class LlamaCppServer:
    """One `llama_cpp.server` process serving `model_path` as `alias`. Use as a context manager, or call
    `start()` and `stop()`; `kill()` is SIGKILL (a crashed server, for failover tests)."""

    def __init__(self, model_path: str | os.PathLike[str], *, alias: str = "tiny", python: str | None = None,
                 n_ctx: int = 2048, n_threads: int = 1, extra_args: tuple[str, ...] = (),
                 startup_timeout: float = 90.0) -> None:
        self.model_path = os.fspath(model_path)
        self.alias = alias
        self.python = python or find_llamacpp_python()
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: str | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def log_text(self) -> str:
        """The server's output so far (kept until stop())."""
        if self._log_path is None:
            return ""
        try:
            return Path(self._log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> str:
        command = [self.python, "-m", "llama_cpp.server", "--model", self.model_path, "--model_alias", self.alias,
                   "--host", "127.0.0.1", "--port", "0", "--interrupt_requests", "False", "--n_ctx", str(self.n_ctx),
                   "--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads),
                   "--verbose", "False", *self.extra_args]
        log_fd, self._log_path = tempfile.mkstemp(prefix="llmgw-llamacpp-", suffix=".log")
        try:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_fd,
                                             stderr=subprocess.STDOUT)
        finally:
            os.close(log_fd)  # the child has its own copy
        deadline = time.monotonic() + self.startup_timeout
        try:
            self.port = self._wait_for_port(deadline)
            self._wait_until_ready(deadline)
        except BaseException:
            self.stop()
            raise
        return self.base_url

    def _wait_for_port(self, deadline: float) -> int:
        assert self._process is not None
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log_text())
            if match:
                return int(match.group(1))
            if self._process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self._process.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        raise TimeoutError(f"llama_cpp.server did not listen within {self.startup_timeout}s:\n{self.log_text()}")

    def _wait_until_ready(self, deadline: float) -> None:
        url = self.base_url + "/v1/models"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    models = json.load(response)
                if any(m.get("id") == self.alias for m in models.get("data", ())):
                    return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{url} not ready within {self.startup_timeout}s:\n{self.log_text()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=10)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        log_path, self._log_path = self._log_path, None
        if log_path is not None:
            try:
                os.unlink(log_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> LlamaCppServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
