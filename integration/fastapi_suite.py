"""Run FastAPI's own tutorial test suite with and without the middleware in every app; report new failures.

    python3 integration/fastapi_suite.py [--version 0.165.0] [--tests tests/test_tutorial]

Downloads the pinned FastAPI release's source distribution (its tests are in it), builds a virtual
environment with FastAPI, its test dependencies and this library, starts a real ``mlflow server`` (from
.venv-mlflow, which ``make`` builds), runs the suite twice (plain, then with ``inject_middleware``) and
compares the failed test IDs. Exits 1 when the middleware adds a failure not of a class the README explains
as by design (`BY_DESIGN`). FastAPI's own configuration applies (``filterwarnings = error``, a 20 s timeout
per test). ``MLFLOW_FEEDBACK_*`` variables reach the middleware (e.g. ``MLFLOW_FEEDBACK_SSE_FINAL_EVENT=false``).
Work files go to build/fastapi-suite/.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
import urllib.request
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "fastapi-suite"
# Test dependencies FastAPI's tutorial tests do not need (type checkers, benchmarking, coverage, pretty output).
# Failures the README explains as by design: FastAPI's SSE tutorials count every `data:` line of a stream,
# the named `mlflow_trace` event's too (kept by default for apps' own stream formats; the guide's client reads it).
BY_DESIGN = ("tests.test_tutorial.test_server_sent_events.",)
_SKIPPED = {"ty", "mypy", "pytest-codspeed", "pytest-sugar", "pytest-cov", "coverage", "logfire", "sentry-sdk"}


def _run(command: list[str], **kwargs: object) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]


def _requirement_name(requirement: str) -> str:
    name = requirement.split(";")[0]
    for stop in "<>=~![ ":
        name = name.split(stop)[0]
    return name.strip().lower()


def _test_requirements(pyproject: Path) -> list[str]:
    groups = tomllib.loads(pyproject.read_text())["dependency-groups"]

    def expand(group: str) -> list[str]:
        out: list[str] = []
        for entry in groups[group]:
            out += expand(entry["include-group"]) if isinstance(entry, dict) else [entry]
        return out

    return [r for r in expand("tests") if _requirement_name(r) not in _SKIPPED]


def _source(version: str) -> Path:
    tree = WORK / f"fastapi-{version}"
    if tree.is_dir():
        return tree
    WORK.mkdir(parents=True, exist_ok=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"fastapi=={version}",
            "-d",
            str(WORK),
        ]
    )
    with tarfile.open(WORK / f"fastapi-{version}.tar.gz") as archive:
        archive.extractall(WORK, filter="data")
    return tree


def _venv(tree: Path) -> Path:
    python = WORK / "venv" / "bin" / "python"
    ready = WORK / "venv" / ".ready"
    if not ready.exists():
        _run([sys.executable, "-m", "venv", str(WORK / "venv")])
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        _run([*pip, f"{tree}[all]", *_test_requirements(tree / "pyproject.toml")])
        _run([*pip, "-e", str(ROOT)])
        ready.touch()
    return python


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_mlflow() -> tuple[subprocess.Popen[bytes], str]:
    server = ROOT / ".venv-mlflow" / "bin" / "mlflow"
    if not server.exists():
        sys.exit("no .venv-mlflow: run `make .venv-mlflow/.ready` (or `make fastapi-suite`)")
    port = _free_port()
    store = WORK / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            str(server),
            "server",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--default-artifact-root",
            str(store / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=open(store / "server.log", "ab"),  # noqa: SIM115 - the child's log
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(480):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.25)
    process.kill()
    sys.exit(f"mlflow server did not start; see {store / 'server.log'}")


def _failures(junit: Path) -> tuple[int, set[str]]:
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    total, failed = 0, set()
    for case in cases:
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(f"{case.get('classname')}::{case.get('name')}")
    return total, failed


def _suite(python: Path, tree: Path, tests: str, inject: bool, url: str) -> tuple[int, set[str]]:
    junit = WORK / ("with-middleware.xml" if inject else "plain.xml")
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith("MLFLOW_FEEDBACK_") or not k.startswith(("MLFLOW_", "OTEL_"))
    }
    env |= {
        "PYTHONPATH": str(ROOT / "integration"),
        "INJECT_MLFLOW_FEEDBACK": "1" if inject else "0",
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_FEEDBACK_OUTBOX": str(WORK / "outbox.db"),
    }
    command = [
        str(python),
        "-m",
        "pytest",
        tests,
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "inject_middleware",
        f"--junitxml={junit}",
    ]
    print(f"== FastAPI's {tests} {'with' if inject else 'without'} the middleware", flush=True)
    subprocess.run(command, cwd=tree, env=env, check=False)
    return _failures(junit)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default="0.165.0", help="the FastAPI release whose suite runs")
    parser.add_argument("--tests", default="tests/test_tutorial", help="which of its tests (a path in its sdist)")
    args = parser.parse_args()
    tree = _source(args.version)
    python = _venv(tree)
    server, url = _start_mlflow()
    try:
        plain_total, plain = _suite(python, tree, args.tests, False, url)
        total, injected = _suite(python, tree, args.tests, True, url)
    finally:
        server.terminate()
    new = sorted(injected - plain)
    by_design = [t for t in new if t.startswith(BY_DESIGN)]
    unexplained = [t for t in new if not t.startswith(BY_DESIGN)]
    print(f"\nFastAPI {args.version} {args.tests}: {plain_total} tests without the middleware, {len(plain)} failed;")
    print(f"{total} tests with it in every app, {len(injected)} failed; new failures: {len(new)}")
    for test_id in by_design:
        print("  by design (README: tested against FastAPI's own suite):", test_id)
    for test_id in unexplained:
        print("  NEW:", test_id)
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
