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
    """A loopback port free now. Another process may take it before ours binds it: servers started on one go
    through `launch`, which starts again on another port when that happened."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_PORT_TAKEN = ("address already in use", "errno 98")


def launch(
    command: Any,
    log_path: Path,
    ready: Any,
    port: int | None = None,
    timeout: float = 120.0,
    **popen: Any,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start the server process `command(port)` and wait until `ready(port)`; its process and port.

    Without a `port`, a free one is drawn, and drawn again when the process finds it taken (another test's
    server bound it in between). A given port (a restart on the port clients know) is used as it is.
    """
    for _ in range(5 if port is None else 1):
        chosen = port if port is not None else free_port()
        start = log_path.stat().st_size if log_path.exists() else 0
        log = open(log_path, "ab")  # noqa: SIM115 - kept open for the child
        process = subprocess.Popen(command(chosen), stdout=log, stderr=subprocess.STDOUT, **popen)
        log.close()
        deadline = time.monotonic() + timeout
        while process.poll() is None and not ready(chosen):
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{command(chosen)[:4]} did not start in {timeout} s; see {log_path}")
            time.sleep(0.1)
        if process.poll() is None:
            return process, chosen
        with open(log_path, "rb") as done:
            done.seek(start)
            said = done.read().decode(errors="replace").lower()
        if not any(text in said for text in _PORT_TAKEN):
            break
    raise RuntimeError(f"{command(chosen)[:4]} exited; see {log_path}")


def answers(url: str, path: str = "/health") -> bool:
    """Whether an HTTP server answers `path` at `url` (any status)."""
    try:
        httpx.get(url + path, timeout=1)
        return True
    except httpx.HTTPError:
        return False


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
        self.port: int | None = None  # chosen at the first start, kept for restarts
        self.process: subprocess.Popen[bytes] | None = None
        self._app_name = app_name  # e.g. "basic-auth"
        self._env = env or {}
        self._store = backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
        self.workers = workers

    @property
    def url(self) -> str:
        assert self.port is not None, "start the server first"
        return f"http://127.0.0.1:{self.port}"

    def _command(self, port: int) -> list[str]:
        return [
            *_server_command(),
            "server",
            "--backend-store-uri",
            self._store,
            "--default-artifact-root",
            str(self.workdir / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(self.workers),
            *(["--app-name", self._app_name] if self._app_name else []),
        ]

    def start(self, timeout: float = 120.0) -> None:
        def healthy(port: int) -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        self.process, self.port = launch(
            self._command,
            self.workdir / "server.log",
            healthy,
            self.port,
            timeout,
            cwd=self.workdir,
            env=os.environ | self._env,
            start_new_session=True,
        )

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
    pause = 0.1
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
            # Growing pauses: on a busy machine (or a basic-auth server, which hashes the password on every
            # call) fast polls would slow down the very server being waited for.
            time.sleep(pause)
            pause = min(pause * 1.5, 2.0)


def root_span(trace: Trace) -> Any:
    return next(span for span in trace.data.spans if span.parent_id is None)


class UvicornThread:
    """A real uvicorn server for `app` on a free loopback port, in a background thread."""

    def __init__(self, app: Any, **config_kwargs: Any) -> None:
        # Port 0: the kernel picks a free port as uvicorn binds it; read back once started.
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", **config_kwargs)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        assert self.port, "enter the server first"
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = int(self.server.servers[0].sockets[0].getsockname()[1])
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
        self.port: int | None = None  # chosen at the first start, kept when started again
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OTEL_"))}
        self.env = base | env | {"TEST_MIDDLEWARE_KWARGS": json.dumps(kwargs)}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        assert self.port is not None, "start the app first"
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> AppProcess:
        command = [sys.executable, "-m", "uvicorn", "--factory", "tests.apps:app_from_env", "--host", "127.0.0.1"]
        self.process, self.port = launch(
            lambda port: [*command, "--port", str(port), "--log-level", "warning", "--workers", str(self._workers)],
            self.workdir / "app.log",
            lambda port: answers(f"http://127.0.0.1:{port}", "/healthz"),
            self.port,
            60,
            cwd=ROOT,
            env=self.env,
        )
        return self

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
    pause = 0.1
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(pause)
        pause = min(pause * 1.5, 1.0)


def middleware_of(app: Any) -> Any:
    """The `MlflowFeedbackMiddleware` inside an app (after its first request built the middleware stack)."""
    from mlflow_feedback_middleware import MlflowFeedbackMiddleware

    node = getattr(app, "middleware_stack", None) or app
    while node is not None:
        if isinstance(node, MlflowFeedbackMiddleware):
            return node
        node = getattr(node, "app", None)
    raise LookupError("no MlflowFeedbackMiddleware in this app")


def outbox_drained(app: Any, timeout: float = 60) -> dict[str, Any]:
    """Wait until nothing accepted by `app`'s feedback route is still to be written; the outbox counts.
    After it, a write that has not happened will not happen (what tests of "written once" wait for)."""
    middleware = middleware_of(app)
    return wait_until(  # type: ignore[no-any-return]
        lambda: (stats := middleware.status()["outbox"])["pending"] == 0 and stats, timeout, "the outbox drained"
    )


def middleware_log(level: int = logging.NOTSET) -> list[logging.LogRecord]:
    """The middleware logger's records at `level` and above, from now on (kept in the returned list)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logging.getLogger("mlflow_feedback_middleware").addHandler(Keep(level))
    return records


def run_script(script: str, args: list[str], env: dict[str, str], timeout: float = 300) -> Any:
    """Run ``tests/scripts/<script>.py`` in a fresh Python process (MLflow's tracer, URI and OTel settings are
    process-wide) with only `env` of MLFLOW_* / OTEL_* settings, and the JSON its last output line holds."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OTEL_"))}
    clean["MLFLOW_FEEDBACK_OUTBOX"] = os.environ["MLFLOW_FEEDBACK_OUTBOX"]
    result = subprocess.run(
        [sys.executable, "-m", f"tests.scripts.{script}", *args],
        cwd=ROOT,
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def serve_demo(
    python: str | Path,
    tracking_uri: str,
    experiment_name: str,
    workdir: Path,
    extra_env: dict[str, str] | None = None,
    timeout: float = 60,
) -> Any:
    """examples/chat_app.py under uvicorn with `python`, on the test server, as `make demo` serves it; its URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OTEL_"))} | {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_EXPERIMENT_NAME": experiment_name,
        "MLFLOW_FEEDBACK_OUTBOX": str(workdir / "outbox.db"),
        "MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS": "500",
        **(extra_env or {}),
    }
    command = [str(python), "-m", "uvicorn", "chat_app:app", "--host", "127.0.0.1", "--port"]
    process, port = launch(
        lambda port: [*command, str(port)],
        workdir / "demo.log",
        lambda port: answers(f"http://127.0.0.1:{port}", "/feedback/health"),
        timeout=timeout,
        cwd=ROOT / "examples",
        env=env,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
