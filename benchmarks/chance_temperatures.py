"""Fit a drafter's chance temperatures (`trainer.fit_chance_temperatures`: per draft position, the
temperature at which its distribution gives the chance that greedy verification keeps a draft) on a
data folder's held-out rows, as `orthrus train --export` does for a new drafter. `--write` stores
them in the drafter's config.json (how the shipped drafter got its own):

    python benchmarks/chance_temperatures.py --drafter orthrus/drafters/smollm2-135m-instruct \\
        --data data/distill/smollm2 --write
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import orthrus
from orthrus.training.data import shard_files
from orthrus.training.trainer import CHANCE_FIT_ROWS, TrainConfig, eval_set, fit_chance_temperatures


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", required=True, help="a drafter folder")
    ap.add_argument("--data", required=True, help="a distilled data folder (its held-out rows are used)")
    ap.add_argument("--rows", type=int, default=CHANCE_FIT_ROWS, help="held-out packed rows of 512 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="store them in the drafter's config.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = orthrus.load(drafter=args.drafter, dtype="float32", device="cpu")
    cfg = TrainConfig(data=args.data, seq_len=512, eval_rows=args.rows)
    held = eval_set(cfg, [p.name for p in shard_files(Path(args.data))])
    temperatures = fit_chance_temperatures(llm.model, held, llm.block_size)
    print(f"{args.drafter}: chance temperatures {temperatures} (draft positions 1..{llm.block_size - 1}, "
          f"{len(held)} held-out rows of {args.data})")
    if args.write:
        path = Path(args.drafter) / "config.json"
        config = json.loads(path.read_text())
        config["chance_temperatures"] = temperatures
        path.write_text(json.dumps(config, indent=2) + "\n")
        print(f"written to {path}")


if __name__ == "__main__":
    main()
