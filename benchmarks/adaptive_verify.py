"""Block size and adaptive verify against our AR mode: orthrus at each block size, verifying every
draft or only up to the first unsure one (--draft-confidence), interleaved per prompt on the
GSM-style eval set, in one process.

    OMP_NUM_THREADS=1 python benchmarks/adaptive_verify.py --prompts 4 --max-new-tokens 64 --confidences 0.5,0.8
    OMP_NUM_THREADS=1 python benchmarks/adaptive_verify.py --block-sizes 4,8,16,32 --confidences 0.5
"""

import argparse
import time

import orthrus
from orthrus.bench.prompts import gsm
from orthrus.engine import acceptance_length


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--confidences", default="0.5,0.8")
    p.add_argument("--block-sizes", default=None, help="comma list (default: the drafter's own)")
    p.add_argument("--drafter", default=None, help="drafter folder (default: the shipped one)")
    args = p.parse_args()
    llm = orthrus.load(drafter=args.drafter, dtype="float32", device="cpu")
    blocks = [int(b) for b in args.block_sizes.split(",")] if args.block_sizes else [llm.block_size]
    confidences = [0.0] + [float(c) for c in args.confidences.split(",") if c]
    methods = [("ar", dict(mode="ar"))]
    methods += [(f"orthrus, block {b}" + (f", confidence {c}" if c else ""), dict(block_size=b, draft_confidence=c))
                for b in blocks for c in confidences]
    totals = {name: [0, 0.0, []] for name, _ in methods}
    prompts = gsm(args.prompts)
    llm.generate(prompts[0], max_new_tokens=8)  # warm-up
    for i, prompt in enumerate(prompts):
        for name, kwargs in methods[i % len(methods):] + methods[: i % len(methods)]:  # rotate the order
            start = time.perf_counter()
            out = llm.generate(prompt, max_new_tokens=args.max_new_tokens, **kwargs)
            totals[name][0] += len(out.token_ids)
            totals[name][1] += time.perf_counter() - start
            totals[name][2] += out.stats.accepted
    ar_speed = totals["ar"][0] / totals["ar"][1]
    print("| method | tok/s | vs AR | tokens per cycle |\n|---|---:|---:|---:|")
    for name, (tokens, seconds, accepted) in totals.items():
        print(f"| {name} | {tokens / seconds:.2f} | {tokens / seconds / ar_speed:.2f}x | {acceptance_length(accepted):.2f} |")


if __name__ == "__main__":
    main()
