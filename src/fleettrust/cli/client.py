"""A small httpx wrapper that turns problem documents (RFC 9457) into :class:`ApiError`.

It knows nothing about commands or output: ``fleettrust.cli.main`` formats the errors. A server
that cannot be reached becomes ``ApiError(status=0, code="unreachable")``.
"""

from __future__ import annotations

from typing import Any

import httpx


class ApiError(Exception):
    """An error answer from the API, or no answer at all (``status == 0``)."""

    def __init__(self, status: int, code: str, detail: str,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.errors: list[dict[str, Any]] = [e for e in errors or [] if isinstance(e, dict)]

    @property
    def unreachable(self) -> bool:
        return self.status == 0


class Client:
    def __init__(self, server: str, token: str | None, *, timeout: float = 300.0,
                 verify: bool | str = True) -> None:
        headers = {"User-Agent": "fleettrust-cli", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token.strip()}"
        self.server = server.rstrip("/")
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout,
                                  verify=verify)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ApiError(0, "unreachable",
                           f"the fleettrust server at {self.server} did not answer in time "
                           f"({type(exc).__name__})") from exc
        except (httpx.HTTPError, UnicodeEncodeError) as exc:
            reason = str(exc) or type(exc).__name__
            raise ApiError(0, "unreachable",
                           f"cannot reach the fleettrust server at {self.server}: {reason}"
                           ) from exc
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                text = resp.text.strip()[:200] or resp.reason_phrase
                raise ApiError(resp.status_code, "http_error", text)
            errors = body.get("errors")
            raise ApiError(resp.status_code, str(body.get("code", "http_error")),
                           str(body.get("detail", resp.reason_phrase)),
                           errors if isinstance(errors, list) else None)
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.content

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=json, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)
