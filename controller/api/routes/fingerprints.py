"""Fingerprint sets (exact data match, issue 15): upload (admin), list (reader),
remove (admin). The upload's body is the export itself (CSV with a header row, or
JSONL); only keyed hashes of its values are kept, and the running agent's
inspector picks the change up within a second (FingerprintWatcher)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from starlette.concurrency import run_in_threadpool

from leaktap.controller.api.deps import AdminDep, AgentDep, ReaderDep
from leaktap.controller.fingerprint_store import (
    FingerprintError,
    FingerprintStore,
    build_set,
    check_name,
    detect_format,
    open_text,
)

router = APIRouter(prefix="/v1/fingerprints", tags=["fingerprints"])

Name = Annotated[str, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


def _matcher(agent: Any) -> Any:
    plaintext = getattr(agent, "plaintext", None)
    if plaintext is None:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            "plaintext inspection is not enabled (plaintext.enabled)")
    return plaintext.inspector.fingerprints


def _build(agent: Any, body: bytes, tenant: str, name: str, columns: list[str] | None,
           min_matches: int, fmt: str) -> dict[str, Any]:
    hasher = _matcher(agent).hasher  # the agent's own key: the set loads here
    cols, arrays, stats = build_set(hasher, open_text(body), "upload", fmt, columns)
    with FingerprintStore(agent.store.path) as store:
        return store.add(tenant, name, cols, min_matches, arrays, stats,
                         hasher.key_id).public()


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_fingerprint_set(request: Request, agent: AgentDep, _: AdminDep,
                                 tenant: Name, name: Name,
                                 columns: Annotated[str | None, Query(max_length=2048)] = None,
                                 min_matches: Annotated[int, Query(ge=1, le=1000)] = 3,
                                 format: Annotated[str | None,  # noqa: A002 - the query name
                                                   Query(pattern="^(csv|jsonl)$")] = None,
                                 ) -> dict[str, Any]:
    known = {t.name for t in agent.config.tenants}
    if known and tenant not in known:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"no tenant named {tenant}")
    body = await request.body()
    if not body:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "empty body: send the export")
    content_type = request.headers.get("content-type", "")
    fmt = format or ("jsonl" if "json" in content_type else "csv" if "csv" in content_type
                     else detect_format("", body[:64].decode("utf-8", "replace")))
    wanted = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    try:
        check_name("tenant", tenant)
        return await run_in_threadpool(_build, agent, body, tenant, name, wanted, min_matches,
                                       fmt)
    except FingerprintError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from e


@router.get("")
def read_fingerprint_sets(agent: AgentDep, _: ReaderDep) -> dict[str, Any]:
    with FingerprintStore(agent.store.path) as store:
        sets = [r.public() for r in store.sets()]
        generation = store.generation()
    watcher = getattr(agent, "fingerprints", None)
    return {"sets": sets, "generation": generation,
            "loaded_generation": watcher.loaded_generation if watcher is not None else None,
            "problems": list(watcher.problems) if watcher is not None else []}


@router.delete("/{tenant}/{name}")
def delete_fingerprint_set(tenant: str, name: str, agent: AgentDep,
                           _: AdminDep) -> dict[str, str]:
    with FingerprintStore(agent.store.path) as store:
        if not store.remove(tenant, name):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no fingerprint set {tenant}/{name}")
    return {"status": "removed", "set": f"{tenant}/{name}"}
