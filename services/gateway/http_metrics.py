"""Counting HTTP responses by route and status, as plain ASGI middleware.

Plain ASGI rather than Starlette's `BaseHTTPMiddleware`, which wraps the request's receive
channel and the response's body stream: the handlers here watch `receive` for a client that
goes away mid-generation, and stream tokens as they come.
"""

from __future__ import annotations

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "unmatched"


class CountResponses:
    def __init__(self, app: ASGIApp, counter: Counter, skip: frozenset[str]) -> None:
        """`counter` takes (route, status); routes in `skip` (the scrape itself) are not
        counted."""
        self.app = app
        self.counter = counter
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = ["500"]  # if the app raises before it starts a response

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # The route's template (set by the router), never the raw path: few values.
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            if route not in self.skip:
                self.counter.labels(route, status[0]).inc()
