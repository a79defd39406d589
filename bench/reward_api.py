"""Throughput of HTTP judge scoring: sequential vs chunks of 4 vs alignkit's concurrent client.

512 (prompt, response) pairs, a judge that takes 100 ms per request, one item per request.
The judge runs in its own process so the client's CPU time is measured alone. Prints figures;
asserts nothing. Run: ``.venv/bin/python bench/reward_api.py`` (about 3.5 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import socket
import statistics
import subprocess
import sys
import time

import httpx

from alignkit.rewards.api import RewardApiConfig, build_api_reward


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_judge(port: int, latency_ms: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "alignkit.judge.server", "--port", str(port), "--latency-ms", str(latency_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    for _ in range(200):  # up to 20 s
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("judge server did not start")


def pairs(n: int) -> tuple[list[str], list[str]]:
    return [f"prompt {i}" for i in range(n)], [f"a good answer number {i}" for i in range(n)]


def body(p: str, r: str) -> dict:
    return {"items": [{"prompt": p, "response": r, "label": None}]}


def sequential(url: str, prompts: list[str], responses: list[str]) -> None:
    with httpx.Client(timeout=30) as client:
        for p, r in zip(prompts, responses, strict=True):
            client.post(url, json=body(p, r)).raise_for_status()


async def chunks_of_4(url: str, prompts: list[str], responses: list[str]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(0, len(prompts), 4):
            replies = await asyncio.gather(
                *(client.post(url, json=body(p, r)) for p, r in zip(prompts[i : i + 4], responses[i : i + 4]))
            )
            for reply in replies:
                reply.raise_for_status()


async def alignkit_client(url: str, prompts: list[str], responses: list[str], concurrency: int) -> None:
    reward = build_api_reward(RewardApiConfig(url=url, max_concurrency=concurrency, batch_size=1))
    scores = await reward.score(prompts, responses)
    await reward.aclose()
    failed = [s.reason for s in scores if not s.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} failures, e.g. {failed[0]}")


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-sequential", action="store_true", help="skip (a), the slowest (~51 s per run)")
    args = ap.parse_args()

    port = free_port()
    proc = start_judge(port, args.latency_ms)
    url = f"http://127.0.0.1:{port}/score"
    prompts, responses = pairs(args.pairs)
    cases = {
        "(a) sequential, 1 request at a time": lambda: sequential(url, prompts, responses),
        "(b) serial chunks of 4 concurrent": lambda: asyncio.run(chunks_of_4(url, prompts, responses)),
        f"(c) alignkit, max_concurrency={args.concurrency}": lambda: asyncio.run(
            alignkit_client(url, prompts, responses, args.concurrency)
        ),
    }
    if args.skip_sequential:
        del cases["(a) sequential, 1 request at a time"]
    try:
        print(f"{args.pairs} pairs, judge latency {args.latency_ms:g} ms, 1 item/request, median of {args.runs} runs")
        results = {}
        for name, fn in cases.items():
            runs = [timed(fn) for _ in range(args.runs)]
            wall = statistics.median(w for w, _ in runs)
            cpu_ms = statistics.median(c for _, c in runs) / args.pairs * 1000
            results[name] = wall
            print(f"  {name:<40} wall {wall:7.2f} s   client CPU {cpu_ms:.3f} ms/request")
        ideal = math.ceil(args.pairs / args.concurrency) * args.latency_ms / 1000
        ours = results[f"(c) alignkit, max_concurrency={args.concurrency}"]
        print(f"  ideal ceil({args.pairs}/{args.concurrency}) x {args.latency_ms:g} ms = {ideal:.2f} s")
        print(f"  alignkit / ideal = {ours / ideal:.3f}  (target <= 1.15)")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
