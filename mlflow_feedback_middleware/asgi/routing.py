"""Where the feedback routes live in the host app: in its own router, behind its own middleware.

Served from inside the middleware, the feedback routes would sit in front of every middleware added after
it (host checks, HTTPS redirects, authentication), and ahead of the app's own routes at the same paths.
Added to the app's router instead, they are reached the way every route of the app is: through the whole
middleware stack, after the app's own routes (which keep their paths), with Starlette's ``root_path``
handling for mounts and path-stripping proxies. An app that is not Starlette's is served directly.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.datastructures import URLPath
from starlette.routing import BaseRoute, Match, Mount, NoMatchFound, Router
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("mlflow_feedback_middleware")


def route_path(scope: Scope) -> str:
    """The request's path within the app: without the ``root_path`` of a mount or a proxy's prefix.

    Starlette's own rule (``starlette._utils.get_route_path``): ASGI servers include ``root_path`` in
    ``path``, and a mounted app sees the full path with its mount point in ``root_path``.
    """
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path


class FeedbackRoute(BaseRoute):
    """A route of the app's router that hands every request under the feedback path to the feedback app."""

    def __init__(self, feedback: Any) -> None:
        self.feedback = feedback  # FeedbackRoutes: handles(path) and an ASGI __call__

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and self.feedback.handles(route_path(scope)):
            return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.feedback(scope, receive, send)


def _probes(path: str) -> list[tuple[str, str]]:
    """One request for each feedback route: what an app route at the same place would take over."""
    gets = ("health", "schema", "client.js", "summary", "fb-" + "0" * 32)
    return [("POST", path), *(("GET", f"{path}/{name}") for name in gets)]


def _describe(route: BaseRoute) -> str:
    methods = sorted(getattr(route, "methods", None) or ())
    where = getattr(route, "path", None) or type(route).__name__
    return f"{'/'.join(methods) + ' ' if methods else ''}{where}"


def mount_feedback_routes(app: Any, feedback: Any, path: str) -> bool:
    """Add the feedback routes to `app`'s router (a Starlette or FastAPI app); whether that was possible.

    They go before the first catch-all mount (``app.mount("/", StaticFiles(...))`` would otherwise take
    them) and after every other route; an app route that takes one of their requests keeps it, with a
    warning that says how to move the feedback routes.
    """
    router = getattr(app, "router", None)
    if not isinstance(router, Router):
        return False
    routes = router.routes
    if any(isinstance(route, FeedbackRoute) and route.feedback is feedback for route in routes):
        return True
    at = next((i for i, r in enumerate(routes) if isinstance(r, Mount) and r.path == ""), len(routes))
    clashes: list[str] = []
    for method, probe_path in _probes(path):
        probe = {"type": "http", "method": method, "path": probe_path, "root_path": "", "headers": []}
        for route in routes[:at]:
            if route.matches(probe)[0] == Match.FULL:
                clashes.append(f"{method} {probe_path} (the app's route {_describe(route)})")
                break
    if clashes:
        logger.warning(
            "the app's own routes answer requests of MlflowFeedbackMiddleware's feedback routes, and keep them: %s. "
            "Pass feedback_path= another path (e.g. '/mlflow-feedback') to use the middleware's.",
            "; ".join(clashes),
        )
    routes.insert(at, FeedbackRoute(feedback))
    return True


def host_app(app: ASGIApp, scope: Scope, middleware: type) -> Any:
    """The Starlette app the middleware serves: the one it wraps, or the one whose stack it is in (not a
    parent app that mounts the wrapped one: its router does not see the wrapped app's paths)."""
    if isinstance(getattr(app, "router", None), Router):
        return app
    candidate = scope.get("app")
    stack = getattr(candidate, "user_middleware", None) or ()
    return candidate if any(getattr(entry, "cls", None) is middleware for entry in stack) else None
