"""RFC 9457 problem details: every error the API returns is one of these."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_BASE = "https://github.com/hiapi/relay/blob/main/docs/api.md#"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Problem(Exception):
    """Raise from a handler to answer with a problem+json body."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind
        self.field = field
        self.headers = headers or {}

    def response(self, instance: str | None = None) -> web.Response:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.kind,
            "title": _TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
        }
        if instance is not None:
            body["instance"] = instance
        if self.field is not None:
            # `errors` follows the RFC 9457 extension style many validators use.
            body["errors"] = [{"field": self.field, "detail": self.detail}]
        return web.Response(
            status=self.status,
            body=orjson.dumps(body),
            content_type=PROBLEM_CONTENT_TYPE,
            headers=self.headers,
        )


def invalid_field(field: str, detail: str) -> Problem:
    return Problem(422, f"{field}: {detail}", kind="invalid-field", field=field)
