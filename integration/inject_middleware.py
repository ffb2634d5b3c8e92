"""A pytest plugin that puts MlflowFeedbackMiddleware into every FastAPI app another project's tests build.

Loaded with ``-p inject_middleware`` (this folder on PYTHONPATH) when ``INJECT_MLFLOW_FEEDBACK=1``. The
middleware goes in as the innermost user middleware, where the README recommends it, at its defaults but
for the experiment and, so nothing is written to the project's folder, the outbox (MLFLOW_FEEDBACK_OUTBOX).
"""

from __future__ import annotations

import functools
import os
from typing import Any

if os.environ.get("INJECT_MLFLOW_FEEDBACK") == "1":
    from fastapi import FastAPI
    from starlette.middleware import Middleware

    from mlflow_feedback_middleware import MlflowFeedbackMiddleware

    _original_init = FastAPI.__init__

    @functools.wraps(_original_init)
    def _init_with_middleware(self: FastAPI, *args: Any, **kwargs: Any) -> None:
        _original_init(self, *args, **kwargs)
        self.user_middleware.append(Middleware(MlflowFeedbackMiddleware, experiment_name="fastapi-suite"))

    FastAPI.__init__ = _init_with_middleware  # type: ignore[method-assign]
