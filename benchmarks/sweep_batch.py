"""Decode throughput against batch size (1 to 32), orthrus vs AR: MT-Bench first turns, decoded
together in one engine, every row emitting --max-new-tokens tokens.

    nice -n 10 python benchmarks/sweep_batch.py --drafter none --batches 1,2,4,8,16,32 --out sweep_batch.json
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--batches", default="1,2,4,8,16,32", help="comma-separated batch sizes")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", default="sweep_batch.json")
    args = p.parse_args()
    llm = orthrus.load(args.model, drafter=args.drafter, dtype=args.dtype, device=args.device, block_size=args.block_size)
    block = llm.block_size
    batches = [int(b) for b in args.batches.split(",")]
    prompts = [llm.encode(chat) for chat in mtbench(max(batches))]
    timed_decode(llm.model, prompts[:2], "orthrus", block, 4)  # warm-up
    rows = compare_modes(llm.model, batches, lambda batch: prompts[:batch], block, args.max_new_tokens, "batch")
    save_sweep(args.out, llm, args.max_new_tokens, rows)
    print("| batch | AR tok/s | orthrus tok/s | speedup | AR ms/step | orthrus ms/cycle | acceptance length | KV MiB AR | KV MiB orthrus |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ar, o = r["ar"], r["orthrus"]
        print(f"| {r['batch']} | {ar['decode_tokens_per_second']:.1f} | {o['decode_tokens_per_second']:.1f} | {r['speedup']:.2f}x "
              f"| {ar['ms_per_step']:.1f} | {o['ms_per_step']:.1f} | {o['tokens_per_cycle']:.2f} "
              f"| {ar['kv_bytes'] / 2**20:.2f} | {o['kv_bytes'] / 2**20:.2f} |")
    print(f"peak RSS of the process: {rows[-1]['orthrus']['peak_memory_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
