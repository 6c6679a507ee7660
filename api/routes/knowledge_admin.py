"""The live knowledge base's admin API: status, versions, validate, replace, edit one entry, roll back.

Reading needs the ADMIN_TOKEN bearer when one is set (as /dashboard). Changing (and validating, which
builds a whole index) needs ADMIN_TOKEN to be set at all: without one these endpoints answer 403.
Bodies may be up to ADMIN_MAX_BODY_BYTES (a whole dataset), not MAX_BODY_BYTES. A refused change raises
ChangeRefusedError, answered in the error format by middleware/errors.py.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import ValidationError

from api.deps import AdminOnly, KnowledgeManagerDep, require_admin
from api.schemas import documented_errors
from config import Settings
from middleware.errors import describe_validation
from services.knowledge_admin import ChangeRefusedError
from services.knowledge_base import Entry
from services.knowledge_versions import KnowledgeVersion

router = APIRouter(prefix="/admin/knowledge-base", tags=["knowledge base"])

_ERRORS = documented_errors(
    {
        401: "ADMIN_TOKEN is set and the bearer token is missing or wrong",
        403: "ADMIN_TOKEN is not set: the knowledge base cannot be changed",
        404: "No such entry or version",
        409: "The change leaves the knowledge base as it is",
        413: "Body over ADMIN_MAX_BODY_BYTES",
        422: "Invalid dataset or entry (per-entry `errors`), or eval regression",
        503: "The database cannot be reached",
    }
)
RequireEval = Annotated[
    bool, Query(description="Refuse the change when hit@1 on data/eval_questions.json falls by more than 0.02.")
]


async def require_admin_change(request: Request) -> None:
    """Changes need ADMIN_TOKEN to be configured (403 otherwise) and presented (401)."""
    settings: Settings = request.app.state.settings
    if settings.admin_token is None:
        raise HTTPException(403, "Set ADMIN_TOKEN to change the knowledge base over the API")
    await require_admin(request)


AdminChange = Depends(require_admin_change)


def _changed(record: KnowledgeVersion) -> dict[str, Any]:
    return {"status": "live", **record.to_wire()}


@router.get("", dependencies=[AdminOnly], responses=_ERRORS)
async def knowledge_base_status(manager: KnowledgeManagerDep) -> dict[str, Any]:
    """The live version: number, entries, checksum, when and from what it was loaded, entries due for review."""
    return manager.status()


@router.get("/versions", dependencies=[AdminOnly], responses=_ERRORS)
async def knowledge_base_versions(
    manager: KnowledgeManagerDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    """Stored versions, newest first."""
    return {"versions": [record.to_wire() for record in await manager.history(limit)]}


@router.post("/validate", dependencies=[AdminChange], responses=_ERRORS)
async def validate_dataset(request: Request, manager: KnowledgeManagerDep) -> dict[str, Any]:
    """Check a whole dataset (the data/knowledge_base.json format) against the live one; changes nothing."""
    report = await manager.validate(await request.body())
    return report.to_wire()


@router.post("", dependencies=[AdminChange], responses=_ERRORS)
async def replace_dataset(request: Request, manager: KnowledgeManagerDep, require_eval: RequireEval = False) -> Any:
    """Replace the whole dataset: validated, only new phrasings embedded, then swapped in atomically."""
    return _changed(await manager.replace(await request.body(), require_eval=require_eval))


@router.put("/entries/{entry_id}", dependencies=[AdminChange], responses=_ERRORS)
async def put_entry(
    request: Request,
    manager: KnowledgeManagerDep,
    entry_id: Annotated[str, Path(max_length=80)],
    require_eval: RequireEval = False,
) -> Any:
    """Add the entry, or replace the one with this id (the body's `id`, when given, must match)."""
    try:
        body = await request.json()
    except ValueError:
        raise ChangeRefusedError(422, "Body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise ChangeRefusedError(422, "Body must be one entry (a JSON object)", "invalid_body")
    if body.setdefault("id", entry_id) != entry_id:
        raise ChangeRefusedError(
            422, f"The body's id {body['id']!r} is not the id in the path {entry_id!r}", "id_mismatch"
        )
    try:
        entry = Entry.model_validate(body)
    except ValidationError as error:
        detail, _ = describe_validation(error.errors())
        errors = [
            {"entry": entry_id, "field": ".".join(str(part) for part in item["loc"]), "message": item["msg"]}
            for item in error.errors()
        ]
        raise ChangeRefusedError(422, detail, "entry_invalid", errors=errors) from None
    return _changed(await manager.put_entry(entry, require_eval=require_eval))


@router.delete("/entries/{entry_id}", dependencies=[AdminChange], responses=_ERRORS)
async def delete_entry(
    manager: KnowledgeManagerDep, entry_id: Annotated[str, Path(max_length=80)], require_eval: RequireEval = False
) -> Any:
    """Remove one entry; its questions are declined (or answered by another entry) from then on."""
    return _changed(await manager.delete_entry(entry_id, require_eval=require_eval))


@router.post("/rollback/{version}", dependencies=[AdminChange], responses=_ERRORS)
async def rollback(
    manager: KnowledgeManagerDep, version: Annotated[int, Path(ge=1)], require_eval: RequireEval = False
) -> Any:
    """Make an earlier version's dataset live again (stored as a new version)."""
    return _changed(await manager.rollback(version, require_eval=require_eval))
