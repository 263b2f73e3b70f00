"""The plaintext coverage report (issue 13.3): every process that opened a CRM
connection in the last 24 h, its TLS stack, and whether it is inspected (and why
not). Reader access."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from leaktap.controller.api.deps import AgentDep, ReaderDep

router = APIRouter(prefix="/v1/coverage", tags=["coverage"])


@router.get("")
def read_coverage(agent: AgentDep, _: ReaderDep) -> dict[str, Any]:
    tracker = getattr(agent, "coverage", None)
    return {"processes": tracker.report() if tracker is not None else []}
