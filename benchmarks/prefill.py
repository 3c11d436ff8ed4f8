"""Prefill time for long prompts: the docs set's prompts and their concatenation, AR mode, one new
token (so the time is the prompt's pass plus one step), best of --repeats after a warm-up; with
--chunks, each prompt under each prefill chunk size in turn (what the engine takes per pass).

    python benchmarks/prefill.py --dtype bfloat16 --repeats 3 [--chunks 1024,64]
"""

import argparse
import json
import time
from pathlib import Path

import torch

import orthrus
from orthrus import engine

DOCS = Path(__file__).with_name("prompts") / "docs.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunks", default=None, help="comma-separated prompt tokens per prefill pass to compare "
                    "(default: the engine's own choice)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = orthrus.load(None, drafter="none", dtype=args.dtype, device="cpu")
    prompts = [json.loads(line)["prompt"] for line in DOCS.read_text().splitlines() if line.strip()]
    prompts.append(" ".join(prompts) * 2)  # a long one
    llm.generate(prompts[0], max_new_tokens=1, mode="ar")  # warm-up: packs weights, builds kernels
    chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else [None]
    choose = engine.prefill_chunk
    for prompt in prompts:
        tokens, cells = len(llm.encode(prompt)), []
        for chunk in chunks:
            engine.prefill_chunk = choose if chunk is None else (lambda model, chunk=chunk: chunk)
            best = min(timed(llm, prompt) for _ in range(args.repeats))
            cells.append(f"{'engine' if chunk is None else chunk}: {best:6.2f} s ({best / tokens * 1e3:.2f} ms a token)")
        print(f"{tokens:5d} prompt tokens: " + "; ".join(cells), flush=True)


def timed(llm, prompt: str) -> float:
    start = time.perf_counter()
    llm.generate(prompt, max_new_tokens=1, mode="ar")
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
