"""Who the end user is: the trace's user and the feedback's source ID come from one resolver.

The default trusts, in order, the authenticated user Starlette's ``AuthenticationMiddleware`` put on the
request (``request.user``; that middleware must run outside this one) and the ``X-User-ID`` header. A
bare header is a claim anyone can make; a feedback token binds the user an answer was given to, so with
a secret configured feedback can only be written as that user.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.requests import HTTPConnection

from ..ids import clean_principal_id

logger = logging.getLogger("mlflow_feedback_middleware")

ANONYMOUS = "anonymous"  # the source ID of feedback from nobody in particular; such votes are never merged

IdentityResolver = Callable[[HTTPConnection], str | None]
"""Returns the end user's ID for a request (or connection), or None when it is anonymous."""


class AuthenticatedUserOrHeader:
    """The default `IdentityResolver`: ``request.user`` when authenticated, else the user-ID header."""

    def __init__(self, header: str = "X-User-ID") -> None:
        self.header = header

    def __call__(self, conn: HTTPConnection) -> str | None:
        user = conn.scope.get("user")  # conn.user asserts AuthenticationMiddleware is installed
        if user is not None and getattr(user, "is_authenticated", False):
            try:
                return str(user.identity)
            except NotImplementedError:  # BaseUser subclasses need not define identity
                return str(user.display_name)
        return conn.headers.get(self.header)


def resolve_user(resolver: IdentityResolver, conn: HTTPConnection) -> str | None:
    """The resolver's answer, if it is a usable ID (1-250 printable ASCII); None (anonymous) otherwise."""
    try:
        user = resolver(conn)
    except Exception:  # a broken resolver must not fail the user's request
        logger.warning("the identity resolver failed; treating the request as anonymous", exc_info=True)
        return None
    if user is None:
        return None
    cleaned = clean_principal_id(user) if isinstance(user, str) else None
    if cleaned is None:
        logger.debug("ignoring an unusable user ID from the identity resolver")
    return cleaned
