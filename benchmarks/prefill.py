"""Prefill time for long prompts: the docs set's prompts and their concatenation, AR mode, one new
token (so the time is the prompt's pass plus one step), best of --repeats after a warm-up.

    python benchmarks/prefill.py --dtype bfloat16 --repeats 3
"""

import argparse
import json
import time
from pathlib import Path

import torch

import orthrus

DOCS = Path(__file__).with_name("prompts") / "docs.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = orthrus.load(None, drafter="none", dtype=args.dtype, device="cpu")
    prompts = [json.loads(line)["prompt"] for line in DOCS.read_text().splitlines() if line.strip()]
    prompts.append(" ".join(prompts) * 2)  # a long one
    llm.generate(prompts[0], max_new_tokens=1, mode="ar")  # warm-up: packs weights, builds kernels
    for prompt in prompts:
        best = min(timed(llm, prompt) for _ in range(args.repeats))
        tokens = len(llm.encode(prompt))
        print(f"{tokens:5d} prompt tokens: {best:6.2f} s ({best / tokens * 1e3:.2f} ms a token)", flush=True)


def timed(llm, prompt: str) -> float:
    start = time.perf_counter()
    llm.generate(prompt, max_new_tokens=1, mode="ar")
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
