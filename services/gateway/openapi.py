"""The OpenAPI schema the gateway publishes: each /v1 route's JSON body (the handlers read
the raw body, so FastAPI cannot see it), its answers, and the API key scheme."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.gateway import errors
from services.gateway.protocol import openapi_body, openapi_schemas
from services.gateway.responses import EVENT_SCHEMA


def api_operation(with_keys: bool):
    """The OpenAPI description of a /v1 route, for `app.get`/`app.post`: its JSON body (the
    handler reads the raw body, so FastAPI cannot see it), its answers and the API key."""

    def describe(body: type | None, answer: dict[str, Any]) -> dict[str, Any]:
        content = {"application/json": {"schema": answer}}
        if body is not None:  # "stream": true answers with server-sent events
            stream = {"type": "array", "items": EVENT_SCHEMA}  # OpenAPI 3.2: the whole stream
            events = {"schema": stream, "itemSchema": EVENT_SCHEMA}
            content["text/event-stream"] = events
        refusal = {"description": "refused", "content": {"application/json": {"schema": ERROR}}}
        extra: dict[str, Any] = {"security": [{API_KEY: []}]} if with_keys else {}
        if body is not None:
            extra["requestBody"] = openapi_body(body)
        return {
            "responses": {200: {"content": content}, "4XX": refusal, "5XX": refusal},
            "openapi_extra": extra,
        }

    return describe


def publish_schema(app: FastAPI, with_keys: bool) -> dict[str, Any]:
    """FastAPI's OpenAPI schema plus the request bodies' schemas and the API key scheme."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update(openapi_schemas(), Error=errors.SCHEMA)
    if with_keys:
        components["securitySchemes"] = {API_KEY: {"type": "http", "scheme": "bearer"}}
    app.openapi_schema = schema
    return schema


API_KEY = "apiKey"  # the security scheme's name in the OpenAPI schema
ERROR = {"$ref": "#/components/schemas/Error"}
