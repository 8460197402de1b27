"""The streaming function: GET /api/generations/{id}/stream as SSE (ASGI, behind the Lambda Web Adapter).

Placeholder until the generations work lands: answers the contract's error envelope.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from minichat.log import accept_request_id


async def stream(request: Request) -> JSONResponse:
    request_id = accept_request_id(request.headers.get("x-request-id"))
    body = {
        "error": {
            "code": "not_found",
            "message": "Generations are not available yet.",
            "requestId": request_id,
        }
    }
    return JSONResponse(body, status_code=404, headers={"X-Request-Id": request_id})


app = Starlette(routes=[Route("/api/generations/{generation_id}/stream", stream)])
