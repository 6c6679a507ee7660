"""Profile the server under the unique-question /ask load with py-spy (a developer tool, not a requirement).

    .venv/bin/pip install py-spy          # once, into your own venv
    python -m bench.profile --duration 20 --concurrency 32

Starts the real server as `python -m bench.run` does, drives POST /ask with unique questions (or
`--mode repeated`: cached ones; `--mode health`: GET /health; `--mode sse` / `--mode websocket`: unique
questions answered as a stream) at the given concurrency, records the
server with `py-spy record --threads` meanwhile, and prints where the sampled time went: per thread,
per package of the innermost frame, and the hottest frames. The raw collapsed stacks go to
bench/results/profile-raw.txt (open them in speedscope or flamegraph.pl).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.loadgen import (
    AskWorker,
    HealthWorker,
    QuestionPool,
    SSEWorker,
    WebSocketWorker,
    Worker,
    closed_loop,
    http_client,
)
from bench.run import QUESTIONS_FILE, seed_index, store_index
from bench.server import BenchServer

RESULTS = Path(__file__).resolve().parent / "results"
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def package_of(path: str) -> str:
    """site-packages/<pkg>/... -> pkg; the project's own files -> their top-level module."""
    marker = "site-packages/"
    if marker in path:
        return path.split(marker, 1)[1].split("/", 1)[0]
    parts = Path(path).parts
    for anchor in ("agents", "api", "services", "middleware", "infrastructure"):
        if anchor in parts:
            return f"project:{anchor}/{parts[-1]}"
    if "python3" in path or path.startswith("<"):
        return "stdlib:" + Path(path).name
    return Path(path).name


def summarize(raw: Path, top: int = 25) -> str:
    """Per thread, per innermost package, and hottest frames, as shares of all samples."""
    by_thread: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    by_project_frame: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        total += count
        thread_name = re.sub(r"\(?0x[0-9a-f]+\)?|\s+\d+$", "", thread).strip()
        thread_name = re.sub(r"_\d+$", "", thread_name)
        by_thread[thread_name or thread] += count
        if not frames:
            continue
        leaf = _FRAME.match(frames[-1])
        if leaf:
            by_package[package_of(leaf["file"])] += count
            by_leaf[f"{leaf['function']} ({Path(leaf['file']).name}:{leaf['line']})"] += count
        for frame in reversed(frames):  # innermost frame of the project's own code
            match = _FRAME.match(frame)
            if match and package_of(match["file"]).startswith("project:"):
                by_project_frame[f"{match['function']} ({package_of(match['file'])[8:]}:{match['line']})"] += count
                break
        else:
            by_project_frame["(no project frame: server, framework or idle loop)"] += count

    def table(title: str, counter: Counter[str]) -> list[str]:
        lines = [f"\n{title}", "-" * len(title)]
        for name, count in counter.most_common(top):
            lines.append(f"{100 * count / total:6.1f}%  {name}")
        return lines

    out = [f"{total} samples"]
    out += table("by thread", by_thread)
    out += table("by package of the innermost frame", by_package)
    out += table("by innermost frame of the project's own code", by_project_frame)
    out += table("hottest innermost frames", by_leaf)
    return "\n".join(out)


async def drive(base_url: str, pool: QuestionPool, concurrency: int, duration: float, mode: str = "unique") -> None:
    """Closed-loop load of `mode` (unique or repeated /ask, /health, SSE or WebSocket answers) for `duration` s."""
    async with http_client(base_url, concurrency) as client:

        def worker() -> Worker:
            if mode == "health":
                return HealthWorker(client)
            if mode == "sse":
                return SSEWorker(client, pool.take)
            if mode == "websocket":
                return WebSocketWorker(base_url.replace("http", "ws", 1) + "/ws/ask", pool.take)
            return AskWorker(client, pool.take)

        outcome = await closed_loop(worker, concurrency, duration, 10**9)
    figures = outcome.to_json()
    latency = figures["latency_ms"].get("latency") or figures["latency_ms"].get("complete") or {}
    print(
        f"load: {figures['completed']} answers in {figures['elapsed_s']} s = {figures['throughput_per_s']} /s, "
        f"p50 {latency.get('p50')} ms, errors {figures['errors']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="also sample native frames (onnxruntime)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument(
        "--mode",
        choices=["unique", "repeated", "health", "sse", "websocket"],
        default="unique",
        help="POST /ask with unique questions, with 32 questions over and over (cache hits), GET /health, "
        "or unique questions answered over SSE (/ask-stream) or a WebSocket (/ws/ask)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "profile-raw.txt")
    args = parser.parse_args(argv)
    executable = py_spy()
    if executable is None:
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    questions = [line.strip() for line in QUESTIONS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    pool = QuestionPool(questions[::-1])  # from the end of the file: another slice than bench.run's start
    work = Path(tempfile.mkdtemp(prefix="defi-profile-"))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    try:
        cache_dir = work / "cache"
        cache_dir.mkdir()
        seed_index(cache_dir)
        extra_env = dict(item.split("=", 1) for item in args.server_env)
        with BenchServer(cache_dir, work / "server.log", extra_env) as server:
            print(f"server ready in {server.start_and_wait():.2f} s (pid {server.pid})")
            store_index(cache_dir)
            if args.mode == "repeated":
                pool = QuestionPool(pool.take_many(32))
                asyncio.run(drive(server.base_url, pool, args.concurrency, 1.0))  # answered once: now cached
            command = [
                executable,
                "record",
                "--pid",
                str(server.pid),
                "--duration",
                str(int(args.duration)),
                "--rate",
                str(args.rate),
                "--threads",
                "--format",
                "raw",
                "--output",
                str(args.output),
                "--nonblocking",
            ]
            if args.native:
                command.append("--native")
            recorder = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            time.sleep(0.5)
            asyncio.run(drive(server.base_url, pool, args.concurrency, args.duration + 1.0, args.mode))
            output, _ = recorder.communicate(timeout=60)
            if recorder.returncode != 0:
                print(output.decode(errors="replace"), file=sys.stderr)
                return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(args.output)
    args.output.with_name("profile-summary.txt").write_text(summary + "\n", encoding="utf-8")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
