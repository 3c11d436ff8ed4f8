"""Why orthrus.model.Linear sends a handful of fp32 rows through W @ x^T on CPU: the time of every
linear layer of SmolLM2-135M (30 layers x q, k, v, o, gate, up, down, then the LM head) for a few
rows, as nn.functional.linear (x @ W^T) and as W @ x^T. Weights are 0.5 GB, far past the caches,
as in decoding. Median of repeats, 1 thread by default.

    python benchmarks/cpu_small_linear.py [--rows 1,2,3,4,6,8,12,16] [--threads 1]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

HIDDEN, KV, INTERMEDIATE, LAYERS, VOCAB = 576, 192, 1536, 30, 49152


def median_ms(fn, repeats: int = 9) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,3,4,6,8,12,16")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
              (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)] * LAYERS + [(VOCAB, HIDDEN)]
    weights = [torch.randn(s) for s in shapes]
    print(f"| rows | x @ W^T (ms) | W @ x^T (ms) | ratio |\n|---:|---:|---:|---:|")
    for rows in map(int, args.rows.split(",")):
        inputs = {k: torch.randn(rows, k) for k in (HIDDEN, INTERMEDIATE)}
        plain = median_ms(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights])
        swapped = median_ms(lambda: [torch.mm(w, inputs[w.shape[1]].t()).t() for w in weights])
        print(f"| {rows} | {plain:.1f} | {swapped:.1f} | {plain / swapped:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
