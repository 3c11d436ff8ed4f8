"""The draft pass's head alone: the default model's head (the drafts' int8 copy, as the engine
runs it) over 3 and 4 rows, for every token and for the N tokens the repo's distilled replies use
most (a drafter's `draft_vocab`, `orthrus train --export ... --export-draft-vocab N`); then the
whole draft pass as the engine runs it (`model.draft`: the head over the 3 rows that draft) and as
the diffusion view's forward with every row's logits, alternating, after 256 cached tokens:

    [ORTHRUS_ISA=avx2] python benchmarks/draft_head.py --vocab 8192,16384

Medians of 200 products or passes, ms, 2 threads. Pause background jobs first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from cpu_hot_path import prefilled_cache

import orthrus
from orthrus import kernels
from orthrus.model import Linear
from orthrus.training.data import frequent_tokens, read_shards

DATA = Path(__file__).resolve().parent.parent / "data" / "distill" / "smollm2"


def head_ms(head: Linear, rows: int, repeats: int) -> float:
    x = torch.randn(1, rows, head.in_features).to(head.weight.dtype)
    times = []
    for i in range(repeats + 10):  # the first ten warm up (the first packs the weight)
        start = time.perf_counter()
        kernels.linear(x, head, int8=True, float_out=True)
        if i >= 10:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", default="16384", help="draft vocabulary sizes to time beside the full head")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if kernels.module() is None:
        raise SystemExit("the CPU kernels are off on this machine: nothing to time")
    llm = orthrus.load(None, dtype="bfloat16", device="cpu", draft_dtype="int8")
    rows = read_shards(DATA)
    heads = {"every token": llm.model.lm_head}
    for n in map(int, args.vocab.split(",")):
        llm.model.draft_vocab = frequent_tokens(rows, n, sorted(llm.stop_token_ids))
        heads[f"{n} most used"] = llm.model.draft_head()
    print(f"| draft head ({kernels.isa()} build) | 3 rows, ms | 4 rows, ms |\n|---|---:|---:|")
    for name, head in heads.items():
        print(f"| {name} | {head_ms(head, 3, args.repeats):.3f} | {head_ms(head, 4, args.repeats):.3f} |")

    model = llm.model
    model.draft_vocab = None
    cache, rows = prefilled_cache(model, 256)
    block = torch.tensor([[100] + [model.mask_token_id] * 3])
    passes = {"model.draft (3 rows' head)": lambda w: model.draft(block, w.positions, w),
              "diffusion forward (4 rows' head)": lambda w: model(block, w.positions, w, "diffusion")}
    times = {name: [] for name in passes}
    with torch.inference_mode():
        for i in range(args.repeats + 10):
            for name, run in passes.items():
                start = time.perf_counter()
                run(cache.window(rows, 4, bidirectional=True))
                if i >= 10:
                    times[name].append(time.perf_counter() - start)
    print("\n| draft pass, 256 cached | ms |\n|---|---:|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t) * 1e3:.3f} |")


if __name__ == "__main__":
    main()
