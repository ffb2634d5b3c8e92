"""The middleware inside someone else's app: proxies' root_path, mounts, the app's own routes and guards."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.httpsredirect import HTTPSRedirectMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import HTTPConnection
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from mlflow_feedback_middleware import MlflowFeedbackMiddleware

from .apps import build_app
from .support import UvicornThread, client_for, wait_until

pytestmark = pytest.mark.anyio
TRACE_HEADER = "x-mlflow-trace-id"


def test_behind_a_path_stripping_proxy_the_feedback_routes_honour_root_path(experiment_name: str) -> None:
    """`uvicorn --root-path /api`: the proxy strips /api, the app sees root_path=/api."""
    app = build_app(experiment_name=experiment_name, feedback_wait_seconds=0)
    with UvicornThread(app, root_path="/api") as server, httpx.Client(base_url=server.url) as client:
        answer = client.post("/chat", json={"message": "hi"})
        assert answer.status_code == 200
        trace_id = answer.headers[TRACE_HEADER]
        assert client.get("/feedback/health").status_code in (200, 503)
        assert client.get("/feedback/schema").json()["feedback"]
        posted = client.post("/feedback", params={"trace_id": trace_id}, json={"is_correct": True})
        assert posted.status_code in (200, 202), posted.text
        if posted.status_code == 202:
            assert posted.headers["location"].startswith("/api/feedback/fb-")


async def test_a_mounted_sub_app_serves_its_feedback_routes_under_the_mount(experiment_name: str) -> None:
    sub = build_app(experiment_name=experiment_name)
    parent = Starlette(routes=[Mount("/v1", app=sub)])
    async with client_for(parent) as client:
        answer = await client.post("/v1/chat", json={"message": "hi"})
        assert TRACE_HEADER in answer.headers
        assert (await client.get("/v1/feedback/schema")).status_code == 200
        assert (await client.get("/feedback/schema")).status_code == 404  # the parent's, not ours
        missing = await client.post("/v1/feedback", json={"is_correct": True})
        assert missing.status_code == 422 and missing.json()["errors"][0]["field"] == "trace_id"


async def test_the_apps_own_feedback_route_keeps_its_path_and_is_reported(
    experiment_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()

    @app.post("/feedback")
    async def own_feedback() -> dict[str, str]:
        return {"handled_by": "the app"}

    app.add_middleware(MlflowFeedbackMiddleware, experiment_name=experiment_name)
    with caplog.at_level(logging.WARNING, logger="mlflow_feedback_middleware"):
        async with client_for(app) as client:
            own = await client.post("/feedback", json={"is_correct": True})
            schema = await client.get("/feedback/schema")
    assert own.json() == {"handled_by": "the app"}
    assert schema.status_code == 200  # routes the app does not have are still the middleware's
    warning = next(r.getMessage() for r in caplog.records if "keep them" in r.getMessage())
    assert "POST /feedback" in warning and "feedback_path=" in warning


async def test_a_catch_all_static_mount_does_not_hide_the_feedback_routes(experiment_name: str, tmp_path: Any) -> None:
    (tmp_path / "index.html").write_text("<h1>home</h1>")
    app = build_app(experiment_name=experiment_name)
    app.mount("/", StaticFiles(directory=tmp_path, html=True))
    async with client_for(app) as client:
        assert (await client.get("/")).text == "<h1>home</h1>"
        assert (await client.get("/feedback/schema")).status_code == 200


class HeaderAuth(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        if conn.headers.get("authorization") != "Bearer good":
            raise AuthenticationError("bad credentials")
        return AuthCredentials(["authenticated"]), SimpleUser("alice")


@pytest.mark.parametrize("ours", ["first", "last"])
async def test_the_apps_guards_guard_the_feedback_routes_in_either_order(experiment_name: str, ours: str) -> None:
    """Host check, HTTPS redirect and authentication apply to the feedback routes whether the middleware
    was added before them (inside) or after them (outside)."""
    app = build_app(experiment_name=experiment_name, feedback_path=None)  # a bare app to add to
    app.user_middleware.clear()
    kwargs = {"experiment_name": experiment_name}
    if ours == "first":
        app.add_middleware(MlflowFeedbackMiddleware, **kwargs)
    app.add_middleware(AuthenticationMiddleware, backend=HeaderAuth())
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["chat.example.com"])
    app.add_middleware(HTTPSRedirectMiddleware)
    if ours == "last":
        app.add_middleware(MlflowFeedbackMiddleware, **kwargs)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://chat.example.com") as client:
        good = {"authorization": "Bearer good"}
        assert (await client.get("/feedback/schema", headers=good)).status_code == 200
        assert (await client.get("/feedback/schema")).status_code == 400  # authentication refused
        assert (await client.post("/feedback", json={}, headers=good)).status_code == 422  # reached the route
    async with httpx.AsyncClient(transport=transport, base_url="https://evil.example.com") as client:
        assert (await client.get("/feedback/schema", headers=good)).status_code == 400  # host refused
    async with httpx.AsyncClient(transport=transport, base_url="http://chat.example.com") as client:
        assert (await client.get("/feedback/schema", headers=good)).status_code == 307  # to https


def test_the_feedback_path_is_served_at_the_same_place_whatever_the_first_scope(experiment_name: str) -> None:
    """Lifespan first (uvicorn) or a request first (no lifespan): the routes are there once, not twice."""
    app = build_app(experiment_name=experiment_name)
    with UvicornThread(app) as server, httpx.Client(base_url=server.url) as client:
        wait_until(lambda: client.get("/feedback/schema").status_code == 200, 30, "the schema route answers")
    from mlflow_feedback_middleware.asgi.routing import FeedbackRoute

    assert sum(isinstance(route, FeedbackRoute) for route in app.router.routes) == 1


async def test_a_wrapped_app_mounted_in_a_parent_keeps_its_feedback_routes(experiment_name: str) -> None:
    """The middleware wrapping a sub-app by hand: the parent's router is not the wrapped app's."""
    sub = build_app(experiment_name=experiment_name, feedback_path=None)
    sub.user_middleware.clear()

    async def plain_asgi(scope: Any, receive: Any, send: Any) -> None:  # not a Starlette app: no router
        await sub(scope, receive, send)

    wrapped = MlflowFeedbackMiddleware(plain_asgi, experiment_name=experiment_name)
    parent = Starlette(routes=[Mount("/v1", app=wrapped)])
    async with client_for(parent) as client:
        assert TRACE_HEADER in (await client.post("/v1/chat", json={"message": "hi"})).headers
        assert (await client.get("/v1/feedback/schema")).status_code == 200
