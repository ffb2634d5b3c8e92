"""End-user feedback on MLflow traces for any Starlette or FastAPI service, with one line::

app.add_middleware(MlflowFeedbackMiddleware)
"""

from .asgi.context import TraceIdLogFilter, get_client_request_id, get_feedback_token, get_trace_id
from .asgi.websocket import Turn, traced_turn
from .config import DEFAULT_EXCLUDE_PATHS, DEFAULT_REDACT_FIELDS
from .intake.identity import AuthenticatedUserOrHeader, IdentityResolver
from .intake.limits import FeedbackLimits, RateLimit
from .intake.models import FeedbackRequest
from .intake.openapi import document_feedback_routes
from .intake.schema import IMPLICIT_SIGNALS, Binary, Categorical, Choice, FeedbackSchema, Scale, Signal, Text
from .intake.scrubbing import scrub_personal_data
from .intake.tokens import FeedbackGrant, FeedbackTokens, TokenError
from .middleware import MlflowFeedbackMiddleware

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EXCLUDE_PATHS",
    "DEFAULT_REDACT_FIELDS",
    "IMPLICIT_SIGNALS",
    "AuthenticatedUserOrHeader",
    "Binary",
    "Categorical",
    "Choice",
    "FeedbackGrant",
    "FeedbackLimits",
    "FeedbackRequest",
    "FeedbackSchema",
    "FeedbackTokens",
    "IdentityResolver",
    "MlflowFeedbackMiddleware",
    "RateLimit",
    "Scale",
    "Signal",
    "Text",
    "TokenError",
    "TraceIdLogFilter",
    "Turn",
    "__version__",
    "document_feedback_routes",
    "get_client_request_id",
    "get_feedback_token",
    "get_trace_id",
    "scrub_personal_data",
    "traced_turn",
]
