"""Test support: a real `mlflow server` (sqlite backend) on a free loopback port, apps served through
httpx or a real uvicorn server, and readers of what landed in MLflow."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
import uvicorn
from mlflow.entities import Trace

from mlflow_feedback_middleware._mlflow.export import flush_exports

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_command() -> list[str]:
    explicit = os.environ.get("MLFLOW_SERVER_BIN")
    if explicit:
        return [explicit]
    local = ROOT / ".venv-mlflow" / "bin" / "mlflow"
    if local.exists():
        return [str(local)]
    found = shutil.which("mlflow")
    if found:
        return [found]
    pytest.exit("no `mlflow` server executable: run the tests with `make test`", returncode=3)


def http_scope(method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """An ASGI HTTP scope, for calling an app with raw messages (what no HTTP client would send)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogatepass"),
        "root_path": "",
        "query_string": query,
        "headers": headers,
        "client": ("127.0.0.1", 4321),
        "server": ("testserver", 80),
    }


# Debian's chromium, headless, with nothing talking to the network on its own.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
]


def chromium_or_skip() -> str:
    """The chromium executable; skips the test without one, unless CI requires it (REQUIRE_CHROMIUM)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        assert not os.environ.get("REQUIRE_CHROMIUM"), "chromium is required here"
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    return chromium


def full_mlflow_python() -> Path:
    """The Python of the environment with the full `mlflow` package (the one serving the tests)."""
    return Path(_server_command()[0]).parent / "python"


class MlflowServer:
    """A `mlflow server` process with a sqlite store (or `backend_store_uri`), which tests may stop and
    start again."""

    def __init__(
        self,
        workdir: Path,
        app_name: str | None = None,
        env: dict[str, str] | None = None,
        backend_store_uri: str | None = None,
        workers: int = 1,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._app_name = app_name  # e.g. "basic-auth"
        self._env = env or {}
        self._store = backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
        self.workers = workers

    def start(self, timeout: float = 120.0) -> None:
        log = open(self.workdir / "server.log", "ab")  # noqa: SIM115 - kept open for the child
        self.process = subprocess.Popen(
            [
                *_server_command(),
                "server",
                "--backend-store-uri",
                self._store,
                "--default-artifact-root",
                str(self.workdir / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
                *(["--app-name", self._app_name] if self._app_name else []),
            ],
            cwd=self.workdir,
            env=os.environ | self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited; see {self.workdir / 'server.log'}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"mlflow server did not start in {timeout}s; see {self.workdir / 'server.log'}")

    def stop(self, signal: int = 15) -> None:
        """Stop the server (SIGTERM, or e.g. SIGKILL as a crash would)."""
        if self.process is None:
            return
        os.killpg(self.process.pid, signal)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        self.process = None


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


_INFO_FINALIZED = "mlflow.trace.infoFinalized"  # set by the tracking store once a trace's info is stored


def get_trace(trace_id: str, timeout: float = 30.0, finalized: bool = True) -> Trace:
    """The stored trace, once it has fully landed; flushes MLflow's export queue (about 1 s) if needed.

    MLflow's exporter sends a trace's spans and its info separately, and the spans may create the trace
    first: until the info is stored (`mlflow.trace.infoFinalized`), its metadata (user, session, client
    request ID) is missing. OTLP ingestion never sets that marker: pass ``finalized=False`` there.
    """
    deadline = time.monotonic() + timeout
    flushed = False
    while True:
        try:
            trace = mlflow.get_trace(trace_id)
        except Exception:
            trace = None
        if (
            trace is not None
            and trace.data.spans
            and trace.info.state.value != "IN_PROGRESS"
            and (not finalized or trace.info.trace_metadata.get(_INFO_FINALIZED) == "true")
        ):
            return trace
        if time.monotonic() > deadline:
            raise AssertionError(f"trace {trace_id} did not land in {timeout}s")
        if not flushed:
            flush_exports(timeout)
            flushed = True
        else:
            time.sleep(0.1)


def root_span(trace: Trace) -> Any:
    return next(span for span in trace.data.spans if span.parent_id is None)


class UvicornThread:
    """A real uvicorn server for `app` on a free loopback port, in a background thread."""

    def __init__(self, app: Any, **config_kwargs: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", **config_kwargs
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class PostgresCluster:
    """A throwaway PostgreSQL server (Debian's binaries, run as the `postgres` user) on a free port, with a
    database for MLflow; skips the test without one, unless CI requires it (REQUIRE_POSTGRES)."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not found or shutil.which("runuser") is None:
            assert not os.environ.get("REQUIRE_POSTGRES"), "PostgreSQL is required here (.ci/run installs it)"
            pytest.skip("Debian's postgresql is not installed")
        self._bin = found[-1].parent
        # Its own folder: the server runs as `postgres`, which cannot enter pytest's root-only temp folders.
        self.workdir = Path(tempfile.mkdtemp(prefix="mlflow-feedback-pg-"))
        self.port = free_port()
        self.uri = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/mlflow"

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresCluster:
        shutil.chown(self.workdir, "postgres")
        data = str(self.workdir / "data")
        self._as_postgres(str(self._bin / "initdb"), "-D", data, "--auth=trust", "-U", "postgres")
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._as_postgres(str(self._bin / "pg_ctl"), "-D", data, "-o", options, "-l", f"{data}.log", "-w", "start")
        psql = [str(self._bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port)]
        self._as_postgres(*psql, "-c", "CREATE DATABASE mlflow")
        return self

    def query(self, sql: str) -> list[list[str]]:
        """Rows of `sql` run on the MLflow database (fields as text): counting in the store without
        loading the tracking server."""
        psql = [str(self._bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-d", "mlflow", "-At", "-F", "\t"]
        command = ["runuser", "-u", "postgres", "--", *psql, "-c", sql]
        done = subprocess.run(command, check=True, capture_output=True, timeout=120, text=True)
        return [line.split("\t") for line in done.stdout.splitlines()]

    def log_count(self, text: str) -> int:
        """Lines of the server's log containing `text`."""
        log = self.workdir / "data.log"
        return sum(text in line for line in log.read_text(errors="replace").splitlines()) if log.exists() else 0

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._as_postgres(str(self._bin / "pg_ctl"), "-D", str(self.workdir / "data"), "-m", "fast", "stop")
        shutil.rmtree(self.workdir, ignore_errors=True)


class AppProcess:
    """The test app under a real uvicorn in its own process, which tests may kill like a crash would."""

    def __init__(self, workdir: Path, env: dict[str, str], kwargs: dict[str, Any], workers: int = 1) -> None:
        self.workdir = workdir
        self._workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OTEL_"))}
        self.env = base | env | {"TEST_MIDDLEWARE_KWARGS": json.dumps(kwargs)}
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> AppProcess:
        log = open(self.workdir / f"app-{self.port}.log", "ab")
        command = [sys.executable, "-m", "uvicorn", "--factory", "tests.apps:app_from_env", "--host", "127.0.0.1"]
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port), "--log-level", "warning", "--workers", str(self._workers)],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited; see {self.workdir}")
            try:
                httpx.get(f"{self.url}/healthz", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the app did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush, as in a crash."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None


def wait_until(condition: Any, timeout: float, what: str) -> Any:
    """Poll `condition()` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.25)


def middleware_log(level: int = logging.NOTSET) -> list[logging.LogRecord]:
    """The middleware logger's records at `level` and above, from now on (kept in the returned list)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logging.getLogger("mlflow_feedback_middleware").addHandler(Keep(level))
    return records


def run_script(script: str, args: list[str], env: dict[str, str], timeout: float = 300) -> Any:
    """Run `script` in a fresh Python process (MLflow's tracer, URI and OTel settings are process-wide)
    with only `env` of MLFLOW_* / OTEL_* settings, and the JSON its last output line holds."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OTEL_"))}
    clean["MLFLOW_FEEDBACK_OUTBOX"] = os.environ["MLFLOW_FEEDBACK_OUTBOX"]
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
