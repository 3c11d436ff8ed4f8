"""Held-out acceptance of several drafters on the held-out rows of several data folders, in one
process (issue 11's data-mix comparison).

A training run measures itself on the held-out rows of its own data only, so a run on ShareGPT's
text and a run on the model's own replies report numbers that cannot be compared. This measures
every drafter on every data's held-out rows, with the trainer's own `evaluate` (simulated greedy
acceptance of anchor blocks whose drafts all lie in a reply, same anchors for every drafter; and
the tokens a cycle on the anchors greedy decoding with each drafter visits, `walk_anchors`).

    python benchmarks/heldout_acceptance.py --data data/distill/smollm2 sharegpt-text \\
        --drafters orthrus/drafters/smollm2-135m-instruct /tmp/text-export /tmp/self-export

`--by-source` measures each source's held-out rows (chat, math, code) apart.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import orthrus
from orthrus.checkpoint import load_drafter
from orthrus.hub import cache_dir
from orthrus.training.data import pack, read_shards, shard_files, split_held_out
from orthrus.training.trainer import TrainConfig, eval_set, evaluate


def data_folder(name: str) -> Path:
    return Path(name) if Path(name).is_dir() else cache_dir() / "distill" / name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True, help="data folders (or names under the cache's distill/)")
    ap.add_argument("--drafters", nargs="+", required=True, help="drafter folders")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--rows", type=int, default=16, help="held-out packed rows of 512 tokens per data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--by-source", action="store_true", help="each source's held-out rows apart")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    held = {}
    for name in args.data:
        folder = data_folder(name)
        cfg = TrainConfig(data=str(folder), block_size=args.block_size, seq_len=512, anchors=128, eval_rows=args.rows)
        files = [p.name for p in shard_files(folder)]
        if not args.by_source:
            held[name] = (cfg, eval_set(cfg, files))
            continue
        _, rows = split_held_out(read_shards(folder, files))
        for source in sorted({r["source"] for r in rows}):
            packed = pack([r for r in rows if r["source"] == source], cfg.seq_len)
            held[f"{name} {source}"] = (cfg, packed.select(list(range(min(args.rows, len(packed))))))
    print("| drafter | " + " | ".join(f"{name} acceptance | on decoding's anchors | per position" for name in held) + " |")
    print("|---|" + "---:|---:|---|" * len(held))
    llm = orthrus.load(drafter="none", dtype="float32", device="cpu")  # the base once; each drafter swaps its twins in
    for drafter in args.drafters:
        load_drafter(llm.model, drafter)
        cells = []
        for name, (cfg, rows) in held.items():
            result = evaluate(llm.model, rows, cfg)
            cells.append(f"{result['acceptance']:.3f} ({result['eval_blocks']} blocks) | {result['walk_acceptance']:.3f} | "
                         f"{result['per_position']}")
        print(f"| {drafter} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
