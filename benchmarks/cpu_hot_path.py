"""The CPU hot path against the memory floor (issue: few-row kernels).

Measures, in one run and interleaved (so machine noise hits every number alike):
  - read bandwidth (a sum over a buffer twice the weights' size) and the weight-read floor: the
    bytes one decoding step must stream (every weight once) divided by that bandwidth;
  - the AR step (one token) against the floor, and a T-token pass against the AR step, for the
    model's forward over a warm KV cache, in each dtype given;
  - with --compare-plain, the same passes with the kernels off (plain PyTorch), side by side;
  - with --overhead, the same passes with every kernel (the decoder stack included) swapped for a
    stub that only allocates its output: what is left is the Python cost of a pass, the part that
    is neither weight streaming nor arithmetic.

    python benchmarks/cpu_hot_path.py --dtypes float32,bfloat16 --threads 2 --out benchmarks/results/cpu-hot-path

Prints a Markdown table and writes hot_path.json (+ .md) under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import orthrus
from orthrus import kernels
from orthrus.cache import KVCache


def read_bandwidth(nbytes: int, repeats: int) -> float:
    buf = torch.ones(nbytes // 4)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return buf.nbytes / statistics.median(times)


def weight_bytes(model) -> int:
    """Bytes one AR step reads: every AR-view weight once (a tied head counts once; twins not read)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if "_diff" in name or name == "model.mask_embedding" or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name == "model.embed_tokens.weight" and not model.config.tie_word_embeddings:
            continue  # an untied embedding is a lookup of one row, not a read of the table
        total += p.nbytes
    return total


def prefilled_cache(model, context: int) -> tuple[KVCache, torch.Tensor]:
    """A one-row KV cache holding `context` random tokens, with room for a pass of up to 64 more;
    and its row index tensor."""
    cache = KVCache(model.config, 1, context + 64, next(model.parameters()).dtype, "cpu")
    rows = torch.tensor([0])
    with torch.inference_mode():
        window = cache.window(rows, context, bidirectional=False)
        model(torch.randint(0, 1000, (1, context)), window.positions, window, "ar", logits=False)
    cache.lengths[0] = context
    return cache, rows


def pass_timer(model, context: int, view: str = "ar"):
    """A function timing one pass of T tokens in `view` after `context` cached tokens (nothing committed)."""
    cache, rows = prefilled_cache(model, context)

    def run(T: int) -> float:
        tokens = torch.randint(0, 1000, (1, T))
        with torch.inference_mode():
            t = time.perf_counter()
            window = cache.window(rows, T, bidirectional=view == "diffusion")
            model(tokens, window.positions, window, view)
            return time.perf_counter() - t

    return run


class StubKernels:
    """The kernels' interface, computing nothing: a pass through it costs only its dispatch."""

    def pack(self, w):
        return w

    def draft_weight(self, w):
        return w, None

    def linear(self, x, weights, biases, scales, float_out):
        return [x.new_empty(*x.shape[:-1], w.shape[0], dtype=torch.float32 if float_out else x.dtype) for w in weights]

    def rmsnorm(self, x, weight, eps):
        return torch.empty_like(x)

    def rope_(self, x, cos, sin):
        pass

    class DecoderStack:
        def __init__(self, layers, heads, kv_heads, head_dim, eps, int8_drafts):
            pass

        def fresh(self):
            return True

        def forward(self, x, cos, sin, k_cache, v_cache, rows, starts, limits, lasts, diffusion):
            return torch.empty_like(x)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", default="1,2,4,8,16,32")
    ap.add_argument("--context", type=int, default=256, help="cached tokens before each timed pass")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare-plain", action="store_true", help="also time every pass with the kernels off")
    ap.add_argument("--overhead", action="store_true", help="also time every pass with stub kernels (dispatch cost only)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    Ts = [int(t) for t in args.tokens.split(",")]
    if kernels.module() is None:
        sys.exit("the kernels are not available here; nothing to compare")

    timers, floors = {}, {}
    for dtype in args.dtypes.split(","):
        llm = orthrus.load(args.model, drafter="none", dtype=dtype, device="cpu")
        timers[dtype] = pass_timer(llm.model, args.context)
        floors[dtype] = weight_bytes(llm.model)
    paths = ["kernels"] + ["plain"] * args.compare_plain + ["overhead"] * args.overhead
    samples = {(d, k, T): [] for d in timers for k in paths for T in Ts}
    compiled, stub = kernels.module(), StubKernels()
    bandwidth = []
    for rep in range(args.repeats + 1):  # the first round warms up and is dropped
        bandwidth.append(read_bandwidth(2 * max(floors.values()), 1))
        for d, run in timers.items():
            for T in Ts:
                for path in paths:
                    kernels.enabled = path != "plain"
                    kernels._module = stub if path == "overhead" else compiled
                    elapsed = run(T)
                    if rep:
                        samples[d, path, T].append(elapsed)
    kernels.enabled, kernels._module = True, compiled
    bw = statistics.median(bandwidth[1:])
    result = {"threads": args.threads, "context": args.context, "repeats": args.repeats,
              "read_bandwidth_GBps": bw / 1e9, "dtypes": {}}
    lines = [f"read bandwidth {bw / 1e9:.1f} GB/s ({args.threads} threads, median of {args.repeats})", "",
             "| dtype | path | weights MB | floor ms | " + " | ".join(f"T={T} ms" for T in Ts) + " | AR step / floor | "
             + " | ".join(f"T={T} / AR" for T in Ts if T > 1) + " |",
             "|" + "---|" * (5 + 2 * len(Ts))]
    for d in timers:
        floor_ms = floors[d] / bw * 1e3
        result["dtypes"][d] = {"weight_bytes": floors[d], "floor_ms": floor_ms}
        for path in paths:
            ms = {T: statistics.median(samples[d, path, T]) * 1e3 for T in Ts}
            result["dtypes"][d][path] = {"pass_ms": ms, "ar_over_floor": ms[Ts[0]] / floor_ms,
                                         "pass_over_ar": {T: ms[T] / ms[Ts[0]] for T in Ts}}
            lines.append(f"| {d} | {path} | {floors[d] / 1e6:.0f} | {floor_ms:.1f} | "
                         + " | ".join(f"{ms[T]:.1f}" for T in Ts) + f" | {ms[Ts[0]] / floor_ms:.2f} | "
                         + " | ".join(f"{ms[T] / ms[Ts[0]]:.2f}" for T in Ts if T > 1) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "hot_path.json").write_text(json.dumps(result, indent=1))
        (out / "hot_path.md").write_text(f"`python {' '.join(sys.argv)}`\n\n{table}\n")


if __name__ == "__main__":
    main()
