"""The agent's FastAPI application; the lifespan starts and stops the probes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from leaktap.controller.api.cache import ResponseCache
from leaktap.controller.api.deps import ReaderDep, credential_role
from leaktap.controller.api.guard import RequestGuard
from leaktap.controller.api.routes import (
    alerts,
    audit,
    canaries,
    config,
    coverage,
    dataflows,
    fingerprints,
    flows,
    health,
    metrics,
    session,
    sinks,
    stats,
    tenants,
    ui,
)
from leaktap.controller.api.sessions import SessionStore

logger = logging.getLogger(__name__)


def create_app(agent: Any, readers: list[str], admins: list[str], manage: bool = True) -> FastAPI:
    """`manage`: the app's lifespan starts and stops the agent (False in tests that do it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage:
            try:
                # pyroute2's sync API refuses to run inside an event loop
                await asyncio.to_thread(agent.start)
            except Exception as e:
                app.state.startup_error = e
                logger.error("agent failed to start: %s", e)
                raise
        try:
            yield
        finally:
            if manage:
                await asyncio.to_thread(agent.stop)

    # the schema and its UI need a reader token too: only /healthz is open
    app = FastAPI(title="leaktap", version="0.1.0", lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/openapi.json", include_in_schema=False)
    def read_openapi(_: ReaderDep) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def read_docs(_: ReaderDep) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="leaktap API")

    app.state.agent = agent
    app.state.response_cache = ResponseCache()
    app.state.reader_tokens = list(readers)
    app.state.admin_tokens = list(admins)
    app.state.sessions = SessionStore()
    # before anything reads a body: credentials first, then a capped body
    app.add_middleware(RequestGuard, role_of=credential_role)
    app.include_router(health.router)
    app.include_router(flows.router)
    app.include_router(tenants.router)
    app.include_router(alerts.router)
    app.include_router(audit.router)
    app.include_router(dataflows.router)
    app.include_router(sinks.router)
    app.include_router(canaries.router)
    app.include_router(config.router)
    app.include_router(coverage.router)
    app.include_router(fingerprints.router)
    app.include_router(metrics.router)
    app.include_router(stats.router)
    app.include_router(session.router)
    app.include_router(ui.router)
    return app
