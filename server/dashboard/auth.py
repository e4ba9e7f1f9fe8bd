"""The dashboard's token: every request must carry it, or it is refused with 401.

A browser opens ``/?token=TOKEN`` once: the server checks it, stores it in an HttpOnly,
SameSite=Strict cookie that expires after :data:`COOKIE_MAX_AGE_S` (``Secure`` when the dashboard
is served over TLS) and redirects to the same page without it (so it stays out of the address
bar and history). The redirect only ever goes to a path of this server (:func:`same_origin_path`):
``//evil.example/x?token=...`` lands on ``/evil.example/x`` here, never on another site. Scripts
send ``Authorization: Bearer TOKEN`` instead.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse

COOKIE = "fleetlora_dashboard"
COOKIE_MAX_AGE_S = 12 * 3600  # a working day: then the operator opens the printed address again
REFUSED = (
    "401: this dashboard needs its token. Open the address `fleetlora dashboard` printed "
    "(http://HOST:PORT/?token=...), or send the header 'Authorization: Bearer <token>'.\n"
)
HEADERS = {
    # no inline script or style, nothing from elsewhere: data can only ever be text
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def new_token() -> str:
    """Return a fresh random token (192 bits, URL-safe)."""
    return secrets.token_urlsafe(24)


def require_token(app: FastAPI, token: str, *, secure: bool = False) -> None:
    """Refuse every request to ``app`` that does not carry ``token``; add the security headers to every reply.

    ``secure``: the app is served over TLS, so the cookie is marked ``Secure`` (never sent over
    plain HTTP). It is the server's setting, not the request's scheme, which a proxy header
    could claim.
    """
    if len(token) < 16:
        raise ValueError("the dashboard token must be at least 16 characters")

    @app.middleware("http")
    async def _check(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        given = request.query_params.get("token")
        if given is not None:
            response = _login(request, given, token, secure)
        elif _matches(request.cookies.get(COOKIE) or _bearer(request), token):
            response = await call_next(request)
        else:
            response = _refuse(request)
        response.headers.update(HEADERS)
        return response


def same_origin_path(path: str) -> str:
    """Return ``path`` as a redirect target that can only name a path on this server.

    Browsers read ``//host/x`` (and ``/<backslash>host``, ``/<tab>/host``: they take a backslash for a
    slash and drop tabs and newlines) as another site. Everything but unreserved characters and
    ``/`` is percent-encoded, so no backslash, control character or ``:`` is left to reinterpret;
    then the leading slashes collapse to one: the result is ``/`` followed by anything but ``/``.
    """
    return "/" + quote(path, safe="/").lstrip("/")


def _login(request: Request, given: str, token: str, secure: bool) -> Response:
    """Trade a right ``?token=`` for the cookie and redirect to the same page of this server without it."""
    if not _matches(given, token):
        return _refuse(request)
    query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
    response = RedirectResponse(same_origin_path(request.url.path) + (f"?{query}" if query else ""), status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=COOKIE_MAX_AGE_S,
        expires=COOKIE_MAX_AGE_S,  # Max-Age for current browsers, Expires for the rest
        path="/",
        secure=secure,
        httponly=True,
        samesite="strict",
    )
    return response


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _matches(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def _refuse(request: Request) -> Response:
    headers = {"WWW-Authenticate": "Bearer"}
    if request.url.path.startswith("/api/"):
        return JSONResponse({"detail": REFUSED.strip()}, status_code=401, headers=headers)
    return PlainTextResponse(REFUSED, status_code=401, headers=headers)
