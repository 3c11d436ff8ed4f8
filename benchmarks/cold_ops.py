"""What the first torch ops after a forward pass cost: each op timed right after a pass and again
at once, on the CPU kernels' path (the pass streams the weights through the caches, so an op's code
and data may have to come back from memory). Pause background jobs first.

    python benchmarks/cold_ops.py --tokens 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from cpu_hot_path import prefilled_cache

import orthrus
from orthrus import kernels


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=5, help="tokens of the AR pass before each op")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = orthrus.load(None, dtype="bfloat16", device="cpu")
    model = llm.model
    cache, rows = prefilled_cache(model, args.context)
    tokens = torch.randint(0, 1000, (1, args.tokens))
    ops = {"torch.arange(5)": lambda: torch.arange(5), "model.embed": lambda: model.embed(tokens),
           "kernels.decoder_stack (freshness check)": lambda: kernels.decoder_stack(model)}
    after, again = {name: [] for name in ops}, {name: [] for name in ops}
    with torch.inference_mode():
        window = cache.window(rows, args.tokens, bidirectional=False)
        for _ in range(args.rounds):
            for name, op in ops.items():
                model(tokens, window.positions, window, "ar")
                for times in (after, again):
                    start = time.perf_counter()
                    op()
                    times[name].append(time.perf_counter() - start)
    print("| op | right after a pass, us | again, us |\n|---|---:|---:|")
    for name in ops:
        print(f"| {name} | {statistics.median(after[name]) * 1e6:.1f} | {statistics.median(again[name]) * 1e6:.1f} |")


if __name__ == "__main__":
    main()
