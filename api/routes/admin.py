"""Operator insights: `GET /admin/insights`, what users asked that the knowledge base lacks, and what they dispute."""

from __future__ import annotations

import csv
import io
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from api.deps import AdminPage, InsightsDep
from middleware.errors import error_response
from services.insights import TABLE_COLUMNS, TABLES, InsightsUnavailableError

# The same guard as /dashboard (ADMIN_TOKEN as a bearer header, or `?token=`), so the dashboard's panel can read it.
router = APIRouter(tags=["operations"], include_in_schema=False, dependencies=[AdminPage])

NO_STORE = {"Cache-Control": "no-store"}


@router.get("/admin/insights", response_model=None)
async def insights(
    service: InsightsDep,
    days: Annotated[int, Query(ge=1, le=365)] = 7,
    format: Literal["json", "csv"] = "json",
    table: str | None = None,
) -> Response:
    """The report for the last `days` days as JSON, or one of its tables as CSV (`?format=csv&table=<name>`)."""
    if format == "csv" and table not in TABLES:
        named = f"unknown table {table!r}; " if table else ""
        return error_response(422, f"format=csv needs table=<name>: {named}one of {', '.join(TABLES)}", "table_invalid")
    try:
        report = await service.report(days)
    except InsightsUnavailableError:
        return error_response(
            503,
            "Insights cannot be read right now: the database does not answer",
            "database_unavailable",
            headers={"Retry-After": "5"},
        )
    if format == "json":
        return JSONResponse(report.to_json(), headers=NO_STORE)
    assert table is not None
    return Response(
        content=to_csv(TABLE_COLUMNS[table], report.table(table)),
        media_type="text/csv; charset=utf-8",
        headers={**NO_STORE, "Content-Disposition": f'attachment; filename="insights-{table}-{days}d.csv"'},
    )


def to_csv(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    """Rows as CSV under a header line (empty cells for None)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
