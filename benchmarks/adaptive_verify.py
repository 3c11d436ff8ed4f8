"""Adaptive verify against the full block: our AR mode, orthrus verifying every draft, and
orthrus verifying only up to the first unsure draft (--draft-confidence), interleaved per prompt
on the GSM-style eval set, in one process.

    OMP_NUM_THREADS=1 python benchmarks/adaptive_verify.py --prompts 4 --max-new-tokens 64 --confidences 0.5,0.8
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
    p.add_argument("--block-size", type=int, default=None)
    args = p.parse_args()
    llm = orthrus.load(dtype="float32", device="cpu", block_size=args.block_size)
    methods = [("ar", dict(mode="ar")), ("orthrus", {})]
    methods += [(f"orthrus, confidence {c}", dict(draft_confidence=float(c))) for c in args.confidences.split(",")]
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
