"""Bounded load test of `orthrus serve`: N streaming chat clients for a fixed duration, localhost only.

Starts one server per --max-batch value (or uses --url, which must be on this machine), runs the
clients against it, and prints one markdown table row per configuration: requests, errors, server
errors (5xx, broken streams, `requests_total{outcome="error"}`), generated tokens per second, mean
time to first token and mean request latency. `--max-batch 8 1` compares batched serving with
one request at a time.

    nice -n 10 python benchmarks/load_test.py --clients 8 --duration 30 --max-batch 8 1 --drafter none
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import httpx
import openai

PROMPTS = [  # plain everyday requests (no benchmark set's prompts)
    "Write a short story about a lighthouse keeper.", "Explain how a bicycle gear works.",
    "Give me a recipe for pancakes.", "Describe the water cycle.", "What makes a good team leader?",
    "Write a poem about city rain.", "How do vaccines train the immune system?", "Plan a one-day trip to a museum.",
    "Explain what a database index is.", "Why is the ocean salty?", "Describe a sunrise to someone who never saw one.",
    "List tips for learning a new language.",
]
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class Tally:
    def __init__(self):
        self.requests = self.errors = self.server_errors = self.tokens = 0
        self.ttft: list[float] = []
        self.latency: list[float] = []


async def client_loop(client: openai.AsyncOpenAI, model: str, index: int, deadline: float, max_tokens: int, tally: Tally):
    """One client: requests back to back until the deadline (the last one is allowed to finish)."""
    turn = 0
    while time.perf_counter() < deadline:
        prompt = PROMPTS[(index + turn) % len(PROMPTS)]
        turn += 1
        start, first, usage = time.perf_counter(), None, None
        try:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter()
                usage = chunk.usage or usage
        except openai.APIStatusError as e:
            tally.errors += 1
            tally.server_errors += e.status_code >= 500
            continue
        except openai.APIError:  # a broken stream or connection: the server's fault on localhost
            tally.errors += 1
            tally.server_errors += 1
            continue
        tally.requests += 1
        tally.tokens += usage.completion_tokens
        tally.latency.append(time.perf_counter() - start)
        if first is not None:
            tally.ttft.append(first - start)


def metric(url: str, name: str, **labels) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        match = re.fullmatch(r"([^{\s]+)(?:\{(.*)\})? (\S+)", line)
        if match and match[1] == name and all(f'{k}="{v}"' in (match[2] or "") for k, v in labels.items()):
            total += float(match[3])
    return total


async def run_load(url: str, api_key: str, clients: int, duration: float, max_tokens: int) -> tuple[Tally, float]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    tally = Tally()
    start = time.perf_counter()
    await asyncio.gather(*(client_loop(client, model, i, start + duration, max_tokens, tally) for i in range(clients)))
    return tally, time.perf_counter() - start


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "orthrus", "serve", "--host", "127.0.0.1", "--port", str(port), "--api-key", args.api_key,
               "--max-batch", str(max_batch), "--max-queue", str(args.clients), "--dtype", args.dtype, "--device", args.device,
               "--mode", args.mode]
    for option in ("model", "drafter", "block_size"):
        if getattr(args, option) is not None:
            command += ["--" + option.replace("_", "-"), str(getattr(args, option))]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    sys.exit(f"load_test: the server with --max-batch {max_batch} did not start: {' '.join(command)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server on this machine (default: start one per --max-batch)")
    p.add_argument("--api-key", default="load-test")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=30.0, help="seconds during which clients start requests")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, nargs="+", default=[8, 1], help="one run per value (ignored with --url)")
    p.add_argument("--model", default=None)
    p.add_argument("--drafter", default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--mode", choices=["orthrus", "ar"], default="orthrus")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.url and urlparse(args.url).hostname not in LOCAL_HOSTS:
        sys.exit("load_test: only a server on localhost may be load-tested")
    if not (1 <= args.clients <= 256 and 0 < args.duration <= 600):
        sys.exit("load_test: --clients must be in [1, 256] and --duration in (0, 600] seconds")

    print("| max batch | clients | duration (s) | requests | errors | server errors | generated tok/s | mean TTFT (s) | mean latency (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for max_batch in [None] if args.url else args.max_batch:
        server, url = (None, args.url.rstrip("/")) if args.url else start_server(args, max_batch)
        try:
            tally, seconds = asyncio.run(run_load(url, args.api_key, args.clients, args.duration, args.max_tokens))
            server_errors = tally.server_errors + int(metric(url, "orthrus:requests_total", outcome="error"))
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=60)
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
        print(f"| {max_batch or 'server'} | {args.clients} | {seconds:.1f} | {tally.requests} | {tally.errors} | {server_errors} | "
              f"{tally.tokens / seconds:.1f} | {mean(tally.ttft):.2f} | {mean(tally.latency):.2f} |", flush=True)


if __name__ == "__main__":
    main()
