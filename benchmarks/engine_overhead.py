"""The engine's own time: wall time of `generate` minus the time spent in the model's forward
passes, per cycle (Orthrus) or per step (AR). What sampling, acceptance, the planner, the cache
bookkeeping and text decoding cost on top of the passes.

    python benchmarks/engine_overhead.py --max-new-tokens 128 --repeats 2

Pause background jobs first.
"""

from __future__ import annotations

import argparse
import time

import torch

import orthrus

PROMPTS = [
    "Explain how binary search works, with Python code.",
    "Write a short story about a robot learning to paint.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    llm = orthrus.load(None)
    in_forward = [0.0]
    forward = type(llm.model).forward

    def timed_forward(self, *a, **k):
        start = time.perf_counter()
        try:
            return forward(self, *a, **k)
        finally:
            in_forward[0] += time.perf_counter() - start

    type(llm.model).forward = timed_forward
    llm.generate(PROMPTS[0], max_new_tokens=16)  # warm up
    for mode in ("orthrus", "ar"):
        for _ in range(args.repeats):
            in_forward[0], cycles, tokens = 0.0, 0, 0
            start = time.perf_counter()
            for prompt in PROMPTS:
                out = llm.generate(prompt, max_new_tokens=args.max_new_tokens, mode=mode)
                cycles, tokens = cycles + out.stats.cycles, tokens + len(out.token_ids)
            total = time.perf_counter() - start
            print(f"{mode}: {tokens / total:.1f} tok/s; per cycle {total / cycles * 1e3:.2f} ms, in forward passes "
                  f"{in_forward[0] / cycles * 1e3:.2f} ms, outside them {(total - in_forward[0]) / cycles * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
