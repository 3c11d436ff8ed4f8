"""Decode throughput against context length, orthrus vs AR, batch 1: does the speedup hold as the
context grows? Also the cost of one orthrus cycle relative to one AR step (the acceptance length
at which orthrus breaks even) and the KV cache each mode allocates.

    nice -n 10 python benchmarks/sweep_context.py --drafter none --contexts 1024,2048,4096,8192 --out sweep_context.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orthrus  # noqa: E402
from orthrus.bench.prompts import mtbench  # noqa: E402
from orthrus.bench.sweeps import compare_modes, save_sweep, timed_decode  # noqa: E402
from orthrus.cli import add_model_args  # noqa: E402


def context_prompt(llm, length: int) -> list[int]:
    """`length` tokens of natural text: MT-Bench questions, repeated as needed."""
    text = "\n\n".join(chat[0]["content"] for chat in mtbench(80))
    ids = llm.encode(text)
    return (ids * (length // len(ids) + 1))[:length]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--contexts", default="1024,2048,4096,8192", help="comma-separated prompt lengths in tokens")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", default="sweep_context.json")
    args = p.parse_args()
    llm = orthrus.load(args.model, drafter=args.drafter, dtype=args.dtype, device=args.device, block_size=args.block_size)
    block = llm.block_size
    limit = llm.model.config.max_position_embeddings - args.max_new_tokens - block
    contexts = sorted({min(int(c), limit) for c in args.contexts.split(",")})
    timed_decode(llm.model, [context_prompt(llm, 64)], "orthrus", block, 4)  # warm-up
    rows = compare_modes(llm.model, contexts, lambda length: [context_prompt(llm, length)], block, args.max_new_tokens,
                         "context")
    save_sweep(args.out, llm, args.max_new_tokens, rows)
    print("| context | AR tok/s | orthrus tok/s | speedup | AR ms/step | orthrus ms/cycle | cycle cost (AR steps) "
          "| acceptance length | KV MiB AR | KV MiB orthrus | prefill s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ar, o = r["ar"], r["orthrus"]
        print(f"| {r['context']} | {ar['decode_tokens_per_second']:.1f} | {o['decode_tokens_per_second']:.1f} | {r['speedup']:.2f}x "
              f"| {ar['ms_per_step']:.1f} | {o['ms_per_step']:.1f} | {r['cycle_cost_in_ar_steps']:.2f} | {o['tokens_per_cycle']:.2f} "
              f"| {ar['kv_bytes'] / 2**20:.1f} | {o['kv_bytes'] / 2**20:.1f} | {ar['prefill_seconds']:.2f} |")
    print(f"peak RSS of the process: {rows[-1]['orthrus']['peak_memory_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
