"""The knowledge base from the command line, for datasets kept in git and deployed from CI.

    python -m scripts.kb validate FILE               # offline: every problem, entries due for review
    python -m scripts.kb validate FILE --url URL     # the server's full check: diff, warnings, eval figures
    python -m scripts.kb diff FILE --url URL         # what would change on that server
    python -m scripts.kb push FILE --url URL [--require-eval]

The token is read from `--token` or the ADMIN_TOKEN environment variable. Exit codes: 0 done, 1 the
dataset has problems or the server refused it, 2 the server could not be reached or refused the token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from config import get_settings
from services.knowledge_base import check_dataset, stale_entries

TIMEOUT_SECONDS = 300.0  # a replace fits a new index when many entries changed


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m scripts.kb", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("validate", "diff", "push"))
    parser.add_argument("file", type=Path)
    parser.add_argument("--url", help="the service's base URL, e.g. https://defi.example.com")
    parser.add_argument("--token", default=os.environ.get("ADMIN_TOKEN"), help="ADMIN_TOKEN (default: from env)")
    parser.add_argument("--require-eval", action="store_true", help="push: refuse a change that lowers hit@1")
    args = parser.parse_args(argv)
    try:
        raw = args.file.read_bytes()
    except OSError as error:
        print(f"cannot read {args.file}: {error.strerror or error}", file=sys.stderr)
        return 1
    if args.command != "validate" and not args.url:
        parser.error(f"{args.command} needs --url")
    if args.url is None:
        return validate_offline(raw, str(args.file))
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    with httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=TIMEOUT_SECONDS) as client:
        try:
            if args.command == "push":
                params = {"require_eval": "true"} if args.require_eval else {}
                response = client.post("/admin/knowledge-base", content=raw, params=params)
            else:
                response = client.post("/admin/knowledge-base/validate", content=raw)
        except httpx.HTTPError as error:
            print(f"cannot reach {args.url}: {error}", file=sys.stderr)
            return 2
    return report(args.command, response)


def validate_offline(raw: bytes, source: str) -> int:
    """Check the file without a server: the same per-entry rules the server applies."""
    knowledge_base, problems = check_dataset(raw, source)
    for problem in problems:
        print(f"error  {problem}")
    if knowledge_base is None:
        print(f"{len(problems)} problem(s); the server would refuse this dataset")
        return 1
    max_days = get_settings().kb_review_max_days
    stale = stale_entries(knowledge_base, max_days)
    for entry in stale:
        reviewed = entry["reviewed"] or "never"
        print(f"review {entry['entry']}: has figures, last reviewed {reviewed} (KB_REVIEW_MAX_DAYS={max_days})")
    print(f"ok: {len(knowledge_base)} entries, {len(stale)} due for review")
    return 0


def report(command: str, response: httpx.Response) -> int:
    """Print the server's answer for people; the exit code."""
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        print(f"HTTP {response.status_code}: {response.text[:300]}", file=sys.stderr)
        return 2
    if response.status_code in (401, 403):
        print(f"HTTP {response.status_code}: {body.get('detail')}", file=sys.stderr)
        return 2
    if response.status_code != 200:
        print(f"refused ({response.status_code} {body.get('reason')}): {body.get('detail')}")
        for problem in body.get("errors", []):
            print(f"error  {problem['entry']}: {problem['field']}: {problem['message']}")
        if "eval" in body:
            print(json.dumps(body["eval"], indent=2))
        return 1
    if command == "push":
        print(f"live: version {body['version']} ({body['entries']} entries, checksum {body['checksum'][:12]})")
        return 0
    for problem in body.get("errors", []):
        print(f"error  {problem['entry']}: {problem['field']}: {problem['message']}")
    diff = body.get("diff") or {}
    for kind in ("added", "changed", "removed"):
        for entry_id in diff.get(kind, []):
            print(f"{kind:8} {entry_id}")
    if command == "validate":
        for warning in body.get("warnings", []):
            print(f"warning {warning['entry']}: {warning['message']}")
        for entry in body.get("stale_entries", []):
            print(f"review  {entry['entry']}: last reviewed {entry['reviewed'] or 'never'}")
        if body.get("eval"):
            live, proposed = body["eval"]["live"], body["eval"]["proposed"]
            for name in ("hit@1", "hit@3", "decline_accuracy"):
                print(f"{name:17} live {live[name]:.4f}  proposed {proposed[name]:.4f}")
    return 0 if body.get("valid", True) else 1


if __name__ == "__main__":
    sys.exit(main())
