"""End-user feedback on MLflow traces for any Starlette or FastAPI service, with one line::

app.add_middleware(MlflowFeedbackMiddleware)
"""

from .config import DEFAULT_EXCLUDE_PATHS
from .context import get_client_request_id, get_trace_id
from .feedback_models import FeedbackRequest
from .middleware import MlflowFeedbackMiddleware

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EXCLUDE_PATHS",
    "FeedbackRequest",
    "MlflowFeedbackMiddleware",
    "__version__",
    "get_client_request_id",
    "get_trace_id",
]
