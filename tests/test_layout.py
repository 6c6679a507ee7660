"""The layout's rules, checked on the source: imports flow one way, and only the composition root builds services."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lower rank = higher layer; a module may import its own layer and any layer below (higher rank).
LAYERS = {"main": 0, "bootstrap": 0, "api": 1, "middleware": 1, "agents": 2, "services": 3, "infrastructure": 4}
SERVICES = {
    "DeFiAgent",
    "EmbeddingService",
    "LocalMiniLMProvider",
    "OpenAIProvider",
    "MemorySessionStore",
    "RedisSessionStore",
    "AnswerGenerator",
    "AnswerCache",
    "LiveKnowledge",
    "QuestionRateLimiter",
    "Database",
    "QuestionLog",
    "FeedbackStore",
    "Insights",
    "KnowledgeManager",
    "KnowledgeVersions",
    "MemoryCache",
    "DiskCache",
    "SharedCache",
    "SystemSampler",
    "Monitoring",
    "create_redis",
}
ALLOWED_BUILDERS = {"main", "bootstrap"}


def _modules() -> list[Path]:
    files = [ROOT / "main.py", ROOT / "bootstrap.py"]
    for package in ("api", "middleware", "agents", "services", "infrastructure"):
        files.extend(sorted((ROOT / package).rglob("*.py")))
    return files


def _layer(path: Path) -> str:
    relative = path.relative_to(ROOT)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
    return names


@pytest.mark.parametrize("path", _modules(), ids=lambda path: str(path.relative_to(ROOT)))
def test_imports_flow_one_way(path: Path) -> None:
    layer = _layer(path)
    tree = ast.parse(path.read_text())
    upward = sorted(name for name in _imported(tree) if name in LAYERS and LAYERS[name] < LAYERS[layer])
    assert not upward, f"{path.relative_to(ROOT)} ({layer}) imports from a layer above it: {upward}"


def test_only_the_composition_root_constructs_services() -> None:
    """The command-line scripts too build their services through bootstrap.py (the bench's provider baseline,
    which measures the bare model, is the one deliberate exception and lives outside these folders)."""
    offenders = []
    for path in _modules() + sorted((ROOT / "scripts").glob("*.py")):
        if _layer(path) in ALLOWED_BUILDERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SERVICES:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id}()")
    assert not offenders, offenders
    # The rule is live: the root does build them.
    root_calls = {
        node.func.id
        for node in ast.walk(ast.parse((ROOT / "bootstrap.py").read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert {"DeFiAgent", "EmbeddingService", "LiveKnowledge", "KnowledgeManager", "QuestionLog"} <= root_calls
