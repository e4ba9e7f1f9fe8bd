"""The dashboard's FastAPI app: three pages and the read-only JSON API behind them.

Pages (one HTML shell; ``static/dashboard.js`` renders each from the API and polls it)::

    /                          runs, newest first
    /runs/{run_id}             a run: held-out loss, bytes, participation per round; rejections
    /runs/{run_id}/rounds/{n}  a round: client results, aggregation settings, signed release

API (JSON)::

    GET /api/runs                          {"runs": [...]}
    GET /api/runs/{run_id}                 {"run", "rounds", "clients", "rejections"}
    GET /api/runs/{run_id}/rounds/{n}      {"run", "aggregation", "round", "clients", "release"}

Only GET routes exist: nothing here writes the store, which is opened read-only besides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from server.dashboard.auth import require_token
from server.state import StateStore
from server.state.queries import list_runs, round_view, run_view
from shared.manifest import MAX_MANIFEST_BYTES, ManifestError, parse
from shared.release import MANIFEST, SIGNATURE

STATIC = Path(__file__).with_name("static")


def create_app(store: StateStore, token: str) -> FastAPI:
    """Build the dashboard over ``store``; every request must carry ``token`` (see ``auth.py``)."""
    app = FastAPI(title="fleetlora dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    require_token(app, token)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    for path in ("/", "/runs/{run_id}", "/runs/{run_id}/rounds/{server_round}"):
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/favicon.ico", lambda: Response(status_code=204), methods=["GET"], include_in_schema=False)

    @app.get("/api/runs")
    def runs() -> JSONResponse:
        with store.read() as conn:
            return _json({"runs": list_runs(conn)})

    @app.get("/api/runs/{run_id}")
    def run(run_id: str) -> JSONResponse:
        with store.read() as conn:
            view = run_view(conn, run_id)
        if view is None:
            raise HTTPException(404, f"no run '{run_id}' in the state store")
        return _json(view)

    @app.get("/api/runs/{run_id}/rounds/{server_round}")
    def round_(run_id: str, server_round: int) -> JSONResponse:
        with store.read() as conn:
            view = round_view(conn, run_id, server_round)
        if view is None:
            raise HTTPException(404, f"no round {server_round} of run '{run_id}' in the state store")
        rec = view["round"]
        return _json({**view, "release": release_details(rec["release_path"], rec["manifest_digest"])})

    return app


def release_details(folder: str | None, digest: str | None) -> dict[str, Any] | None:
    """Read a round's signed release from its folder: manifest fields, signature, whether the digest matches.

    Returns None when the round recorded no release; ``{"error": ...}`` when the folder cannot
    be read here (the dashboard may run on another machine than the releases).
    """
    if not folder:
        return None
    try:
        data = (Path(folder) / MANIFEST).read_bytes()[: MAX_MANIFEST_BYTES + 1]
        signature = (Path(folder) / SIGNATURE).read_bytes()[:1024]
        manifest = parse(data)
    except (OSError, ManifestError) as exc:
        return {"folder": folder, "error": f"cannot read the release: {exc}"}
    return {
        "folder": folder,
        "manifest": {k: getattr(manifest, k) for k in ("kind", "run_id", "round", "base_digest", "method", "created")}
        | {"key_id": manifest.key_id, "previous": manifest.previous, "files": dict(manifest.files)},
        "signature": signature.hex(),
        "digest_matches": manifest.digest() == digest,
    }


def _json(value: Any) -> JSONResponse:
    """JSON reply (SQLite keeps a NaN loss as NULL, so every float here is finite)."""
    return JSONResponse(value)
