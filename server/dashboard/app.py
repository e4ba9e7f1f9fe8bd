"""The dashboard's FastAPI app: three pages and the read-only JSON API behind them.

Pages (one HTML shell; ``static/dashboard.js`` renders each from the API and polls it)::

    /                          runs, newest first
    /runs/{run_id}             a run: held-out loss, bytes, participation per round; privacy (DP runs); rejections
    /runs/{run_id}/rounds/{n}  a round: client results, aggregation settings, signed release

API (JSON)::

    GET /api/runs                          {"runs": [...]}
    GET /api/runs/{run_id}                 {"run", "rounds", "clients", "rejections"}
    GET /api/runs/{run_id}/rounds/{n}      {"run", "aggregation", "round", "clients", "release"}

Only GET routes exist: nothing here writes the store, which is opened read-only besides. A store
that cannot be read (missing, another schema, locked too long) is a 503 that says why; every
row is parsed by ``server/state/rows.py``, so a damaged or hostile row never makes a 500.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError

from server.dashboard.auth import require_token
from server.dashboard.reader import StoreReader
from server.state import StateStoreError
from server.state.queries import list_runs, round_view, run_view
from server.state.values import MAX_ID, MAX_ROUND
from shared.files import read_bounded
from shared.manifest import MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES, parse
from shared.release import MANIFEST, SIGNATURE

STATIC = Path(__file__).with_name("static")
RunId = Annotated[str, PathParam(max_length=MAX_ID)]
Round = Annotated[int, PathParam(ge=0, le=MAX_ROUND)]


class SafeJSON(JSONResponse):
    """JSON as plain ASCII: a lone surrogate in a string is escaped, not an encoding error; NaN is refused."""

    def render(self, content: Any) -> bytes:
        """Return ``content`` as compact ASCII JSON."""
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def create_app(reader: StoreReader, token: str, *, secure: bool = False) -> FastAPI:
    """Build the dashboard over ``reader``; every request must carry ``token`` (see ``auth.py``).

    ``secure``: it is served over TLS (the login cookie is then ``Secure``).
    """
    app = FastAPI(title="fleetlora dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    require_token(app, token, secure=secure)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    for path in ("/", "/runs/{run_id}", "/runs/{run_id}/rounds/{server_round}"):
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/favicon.ico", lambda: Response(status_code=204), methods=["GET"], include_in_schema=False)

    @app.exception_handler(StateStoreError)
    def _unreadable(_request: Request, exc: StateStoreError) -> SafeJSON:
        return SafeJSON({"detail": f"the state store cannot be read: {exc}"}, status_code=503)

    @app.exception_handler(SQLAlchemyError)
    def _failed(_request: Request, exc: SQLAlchemyError) -> SafeJSON:
        reason = getattr(exc, "orig", None) or exc  # e.g. locked by a writer for longer than the busy timeout
        return SafeJSON({"detail": f"the state store could not be read ({reason}); retrying"}, status_code=503)

    @app.get("/api/runs")
    def runs() -> SafeJSON:
        with reader.read() as conn:
            return SafeJSON({"runs": list_runs(conn)})

    @app.get("/api/runs/{run_id}")
    def run(run_id: RunId) -> SafeJSON:
        with reader.read() as conn:
            view = run_view(conn, run_id)
        if view is None:
            raise HTTPException(404, f"no run '{run_id}' in the state store")
        return SafeJSON(view)

    @app.get("/api/runs/{run_id}/rounds/{server_round}")
    def round_(run_id: RunId, server_round: Round) -> SafeJSON:
        with reader.read() as conn:
            view = round_view(conn, run_id, server_round)
        if view is None:
            raise HTTPException(404, f"no round {server_round} of run '{run_id}' in the state store")
        rec = view["round"]
        return SafeJSON({**view, "release": release_details(rec["release_path"], rec["manifest_digest"])})

    return app


def release_details(folder: str | None, digest: str | None) -> dict[str, Any] | None:
    """Read a round's signed release from its folder: manifest fields, signature, whether the digest matches.

    Returns None when the round recorded no release; ``{"error": ...}`` when the folder cannot
    be read here (the dashboard may run on another machine than the releases) or holds no
    readable release. The folder is named by a database row: each file is read only if it is a
    regular file, and never beyond its bound.
    """
    if not folder:
        return None
    try:
        data = read_bounded(Path(folder) / MANIFEST, MAX_MANIFEST_BYTES)
        signature = read_bounded(Path(folder) / SIGNATURE, MAX_SIGNATURE_BYTES)
        manifest = parse(data)
    except Exception as exc:  # noqa: BLE001 - hostile files: whatever the parser raises is a refusal, not a 500
        return {"folder": folder, "error": f"cannot read the release: {exc}"}
    return {
        "folder": folder,
        "manifest": {k: getattr(manifest, k) for k in ("kind", "run_id", "round", "base_digest", "method", "created")}
        | {"key_id": manifest.key_id, "previous": manifest.previous, "files": dict(manifest.files)},
        "signature": signature.hex(),
        "digest_matches": manifest.digest() == digest,
    }
