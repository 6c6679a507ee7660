"""Print the insights report in a terminal: `python -m scripts.insights [--days N] [--database-url URL]`.

The same tables as `GET /admin/insights`, read from the question log's database (the configured one, or
`--database-url`), with declined questions grouped by the same embedder the service uses. Works offline.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import textwrap
from typing import Any

from bootstrap import build_core, build_insights, open_database, stop_services
from config import get_settings, normalize_database_url
from infrastructure.logging import configure_logging
from services.insights import TABLE_COLUMNS, TABLES, InsightsReport
from services.knowledge_base import load_knowledge_base

CELL_MAX = 60


def render_table(title: str, columns: tuple[str, ...], rows: list[dict[str, Any]], width: int) -> str:
    """A plain-text table: a title, a header, a rule and one line per row (long cells shortened)."""
    if not rows:
        return f"{title}\n  (none)\n"
    cell_max = max(12, min(CELL_MAX, width // max(len(columns), 1)))
    cells = [[_cell(row.get(column), cell_max) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[index]) for line in cells)) for index, column in enumerate(columns)]
    lines = [title, "  ".join(column.ljust(size) for column, size in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * size for size in widths))
    lines += ["  ".join(value.ljust(size) for value, size in zip(line, widths, strict=True)).rstrip() for line in cells]
    return "\n".join(lines) + "\n"


def _cell(value: Any, limit: int) -> str:
    text = "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
    return textwrap.shorten(text, limit, placeholder="…") if len(text) > limit else text


def render(report: InsightsReport, width: int) -> str:
    """Every table of the report, with a one-line summary first."""
    totals = report.totals()
    share = "–" if totals["answered_share"] is None else f"{totals['answered_share'] * 100:.1f} %"
    head = (
        f"Insights for the last {report.days} days (since {report.since:%Y-%m-%d %H:%M} UTC): "
        f"{totals['questions']} questions, answered {share}, {totals['no_match']} declined; "
        f"knowledge base v{report.kb_version}, threshold {report.similarity_threshold}\n"
    )
    tables = [head]
    for name in TABLES:
        rows = report.table(name)
        if name == "answer_rate":
            rows = [row for row in rows if row["questions"]]  # empty hours and days add nothing in a terminal
        tables.append(render_table(f"== {name} ({len(rows)}) ==", TABLE_COLUMNS[name], rows, width))
    return "\n".join(tables)


async def run(days: int, database_url: str | None) -> str:
    """Build the embedder, the knowledge base and the database as a serving process does, and render the report."""
    settings = get_settings()
    if database_url is not None:
        settings = settings.model_copy(update={"database_url": normalize_database_url(database_url)})
    configure_logging("WARNING", True, None, settings.log_question_max_chars)
    database = await open_database(settings)
    try:
        services = await build_core(settings, load_knowledge_base(settings.dataset_path))
        try:
            report = await build_insights(settings, services, database).report(days)
        finally:
            await stop_services(services)
    finally:
        await database.close()
    return render(report, shutil.get_terminal_size((160, 40)).columns)


def main() -> None:
    """Parse the arguments and print the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=7, choices=range(1, 366), metavar="N", help="1-365 (default 7)")
    parser.add_argument("--database-url", help="the database to read (default: DATABASE_URL, or the cache's SQLite)")
    args = parser.parse_args()
    print(asyncio.run(run(args.days, args.database_url)))


if __name__ == "__main__":
    main()
