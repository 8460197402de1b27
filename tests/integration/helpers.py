"""Test helpers for the HTTP API: a thin client and the error-envelope assertion."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Account:
    email: str
    password: str
    user_id: str
    access: str
    refresh: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access}"}


class Api:
    """A thin client for the tests: plain httpx, plus register/login shortcuts."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=30)

    def request(
        self, method: str, path: str, *, user: Account | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if user is not None:
            headers.update(user.headers)
        return self.http.request(method, path, headers=headers, **kwargs)

    def register(self, email: str | None = None, password: str = "correct horse battery") -> Account:
        email = email or f"user-{uuid.uuid4().hex[:12]}@example.com"
        r = self.http.post("/api/auth/register", json={"email": email, "password": password})
        assert r.status_code == 201, r.text
        body = r.json()
        return Account(email, password, body["user"]["id"], body["accessToken"], body["refreshToken"])

    def create_chat(self, user: Account, title: str | None = None) -> dict[str, Any]:
        r = self.request("POST", "/api/chats", user=user, json={} if title is None else {"title": title})
        assert r.status_code == 201, r.text
        return dict(r.json())


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The contract's envelope, with the request id echoed in the header."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == code, body
    assert error["message"]
    assert error["requestId"] == response.headers["x-request-id"]
    return dict(error)
