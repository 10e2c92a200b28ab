"""``/docs`` without a CDN, for every HTTP app of the project (the orchestrator, the worker's serve app).

FastAPI's own ``/docs`` page loads Swagger UI's script and stylesheet from a CDN, which an operator's
private network or an air-gapped GPU box cannot reach: the page stays blank. The ``fastapi-offline``
package ships those files; this mounts them from the installed package and serves ``/docs`` and
``/openapi.json`` pointing at them. Create the app with ``docs_url=None, redoc_url=None`` and call
:func:`install_offline_docs` once."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_PATH = "/docs-assets"


def swagger_assets_dir() -> Path:
    """The folder of Swagger UI's files inside the installed ``fastapi_offline`` package."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the fastapi-offline package (Swagger UI files for /docs) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    if not (folder / "swagger-ui-bundle.js").is_file():
        raise RuntimeError(f"{folder} lacks swagger-ui-bundle.js")
    return folder


def install_offline_docs(app: FastAPI, docs_url: str = "/docs") -> None:
    """Serve ``docs_url`` (Swagger UI) from local files; the schema stays at ``app.openapi_url``."""
    app.mount(ASSETS_PATH, StaticFiles(directory=swagger_assets_dir()), name="docs-assets")
    title = f"{app.title} — API"

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=title,
                                   swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS_PATH}/favicon.png")
