"""Throughput of HTTP judge scoring: sequential vs chunks of 4 vs alignkit's concurrent client.

512 (prompt, response) pairs, a judge that takes 100 ms per request, one item per request.
The judge runs in its own process so the client's CPU time is measured alone. Prints figures;
asserts nothing. Run: ``.venv/bin/python bench/reward_api.py`` (about 4 minutes).

Two judges: a minimal asyncio one (``lean``: its own CPU cost is ~0.1 ms per request, so the
figures are the client's), and alignkit's FastAPI judge server (~1 ms of CPU per request,
which on a small machine shared with the client shows up in the wall time).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

from alignkit.rewards.api.client import build_api_reward
from alignkit.rewards.api.config import parse_reward_api

# A judge that only waits: HTTP/1.1 keep-alive, Content-Length bodies, {"scores": [1.0, ...]}.
LEAN_JUDGE = r"""
import asyncio, json, sys
port, latency = int(sys.argv[1]), float(sys.argv[2]) / 1000

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line[15:]) for line in head.split(b"\r\n") if line[:15].lower() == b"content-length:")
            items = json.loads(await reader.readexactly(length))["items"]
            await asyncio.sleep(latency)
            out = json.dumps({"scores": [1.0] * len(items)}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(out), out))
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_judge(kind: str, port: int, latency_ms: float) -> subprocess.Popen:
    if kind == "lean":
        cmd = [sys.executable, "-c", LEAN_JUDGE, str(port), str(latency_ms)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "alignkit.judge.server",
            "--port",
            str(port),
            "--latency-ms",
            str(latency_ms),
        ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    probe = {"items": [{"prompt": "p", "response": "r", "label": None}]}
    for _ in range(200):  # up to 20 s for the interpreter to start
        try:
            httpx.post(f"http://127.0.0.1:{port}/score", json=probe, timeout=5).raise_for_status()
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{kind} judge did not start")


def process_cpu_s(pid: int) -> float:
    """CPU time (user + system) of another process, from /proc; 0.0 where there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def body(p: str, r: str) -> dict:
    return {"items": [{"prompt": p, "response": r, "label": None}]}


def sequential(url: str, prompts: list[str], responses: list[str]) -> None:
    with httpx.Client(timeout=30) as client:
        for p, r in zip(prompts, responses, strict=True):
            client.post(url, json=body(p, r)).raise_for_status()


async def chunks_of_4(url: str, prompts: list[str], responses: list[str]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(0, len(prompts), 4):
            chunk = zip(prompts[i : i + 4], responses[i : i + 4], strict=True)
            replies = await asyncio.gather(*(client.post(url, json=body(p, r)) for p, r in chunk))
            for reply in replies:
                reply.raise_for_status()


async def alignkit_client(url: str, prompts: list[str], responses: list[str], concurrency: int) -> None:
    reward = build_api_reward(parse_reward_api({"url": url, "max_concurrency": concurrency, "batch_size": 1}))
    scores = await reward.score(prompts, responses)
    await reward.aclose()
    failed = [s.reason for s in scores if not s.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} failures, e.g. {failed[0]}")


def measure(name: str, run, url: str, server_pid: int, runs: int, n: int) -> float:
    """Print the median wall time and CPU per request (client, judge) of ``runs`` runs of ``run(url)``."""
    walls, cpus, judge_cpus = [], [], []
    for _ in range(runs):
        wall, cpu, judge = time.perf_counter(), time.process_time(), process_cpu_s(server_pid)
        run(url)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        judge_cpus.append(process_cpu_s(server_pid) - judge)
    wall = statistics.median(walls)
    print(
        f"  {name:<40} wall {wall:7.2f} s   client CPU {statistics.median(cpus) / n * 1000:.3f} ms/request"
        f"   (judge CPU {statistics.median(judge_cpus) / n * 1000:.2f} ms/request)"
    )
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-sequential", action="store_true", help="skip (a), the slowest (~51 s per run)")
    args = ap.parse_args()

    n, c = args.pairs, args.concurrency
    prompts = [f"prompt {i}" for i in range(n)]
    responses = [f"a good answer number {i}" for i in range(n)]
    ideal = math.ceil(n / c) * args.latency_ms / 1000
    print(f"{n} pairs, judge latency {args.latency_ms:g} ms, 1 item/request, median of {args.runs} runs")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    print(f"ideal for alignkit: ceil({n}/{c}) x {args.latency_ms:g} ms = {ideal:.2f} s")
    cases = {
        "(a) sequential, 1 request at a time": lambda url: sequential(url, prompts, responses),
        "(b) serial chunks of 4 concurrent": lambda url: asyncio.run(chunks_of_4(url, prompts, responses)),
        f"(c) alignkit, max_concurrency={c}": lambda url: asyncio.run(
            alignkit_client(url, prompts, responses, c)
        ),
    }
    if args.skip_sequential:
        del cases["(a) sequential, 1 request at a time"]
    for kind in ("lean", "alignkit-judge"):
        port = free_port()
        proc = start_judge(kind, port, args.latency_ms)
        print(f"judge: {kind}")
        try:
            for name, run in cases.items():
                if kind == "lean" or name.startswith("(c)"):  # the baselines once
                    wall = measure(name, run, f"http://127.0.0.1:{port}/score", proc.pid, args.runs, n)
            print(f"  alignkit / ideal = {wall / ideal:.3f}  (target <= 1.15)")
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
