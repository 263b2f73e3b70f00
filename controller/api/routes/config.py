"""POST /v1/config/reload: tenants, allow lists and enforcement from the config file,
into the running agent and its kernel maps (admin)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException

from leaktap.controller.api.deps import AdminDep, AgentDep
from leaktap.controller.errors import ConfigError

router = APIRouter(prefix="/v1/config", tags=["config"])


@router.post("/reload")
async def reload_config(agent: AgentDep, _: AdminDep) -> dict[str, Any]:
    """200 with what changed; 422 with the `FILE:LINE: key: ...` error, the running
    policy kept."""
    try:
        # re-reads a file and writes kernel maps: off the event loop
        summary: dict[str, Any] = await asyncio.to_thread(agent.reload_config)
    except ConfigError as e:
        raise HTTPException(422, str(e)) from e
    return {"status": "reloaded", "changes": summary}
